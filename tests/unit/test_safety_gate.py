"""The safety gate of online learning (seed 001 Innovation #4, learners/safety.py): the 80% rule for
positive, negative and zero baselines at its boundary; the recent window read from a batch's
joint.action events (its rewards, reset seeds and offsets); and the gate in the one training loop
on MatchTarget through MemoryTransport, where an update whose learning rate is corrupted is rolled
back to the signed checkpoint (weights hash equal), recorded as policy.rollback on the policy chain
with the window's offsets, the chain still verifies and replays, and good updates are accepted."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from eventlog.verify import verify_records
from learners.checkpoint import CheckpointError, load_checkpoint
from learners.mappo import MAPPO, MAPPOConfig
from learners.online import MemoryTransport
from learners.replay import ReplayError, read_records_of_run, records_from_memory
from learners.safety import SafetyGate, candidate_score, decision_rewards, passes, recent_window, threshold
from ledger.ingest import decode_rows
from marlgrc.training import spec_of, train_on_env
from producers.harness import run_episodes
from tests.unit.test_learners_support import MatchTarget

CODEC = default_codec()


# --- the rule ----------------------------------------------------------------------------------------
def test_positive_baseline_refuses_below_80_percent_and_accepts_exactly_80():
    assert threshold(10.0, 0.8) == 8.0
    assert passes(8.0, 10.0) and passes(12.0, 10.0)
    assert not passes(np.nextafter(8.0, 0.0), 10.0)
    assert not passes(7.9, 10.0)


def test_negative_baseline_allows_losing_20_percent_of_its_magnitude():
    # a naive 0.8 * baseline (-8) would refuse the candidate -9, which is only 10% worse
    assert threshold(-10.0, 0.8) == -12.0
    assert passes(-12.0, -10.0) and passes(-9.0, -10.0) and passes(-5.0, -10.0)
    assert not passes(np.nextafter(-12.0, -13.0), -10.0)
    assert not passes(-12.5, -10.0)
    # the same allowance either side of zero: |baseline| * (1 - ratio)
    for b in (3.0, -3.0, 0.25, -0.25):
        assert math.isclose(b - threshold(b, 0.8), 0.2 * abs(b))


def test_zero_baseline_refuses_any_loss_and_nan_never_passes():
    assert passes(0.0, 0.0) and passes(1e-12, 0.0)
    assert not passes(-1e-12, 0.0)
    assert not passes(float("nan"), 1.0) and not passes(-math.inf, -1.0)


def test_other_ratios_and_a_ratio_out_of_range():
    assert threshold(10.0, 1.0) == 10.0 and threshold(-10.0, 1.0) == -10.0  # no degradation at all
    assert threshold(10.0, 0.5) == 5.0 and threshold(-10.0, 0.5) == -15.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            threshold(1.0, bad)


def test_candidate_score_is_the_mean_of_the_last_n_decisions():
    assert candidate_score([[1, 2, 3], [4, 5]], 3) == 4.0
    assert candidate_score([[1, 2, 3], [4, 5]], 10) == 3.0
    assert math.isnan(candidate_score([], 5))


# --- the window ----------------------------------------------------------------------------------
class ArgmaxSometimes:
    """A deterministic policy: names the target unless its first observation entry is set."""

    version = "argmax-sometimes"

    def act(self, observations, state=None):
        return {a: (1 if o[0] > 0.5 else int(np.argmax(o)), 0.0) for a, o in observations.items()}


def _batches(run_id="w1", seeds=(100, 200), episodes=3):
    """Two batches of a run, as the loop writes them: a log (producer id) and run.started each."""
    sink, env = MemorySink(), MatchTarget()
    heads = {}
    for b, seed in enumerate(seeds):
        log = EventLog(sink, run_id=run_id, producer_id=f"harness-{b}")
        for k, h in heads.items():
            log.writer(*k, head=h)
        run_episodes(env, ArgmaxSometimes(), log, episodes=episodes, seed=seed, env_id="match_target_v0",
                     env_version="0", config={})
        log.close()
        heads.update(log.heads())
    return records_from_memory(sink.sent)


def test_the_window_is_the_last_decisions_with_their_seeds_and_offsets():
    records = _batches()
    actions = [r for r in records if r.topic == "marl.joint.action"]
    decoded = [CODEC.decode(r.value)[1] for r in actions]
    # MatchTarget: 2 agents x 8 steps = 16 decisions an episode; 40 = the second batch's last 2.5 episodes
    w = recent_window(records, "w1", 40)
    assert len(w) == 40
    assert list(w.rewards) == [a["reward"] for rec in decoded for a in rec["actions"]][-40:]
    assert w.reset_seeds == (200, 201, 202)  # episodes 0..2 of the batch whose run.started has seed 200
    assert recent_window(records, "w1", 32).reset_seeds == (201, 202)
    (lin,) = w.lineage
    assert (lin.topic, lin.chain_id, lin.last_offset) == ("marl.joint.action", "w1:actions", actions[-1].offset)
    assert lin.first_offset == actions[-20].offset and lin.last_seq - lin.first_seq == 19
    assert lin.head_event_hash == actions[-1].value[-32:]
    # an odd window starts inside a step, with its last agent
    w41 = recent_window(records, "w1", 41)
    assert w41.rewards[1:] == w.rewards and w41.lineage[0].first_offset == actions[-21].offset
    # the window across both batches names each batch's seeds
    assert recent_window(records, "w1", 16 * 4).reset_seeds == (102, 200, 201, 202)
    assert len(recent_window(records, "w1", 10_000)) == 16 * 6
    assert len(recent_window(records, "other", 10)) == 0


def test_re_running_the_window_with_the_same_policy_gives_its_rewards_exactly():
    records = _batches()
    for size in (16, 40, 41, 96):
        w = recent_window(records, "w1", size)
        again = decision_rewards(MatchTarget(), ArgmaxSometimes(), w.reset_seeds)
        assert candidate_score(again, len(w)) == w.baseline
        assert [x for ep in again for x in ep][-size:] == list(w.rewards)


def test_a_window_whose_run_started_was_not_read_is_refused():
    records = [r for r in _batches() if not (r.topic == "marl.run.lifecycle" and r.offset == 0)]
    with pytest.raises(ReplayError, match="harness-0"):
        recent_window(records, "w1", 16 * 4)
    assert len(recent_window(records, "w1", 16 * 3)) == 48  # batch 2 alone is fine


# --- the gate in the training loop ---------------------------------------------------------------
class CorruptedOnce(MAPPO):
    """MAPPO whose learning rate is corrupted for its 4th update call: sign flipped and raised to 0.05
    (gradient ascent on the PPO loss, i.e. away from the rewarded actions). The optimizer's own rate is
    put back afterwards, so the checkpoints before and after hold the right one."""

    calls = 0
    bad_call = 4

    def update(self, replay):
        self.calls += 1
        if self.calls != self.bad_call:
            return super().update(replay)
        group = self.optimizer.param_groups[0]
        lr, group["lr"] = group["lr"], -0.05
        try:
            return super().update(replay)
        finally:
            group["lr"] = lr


KEY = Ed25519PrivateKey.from_private_bytes(b"g" * 32)
SIGNER = Signer.from_seed(b"safety-gate-test")


def _train(tmp_path: Path, continuous: bool, iterations: int = 5):
    torch.set_num_threads(1)
    env = MatchTarget(continuous=continuous)
    run_id = f"gate-{'c' if continuous else 'd'}"
    learner = CorruptedOnce(spec_of(env, run_id, "match_target_v0", "0", 1), MAPPOConfig(seed=1, learning_rate=3e-3))
    gate = SafetyGate(MatchTarget(continuous=continuous), checkpoint=tmp_path / "pre-update", key=KEY, window=100)
    transport = MemoryTransport()
    seen = []

    def on_update(row):  # the learner right after each verdict, and the checkpoint on disk at that time
        _, meta = load_checkpoint(gate.checkpoint, KEY.public_key())
        seen.append((row, learner.weights_sha256().hex(), meta["weights_sha256"], learner.version,
                     learner.optimizer.param_groups[0]["lr"]))

    res = train_on_env(env, "match_target_v0", "0", "mappo", transport=transport, iterations=iterations, seed=1,
                       run_id=run_id, learner=learner, signer=SIGNER, public_key=SIGNER.public_key,
                       decisions_per_update=200, gate=gate, on_update=on_update)
    return res, gate, transport, seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("continuous", [False, True], ids=["positive-rewards", "negative-rewards"])
def test_a_bad_update_is_rolled_back_to_the_signed_checkpoint_and_recorded_on_the_policy_chain(tmp_path, continuous):
    res, gate, transport, seen = _train(tmp_path, continuous)
    verdicts = [row["gate"] for row, *_ in seen]
    # good updates are kept; the corrupted 4th is refused
    assert verdicts[:4] == ["accepted"] * 3 + ["rolled back"], [(r["gate"], r["gate_baseline"], r["gate_candidate"])
                                                                 for r, *_ in seen]
    if not continuous:  # and the next (the right learning rate again) is kept. In the continuous case a
        # 100-decision window refuses it by chance (baseline -0.314, candidate -0.397): the window is small
        assert verdicts[4] == "accepted"
    # MatchTarget discrete pays 0 or 1 per decision, continuous -|a - target|: both signs are covered
    assert all((r["gate_baseline"] > 0) != continuous for r, *_ in seen)
    # every update learned from >= 200 decisions: 13 episodes of 16 decisions (the first: 1 + 12)
    assert all(r["decisions"] == 208 for r, *_ in seen)
    row, now, ckpt, version, _ = seen[3]
    assert row["gate_candidate"] < row["gate_threshold"] == threshold(row["gate_baseline"], 0.8)
    assert now == ckpt == seen[2][1]                 # restored bit for bit: the weights before the update
    assert version == seen[2][3]                     # the deployed version again
    for (r, after, before, *_) in seen:  # an accepted update moved the weights; a refused one did not
        assert (after != before) == (r["gate"] == "accepted")

    # the policy chain: each update's policy.update, a refused one's followed by its policy.rollback
    sent = records_from_memory(transport.sink.sent)
    chain = [(r, *CODEC.decode(r.value)) for r in sent if r.key == f"{res.run_id}:policy:mappo"]
    assert [n for _, n, _ in chain] == [n for v in verdicts for n in
                                        ["policy_update"] + ["policy_rollback"] * (v == "rolled back")]
    refused, (_, _, rb) = chain[3][2], chain[4]
    assert rb["prev_event_hash"] == refused["event_hash"] == rb["rejected_update_event_hash"] == res.update_hashes[3]
    assert rb["event_hash"] == res.rollback_hashes[0] and len(res.rollback_hashes) == verdicts.count("rolled back")
    assert rb["rejected_policy_version"] == refused["policy_version"]
    assert rb["rejected_weights_sha256"] == refused["weights_sha256"] != rb["checkpoint_weights_sha256"]
    assert rb["checkpoint_weights_sha256"].hex() == ckpt == chain[2][2]["weights_sha256"].hex()
    assert rb["policy_version"] == rb["restored_policy_version"] == chain[2][2]["policy_version"]
    assert chain[5][2]["parent_policy_version"] == rb["restored_policy_version"]
    assert (rb["baseline"], rb["candidate"], rb["threshold"], rb["gate_ratio"]) == \
        (row["gate_baseline"], row["gate_candidate"], row["gate_threshold"], 0.8)
    assert rb["window_decisions"] == 100 and "<" in rb["reason"]
    # the window's offsets: the refused update's last 100 decisions on the actions chain
    (lin,) = rb["lineage"]
    assert (lin["topic"], lin["chain_id"]) == ("marl.joint.action", f"{res.run_id}:actions")
    actions = {r.offset: r for r in sent if r.topic == "marl.joint.action"}
    upd = next(x for x in refused["lineage"] if x["chain_id"] == lin["chain_id"])
    assert lin["last_offset"] == upd["last_offset"] and lin["last_seq"] == upd["last_seq"]
    assert lin["last_offset"] - lin["first_offset"] == 49       # 50 joint actions of 2 agents
    assert actions[lin["last_offset"]].value[-32:] == lin["head_event_hash"]
    window = [a["reward"] for o in range(lin["first_offset"], lin["last_offset"] + 1)
              for a in CODEC.decode(actions[o].value)[1]["actions"]]
    assert math.isclose(sum(window) / len(window), rb["baseline"])
    assert rb["source_event_hashes"] == [refused["event_hash"], lin["head_event_hash"]]

    # everything still verifies, signed through its last event, and the run replays from its records
    report = verify_records(sent, SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    policy = next(c for c in report.chains if c.chain_id == f"{res.run_id}:policy:mappo")
    assert policy.last_seq == policy.signed_through_seq == len(chain) - 1
    replay = read_records_of_run(sent, res.run_id, public_key=SIGNER.public_key)
    assert replay.verified and len(replay.episodes) == 5 * 13
    # the ledger materializes the event into policy_rollbacks
    r = chain[4][0]
    name, rows = decode_rows(r.value, r.topic, r.partition, r.offset)
    assert name == "policy_rollback" and [t for t, _ in rows] == ["policy_rollbacks"]


def test_a_checkpoint_changed_after_it_was_signed_is_not_restored(tmp_path):
    env = MatchTarget()
    learner = MAPPO(spec_of(env, "t1", "match_target_v0", "0", 1), MAPPOConfig(seed=1))
    gate = SafetyGate(MatchTarget(), checkpoint=tmp_path / "pre-update", key=KEY)
    gate.before_update(learner)
    pt = tmp_path / "pre-update.pt"
    pt.write_bytes(pt.read_bytes()[:-1] + bytes([pt.read_bytes()[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="modified after it was signed"):
        gate.restore(learner)


def test_gate_settings_are_checked_when_the_gate_is_made(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        SafetyGate(MatchTarget(), checkpoint=tmp_path / "c", key=KEY, ratio=1.2)
    with pytest.raises(ValueError, match="at least one decision"):
        SafetyGate(MatchTarget(), checkpoint=tmp_path / "c", key=KEY, window=0)

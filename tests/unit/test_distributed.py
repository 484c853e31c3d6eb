"""learners.distributed without a broker: round bookkeeping over any arrival order, the split of a
round's episodes and seeds, and the learner's loop with producers running as threads of this process
(the same sealed bytes Kafka would carry, in memory), reproduced bit for bit by ``retrain``; with a lag,
each round's update scored with the actor that collected it."""
from __future__ import annotations

import copy
import random
import threading
import time

import pytest
import torch

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import Record
from eventlog.log import MemorySink
from eventlog.verify import Verifier
from learners.checkpoint import load_signing_key
from learners.distributed import (BehaviourActors, PolicyBoard, RecordSource, RoundBook, acting_policy, acting_seed,
                                  collect_batch, group_config, produce_rounds, producer_run_id, read_group_run,
                                  reproduce, retrain, round_seed, split_episodes, train_distributed)
from learners.dqn import DQN
from learners.mappo import MAPPO, MAPPOConfig
from learners.networks import weights_sha256
from learners.replay import RunSpec, records_from_memory
from producers.harness import config_digest, env_spaces, run_episodes
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of

CODEC = default_codec()


def _collect(env):
    def collect(policy, log, *, episodes, seed, config):
        return run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id="match_target_v0",
                            env_version="0", config=config)
    return collect


def _rounds(runs, rounds, signer, episodes=2):
    """Each producer run writes ``rounds`` signed batches (random policy), one after another."""
    sink = MemorySink()
    for k, run in enumerate(runs):
        env, heads = MatchTarget(), {}
        for r in range(rounds):
            heads = collect_batch(_collect(env), RandomPolicy(env, seed=r), sink, run_id=run, round_=r, heads=heads,
                                  signer=signer, episodes=episodes, seed=100 * k + r, config={})
    return records_from_memory(sink.sent)


def _batch_of(record: Record) -> str:
    return CODEC.decode(record.value)[1]["producer_id"]


def test_split_and_seeds_give_each_round_the_seeds_of_one_process():
    assert split_episodes(20, 3) == [7, 7, 6] and split_episodes(20, 4) == [5] * 4 and split_episodes(2, 3) == [1, 1, 0]
    with pytest.raises(ValueError):
        split_episodes(20, 0)
    for n in (1, 2, 3, 4):
        for r in (0, 5):
            shares = split_episodes(20, n)
            seeds = [round_seed(7, r, 20, k, n) + i for k in range(n) for i in range(shares[k])]
            assert seeds == list(range(7 * 1_000_003 + r * 20, 7 * 1_000_003 + r * 20 + 20))
    acting = {acting_seed(1, r, k) for r in range(10) for k in range(4)}
    assert len(acting) == 40 and acting_seed(1, 2, 3) == acting_seed(1, 2, 3) != acting_seed(2, 2, 3)


def test_a_round_is_ready_exactly_when_all_its_signed_records_have_arrived_in_any_order():
    signer = Signer.generate()
    runs = ["g.p0", "g.p1"]
    records = _rounds(runs, 2, signer)
    for trial in range(3):
        rng = random.Random(trial)
        # a consumer sees each partition in order, partitions interleaved at random
        queues = {}
        for rec in records:
            queues.setdefault(rec.topic, []).append(rec)
        round0 = [{(x.topic, x.offset) for x in records if x.key.startswith(run + ":") and _batch_of(x) == "harness-0"}
                  for run in runs]
        book, arrived = RoundBook(runs), set()
        while any(queues.values()):
            topic = rng.choice([t for t, q in queues.items() if q])
            rec = queues[topic].pop(0)
            book.add([rec])
            arrived.add((rec.topic, rec.offset))
            for k in range(len(runs)):
                assert book.ready(k, 0) == (round0[k] <= arrived)
        for k, run in enumerate(runs):
            first = book.take(k, 0)
            mine = [x for x in records if x.key.startswith(run + ":")]
            assert sorted((x.topic, x.offset) for x in first) == sorted(
                (x.topic, x.offset) for x in mine if _batch_of(x) == "harness-0")
            assert not book.ready(k, 0) and book.ready(k, 1)
            assert {_batch_of(x) for x in book.take(k, 1)} == {"harness-1"}
        assert book.pending_low() == {}


def test_the_book_keeps_only_the_producers_records_and_says_what_a_round_waits_for():
    signer = Signer.generate()
    records = _rounds(["g.p0", "other"], 1, signer)
    book = RoundBook(["g.p0", "g.p1"])
    foreign = [r for r in records if not r.key.startswith("g.p0:")]
    assert book.add(foreign) == 0
    assert book.add([Record("marl.di.credit", 0, 0, "g.p0:credit", b"\x00" * 60, 0)]) == 0
    mine = [r for r in records if r.key.startswith("g.p0:")]
    last_action = max(i for i, r in enumerate(mine) if r.topic == "marl.joint.action")
    book.add(mine[:last_action] + mine[last_action + 1:])  # one joint action still in flight
    assert not book.ready(0, 0)
    assert "g.p0:actions at seq" in book.missing(0) and "g.p1: its batch is not signed yet" in book.missing(0)
    assert book.pending_low()[("marl.joint.action", 0)] == min(r.offset for r in mine if r.topic == "marl.joint.action")
    book.add([mine[last_action]])
    assert book.ready(0, 0) and not book.ready(1, 0)
    with pytest.raises(ValueError, match="not complete"):
        book.take(1, 0)


class MemorySource(RecordSource):
    """The records every thread has sent to a shared MemorySink so far (offsets per topic)."""

    def __init__(self, sink: MemorySink):
        self.sink, self.read, self.offsets = sink, 0, {}

    def poll(self, timeout: float) -> list[Record]:
        new = self.sink.sent[self.read:]
        if not new:
            time.sleep(min(timeout, 0.005))
            return []
        self.read += len(new)
        out = []
        for topic, key, value in new:
            o = self.offsets.get(topic, 0)
            self.offsets[topic] = o + 1
            out.append(Record(topic, 0, o, key, value, 0))
        return out


def _session(tmp_path, group, producers=3, rounds=3, episodes=5, lag=0, learner=None, time_budget_s=None):
    """A learner and ``producers`` producer threads over one in-memory sink; returns (result, sink, public key)."""
    torch.set_num_threads(1)
    signer = Signer.generate()
    signer.save(tmp_path / "k.pem")
    key = load_signing_key(tmp_path / "k.pem")
    env = MatchTarget()
    spec = RunSpec.from_run_started(group, {"env_id": "match_target_v0", "env_version": "0", "seed": 1,
                                            "config_hash": "", **env_spaces(env)})
    config = MAPPOConfig(seed=1, episodes_per_update=episodes)
    runs = [producer_run_id(group, k) for k in range(producers)]
    text, digest = config_digest(group_config("mappo", config, runs, episodes, 1, lag))
    started = {"env_id": "match_target_v0", "env_version": "0", "seed": 1, "config_hash": digest, "config_json": text,
               **env_spaces(env), "episodes_planned": rounds * episodes}
    sink, board = MemorySink(), PolicyBoard(tmp_path / "policies")
    errors: list[BaseException] = []

    def producer(k):
        try:
            produce_rounds(group, k, producers, collect=_collect(MatchTarget()), sink=sink, board=board,
                           public_key=signer.public_key, signer=signer, episodes_per_round=episodes, seed=1,
                           algo="mappo", wait_timeout_s=60)
        except BaseException as exc:  # noqa: BLE001 - the learner's alive() raises it
            errors.append(exc)

    def alive():
        if errors:
            raise errors[0]

    threads = [threading.Thread(target=producer, args=(k,), daemon=True) for k in range(producers)]
    for t in threads:
        t.start()
    try:
        res = train_distributed(spec, "mappo", runs=runs, source=MemorySource(sink), sink=sink, board=board,
                                signing_key=key, signer=signer, public_key=signer.public_key, iterations=rounds,
                                seed=1, config=config, run_started=started, alive=alive, round_timeout_s=30,
                                lag=lag, learner=learner(spec, config) if learner else None,
                                time_budget_s=time_budget_s)
    finally:
        board.stop(-1)
        for t in threads:
            t.join(30)
    assert not errors
    return res, sink, signer.public_key


def test_the_learner_trains_on_every_producers_batch_and_retrain_reproduces_each_update(tmp_path):
    res, sink, pk = _session(tmp_path, "grp")
    assert [r["env_steps"] for r in res.curve] == [40, 80, 120]  # 5 episodes of 8 steps a round, from 3 producers
    records = records_from_memory(sink.sent)
    updates = read_group_run(records, "grp").updates
    assert [u["event_hash"] for u in updates] == res.update_hashes
    actions = [{x["chain_id"]: (x["first_seq"], x["last_seq"]) for x in u["lineage"]
                if x["topic"] == "marl.joint.action"} for u in updates]
    # every producer's chain in every update; the 5 episodes split 2, 2, 1; consecutive rounds continue the chains
    assert actions[0] == {"grp.p0:actions": (0, 15), "grp.p1:actions": (0, 15), "grp.p2:actions": (0, 7)}
    assert actions[2] == {"grp.p0:actions": (32, 47), "grp.p1:actions": (32, 47), "grp.p2:actions": (16, 23)}
    assert all(u["verified"] and u["env_steps"] == 40 for u in updates)
    # each producer acted with the version the learner published for that round
    acted = {CODEC.decode(v)[1]["policy_version"] for t, k, v in sink.sent if t == "marl.joint.action"}
    assert acted == {u["parent_policy_version"] for u in updates} and len(acted) == 3
    report = Verifier(pk, require_signed=True)  # every event, the learner's included, under a signature
    report.add_checkpoints([r for r in records if r.topic == "marl.audit.checkpoints"])
    report.feed([r for r in records if r.topic != "marl.audit.checkpoints"])
    assert report.finish().ok
    assert reproduce(records, "grp", public_key=pk) == [(u["policy_version"], True) for u in updates]
    # the same records in another arrival order (topics reversed) give the same weights
    group = read_group_run(records, "grp")
    _, hashes = retrain(sorted(records, key=lambda r: r.topic, reverse=True), group, public_key=pk)
    assert hashes == [bytes(u["weights_sha256"]) for u in updates]
    assert hashes[-1] == res.learner.weights_sha256()


def test_a_session_is_deterministic_given_its_seed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _, _ = _session(tmp_path / "a", "ga", producers=2, rounds=2, episodes=4)
    b, _, _ = _session(tmp_path / "b", "gb", producers=2, rounds=2, episodes=4)
    assert a.learner.weights_sha256() == b.learner.weights_sha256()
    assert isinstance(a.learner, MAPPO)


# --- lag: the producers collect round r + lag while the learner updates on round r --------------------------
def _spec(run="g"):
    return RunSpec.from_run_started(run, {"env_id": "match_target_v0", "env_version": "0", "seed": 1,
                                          "config_hash": "", **env_spaces(MatchTarget())})


def test_which_policy_collects_each_round_and_which_actors_the_learner_keeps():
    assert [acting_policy(r, 0) for r in range(4)] == [0, 1, 2, 3]
    assert [acting_policy(r, 1) for r in range(4)] == [0, 0, 1, 2]
    assert [acting_policy(r, 2) for r in range(5)] == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError):
        acting_policy(3, -1)
    # the config records a lag only where there is one: a synchronous session's config (and hash) is unchanged
    cfg = group_config("mappo", MAPPOConfig(), ["g.p0"], 4, 1)
    assert "lag" not in cfg and group_config("mappo", MAPPOConfig(), ["g.p0"], 4, 1, 1) == {**cfg, "lag": 1}

    torch.set_num_threads(1)
    learner = MAPPO(_spec(), MAPPOConfig(seed=1, episodes_per_update=2))
    replay = replay_of(harness_run(MatchTarget(), learner, run_id="g", episodes=2), "g")
    book = BehaviourActors(1, learner)
    book.keep(0, learner)
    published = [weights_sha256(learner.actor)]
    assert book.behaviour(0, 0) is None  # round 0: collected by the learner's own policy 0
    for r in range(4):
        if r:
            actor = book.behaviour(r, r)  # round r was collected by policy r - 1, one update behind
            assert actor is not learner.actor and weights_sha256(actor) == published[r - 1]
            assert weights_sha256(actor) != weights_sha256(learner.actor)
            assert book.held() == [r - 1, r]  # older actors are dropped
        learner.update(replay)
        book.keep(r + 1, learner)
        published.append(weights_sha256(learner.actor))
    assert book.held() == [2, 3, 4]
    # no lag, or an off-policy learner: nothing kept, the learner's own policy
    for none in (BehaviourActors(0, learner), BehaviourActors(1, DQN(_spec()))):
        none.keep(0, learner)
        assert none.held() == [] and none.behaviour(3, 3) is None


def test_mappo_scores_old_log_probabilities_with_the_behaviour_actor():
    torch.set_num_threads(1)
    config = MAPPOConfig(seed=1, episodes_per_update=4)
    collector = MAPPO(_spec(), config)
    replay = replay_of(harness_run(MatchTarget(), collector, run_id="g", episodes=4), "g")
    a, b, c = (MAPPO(_spec(), config) for _ in range(3))
    a.update(replay)
    b.update(replay, behaviour=copy.deepcopy(b.actor))  # the same actor as a module of its own: the same update
    assert a.weights_sha256() == b.weights_sha256()

    calls = []
    other = MAPPO(_spec(), MAPPOConfig(seed=7)).actor  # an actor with other weights acted

    def spy(x, actions, _f=other.log_prob_entropy):
        calls.append(x.shape[0])
        return _f(x, actions)
    other.log_prob_entropy = spy
    before = weights_sha256(other)
    out = c.update(replay, behaviour=other)
    assert calls == [replay.env_steps * 2]  # once, over every live agent-step (2 agents), before the epochs
    assert weights_sha256(other) == before  # the behaviour actor is read, never trained
    assert c.weights_sha256() != a.weights_sha256()  # the ratio is taken against the actor that acted
    assert out["losses"]["losses/approx_kl"] != pytest.approx(0.0, abs=1e-6)


def test_a_lagged_session_scores_each_round_with_the_policy_that_collected_it_and_reproduces(tmp_path):
    seen = []

    class Spy(MAPPO):
        def update(self, replay, behaviour=None):
            seen.append(None if behaviour is None else weights_sha256(behaviour).hex()[:12])
            return super().update(replay, behaviour=behaviour)

    res, sink, pk = _session(tmp_path, "lag", producers=3, rounds=4, episodes=5, lag=1, learner=Spy)
    assert [r["env_steps"] for r in res.curve] == [40, 80, 120, 160]
    records = records_from_memory(sink.sent)
    group = read_group_run(records, "lag")
    assert group.lag == 1 and [u["event_hash"] for u in group.updates] == res.update_hashes
    updates = group.updates
    versions = [updates[0]["parent_policy_version"]] + [u["policy_version"] for u in updates]  # policy p
    # round r was collected by policy max(0, r - 1): rounds 0 and 1 by policy 0, round 2 by policy 1, ...
    for r in range(4):
        acted = {CODEC.decode(v)[1]["policy_version"] for t, k, v in sink.sent
                 if t == "marl.joint.action" and CODEC.decode(v)[1]["producer_id"] == f"harness-{r}"}
        assert acted == {versions[acting_policy(r, 1)]}
        # the learner's update of round r took its old log-probabilities from that policy's actor
        assert (seen[r] is None) == (r == 0)
        if r:
            assert seen[r] == versions[r - 1].rsplit("-", 1)[1]
            assert versions[r - 1] != updates[r]["parent_policy_version"]  # not the learner's policy at the update
    # each update still names exactly the round's ranges of every producer
    actions = [{x["chain_id"]: (x["first_seq"], x["last_seq"]) for x in u["lineage"]
                if x["topic"] == "marl.joint.action"} for u in updates]
    assert actions[3] == {"lag.p0:actions": (48, 63), "lag.p1:actions": (48, 63), "lag.p2:actions": (24, 31)}
    report = Verifier(pk, require_signed=True)
    report.add_checkpoints([r for r in records if r.topic == "marl.audit.checkpoints"])
    report.feed([r for r in records if r.topic != "marl.audit.checkpoints"])
    assert report.finish().ok
    # reproduced bit for bit from the records, with the lag run.started records ...
    assert reproduce(records, "lag", public_key=pk) == [(u["policy_version"], True) for u in updates]
    _, hashes = retrain(sorted(records, key=lambda r: r.topic, reverse=True), group, public_key=pk)
    assert hashes == [bytes(u["weights_sha256"]) for u in updates] and hashes[-1] == res.learner.weights_sha256()
    # ... and not without it: from round 1 on the synchronous old log-probabilities differ
    group.lag = 0
    _, sync = retrain(records, group, public_key=pk)
    assert sync[0] == hashes[0] and all(x != y for x, y in zip(sync[1:], hashes[1:]))


def test_a_lagged_session_out_of_time_trains_on_the_rounds_already_published(tmp_path):
    # a time budget of 0: the first update spends it; round 1, published with round 0, is still trained on
    res, sink, pk = _session(tmp_path, "late", producers=2, rounds=50, episodes=4, lag=1, time_budget_s=0.0)
    assert [r["iteration"] for r in res.curve] == [0, 1]
    records = records_from_memory(sink.sent)
    collected = {CODEC.decode(v)[1]["producer_id"] for t, k, v in sink.sent if t == "marl.joint.action"}
    assert collected == {"harness-0", "harness-1"}  # nothing collected that is not trained on
    assert reproduce(records, "late", public_key=pk) == [(u["policy_version"], True)
                                                         for u in read_group_run(records, "late").updates]


def test_a_lagged_session_is_deterministic_given_its_seed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _, _ = _session(tmp_path / "a", "ga", producers=2, rounds=3, episodes=4, lag=1)
    b, _, _ = _session(tmp_path / "b", "gb", producers=2, rounds=3, episodes=4, lag=1)
    s, _, _ = _session(tmp_path, "gs", producers=2, rounds=3, episodes=4)
    assert a.learner.weights_sha256() == b.learner.weights_sha256() != s.learner.weights_sha256()


def test_a_producer_done_after_the_stop_is_not_a_failure_one_ended_before_it_is(tmp_path):
    # with a lag the learner writes `stop` when it publishes no more rounds, and still trains on the rounds
    # in flight: their producers may end (cleanly) before it reads their last batch
    from types import SimpleNamespace

    from marlgrc.scaleout import ScaleoutError, check_producers

    board = PolicyBoard(tmp_path / "policies")
    runs = ["g.p0", "g.p1"]
    done, running, failed = (SimpleNamespace(exitcode=c) for c in (0, None, 1))
    check_producers([running, running], runs, board)
    with pytest.raises(ScaleoutError, match="producer 0 .* code 0 before the learner stopped"):
        check_producers([done, running], runs, board)
    (tmp_path / "policies" / "producer-1.error").write_text("ValueError: boom\n")
    with pytest.raises(ScaleoutError, match="producer 1 .* code 1 .*ValueError: boom"):
        check_producers([running, failed], runs, board)
    board.stop(3, "done")
    assert board.stopped()
    check_producers([done, running], runs, board)
    with pytest.raises(ScaleoutError, match="producer 1 .* code 1"):
        check_producers([done, failed], runs, board)

"""Replay: joining events into episodes, credit assignments, segments, verification refusals."""
from __future__ import annotations

import numpy as np
import pytest

from eventlog.log import EventLog, MemorySink
from learners.replay import ReplayError, UnverifiedStream, read_records_of_run, records_from_memory
from tests.synthetic import synthetic_run
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of


def test_synthetic_run_joins_every_step_and_reward():
    sink = MemorySink()
    log = EventLog(sink, run_id="syn", producer_id="demo")
    synthetic_run(log, episodes=3, steps=7, agents=3, obs_dim=4, seed=5)
    rp = replay_of(sink, "syn")
    assert [e.length for e in rp.episodes] == [7, 7, 7]
    assert rp.spec.agents == ("agent_0", "agent_1", "agent_2") and rp.spec.n_actions == 5
    assert rp.episodes[0].obs.shape == (7, 3, 4) and rp.episodes[0].state.shape == (7, 12)
    # state of the synthetic stream is the agents' observations side by side
    assert np.allclose(rp.episodes[1].state[3], rp.episodes[1].obs[3].reshape(-1))
    # rewards equal what joint.action carried: run.finished's mean_return
    from eventlog.codec import default_codec
    fin = [default_codec().decode(v)[1] for t, k, v in sink.sent if k == "syn:lifecycle"][-1]
    assert np.isclose(np.mean([e.team_return for e in rp.episodes]), fin["mean_return"], atol=1e-4)
    assert rp.verified and rp.env_steps == 21
    chains = {r.chain_id for r in rp.lineage}
    assert {"syn:env", "syn:actions", "syn:obs:agent_0", "syn:lifecycle"} <= chains
    acts = next(r for r in rp.lineage if r.chain_id == "syn:actions")
    assert (acts.first_seq, acts.last_seq) == (0, 20)
    assert acts.head_event_hash == [v for t, k, v in sink.sent if k == "syn:actions"][-1][-32:]


def test_actions_and_observations_match_what_the_harness_wrote():
    env = MatchTarget()
    sink = harness_run(env, RandomPolicy(env, seed=12345), episodes=2, seed=40)
    rp = replay_of(sink)
    env2 = MatchTarget()
    obs, _ = env2.reset(seed=41)  # second episode
    ep = rp.episodes[1]
    assert np.allclose(ep.obs[0, 0], obs["agent_0"])
    # reward 1 exactly where the action named the target
    assert np.array_equal(ep.rewards > 0.5, ep.actions == ep.obs.argmax(-1))


def test_credit_assignments_replace_raw_rewards():
    env = MatchTarget()
    sink = harness_run(env, RandomPolicy(env, seed=7), episodes=1, seed=0)
    log = EventLog(sink, run_id="r1", producer_id="di")
    from eventlog.codec import default_codec
    codec = default_codec()
    for topic, key, value in list(sink.sent):
        if key == "r1:actions":
            rec = codec.decode(value)[1]
            log.append("r1:credit", "di.credit", {
                "episode": rec["episode"], "step": rec["step"], "joint_action_hash": value[-32:], "raw_reward": 0.0,
                "global_reward": 0.0, "penalties": [],
                "shares": [{"agent_id": a["agent_id"], "credit": 10.0 + rec["step"], "rule": "test"} for a in rec["actions"]]},
                source_event_hashes=[value[-32:]])
    rp = replay_of(sink)
    assert rp.credited_steps == 8
    assert np.array_equal(rp.episodes[0].rewards[:, 0], 10.0 + np.arange(8))


def test_two_harness_batches_on_one_run_are_two_segments():
    env = MatchTarget()
    from producers.harness import run_episodes

    sink = MemorySink()
    log = EventLog(sink, run_id="r1", producer_id="harness")  # one writer per chain: chains continue
    run_episodes(env, RandomPolicy(env, seed=1), log, episodes=2, seed=0, env_id="m", env_version="0", config={})
    run_episodes(env, RandomPolicy(env, seed=2), log, episodes=3, seed=100, env_id="m", env_version="0", config={})
    rp = replay_of(sink)
    assert [(e.segment, e.episode) for e in rp.episodes] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]


def _tampered(sink):
    recs = records_from_memory(sink.sent)
    i = next(i for i, r in enumerate(recs) if r.key == "r1:obs:agent_1" and r.offset > 3)
    v = bytearray(recs[i].value)
    v[60] ^= 0x01
    recs[i] = recs[i]._replace(value=bytes(v))
    return recs


def test_a_stream_that_fails_verification_is_refused():
    env = MatchTarget()
    sink = harness_run(env, RandomPolicy(env, seed=1), episodes=2)
    with pytest.raises(UnverifiedStream, match=r"edited in marl.agent.observation chain r1:obs:agent_1.*--allow-unverified"):
        read_records_of_run(_tampered(sink), "r1")


def test_allow_unverified_trains_and_lineage_says_so():
    from learners.mappo import MAPPO, MAPPOConfig
    from learners.lineage import emit_policy_update

    env = MatchTarget()
    sink = harness_run(env, RandomPolicy(env, seed=1), episodes=2)
    rp = read_records_of_run(_tampered(sink), "r1", allow_unverified=True)
    assert not rp.verified and len(rp.episodes) == 2
    learner = MAPPO(rp.spec, MAPPOConfig(seed=0))
    out = MemorySink()
    ev = emit_policy_update(EventLog(out, run_id="r1", producer_id="l"), learner, learner.update(rp), rp,
                            parent_version="p")
    from eventlog.codec import default_codec
    rec = default_codec().decode(ev.value)[1]
    assert rec["verified"] is False and rec["policy_updated"] is True


def test_missing_run_started_is_a_clear_error():
    env = MatchTarget()
    sink = harness_run(env, RandomPolicy(env, seed=1), episodes=1)
    recs = [r for r in records_from_memory(sink.sent) if r.topic != "marl.run.lifecycle"]
    with pytest.raises(ReplayError, match="no run.started"):
        read_records_of_run(recs, "r1")

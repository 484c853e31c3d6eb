"""The harness on MPE2 simple_spread (in memory): event layout, links, spaces, verification."""
import json

import numpy as np
import pytest
from mpe2 import simple_spread_v3

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.verify import verify_records
from producers.harness import HarnessError, run_episodes
from producers.policies import HeuristicPolicy, RandomPolicy
from producers.spaces import space_record

SIGNER = Signer.from_seed(b"harness-test")


def spread():
    return simple_spread_v3.parallel_env(N=3, max_cycles=5, local_ratio=0.5)


def run(env, policy, episodes=2, seed=3):
    sink = MemorySink()
    log = EventLog(sink, run_id="run1", producer_id="p", signer=SIGNER, checkpoint_every=7)
    summary = run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id="simple_spread_v3",
                           env_version="3", config={"N": 3})
    log.close()
    codec = default_codec()
    decoded = [(t, k, codec.decode(v)[1]) for t, k, v in sink.sent]
    return sink, summary, decoded


def test_event_layout_and_links():
    env = spread()
    sink, summary, decoded = run(env, RandomPolicy(env, seed=1))
    assert summary.steps == 10 and summary.episodes == 2
    by_type = {}
    for t, k, r in decoded:
        by_type.setdefault(r["event_type"], []).append((k, r))
    assert len(by_type["env.state"]) == 10
    assert len(by_type["agent.observation"]) == 30
    assert len(by_type["joint.action"]) == 10
    assert summary.events == 1 + 10 * 5 + 2 + 1  # run.started, 10 steps, 2 episode.summary, run.finished
    hashes = {r["event_hash"]: (k, r) for _, k, r in decoded}
    for k, r in by_type["joint.action"]:
        assert k == "run1:actions" and r["policy_version"] == "random-v1"
        srcs = [hashes[h][1] for h in r["source_event_hashes"]]
        assert [s["event_type"] for s in srcs] == ["env.state"] + ["agent.observation"] * 3
        assert {s["step"] for s in srcs} == {r["step"]} and {s["episode"] for s in srcs} == {r["episode"]}
        assert [a["agent_id"] for a in r["actions"]] == ["agent_0", "agent_1", "agent_2"]
        assert r["joint_vector"] == [float(a["discrete"]) for a in r["actions"]]
        assert all(a["log_prob"] == pytest.approx(-np.log(5)) for a in r["actions"])
        assert all(a["truncated"] == (r["step"] == 4) for a in r["actions"])
    for k, r in by_type["agent.observation"]:
        assert k == f"run1:obs:{r['agent_id']}" and len(r["observation"]) == 18
        assert hashes[r["source_event_hashes"][0]][1]["event_type"] == "env.state"
    for k, r in by_type["env.state"]:
        assert k == "run1:env" and len(r["state"]) == 54
    finished = by_type["run.finished"][0][1]
    assert finished["status"] == "completed" and finished["steps"] == 10
    heads = {h["chain_id"]: h["seq"] for h in finished["chain_heads"]}
    assert heads["run1:actions"] == 9 and heads["run1:obs:agent_2"] == 9 and heads["run1:env"] == 9


def test_run_started_describes_spaces_exactly():
    env = spread()
    _, _, decoded = run(env, RandomPolicy(env, seed=1), episodes=1)
    started = decoded[0][2]
    assert started["event_type"] == "run.started" and started["episodes_planned"] == 1
    assert [a["agent_id"] for a in started["agents"]] == env.possible_agents
    for spec in started["agents"]:
        obs = spec["observation_space"]
        assert obs["kind"] == "Box" and obs["shape"] == [18] and obs["dtype"] == "float32"
        assert obs["low"] == [float("-inf")] * 18 and obs["high"] == [float("inf")] * 18
        assert spec["action_space"] == {"kind": "Discrete", "shape": [], "dtype": "int64", "n": 5, "start": 0,
                                        "nvec": [], "low": [], "high": []}
    assert started["state_space"]["shape"] == [54]
    cfg = json.loads(started["config_json"])
    assert cfg["N"] == 3 and cfg["seed"] == 3 and cfg["policy_version"] == "random-v1"


def test_stream_verifies():
    env = spread()
    sink, _, _ = run(env, RandomPolicy(env, seed=1))
    records = [Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)]
    report = verify_records(records, SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    assert report.events == len(records)


def test_same_seed_same_actions_and_states():
    def actions(seed):
        env = spread()
        _, _, decoded = run(env, RandomPolicy(env, seed=seed), seed=seed)
        return [(r["state"] if "state" in r else None, [a["discrete"] for a in r.get("actions", [])])
                for _, _, r in decoded if r["event_type"] in ("joint.action", "env.state")]
    assert actions(5) == actions(5)
    assert actions(5) != actions(6)


def test_failure_is_recorded_and_raised():
    env = spread()

    class Broken:
        version = "broken"

        def act(self, observations, state=None):
            return {}

    sink = MemorySink()
    log = EventLog(sink, run_id="r", producer_id="p")
    with pytest.raises(HarnessError, match="gave no action"):
        run_episodes(env, Broken(), log, episodes=1, seed=0, env_id="x", env_version="0", config={})
    last = default_codec().decode(sink.sent[-1][2])[1]
    assert last["event_type"] == "run.finished" and last["status"] == "failed" and last["reason"] == "HarnessError"


def test_heuristic_needs_env_rule():
    with pytest.raises(ValueError, match="heuristic_action"):
        HeuristicPolicy(spread())


def test_space_records_for_other_kinds():
    from gymnasium import spaces
    assert space_record(spaces.MultiDiscrete([3, 4]))["nvec"] == [3, 4]
    assert space_record(spaces.MultiBinary(4))["n"] == 4
    assert space_record(spaces.Discrete(3, start=1))["start"] == 1
    assert space_record(None)["kind"] == "none"
    with pytest.raises(TypeError, match="FlattenObservation"):
        space_record(spaces.Dict({"a": spaces.Discrete(2)}))


class OddTruth:
    def __bool__(self):
        raise ValueError("no truth value here")


@pytest.mark.parametrize("name,change", [
    ("reward not a number", lambda k: k["rewards"].update(a1="lots")),
    ("action not an int", lambda k: k["actions"].update(a1="left")),
    ("no action for a live agent", lambda k: k["actions"].pop("a2")),
    ("no choice for a live agent", lambda k: k["chosen"].pop("a0")),
    ("log_prob not a number", lambda k: k["chosen"].update(a2=(1, object()))),
    ("truncation without a truth value", lambda k: k["truncs"].update(a1=OddTruth())),
    ("action None", lambda k: k["actions"].update(a0=None)),
])
def test_a_bad_step_raises_before_its_joint_action_is_built(name, change):
    """The step recorder builds the whole joint.action payload before anything is sealed: a value it
    cannot write raises there, and no sealer is called."""
    from producers.harness import step_functions

    agents = ["a0", "a1", "a2"]
    calls = []

    def sealer(chain):
        def seal(payload, sources=(), produced_at=None):
            calls.append(chain)
            raise AssertionError("joint_action must not seal")
        return seal

    _, joint_action = step_functions(sealer("state"), {a: sealer(a) for a in agents}, {a: True for a in agents},
                                     {a: (lambda x: (int(x), [])) for a in agents})
    kw = {"actions": {"a0": 1, "a1": 2, "a2": 0}, "chosen": {a: (0, -0.5) for a in agents},
          "rewards": {"a0": 1.0, "a1": np.float32(0.25), "a2": 3}, "terms": {"a0": False},
          "truncs": {"a1": np.bool_(True)}}
    payload, ret = joint_action(0, 5, agents, kw["actions"], kw["chosen"], kw["rewards"], kw["terms"], kw["truncs"],
                                False, 0.5)
    assert ret == 0.5 + 1.0 + 0.25 + 3 and payload["joint_vector"] == [1.0, 2.0, 0.0]
    assert [a["truncated"] for a in payload["actions"]] == [False, np.bool_(True), False]
    change(kw)
    with pytest.raises((ValueError, TypeError, KeyError)):
        joint_action(0, 5, agents, kw["actions"], kw["chosen"], kw["rewards"], kw["terms"], kw["truncs"], False, 0.0)
    assert calls == [], name


def test_a_step_with_a_bad_reward_seals_its_state_and_observations_but_no_joint_action():
    env = spread()

    class BadRewardAtStep2:
        """simple_spread whose third step reports a reward that is not a number."""

        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def reset(self, *a, **k):
            return self.inner.reset(*a, **k)

        def step(self, actions):
            obs, rew, term, trunc, info = self.inner.step(actions)
            self.n += 1
            if self.n == 3:
                rew = {**rew, "agent_1": "lots"}
            return obs, rew, term, trunc, info

    bad = BadRewardAtStep2(env)
    sink = MemorySink()
    log = EventLog(sink, run_id="r", producer_id="p", signer=SIGNER)
    with pytest.raises(ValueError):
        run_episodes(bad, RandomPolicy(env, seed=1), log, episodes=1, seed=0, env_id="x", env_version="0", config={})
    log.close()
    codec = default_codec()
    types = [codec.decode(v)[1]["event_type"] for _, _, v in sink.sent]
    assert types.count("joint.action") == 2 and types.count("env.state") == 3
    assert types.count("agent.observation") == 9
    finished = next(codec.decode(v)[1] for _, _, v in sink.sent if codec.decode(v)[1]["event_type"] == "run.finished")
    assert finished["status"] == "failed" and finished["reason"] == "ValueError" and finished["steps"] == 2
    records = [Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)]
    assert verify_records(records, SIGNER.public_key).ok

"""Hybrid decisions (seed 001 Innovation #5, producers/policies.py ``HybridPolicy``): the policy tier,
then the env's heuristic, then random; each fall (model missing, model raising, invalid action,
heuristic failing) reaches the next tier for the agents it concerns, and every joint.action records
the tier per agent (``decision_tier``, added to schemas/joint_action.avsc with a default, so events
written before it, such as the published vectors, still read). Exploration replaces the heuristic
at the configured rate."""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import avro.io
import avro.schema
import fastavro
import numpy as np
import pytest
from gymnasium import spaces
from pettingzoo import ParallelEnv

import schemas
from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from learners.replay import read_records_of_run, records_from_memory
from producers.harness import HarnessError, run_episodes
from producers.policies import (HYBRID_ONNX_PREFIX, HeuristicPolicy, HybridPolicy, RandomPolicy, action_check,
                                builtin_policy)
from stream_processors.processor import INPUT_TOPICS, Processor

CODEC = default_codec()
VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "hashing.json").read_text())
BOX_ACTION = [0.5, -0.5]
STEPS = 6


class Junction(ParallelEnv):
    """Two Discrete(3) agents and one Box(2,) agent in [-1, 1]; each observes the step number; the
    heuristic answers 1 (discrete) and [0.5, -0.5] (box); an episode lasts 6 steps, reward 1 each."""

    metadata = {"name": "junction_v0"}

    def __init__(self):
        self.possible_agents = ["d0", "d1", "b0"]
        self.agents = []
        self.t = 0

    def observation_space(self, agent):
        return spaces.Box(0.0, 100.0, (1,), np.float32)

    def action_space(self, agent):
        return spaces.Box(-1.0, 1.0, (2,), np.float32) if agent == "b0" else spaces.Discrete(3)

    def _obs(self):
        return {a: np.array([self.t], np.float32) for a in self.agents}

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, list(self.possible_agents)
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):
        for a in self.agents:  # the env gets only what the harness lets through
            assert action_check(self.action_space(a))(actions[a]), (a, actions[a])
        self.t += 1
        done = self.t >= STEPS
        agents = list(self.agents)
        if done:
            self.agents = []
        return ({a: np.array([self.t], np.float32) for a in agents}, dict.fromkeys(agents, 1.0),
                dict.fromkeys(agents, done), dict.fromkeys(agents, False), {a: {} for a in agents})

    def heuristic_action(self, agent, observation):
        return np.array(BOX_ACTION, np.float32) if agent == "b0" else 1


class NoRule(Junction):
    """Junction without a heuristic: the lower tier is random."""

    heuristic_action = None

    def __getattribute__(self, name):
        if name == "heuristic_action":
            raise AttributeError(name)
        return super().__getattribute__(name)


class Scripted:
    """A model whose answer at step t (the observation) is ``answer(t)``: {agent: (action, log_prob)},
    or an exception to raise."""

    version = "scripted-v1"

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def act(self, observations, state=None):
        self.calls += 1
        t = int(next(iter(observations.values()))[0])
        out = self.answer(t)
        if isinstance(out, BaseException):
            raise out
        return out


def good(t):
    return {"d0": (2, -0.1), "d1": (0, -0.2), "b0": (np.array([-0.25, 0.75], np.float32), -0.3)}


def run(policy, env=None, episodes=1):
    """(joint.action records, run.started record) of a harness run into memory."""
    env = env or Junction()
    sink = MemorySink()
    log = EventLog(sink, run_id="h1", producer_id="test")
    run_episodes(env, policy, log, episodes=episodes, seed=0, env_id="junction_v0", env_version="0", config={})
    log.close()
    recs = [CODEC.decode(v)[1] for t, _, v in sink.sent if t == "marl.joint.action"]
    return recs, sink


def tiers_of(recs):
    return [{a["agent_id"]: a["decision_tier"] for a in r["actions"]} for r in recs]


def action_of(rec, agent):
    a = next(x for x in rec["actions"] if x["agent_id"] == agent)
    return a["discrete"] if a["discrete"] >= 0 else pytest.approx(a["continuous"])


# ---- the tiers ------------------------------------------------------------------------------------

def test_a_valid_model_decides_every_agent_and_is_never_explored():
    recs, _ = run(HybridPolicy(Junction(), Scripted(good), explore_rate=0.9, seed=1))
    assert len(recs) == STEPS
    assert tiers_of(recs) == [{"d0": "policy", "d1": "policy", "b0": "policy"}] * STEPS
    r = recs[0]
    assert (action_of(r, "d0"), action_of(r, "d1"), action_of(r, "b0")) == (2, 0, [-0.25, 0.75])
    assert [a["log_prob"] for a in r["actions"]] == pytest.approx([-0.1, -0.2, -0.3])


def test_a_missing_model_falls_to_the_heuristic_for_every_agent(tmp_path, caplog):
    missing = tmp_path / "never-trained.onnx"
    with caplog.at_level(logging.WARNING, logger="producers.policies"):
        policy = builtin_policy(HYBRID_ONNX_PREFIX + str(missing), Junction(), 3, explore_rate=0.0)
    assert policy.model is None and str(missing) in caplog.text
    recs, sink = run(policy)
    assert tiers_of(recs) == [{"d0": "heuristic", "d1": "heuristic", "b0": "heuristic"}] * STEPS
    assert all(action_of(r, "d0") == 1 and action_of(r, "b0") == BOX_ACTION for r in recs)
    assert all(a["log_prob"] == 0.0 for r in recs for a in r["actions"])
    assert {r["policy_version"] for r in recs} == {"hybrid-v1:no-model"}
    started = CODEC.decode(sink.sent[0][2])[1]
    assert json.loads(started["config_json"])["policy_version"] == "hybrid-v1:no-model"
    assert policy.run_config() == {"hybrid": "hybrid-v1:no-model", "explore_rate": 0.0, "model": None,
                                   "model_missing": str(missing)}
    assert sum(policy.fallbacks.values()) == 3 * STEPS
    # plain "hybrid": no model named at all
    assert tiers_of(run(builtin_policy("hybrid", Junction(), 3, explore_rate=0.0))[0])[0]["d1"] == "heuristic"


def test_a_model_that_raises_sends_that_steps_agents_to_the_heuristic(caplog):
    model = Scripted(lambda t: RuntimeError("onnxruntime: bad input") if t in (1, 4) else good(t))
    policy = HybridPolicy(Junction(), model, explore_rate=0.0)
    with caplog.at_level(logging.WARNING, logger="producers.policies"):
        recs, _ = run(policy)
    assert model.calls == STEPS
    expected = ["heuristic" if t in (1, 4) else "policy" for t in range(STEPS)]
    assert [set(tiers.values()) for tiers in tiers_of(recs)] == [{e} for e in expected]
    assert [action_of(r, "d0") for r in recs] == [1 if t in (1, 4) else 2 for t in range(STEPS)]
    assert policy.fallbacks["the model raised RuntimeError"] == 2 * 3
    assert "the model raised RuntimeError" in caplog.text and "bad input" not in caplog.text  # the type only


NAN = float("nan")


@pytest.mark.parametrize("agent,bad", [
    ("d1", 3), ("d1", -1), ("d1", 1.0), ("d1", True), ("d1", "1"), ("d1", None), ("d1", np.array([1])),
    ("d1", np.float32(NAN)),
    ("b0", np.array([NAN, 0.0], np.float32)), ("b0", np.array([0.5], np.float32)), ("b0", np.array([2.0, 0.0])),
    ("b0", np.array([np.inf, 0.0])), ("b0", [[0.1, 0.2]]), ("b0", "ab"), ("b0", None),
])
def test_an_invalid_action_sends_only_that_agent_to_the_heuristic(agent, bad):
    def answer(t):
        out = good(t)
        if t == 2:
            out[agent] = (bad, -0.5)
        return out

    recs, _ = run(HybridPolicy(Junction(), Scripted(answer), explore_rate=0.0))
    tiers = tiers_of(recs)
    assert tiers[2] == {"d0": "policy", "d1": "policy", "b0": "policy", agent: "heuristic"}
    assert all(set(t.values()) == {"policy"} for i, t in enumerate(tiers) if i != 2)
    assert action_of(recs[2], agent) == (1 if agent == "d1" else BOX_ACTION)
    assert action_of(recs[2], "d0") == 2


@pytest.mark.parametrize("answer", [
    lambda t: {**good(t), "d1": (0, NAN)},            # a log-probability that is not a number
    lambda t: {"d0": good(t)["d0"], "b0": good(t)["b0"]},  # no answer for d1
    lambda t: {**good(t), "d1": 0},                   # not an (action, log_prob) pair
])
def test_a_bad_log_prob_or_a_missing_answer_is_invalid_too(answer):
    tiers = tiers_of(run(HybridPolicy(Junction(), Scripted(answer), explore_rate=0.0))[0])
    assert all(t == {"d0": "policy", "d1": "heuristic", "b0": "policy"} for t in tiers)


def test_a_model_that_answers_no_mapping_falls_for_everyone():
    tiers = tiers_of(run(HybridPolicy(Junction(), Scripted(lambda t: [1, 2, 3]), explore_rate=0.0))[0])
    assert all(set(t.values()) == {"heuristic"} for t in tiers)


def test_a_failing_heuristic_falls_to_random():
    class BadRule(Junction):
        def heuristic_action(self, agent, observation):
            if agent == "b0":
                return np.array([3.0, 3.0])  # out of bounds
            if agent == "d1":
                raise ZeroDivisionError("rule")
            return 1

    policy = HybridPolicy(BadRule(), None, explore_rate=0.0, seed=2)
    recs, _ = run(policy, BadRule())
    assert all(t == {"d0": "heuristic", "d1": "random", "b0": "random"} for t in tiers_of(recs))
    uniform = {"d1": -math.log(3), "b0": -2 * math.log(2)}  # RandomPolicy's exact log-probabilities
    for r in recs:
        for a in r["actions"]:
            if a["agent_id"] in uniform:
                assert a["log_prob"] == pytest.approx(uniform[a["agent_id"]])
    assert policy.fallbacks["the heuristic raised ZeroDivisionError"] == STEPS
    assert policy.fallbacks["the heuristic gave no valid action"] == STEPS


def test_an_env_without_a_heuristic_decides_at_random_below_the_model():
    model = Scripted(lambda t: ValueError() if t % 2 else good(t))
    tiers = tiers_of(run(HybridPolicy(NoRule(), model, explore_rate=0.0), NoRule())[0])
    assert [set(t.values()) for t in tiers] == [{"random"} if t % 2 else {"policy"} for t in range(STEPS)]


# ---- exploration ----------------------------------------------------------------------------------

def tier_counts(policy, calls):
    env = Junction()
    counts = {"policy": 0, "heuristic": 0, "random": 0}
    obs, _ = env.reset()
    for _ in range(calls):
        policy.act(obs)
        for t in policy.last_tiers.values():
            counts[t] += 1
    return counts


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.7])
def test_exploration_takes_the_configured_share_of_the_heuristics_decisions(rate):
    n = 3 * 1000
    counts = tier_counts(HybridPolicy(Junction(), None, explore_rate=rate, seed=11), 1000)
    share = counts["random"] / n
    # binomial: 4.5 standard deviations (a false alarm about once in 150 000 seeds; the seed is fixed)
    assert abs(share - rate) <= 4.5 * math.sqrt(rate * (1 - rate) / n), (rate, counts)
    assert counts["heuristic"] + counts["random"] == n and counts["policy"] == 0


def test_exploration_at_zero_and_one_and_never_over_a_valid_model():
    assert tier_counts(HybridPolicy(Junction(), None, explore_rate=0.0), 200)["random"] == 0
    assert tier_counts(HybridPolicy(Junction(), None, explore_rate=1.0), 200)["random"] == 600
    assert tier_counts(HybridPolicy(Junction(), Scripted(good), explore_rate=1.0), 200)["policy"] == 600


def test_the_same_seed_gives_the_same_decisions_and_another_seed_others():
    def decisions(seed):
        recs, _ = run(HybridPolicy(Junction(), None, explore_rate=0.5, seed=seed), episodes=4)
        return [(a["agent_id"], a["decision_tier"], a["discrete"], a["continuous"]) for r in recs for a in r["actions"]]

    assert decisions(5) == decisions(5) != decisions(6)


@pytest.mark.parametrize("name,kwargs,match", [
    ("hybrid", {"explore_rate": 1.5}, "from 0 to 1"),
    ("hybrid", {"explore_rate": NAN}, "from 0 to 1"),
    ("hybrid:torch:x.pt", {}, "hybrid:onnx:PATH"),
    ("hybrid:onnx:", {}, "hybrid:onnx:PATH"),
    ("random", {"explore_rate": 0.2}, "applies to --policy hybrid"),
    ("greedy", {}, "unknown policy"),
])
def test_policy_names_and_rates_it_cannot_use_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builtin_policy(name, Junction(), 0, **kwargs)


def test_a_model_file_that_exists_needs_the_trusted_key(tmp_path):
    (tmp_path / "p.onnx").write_bytes(b"not checked without a key")
    with pytest.raises(ValueError, match="trusted public key"):
        builtin_policy(HYBRID_ONNX_PREFIX + str(tmp_path / "p.onnx"), Junction(), 0)


# ---- what the harness records ---------------------------------------------------------------------

def test_plain_policies_record_their_own_tier():
    class Learned:  # a learner's policy: no last_tiers
        version = "learned-v1"

        def act(self, observations, state=None):
            return good(0)

    assert set(tiers_of(run(Learned())[0])[0].values()) == {"policy"}
    assert set(tiers_of(run(RandomPolicy(Junction(), seed=0))[0])[0].values()) == {"random"}
    assert set(tiers_of(run(HeuristicPolicy(Junction()))[0])[0].values()) == {"heuristic"}


@pytest.mark.parametrize("tiers", [{"d0": "policy", "d1": "policy"}, {"d0": "policy", "d1": "greedy", "b0": "random"}])
def test_a_tier_the_harness_cannot_write_fails_the_step_before_its_joint_action(tiers):
    class Liar:
        version = "liar-v1"
        last_tiers = tiers

        def act(self, observations, state=None):
            return good(0)

    sink = MemorySink()
    log = EventLog(sink, run_id="h1", producer_id="test")
    with pytest.raises(HarnessError, match="decision tier"):
        run_episodes(Junction(), Liar(), log, episodes=1, seed=0, env_id="junction_v0", env_version="0", config={})
    types = [CODEC.decode(v)[1]["event_type"] for _, _, v in sink.sent]
    assert "joint.action" not in types and types[-1] == "run.finished"
    assert CODEC.decode(sink.sent[-1][2])[1]["status"] == "failed"


class AllDiscrete(Junction):
    """Junction with every agent in Discrete(3) (the learners' shared policy needs one action space)."""

    def action_space(self, agent):
        return spaces.Discrete(3)

    def heuristic_action(self, agent, observation):
        return 1


def test_readers_of_joint_actions_take_the_new_field():
    """The stream processor (decision interpreter) and the learners' replay read hybrid runs."""
    model = Scripted(lambda t: ValueError() if t == 3 else {a: (2, -0.1) for a in ("d0", "d1", "b0")})
    recs, sink = run(HybridPolicy(AllDiscrete(), model, explore_rate=0.5, seed=4), AllDiscrete(), episodes=2)
    assert {t for tiers in tiers_of(recs) for t in tiers.values()} == {"policy", "heuristic", "random"}
    records = records_from_memory(sink.sent)
    p = Processor(max_pending=None, max_states=None)
    outs = [CODEC.decode(e.value)[1] for r in records if r.topic in INPUT_TOPICS
            for e in p.feed(r.topic, r.partition, r.offset, r.key, r.value)] + \
        [CODEC.decode(e.value)[1] for e in p.finish()]
    assert [e["event_type"] for e in outs if e["event_type"] == "dead.letter"] == []
    assert sum(e["event_type"] == "di.credit" for e in outs) == len(recs) == 2 * STEPS
    replay = read_records_of_run(records, "h1")
    assert replay.env_steps == 2 * STEPS and len(replay.episodes) == 2


# ---- schema evolution -----------------------------------------------------------------------------

def _apache_read(body: bytes, writer: dict, reader: dict) -> dict:
    return avro.io.DatumReader(avro.schema.parse(json.dumps(writer)), avro.schema.parse(json.dumps(reader))).read(
        avro.io.BinaryDecoder(io.BytesIO(body)))


def test_published_joint_action_vectors_still_read_with_an_empty_tier():
    """The vectors (tests/vectors/hashing.json) were written before decision_tier: the codec finds
    their writer (joint_action.v0) by fingerprint and the current schema reads them, the new field
    taking its default; the Apache avro package resolves them the same way."""
    old = schemas.history()["joint_action.v0"]
    current = schemas.load("joint_action")
    vectors = [e for e in VECTORS["events"] if e["schema"] == "joint_action"]
    assert len(vectors) == 4
    assert CODEC.fingerprint("joint_action").hex() != vectors[0]["fingerprint_hex"]
    for ev in vectors:
        value = bytes.fromhex(ev["value_hex"])
        name, rec = CODEC.decode(value)
        assert name == "joint_action" and rec["seq"] == ev["seq"] and rec["event_hash"].hex() == ev["event_hash"]
        assert [a["decision_tier"] for a in rec["actions"]] == [""]
        as_written = fastavro.schemaless_reader(io.BytesIO(value[10:]), fastavro.parse_schema(old), None)
        assert rec == {**as_written, "actions": [{**a, "decision_tier": ""} for a in as_written["actions"]]}
        assert _apache_read(value[10:], old, current) == rec


def test_new_joint_actions_are_written_with_the_new_schema_and_both_libraries_agree():
    recs, sink = run(HybridPolicy(Junction(), None, explore_rate=0.5, seed=3))
    current = schemas.load("joint_action")
    for t, _, value in sink.sent:
        if t != "marl.joint.action":
            continue
        assert value[2:10] == CODEC.fingerprint("joint_action")
        rec = CODEC.decode(value)[1]
        assert _apache_read(value[10:], current, current) == rec
        assert {a["decision_tier"] for a in rec["actions"]} <= {"heuristic", "random"}


# ---- the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--policy", "random", "--explore-rate", "0.2"], "applies to --policy hybrid"),
    (["--policy", "onnx:p.onnx", "--explore-rate", "0.2"], "applies to --policy hybrid"),
    (["--policy", "hybrid", "--explore-rate", "1.5"], "less than or equal to 1"),
    (["--policy", "hybrid:onnx:{tmp}/unsigned.onnx"], "signature"),
])
def test_marlgrc_run_refuses_what_it_cannot_use_in_one_line(tmp_path, args, match):
    """Before any broker is asked: a wrong rate or policy, and a model file that is there unsigned."""
    import typer
    from typer.testing import CliRunner

    from marlgrc.commands_producers import register

    app = typer.Typer()
    register(app)
    (tmp_path / "unsigned.onnx").write_bytes(b"\x08\x07")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = CliRunner().invoke(app, ["run", "--env", f"{__name__}:Junction", *args, "--home", str(tmp_path),
                                   "--bootstrap", "127.0.0.1:1", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output

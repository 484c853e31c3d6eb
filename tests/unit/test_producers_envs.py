"""The built-in environments: PettingZoo conformance, seeding, hidden labels, heuristics that beat random."""
import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from producers.envs import mailbox_v0, sandbox_v0
from producers.policies import HeuristicPolicy, RandomPolicy
from producers.telemetry import FEATURE_DIM

ENVS = [mailbox_v0, sandbox_v0]


@pytest.mark.parametrize("mod", ENVS, ids=lambda m: m.ENV_ID)
def test_parallel_api(mod):
    parallel_api_test(mod.parallel_env(), num_cycles=200)


@pytest.mark.parametrize("mod", ENVS, ids=lambda m: m.ENV_ID)
def test_two_copies_same_seed(mod):
    parallel_seed_test(mod.parallel_env)


@pytest.mark.parametrize("mod", ENVS, ids=lambda m: m.ENV_ID)
def test_docstring_table(mod):
    for word in ("Agents", "Observation", "Rewards", "Arguments", "State"):
        assert word.lower() in mod.__doc__.lower()


def episode_returns(mod, make_policy, episodes=20):
    out = []
    for s in range(episodes):
        env = mod.parallel_env()
        obs, _ = env.reset(seed=s)
        policy, total = make_policy(env, s), 0.0
        while env.agents:
            chosen = policy.act({a: obs[a] for a in env.agents})
            obs, rew, *_ = env.step({a: c[0] for a, c in chosen.items()})
            total += sum(rew.values())
        out.append(total)
    return float(np.mean(out))


@pytest.mark.parametrize("mod", ENVS, ids=lambda m: m.ENV_ID)
def test_heuristic_beats_random(mod):
    heuristic = episode_returns(mod, lambda e, s: HeuristicPolicy(e))
    random = episode_returns(mod, lambda e, s: RandomPolicy(e, s))
    assert heuristic > random + 2.0, (heuristic, random)


def test_mailbox_hides_label_and_identifiers():
    env = mailbox_v0.parallel_env(inbox_size=50)
    obs, _ = env.reset(seed=1)
    mal = env._malicious.copy()
    assert 0 < mal.sum() < 50
    # no observation or state feature equals the hidden label on every item
    rows = []
    while env.agents:
        rows.append(np.concatenate([env.state(), *obs.values()]))
        obs, *_ = env.step({a: 0 for a in env.agents})
    rows = np.array(rows)
    assert not any(np.array_equal(rows[:, j] > 0.5, mal) for j in range(rows.shape[1]))
    raw = env.raw_identifiers()
    assert len(raw) >= 50 + 5
    assert all(isinstance(v.plaintext, bytes) and v.raw_id for v in env.subject_fields(None))


def test_mailbox_conflict_and_breach_reported():
    env = mailbox_v0.parallel_env(inbox_size=30, malicious_rate=1.0)
    env.reset(seed=2)
    mal = bool(env._malicious[0])
    _, rew, _, _, infos = env.step({"get": mailbox_v0.GET, "open": mailbox_v0.OPEN, "bin": mailbox_v0.BIN})
    assert infos["get"]["conflict"] is True
    assert infos["open"]["breach"] is mal
    assert rew["open"] == (-10.0 if mal else 1.0)


def test_sandbox_containment_terminates_agent():
    env = sandbox_v0.parallel_env(n_sandboxes=2)
    obs, _ = env.reset(seed=0)
    assert obs["sandbox_0"].shape == (FEATURE_DIM,) and env.state().shape == (2 * FEATURE_DIM,)
    _, _, terms, _, infos = env.step({"sandbox_0": sandbox_v0.QUARANTINE_FILE,
                                      "sandbox_1": sandbox_v0.CONTINUE_MONITORING})
    assert terms == {"sandbox_0": True, "sandbox_1": False} and env.agents == ["sandbox_1"]
    assert infos["sandbox_0"]["detected"] != infos["sandbox_0"]["false_positive"]


def test_sandbox_replays_recorded_telemetry_with_flags():
    records = [{"severity": 0.9, "is_malicious": True}, "garbage", {"cpu_usage": "high", "is_malicious": False}]
    env = sandbox_v0.parallel_env(n_sandboxes=1, telemetry=records, max_cycles=6)
    obs, infos = env.reset(seed=0)
    seen = [infos["sandbox_0"]["flags"]]
    while env.agents:
        obs, _, _, _, infos = env.step({"sandbox_0": 0})
        seen.append(infos["sandbox_0"]["flags"])
    assert any("malformed:record" in f for f in seen)
    assert any("malformed:cpu_usage" in f for f in seen)

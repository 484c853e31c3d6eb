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


# ---- sandbox_v0 reward (version 1): aligned with containment outcomes -------------------------

def _sandbox_return(actions, malicious: bool, seed: int = 3, max_cycles: int = 20):
    """Return of one agent that plays ``actions`` (then monitors) on a known sample; and its infos."""
    env = sandbox_v0.parallel_env(n_sandboxes=1, max_cycles=max_cycles, malicious_rate=1.0 if malicious else 0.0)
    env.reset(seed=seed)
    total, infos, plan = 0.0, [], list(actions)
    while env.agents:
        act = plan.pop(0) if plan else sandbox_v0.CONTINUE_MONITORING
        _, rew, _, _, info = env.step({"sandbox_0": act})
        total += rew["sandbox_0"]
        infos.append(info["sandbox_0"])
    return total, infos


def test_sandbox_isolation_credit_is_paid_once_per_sample():
    r = sandbox_v0.step_reward
    first = r(sandbox_v0.INCREASE_ISOLATION, True, 0.3)
    again = r(sandbox_v0.INCREASE_ISOLATION, True, 0.3, frozenset({sandbox_v0.INCREASE_ISOLATION}))
    assert first == pytest.approx(0.5 - 0.5 - 0.3) and again == pytest.approx(-0.5 - 0.3)
    # the severity cost is charged on every uncontained step whatever the action
    for act in (sandbox_v0.CONTINUE_MONITORING, sandbox_v0.INCREASE_ISOLATION, sandbox_v0.REQUEST_HUMAN_REVIEW):
        assert r(act, True, 0.9, frozenset({1, 4})) == pytest.approx(-0.5 - 0.9)
        assert r(act, True, 0.9, frozenset({1, 4})) < r(act, True, 0.2, frozenset({1, 4}))
    # containment: seed 002's detection rewards; false positives keep their cost
    assert r(sandbox_v0.QUARANTINE_FILE, True, 1.0) == 1.5 and r(sandbox_v0.TERMINATE_PROCESS, True, 1.0) == 1.0
    assert r(sandbox_v0.QUARANTINE_FILE, False, 0.1) == -1.0 and r(sandbox_v0.TERMINATE_PROCESS, False, 0.1) == -1.0
    assert r(sandbox_v0.INCREASE_ISOLATION, False, 0.1) == -0.2 and r(sandbox_v0.CONTINUE_MONITORING, False, 0.1) == 0.1
    with pytest.raises(ValueError, match="not one of 0..4"):
        r(7, True, 0.5)


def test_sandbox_keeping_a_malicious_sample_isolated_no_longer_pays():
    # version 0 paid +0.5 per isolated step: 20 steps of isolation (+10) beat quarantining (+1.5)
    isolate, infos = _sandbox_return([sandbox_v0.INCREASE_ISOLATION] * 20, malicious=True)
    quarantine, qinfos = _sandbox_return([sandbox_v0.QUARANTINE_FILE], malicious=True)
    assert quarantine == 1.5 and qinfos == [{"detected": True, "false_positive": False, "uncontained": False,
                                             "flags": []}]
    assert isolate < -10.0, isolate
    assert len(infos) == 20 and all(i["uncontained"] and not i["detected"] for i in infos)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sandbox_containing_a_malicious_sample_at_once_beats_every_delay(seed):
    """Exhaustive over every 1..3 uncontained steps followed by containment (or none): nothing beats
    quarantining at once, so the reward-optimal policy leaves no malicious step uncontained."""
    import itertools

    best, _ = _sandbox_return([sandbox_v0.QUARANTINE_FILE], malicious=True, seed=seed)
    waits = (sandbox_v0.CONTINUE_MONITORING, sandbox_v0.INCREASE_ISOLATION, sandbox_v0.REQUEST_HUMAN_REVIEW)
    ends = (sandbox_v0.TERMINATE_PROCESS, sandbox_v0.QUARANTINE_FILE, None)
    for n in (1, 2, 3):
        for delay in itertools.product(waits, repeat=n):
            for end in ends:
                plan = list(delay) + ([end] if end is not None else [sandbox_v0.INCREASE_ISOLATION] * 20)
                ret, _ = _sandbox_return(plan, malicious=True, seed=seed)
                assert ret < best, (plan, ret, best)
    # and on a benign sample, watching beats every containment (false positive)
    watch, _ = _sandbox_return([], malicious=False, seed=seed)
    assert watch == pytest.approx(0.1 * 20)
    for act in (sandbox_v0.TERMINATE_PROCESS, sandbox_v0.QUARANTINE_FILE, sandbox_v0.INCREASE_ISOLATION,
                sandbox_v0.REQUEST_HUMAN_REVIEW):
        assert _sandbox_return([act], malicious=False, seed=seed)[0] < watch

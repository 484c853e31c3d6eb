"""banking_v0 (seed 003's BANKING demo): PettingZoo conformance, seeding, the channel model and the
constraints against the seed's numbers, the reward terms, personal data through the privacy layer
only, the heuristic against random, and a short MAPPO run through the event log that beats random."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from producers.envs import banking_v0 as B
from producers.policies import HeuristicPolicy, RandomPolicy


def play(env, policy, seed):
    """One episode; (team return, per-step infos, metrics)."""
    obs, _ = env.reset(seed=seed)
    total, steps = 0.0, []
    while env.agents:
        chosen = policy.act({a: obs[a] for a in env.agents})
        obs, rew, _, _, infos = env.step({a: c[0] for a, c in chosen.items()})
        total += sum(rew.values())
        steps.append(infos)
    return total, steps, env.metrics()


class Fixed:
    version = "fixed-v1"

    def __init__(self, channels):
        self.channels = channels

    def act(self, observations, state=None):
        return {a: (self.channels[a], 0.0) for a in observations}


def quiet(env, load=(0.0, 0.0, 0.0)):
    """No background traffic from now on, and the given loads in flight."""
    env._rates = np.zeros(3)
    env._load = np.array(load, np.float64)


# --- API and seeding ----------------------------------------------------------------------------

def test_parallel_api():
    parallel_api_test(B.parallel_env(), num_cycles=200)


def test_pettingzoo_seed_test():
    parallel_seed_test(B.parallel_env)


def _trajectory(seed, policy_seed=3):
    env = B.parallel_env(max_cycles=30)
    obs, _ = env.reset(seed=seed)
    policy = RandomPolicy(env, policy_seed)
    out = [np.concatenate([env.state(), *obs.values()])]
    while env.agents:
        chosen = policy.act(obs)
        obs, rew, _, _, infos = env.step({a: c[0] for a, c in chosen.items()})
        out.append(np.concatenate([env.state(), *obs.values(), list(rew.values()),
                                   [i["latency_ms"] for i in infos.values()]]))
    return out, env.metrics(), [v.raw_id for v in env.subject_fields(None)]


def test_two_copies_with_the_same_seed_agree_and_other_seeds_differ():
    a, ma, ida = _trajectory(7)
    b, mb, idb = _trajectory(7)
    c, mc, idc = _trajectory(8)
    assert len(a) == len(b) == 31 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert ma == mb and ida == idb
    assert not all(np.array_equal(x, y) for x, y in zip(a, c)) and ma != mc and ida != idc


def test_docstring_opens_with_the_table():
    doc = B.__doc__
    table = doc[doc.index("| | |"):]
    for word in ("Agents", "Action", "Observation", "State", "Rewards", "Termination", "Metrics", "Arguments",
                 "20 ms", "80 ms", "200 ms"):
        assert word.lower() in doc.lower(), word
    assert doc.index("| | |") < doc.index("Where seed 003 is silent") and "Discrete(3)" in table


def test_spaces_and_episode_end():
    env = B.parallel_env(max_cycles=5)
    obs, _ = env.reset(seed=0)
    assert env.possible_agents == ["router_0", "router_1", "router_2"]
    assert all(o.shape == (10,) and env.observation_space(a).contains(o) for a, o in obs.items())
    assert env.state().shape == env.state_space.shape == (27,) and env.state_space.contains(env.state())
    assert env.action_space("router_1").n == 3
    for t in range(5):
        assert env.agents
        _, _, terms, truncs, _ = env.step({a: B.INTERNAL for a in env.agents})
    assert not env.agents and all(truncs.values()) and not any(terms.values())
    with pytest.raises(RuntimeError, match="reset"):
        env.step({})
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not 0 .internal."):
        env.step({"router_0": 3, "router_1": 0, "router_2": 0})


# --- the channel model against seed 003 ---------------------------------------------------------

def test_channels_at_zero_load_are_the_seeds():
    assert [B.channel_latency(c, 0.0) for c in range(3)] == [20.0, 80.0, 200.0]
    assert [B.transaction_risk(c, 1) for c in range(3)] == [0.03, 0.02, 0.01]  # a standard-rated customer
    assert [B.channel_cost(c) for c in range(3)] == [0.10, 0.50, 2.00]
    # in the env: one router alone on each idle channel gets exactly the seed's latency and cost
    for c, lat in ((B.INTERNAL, 20.0), (B.EXTERNAL, 80.0), (B.BLOCKCHAIN, 200.0)):
        env = B.parallel_env(n_routers=1)
        env.reset(seed=1)
        quiet(env)
        _, rew, _, _, infos = env.step({"router_0": c})
        i = infos["router_0"]
        assert i["latency_ms"] == lat and i["cost"] == B.COST[c] and i["channel"] == B.CHANNELS[c]
        assert i["risk"] == pytest.approx(B.BASE_RISK[c] * B.PROFILE_RISK[env._profile[0]])


def test_latency_rises_with_load_as_documented():
    # base * (1 + ahead / capacity): doubles at capacity, linear in between
    assert B.channel_latency(B.INTERNAL, 1.5) == pytest.approx(40.0)
    assert B.channel_latency(B.EXTERNAL, 4.0) == pytest.approx(100.0)
    assert B.channel_latency(B.BLOCKCHAIN, 40.0) == pytest.approx(400.0)
    lat = B.channel_latency(np.zeros(6, np.int64), np.arange(6.0))
    assert np.all(np.diff(lat) > 0) and np.allclose(np.diff(lat), 20.0 / 1.5)
    assert np.allclose(B.next_load([2.0, 4.0, 0.0], [3, 0, 0], [1, 0, 2]), [5.0, 2.0, 2.0])
    # in the env: three routers on the idle internal channel each have the two others ahead of them
    env = B.parallel_env()
    env.reset(seed=2)
    quiet(env)
    _, _, _, _, infos = env.step({a: B.INTERNAL for a in env.agents})
    assert all(i["latency_ms"] == pytest.approx(20.0 * (1 + 2 / 1.5)) for i in infos.values())
    assert np.allclose(env._load, [3.0, 0.0, 0.0])
    # the next step: half of that load is still in flight
    _, _, _, _, infos = env.step({a: B.INTERNAL for a in env.agents})
    assert all(i["latency_ms"] == pytest.approx(20.0 * (1 + (1.5 + 2) / 1.5)) for i in infos.values())
    obs = env._observations()
    assert obs["router_0"][4] == pytest.approx(4.5 / B.LOAD_SCALE)  # the router sees the load


def test_a_violation_is_counted_exactly_at_the_limits():
    assert not B.latency_violation(np.nextafter(100.0, 0.0)) and B.latency_violation(100.0)
    assert not B.risk_violation(np.nextafter(0.05, 0.0)) and B.risk_violation(0.05)
    # latency exactly 100 ms: three routers on external with 4 in flight before the step -> 2 + 2 ahead
    env = B.parallel_env()
    env.reset(seed=3)
    quiet(env, (0.0, 4.0, 0.0))
    env._profile = np.zeros(3, np.int64)  # low risk: no portfolio violation
    _, _, _, _, infos = env.step({a: B.EXTERNAL for a in env.agents})
    assert all(i["latency_ms"] == 100.0 and i["latency_violation"] for i in infos.values())
    assert all(i["step_violations"] == 3 and not i["risk_violation"] for i in infos.values())
    m = env.metrics()
    assert m["latency_violations"] == 3 and m["risk_violations"] == 0 and m["constraint_violations"] == 3
    # portfolio risk: a high-rated customer on internal (9%) with most of the money breaks the 5% limit
    env = B.parallel_env()
    env.reset(seed=3)
    quiet(env)
    env._profile = np.array([2, 0, 0])
    env._amount = np.array([9000.0, 500.0, 500.0])
    _, rew, _, _, infos = env.step({"router_0": B.INTERNAL, "router_1": B.EXTERNAL, "router_2": B.EXTERNAL})
    p = (9000 * 0.09 + 1000 * 0.01) / 10000
    assert infos["router_0"]["portfolio_risk"] == pytest.approx(p) and p >= 0.05
    assert all(i["risk_violation"] and i["step_violations"] == 1 for i in infos.values())
    assert env.metrics()["risk_violations"] == 1 and env.metrics()["risk_violation_rate"] == 1.0
    # the same transaction on blockchain (3%) keeps the portfolio under the limit
    env.reset(seed=3)
    quiet(env)
    env._profile = np.array([2, 0, 0])
    env._amount = np.array([9000.0, 500.0, 500.0])
    _, rew2, _, _, infos = env.step({"router_0": B.BLOCKCHAIN, "router_1": B.EXTERNAL, "router_2": B.EXTERNAL})
    assert infos["router_0"]["portfolio_risk"] < 0.05 and not infos["router_0"]["risk_violation"]
    assert rew2["router_1"] - rew["router_1"] == pytest.approx(B.RISK_PENALTY)  # every router paid the penalty


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_follow_the_rule_on_every_random_step(seed):
    env = B.parallel_env()
    _, steps, m = play(env, RandomPolicy(env, seed), seed)
    lat = [i["latency_ms"] for s in steps for i in s.values()]
    lat_v = [i["latency_violation"] for s in steps for i in s.values()]
    assert lat_v == [x >= 100.0 for x in lat] and 0 < sum(lat_v) < len(lat)
    risk_v = [s["router_0"]["risk_violation"] for s in steps]
    assert risk_v == [s["router_0"]["portfolio_risk"] >= 0.05 for s in steps]
    assert all(len({i["risk_violation"] for i in s.values()}) == 1 for s in steps)
    assert m["latency_violations"] == sum(lat_v) and m["risk_violations"] == sum(risk_v)
    assert m["constraint_violations"] == sum(s["router_0"]["step_violations"] for s in steps)
    assert m["avg_latency_ms"] == pytest.approx(np.mean(lat)) and m["steps"] == 50 and m["transactions"] == 150
    assert m["total_cost"] == pytest.approx(sum(i["cost"] for s in steps for i in s.values()))
    assert m["share_internal"] + m["share_external"] + m["share_blockchain"] == pytest.approx(1.0)


def test_portfolio_risk_and_contributions():
    amounts, risks = [1000.0, 3000.0], [0.03, 0.01]
    assert B.portfolio_risk(amounts, risks) == pytest.approx((30 + 30) / 4000)
    assert B.risk_contributions(amounts, risks).sum() == pytest.approx(B.portfolio_risk(amounts, risks))
    assert B.portfolio_risk([0.0], [0.5]) == 0.0
    assert [B.transaction_risk(B.INTERNAL, p) for p in range(3)] == pytest.approx([0.015, 0.03, 0.09])


def test_reward_terms_and_weights():
    t = B.reward_terms(20.0, 0.10, 0.03, 0.03)
    assert t == pytest.approx({"latency": 0.2, "cost": 0.1, "risk": 0.6, "latency_violation": 0.0,
                               "risk_violation": 0.0})
    assert B.router_reward(20.0, 0.10, 0.03, 0.03) == pytest.approx(-0.9)
    t = B.reward_terms(100.0, 0.50, 0.06, 0.05)
    assert t == pytest.approx({"latency": 1.0, "cost": 0.5, "risk": 1.2, "latency_violation": 1.0,
                               "risk_violation": 5.0})
    assert B.router_reward(250.0, 2.0, 0.0, 0.0) == pytest.approx(-(2.5 + 2.0 + 1.0))
    # a dominant high-rated transaction is cheaper for its router on blockchain than on external
    external = B.router_reward(B.channel_latency(1, 0), 0.5, B.transaction_risk(1, 2), B.transaction_risk(1, 2))
    chain = B.router_reward(B.channel_latency(2, 0), 2.0, B.transaction_risk(2, 2), B.transaction_risk(2, 2))
    assert chain > external
    # the env pays exactly these terms
    env = B.parallel_env()
    env.reset(seed=5)
    amounts = env._amount.copy()  # the step draws the next transactions
    _, rew, _, _, infos = env.step({"router_0": 0, "router_1": 1, "router_2": 2})
    contrib = B.risk_contributions(amounts, [infos[a]["risk"] for a in env.possible_agents])
    for k, a in enumerate(env.possible_agents):
        i = infos[a]
        assert rew[a] == pytest.approx(B.router_reward(i["latency_ms"], i["cost"], contrib[k], i["portfolio_risk"]))


# --- personal data --------------------------------------------------------------------------------

def test_subject_fields_name_the_customer_and_the_observation_holds_no_raw_id():
    env = B.parallel_env()
    obs, _ = env.reset(seed=4)
    for k, a in enumerate(env.possible_agents):
        fields = env.subject_fields(a)
        cust = env._customers[env._cust[k]]
        assert {f.field for f in fields} == {"customer_id", "account_id", "amount"}
        assert all(f.namespace == "customer" and f.raw_id == cust for f in fields)
        assert [f.plaintext for f in fields if f.field == "customer_id"] == [cust.encode()]
    assert len(env.subject_fields(None)) == 9
    raw = env.raw_identifiers()
    assert len(raw) == 2 * env.n_customers
    # observations and state are floats in [0, 1] that do not change when the customers' ids do
    before = ({a: o.copy() for a, o in obs.items()}, env.state())
    env._customers = [f"cust-other-{i}" for i in range(env.n_customers)]
    env._accounts = [f"ACC-other-{i}" for i in range(env.n_customers)]
    after = (env._observations(), env.state())
    assert all(np.array_equal(before[0][a], after[0][a]) for a in obs) and np.array_equal(before[1], after[1])
    assert all(o.dtype == np.float32 for o in obs.values())


def test_personal_data_reaches_events_only_protected(tmp_path):
    from eventlog.log import EventLog, MemorySink
    from eventlog.privacy import FieldProtector, LocalKeyStore
    from producers.harness import HarnessError, run_episodes

    env = B.parallel_env(max_cycles=6)
    with pytest.raises(HarnessError, match="FieldProtector"):
        run_episodes(env, RandomPolicy(env, 0), EventLog(MemorySink(), run_id="b0", producer_id="h"),
                     episodes=1, seed=0, env_id="banking_v0", env_version="0", config={})
    sink = MemorySink()
    with LocalKeyStore(tmp_path / "keys.db") as keys:
        run_episodes(env, RandomPolicy(env, 0), EventLog(sink, run_id="b1", producer_id="h"), episodes=1, seed=9,
                     env_id="banking_v0", env_version="0", config={}, protector=FieldProtector(keys))
    values = [v for _, _, v in sink.sent]
    env.reset(seed=9)  # the same episode's customers and accounts
    raw = {s.encode() for s in env.raw_identifiers()}
    assert len(values) > 6 * 5 and not any(r in v for v in values for r in raw)
    # the same ids protected: the events carry pseudonyms, never the ids
    assert sum(b"customer_id" in v for v in values) >= 6 * 4


# --- baselines and learning -------------------------------------------------------------------------

def test_heuristic_beats_random_on_latency_violations_and_return():
    seeds = range(10)
    env = B.parallel_env()
    h = [play(env, HeuristicPolicy(env), s) for s in seeds]
    r = [play(env, RandomPolicy(env, s), s) for s in seeds]

    def mean(runs, key):
        return float(np.mean([m[key] for _, _, m in runs]))
    assert mean(h, "avg_latency_ms") < mean(r, "avg_latency_ms") - 10.0, (mean(h, "avg_latency_ms"),
                                                                          mean(r, "avg_latency_ms"))
    assert mean(h, "constraint_violations") < 0.8 * mean(r, "constraint_violations")
    assert mean(h, "risk_violations") == 0.0 < mean(r, "risk_violations")
    assert mean(h, "avg_cost") < mean(r, "avg_cost")
    assert np.mean([t for t, _, _ in h]) > np.mean([t for t, _, _ in r]) + 50.0


def test_heuristic_picks_the_cheapest_channel_that_meets_both_constraints():
    env = B.parallel_env()
    env.reset(seed=0)
    obs = np.zeros(10, np.float32)
    obs[1] = 1.0  # low-rated customer, idle channels: internal
    assert env.heuristic_action("router_0", obs) == B.INTERNAL
    obs[4] = 10.0 / B.LOAD_SCALE  # internal busy (20 * (1 + 6 / 1.5) = 100 ms): external
    assert env.heuristic_action("router_0", obs) == B.EXTERNAL
    obs[5] = 1.0  # external busy too: the faster one within the risk limit
    assert env.heuristic_action("router_0", obs) == B.INTERNAL
    obs[1], obs[3] = 0.0, 1.0  # high-rated: only blockchain keeps the transaction under 5%
    assert env.heuristic_action("router_0", obs) == B.BLOCKCHAIN
    obs[:] = 0.0
    obs[2], obs[4] = 1.0, 8.0 / B.LOAD_SCALE  # standard; internal: router_0 fits (87 ms), router_2 not (113)
    assert env.heuristic_action("router_0", obs) == B.INTERNAL and env.heuristic_action("router_2", obs) == B.EXTERNAL


@pytest.mark.timeout(60)
def test_mappo_trained_through_the_event_log_beats_random(tmp_path):
    from eventlog.privacy import FieldProtector, LocalKeyStore
    from learners import algorithm
    from learners.evaluate import evaluate
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env

    env = B.parallel_env(max_cycles=20)
    cfg = algorithm("mappo").config_cls(seed=1, episodes_per_update=10, learning_rate=3e-3)
    with LocalKeyStore(tmp_path / "keys.db") as keys:
        res = train_on_env(env, "banking_v0", "0", "mappo", transport=MemoryTransport(keep=False), iterations=8,
                           seed=1, config=cfg, protector=FieldProtector(keys))
    random_return = evaluate(env, RandomPolicy(env, seed=999), 30, 5000)
    trained = evaluate(env, res.learner, 30, 5000)
    # 3 routers x 20 steps: random scores about -169, the heuristic about -109, this budget about -107
    margin = 30.0
    assert trained > random_return + margin, (random_return, trained, res.curve[-1])
    assert res.curve[-1]["optimizer_steps"] > 0

"""retail_v0 (seed 003's RETAIL demo): PettingZoo conformance, seeding, the seed's cost numbers, local
observations and global state, the base-stock heuristic against random, and short learning runs."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from producers.envs import retail_v0
from producers.envs.retail_v0 import (day_cost, feasible_transfers, holding_cost, serve, stockout_cost,
                                      transfer_cost)
from producers.policies import HeuristicPolicy, RandomPolicy


def nothing(env):
    """Every warehouse orders and sends nothing."""
    return {a: np.zeros(env.n, np.float32) for a in env.agents}


# --- conformance and seeding ----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"continuous_actions": False}, {"lead_time": 1, "reward_mode": "shared"}],
                         ids=["continuous", "discrete", "lead1-shared"])
def test_parallel_api(kw):
    parallel_api_test(retail_v0.parallel_env(**kw), num_cycles=100)


def test_parallel_seed_test():
    parallel_seed_test(retail_v0.parallel_env)


def rollout(seed, policy_seed=3):
    env = retail_v0.parallel_env()
    obs, _ = env.reset(seed=seed)
    pol = RandomPolicy(env, policy_seed)
    trace = []
    while env.agents:
        acts = {a: c[0] for a, c in pol.act(obs).items()}
        obs, rew, *_ = env.step(acts)
        trace.append((env.state().copy(), sorted(rew.items())))
    return trace, env.metrics()


def test_two_copies_with_the_same_seed_agree_and_other_seeds_differ():
    (a, ma), (b, mb), (c, mc) = rollout(7), rollout(7), rollout(8)
    assert len(a) == len(b) == 30
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert ma == mb
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    assert ma["total_cost"] != mc["total_cost"]


def test_docstring_table_and_bad_arguments():
    doc = retail_v0.__doc__
    assert doc.splitlines()[0].startswith("retail_v0:")
    for word in ("Agents", "Observation", "Action", "State", "Rewards", "Termination", "Arguments", "Confidential"):
        assert word.lower() in doc.lower(), word
    assert "$10" in doc and "$0.50" in doc and "$0.10" in doc
    with pytest.raises(ValueError, match="reward_mode"):
        retail_v0.parallel_env(reward_mode="selfish")
    with pytest.raises(ValueError, match="n_warehouses >= 2"):
        retail_v0.parallel_env(n_warehouses=1)
    env = retail_v0.parallel_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="needs 5"):
        env.step({"warehouse_0": np.zeros(3, np.float32)})
    assert not hasattr(env, "subject_fields")  # nothing personal: runs without a key store


# --- the seed's costs (pure functions) ------------------------------------------------------------
def test_cost_terms_are_the_seeds_numbers():
    assert stockout_cost(1) == 10.0 and stockout_cost(7) == 70.0
    assert transfer_cost(1) == 0.5 and transfer_cost(12) == 6.0
    assert holding_cost(1) == pytest.approx(0.1) and holding_cost(30) == pytest.approx(3.0)
    assert day_cost(3, 20, 4) == pytest.approx(30 + 2 + 2)
    np.testing.assert_allclose(day_cost(np.array([0, 2]), np.array([5, 0]), np.array([1, 0])), [1.0, 20.0])


def test_serve_is_lost_sales():
    left, unmet = serve(np.array([5, 10, 0]), np.array([8, 3, 4]))
    assert left.tolist() == [0, 7, 0] and unmet.tolist() == [3, 0, 4]


def test_feasible_transfers_respect_stock_and_capacity():
    req = np.array([[9, 6, 4], [0, 0, 0], [0, 50, 0]], float)  # the diagonal is ignored
    sent = feasible_transfers(req, on_hand=np.array([5, 0, 50]), free=np.array([100, 10, 100]))
    assert sent[0, 0] == 0 and sent[0].sum() <= 5           # sender limited to its stock
    assert sent[:, 1].sum() <= 10                           # receiver limited to its free space
    assert (sent >= 0).all() and sent.dtype == np.int64
    assert feasible_transfers(req, np.array([100, 0, 100]), np.array([100, 100, 100]))[0].tolist() == [0, 6, 4]


def test_env_charges_a_stockout_of_k_units_10k_and_holding_01_per_unit():
    env = retail_v0.parallel_env(demand_low=4.0, demand_high=4.0)
    env.reset(seed=1)
    env._inv[:] = [0, 3, 50, 0, 0]
    _, rew, _, _, infos = env.step(nothing(env))
    for a, i in zip(env.possible_agents, range(5)):
        inf = infos[a]
        start = [0, 3, 50, 0, 0][i]
        assert inf["unmet"] == max(0, inf["demand"] - start)
        held = max(0, start - inf["demand"])
        assert rew[a] == pytest.approx(-(10.0 * inf["unmet"] + 0.1 * held))
    m = env.metrics()
    assert m["stockout_cost"] == pytest.approx(10.0 * m["unmet"])
    assert 0 < m["stockout_rate"] < 1 and m["fill_rate"] == pytest.approx(1 - m["stockout_rate"])


def test_env_charges_transfers_05_per_unit_to_the_sender_and_moves_stock_the_same_day():
    env = retail_v0.parallel_env(demand_low=0.0, demand_high=0.0)  # no demand: only holding and transfer
    env.reset(seed=1)
    env._inv[:] = [40, 0, 0, 0, 0]
    acts = nothing(env)
    acts["warehouse_0"][1:] = [1.0, 0.5, 0.0, 0.0]  # 10 units to warehouse_1, 5 to warehouse_2
    obs, rew, _, _, infos = env.step(acts)
    assert infos["warehouse_0"]["sent"] == 15 and infos["warehouse_1"]["received"] == 10
    assert env._inv.tolist() == [25, 10, 5, 0, 0]
    assert rew["warehouse_0"] == pytest.approx(-(0.5 * 15 + 0.1 * 25))
    assert rew["warehouse_1"] == pytest.approx(-0.1 * 10)
    m = env.metrics()
    assert m["transfer_cost"] == pytest.approx(7.5) and m["units_transferred"] == 15
    assert m["total_cost"] == pytest.approx(-sum(rew.values()))


def test_orders_arrive_after_the_lead_time_and_capacity_refuses_the_rest():
    env = retail_v0.parallel_env(demand_low=0.0, demand_high=0.0, lead_time=2, capacity=30)
    env.reset(seed=0)
    env._inv[:] = 20
    acts = nothing(env)
    acts["warehouse_0"][0] = 1.0  # 20 units
    env.step(acts)
    assert env._inv[0] == 20 and env._pipe[0].tolist() == [20]
    _, _, _, _, infos = env.step(nothing(env))
    assert env._inv[0] == 30 and infos["warehouse_0"]["delivered"] == 10 and infos["warehouse_0"]["refused"] == 10


def test_shared_reward_splits_the_total_cost():
    env = retail_v0.parallel_env(reward_mode="shared")
    env.reset(seed=2)
    _, rew, _, _, infos = env.step(nothing(env))
    total = sum(i["cost"] for i in infos.values())
    assert total > 0 and all(r == pytest.approx(-total / 5) for r in rew.values())


# --- decentralized observations, centralized state --------------------------------------------------
def test_observations_are_local_and_the_state_is_global():
    env = retail_v0.parallel_env()
    env.reset(seed=4)
    before_obs, before_state = env._observations(), env.state()
    env._inv[3] += 17  # another warehouse's stock changes
    after_obs, after_state = env._observations(), env.state()
    for a in env.possible_agents:
        if a == "warehouse_3":
            assert not np.array_equal(before_obs[a], after_obs[a])
        else:
            np.testing.assert_array_equal(before_obs[a], after_obs[a])
    assert not np.array_equal(before_state, after_state)
    assert env.state_space.contains(after_state)
    # the state holds every warehouse's observation block, then the hidden demand rates
    blk = after_state[:5 * env.obs_dim].reshape(5, env.obs_dim)
    for i, a in enumerate(env.possible_agents):
        np.testing.assert_array_equal(blk[i], after_obs[a])
    np.testing.assert_allclose(after_state[5 * env.obs_dim:], env._lambda / env.capacity, rtol=1e-6)


# --- baselines ---------------------------------------------------------------------------------------
def episode_metrics(make_policy, seeds=range(10), **kw):
    out = []
    for s in seeds:
        env = retail_v0.parallel_env(**kw)
        obs, _ = env.reset(seed=s)
        pol, ret = make_policy(env, s), 0.0
        while env.agents:
            obs, rew, *_ = env.step({a: c[0] for a, c in pol.act(obs).items()})
            ret += sum(rew.values())
        m = env.metrics()
        assert m["total_cost"] == pytest.approx(-ret)  # team return is minus the total cost
        out.append(m)
    return {k: float(np.mean([m[k] for m in out])) for k in out[0]}


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "discrete"])
def test_base_stock_heuristic_beats_random_on_cost(continuous):
    heur = episode_metrics(lambda e, s: HeuristicPolicy(e), continuous_actions=continuous)
    rand = episode_metrics(lambda e, s: RandomPolicy(e, 100 + s), continuous_actions=continuous)
    nil = episode_metrics(lambda e, s: type("Nil", (), {"act": lambda self, o: {a: (0, 0.0) for a in o}})(),
                          continuous_actions=False)  # order level 0: nothing
    # fixed seeds 0..9: heuristic ~350 $/episode; random ~2200 (continuous) / ~1100 (discrete)
    assert heur["total_cost"] < 0.5 * rand["total_cost"], (heur, rand)
    # its service level: few stockouts (most are on days 0-1, before the first order arrives), far
    # fewer than not ordering; random's over-ordering (2x mean demand) buys a still lower stockout
    # rate with ~6x the holding cost, so on stockouts alone it is not beaten (see the report)
    assert heur["stockout_rate"] < 0.05 and heur["stockout_rate"] < 0.1 * nil["stockout_rate"], (heur, nil)
    assert heur["holding_cost"] < 0.3 * rand["holding_cost"], (heur, rand)
    assert heur["units_refused"] == 0 < rand["units_refused"]


def test_heuristic_is_a_base_stock_rule():
    env = retail_v0.parallel_env(lead_time=2)
    env.reset(seed=0)
    S = retail_v0.base_stock_level(3.0, 2)
    assert S == pytest.approx(9 + 2.33 * 3)  # 3 days of mean demand 3, plus z * sqrt(9)
    obs = np.zeros(env.obs_dim, np.float32)
    obs[env.lead_time + 3] = 0.03  # demand average 3 units/day
    act = env.heuristic_action("warehouse_0", obs)
    assert act.shape == (5,) and act[1:].tolist() == [0.0] * 4
    assert act[0] * env.max_order == pytest.approx(S, rel=1e-5)
    obs[0], obs[1] = 0.10, 0.02  # 10 on hand, 2 in the pipeline
    assert env.heuristic_action("warehouse_0", obs)[0] * env.max_order == pytest.approx(S - 12, rel=1e-4)
    obs[0] = 0.5
    assert env.heuristic_action("warehouse_0", obs)[0] == 0.0
    obs[0], obs[env.lead_time + 3] = 0.0, 0.5  # an order above max_order is capped at 1
    assert env.heuristic_action("warehouse_0", obs)[0] == 1.0


# --- learning: MAPPO through the event log ----------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("continuous,iterations,margin", [(False, 20, 250.0), (True, 10, 400.0)],
                         ids=["discrete", "continuous"])
def test_mappo_learns_to_beat_random(continuous, iterations, margin):
    import torch

    from learners.evaluate import evaluate
    from learners.mappo import MAPPOConfig
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env

    torch.set_num_threads(1)
    env = retail_v0.parallel_env(continuous_actions=continuous)
    res = train_on_env(env, retail_v0.ENV_ID, retail_v0.ENV_VERSION, "mappo", transport=MemoryTransport(),
                       iterations=iterations, seed=1,
                       config=MAPPOConfig(seed=1, episodes_per_update=10, learning_rate=3e-3))
    random_return = evaluate(env, RandomPolicy(env, seed=999), 20, 5000)
    trained = evaluate(env, res.learner, 20, 5000)
    # random: about -2250 (continuous) / -1120 (discrete) per episode (minus the total cost)
    assert trained > random_return + margin, (random_return, trained, [r["charts/episodic_return"] for r in res.curve])

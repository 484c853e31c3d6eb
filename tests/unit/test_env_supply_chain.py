"""supply_chain_v0 (seed 004): PettingZoo conformance, seeding, the cost terms, lead times and supplier
outages against hand-computed numbers, rationing, the bullwhip and fill-rate formulas, stages, the
base-stock heuristic against random, and a short learning run."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from producers.envs import BUILTIN_ENVS, make_env, supply_chain_v0
from producers.envs.supply_chain_v0 import (BACKLOG, HOLDING, MAX_PRODUCTS, OBS_DIM, ORDER_COST, STAGES,
                                            backlog_cost, base_stock_level, bullwhip, fill_rate, holding_cost,
                                            ordering_cost, ration)
from producers.policies import HeuristicPolicy, RandomPolicy

AGENTS = ["retailer_0", "retailer_1", "distributor_0", "distributor_1", "manufacturer_0", "manufacturer_1"]


def quiet(stage="simple", **kw):
    """An env after reset with no customer demand, no forecasts, empty shelves and pipelines."""
    env = supply_chain_v0.parallel_env(stage=stage, **kw)
    env.reset(seed=0)
    env._mu[:] = 0.0
    env._forecast[:] = 0.0
    env._inv[:] = 0
    env._pipe[:] = 0
    return env


def orders(env, **units):
    """Continuous actions ordering ``units[agent] = {product: units}``; everyone else orders nothing."""
    acts = {a: np.zeros(MAX_PRODUCTS, np.float32) for a in env.agents}
    for a, per_product in units.items():
        for p, q in per_product.items():
            acts[a][p] = q / env.max_order
    return acts


# --- conformance and seeding ----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"continuous_actions": False}, {"stage": "complex", "reward_mode": "shared"},
                                {"stage": "simple", "n_regions": 1, "n_plants": 1}],
                         ids=["continuous", "discrete", "complex-shared", "serial"])
def test_parallel_api(kw):
    parallel_api_test(supply_chain_v0.parallel_env(**kw), num_cycles=60)


def test_parallel_seed_test():
    parallel_seed_test(supply_chain_v0.parallel_env)


def rollout(seed, stage="complex", policy_seed=3):
    env = supply_chain_v0.parallel_env(stage=stage, max_cycles=30)
    obs, _ = env.reset(seed=seed)
    pol = RandomPolicy(env, policy_seed)
    trace = []
    while env.agents:
        obs, rew, *_ = env.step({a: c[0] for a, c in pol.act(obs).items()})
        trace.append((env.state().copy(), sorted(rew.items())))
    return trace, env.metrics()


def test_two_copies_with_the_same_seed_agree_and_other_seeds_differ():
    (a, ma), (b, mb), (c, mc) = rollout(7), rollout(7), rollout(8)
    assert len(a) == len(b) == 30
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert ma == mb
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    assert ma["total_cost"] != mc["total_cost"]


def test_registered_docstring_and_bad_arguments():
    assert BUILTIN_ENVS["supply_chain_v0"] == "producers.envs.supply_chain_v0:parallel_env"
    env, env_id, version = make_env("supply_chain_v0")
    assert env_id == "supply_chain_v0" and version == "0" and env.possible_agents == AGENTS
    doc = supply_chain_v0.__doc__
    assert doc.splitlines()[0].startswith("supply_chain_v0:")
    for word in ("Agents", "Observation", "Action", "State", "Rewards", "Episode end", "Stages", "Metrics",
                 "Arguments", "Confidential", "heuristic"):
        assert word.lower() in doc.lower(), word
    with pytest.raises(ValueError, match="unknown stage 'hard'; choose one of simple, medium, complex"):
        supply_chain_v0.parallel_env(stage="hard")
    with pytest.raises(ValueError, match="reward_mode"):
        supply_chain_v0.parallel_env(reward_mode="selfish")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="needs 10"):
        env.step({"retailer_0": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="choose one of"):
        env.set_stage("expert")
    assert not hasattr(env, "subject_fields")  # nothing personal: runs without a key store


# --- cost terms (pure) ------------------------------------------------------------------------------
def test_cost_terms():
    assert holding_cost(0, [3, 2]) == pytest.approx(2.5) and holding_cost(2, [10]) == pytest.approx(3.0)
    assert backlog_cost(0, [4]) == 8.0 and backlog_cost(1, [4, 1]) == 5.0
    assert ordering_cost([0, 3, 0, 7]) == 2 * ORDER_COST == 1.0
    np.testing.assert_allclose(holding_cost(np.array([0, 1, 2]), np.array([[1, 1], [2, 0], [0, 10]])),
                               [1.0, 0.8, 3.0])
    np.testing.assert_allclose(ordering_cost(np.array([[1, 0], [0, 0]])), [0.5, 0.0])


def test_ration_is_proportional_integer_and_never_over_a_claim():
    assert ration(10, [4, 3]).tolist() == [4, 3]                   # enough for everyone
    assert ration(6, [6, 3]).tolist() == [4, 2]                    # 2/3 each
    assert ration(5, [3, 3]).tolist() == [3, 2]                    # the odd unit: tie -> lower index
    assert ration(5, [1, 9]).tolist() == [1, 4]                    # 0.5 / 4.5: remainders tie -> lower index
    assert ration(0, [2, 2]).tolist() == [0, 0]
    cols = ration(np.array([6, 10, 1]), np.array([[6, 4, 1], [3, 4, 1]]))
    assert cols.tolist() == [[4, 4, 1], [2, 4, 0]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        claims, stock = rng.integers(0, 20, 3), int(rng.integers(0, 40))
        got = ration(stock, claims)
        assert got.sum() == min(stock, claims.sum()) and (got <= claims).all() and (got >= 0).all()


# --- the env's costs, lead times and outages against hand-computed numbers -------------------------
def test_holding_cost_by_tier_and_backlogged_customers():
    env = quiet()
    env._inv[0, :3] = [4, 0, 0]          # retailer_0
    env._inv[2, :3] = [10, 0, 0]         # distributor_0
    env._inv[4, 0] = 8                   # manufacturer_0 (makes products 0 and 2)
    env._cust_backlog[1, 1] = 5          # retailer_1's customers wait for 5 of product 1
    _, rew, _, _, infos = env.step(orders(env))
    assert rew["retailer_0"] == pytest.approx(-0.5 * 4)
    assert rew["distributor_0"] == pytest.approx(-0.4 * 10)
    assert rew["manufacturer_0"] == pytest.approx(-0.3 * 8)
    assert rew["retailer_1"] == pytest.approx(-2.0 * 5) and infos["retailer_1"]["backlog"] == 10.0
    assert rew["distributor_1"] == rew["manufacturer_1"] == 0.0
    m = env.metrics()
    assert m["holding_cost"] == pytest.approx(2 + 4 + 2.4) and m["backlog_cost"] == 10.0
    assert m["total_cost"] == pytest.approx(-sum(rew.values()))
    assert HOLDING == (0.5, 0.4, 0.3) and BACKLOG == (2.0, 1.0, 1.0)


def test_customers_are_served_backlog_first_and_the_fill_rate_counts_same_step_service():
    env = quiet()
    env._inv[0, 0] = 6
    env._cust_backlog[0, 0] = 2
    env._mu[0, 0] = 60.0  # a demand far above the stock
    env.step(orders(env))
    demand = env.metrics()["customer_demand"]
    # 6 on hand: 2 to the waiting customers first, 4 to this step's demand, the rest of it waits
    assert demand > 10 and env._inv[0, 0] == 0 and env._cust_backlog[0, 0] == demand - 4
    m = env.metrics()
    assert m["filled"] == 4 and m["fill_rate"] == pytest.approx(4 / demand)


def test_a_short_tier_owes_the_rest_and_pays_backlog():
    env = quiet()
    env._inv[2, 0] = 4                   # distributor_0 holds 4 of product 0
    _, rew, _, _, infos = env.step(orders(env, retailer_0={0: 10}))
    assert infos["distributor_0"]["shipped"] == 4 and env._owed[0, 0] == 6
    assert rew["distributor_0"] == pytest.approx(-1.0 * 6)              # 6 backordered, nothing left on hand
    assert rew["retailer_0"] == pytest.approx(-ORDER_COST)              # one order line
    obs = env._observations()
    f = obs["retailer_0"][3:3 + 8 * MAX_PRODUCTS].reshape(MAX_PRODUCTS, 8)
    assert f[0, 2] == pytest.approx(0.04) and f[0, 3] == pytest.approx(0.06)  # 4 in transit, 6 owed to it
    g = obs["distributor_0"][3:3 + 8 * MAX_PRODUCTS].reshape(MAX_PRODUCTS, 8)
    assert g[0, 1] == pytest.approx(0.06) and g[0, 4] == pytest.approx(0.10)  # owes 6, received an order of 10


def test_plants_split_a_short_product_between_distributors_proportionally():
    env = quiet()
    env._inv[4, 0] = 9                   # manufacturer_0 holds 9 of product 0
    env.step(orders(env, distributor_0={0: 12}, distributor_1={0: 6}))
    assert env._pipe[2, 0].sum() == 6 and env._pipe[3, 0].sum() == 3
    assert env._owed[2, 0] == 6 and env._owed[3, 0] == 3


def test_shipments_arrive_after_each_tiers_lead_time():
    env = quiet()
    env._inv[2, 0] = 5                   # distributor_0 -> retailer_0: 1 step
    env._inv[4, 0] = 7                   # manufacturer_0 -> distributor_1: 2 steps
    env.step(orders(env, retailer_0={0: 5}, distributor_1={0: 7}, manufacturer_1={1: 9}))
    arrivals = {"retailer_0": [], "distributor_1": [], "manufacturer_1": []}
    for _ in range(4):
        _, _, _, _, infos = env.step(orders(env))
        for a in arrivals:
            arrivals[a].append(infos[a]["received"])
    assert arrivals == {"retailer_0": [5, 0, 0, 0], "distributor_1": [0, 7, 0, 0],
                        "manufacturer_1": [0, 0, 9, 0]}  # supplier -> plant: 3 steps
    assert env._inv[0, 0] == 5 and env._inv[3, 0] == 7 and env._inv[5, 1] == 9


def test_a_supplier_outage_refuses_the_plants_order_unbilled_and_is_observed():
    env = quiet(stage="medium")          # 4 suppliers, 6 products: product p from supplier p % 4
    env._outage[1] = 3                   # supplier 1 (products 1 and 5) is down
    obs = env._observations()["manufacturer_1"][3:3 + 8 * MAX_PRODUCTS].reshape(MAX_PRODUCTS, 8)
    assert obs[1, 6] == 0.0 and obs[3, 6] == 1.0 and obs[5, 6] == 0.0 and obs[7, 7] == 0.0
    _, rew, _, _, infos = env.step(orders(env, manufacturer_1={1: 10, 3: 4}))
    assert infos["manufacturer_1"]["refused"] == 10 and infos["manufacturer_1"]["ordered"] == 14
    assert rew["manufacturer_1"] == pytest.approx(-ORDER_COST)          # only product 3's line is billed
    assert env._pipe[5, 1].sum() == 0 and env._pipe[5, 3].sum() == 4
    assert env.metrics()["units_refused"] == 10
    # the outage runs down: 3 steps in all, then the supplier takes orders again (none start: p = 0)
    env.cfg = env.cfg.__class__(**{**env.cfg.__dict__, "outage_p": 0.0})
    for _ in range(2):
        env.step(orders(env))
    assert env._outage[1] == 0
    _, _, _, _, infos = env.step(orders(env, manufacturer_1={1: 10}))
    assert infos["manufacturer_1"]["refused"] == 0 and env.metrics()["outage_steps"] == 3


def test_outages_happen_only_in_the_stages_with_disruptions():
    for stage, expect in (("simple", False), ("medium", True), ("complex", True)):
        seen = 0.0
        for seed in range(4):
            env = supply_chain_v0.parallel_env(stage=stage)
            obs, _ = env.reset(seed=seed)
            while env.agents:
                obs, *_ = env.step({a: c[0] for a, c in HeuristicPolicy(env).act(obs).items()})
            seen += env.metrics()["outage_steps"]
        assert (seen > 0) == expect, stage


def test_shared_reward_splits_the_total_cost():
    env = supply_chain_v0.parallel_env(reward_mode="shared")
    env.reset(seed=2)
    _, rew, _, _, infos = env.step(orders(env, retailer_0={0: 3}))
    total = sum(i["cost"] for i in infos.values())
    assert total > 0 and all(r == pytest.approx(-total / 6) for r in rew.values())


# --- metric formulas ----------------------------------------------------------------------------------
def test_bullwhip_is_the_variance_ratio_of_orders_to_demand():
    assert bullwhip([2, 6, 2, 6], [3, 5, 3, 5]) == pytest.approx(4.0)          # var 4 over var 1
    assert bullwhip([4, 4, 4], [3, 5, 4]) == 0.0                               # smooth orders
    assert bullwhip([1, 9], [5, 5]) == 0.0 and bullwhip([3], [4]) == 0.0       # demand that does not vary
    x = np.random.default_rng(1).poisson(5, 100)
    assert bullwhip(x, x) == pytest.approx(1.0)


def test_fill_rate_and_episode_bullwhip_metrics():
    assert fill_rate(45, 50) == 0.9 and fill_rate(0, 0) == 1.0
    env = supply_chain_v0.parallel_env(stage="simple", max_cycles=20)
    obs, _ = env.reset(seed=5)
    pol = RandomPolicy(env, 1)
    while env.agents:
        obs, *_ = env.step({a: c[0] for a, c in pol.act(obs).items()})
    m, s = env.metrics(), env._series
    assert len(s["demand"]) == 20 and m["customer_demand"] == sum(s["demand"])
    assert m["bullwhip_retailer"] == pytest.approx(np.var(s["retailer"]) / np.var(s["demand"]))
    assert m["bullwhip"] == m["bullwhip_manufacturer"] == pytest.approx(np.var(s["manufacturer"]) / np.var(s["demand"]))
    assert m["fill_rate"] == pytest.approx(m["filled"] / m["customer_demand"])
    assert m["cost_score"] == pytest.approx(-m["total_cost"] / m["customer_demand"])


# --- stages ---------------------------------------------------------------------------------------------
def test_stages_change_the_chain_not_the_spaces():
    env = supply_chain_v0.parallel_env(stage="simple")
    assert env.stages == STAGES == ("simple", "medium", "complex")
    assert supply_chain_v0.parallel_env().stage == "medium"             # the documented default
    spaces = (env.observation_space("retailer_0"), env.action_space("retailer_0"), env.state_space)
    env.reset(seed=1)
    assert env.state_flags() == ["stage:simple"] and env.metrics()["stage_index"] == 0
    env.set_stage("complex")
    assert env.stage == "simple"                                        # the next reset switches
    for stage, products, suppliers in (("complex", 10, 8), ("medium", 6, 4), ("simple", 3, 2)):
        env.set_stage(stage)
        obs, _ = env.reset(seed=1)
        assert env.stage == stage and env.state_flags() == [f"stage:{stage}"]
        assert (env.observation_space("retailer_0"), env.action_space("retailer_0"), env.state_space) == spaces
        handled = obs["retailer_0"][3:3 + 8 * MAX_PRODUCTS].reshape(MAX_PRODUCTS, 8)[:, 7]
        assert handled.tolist() == [1.0] * products + [0.0] * (MAX_PRODUCTS - products)
        assert env.cfg.suppliers == suppliers and obs["retailer_0"].shape == (OBS_DIM,)
        assert env.state_space.contains(env.state())
        m = env.metrics()
        assert m["stage"] == stage and m["stage_index"] == STAGES.index(stage)
    # an unused product slot's order is ignored
    env.step(orders(env, retailer_0={9: 40}))
    assert env.metrics()["ordering_cost"] == 0.0


def test_curriculum_criteria_name_metrics_and_are_ordered():
    env = supply_chain_v0.parallel_env()
    env.reset(seed=0)
    keys = env.metrics()
    assert set(env.CURRICULUM) == set(STAGES)
    for c in env.CURRICULUM.values():
        assert c["metric"] in keys and c["promote_at"] > c["regress_below"]


# --- baselines ----------------------------------------------------------------------------------------
def episode_metrics(make_policy, seeds=range(5), **kw):
    out = []
    for s in seeds:
        env = supply_chain_v0.parallel_env(**kw)
        obs, _ = env.reset(seed=s)
        pol, ret = make_policy(env, s), 0.0
        while env.agents:
            obs, rew, *_ = env.step({a: c[0] for a, c in pol.act(obs).items()})
            ret += sum(rew.values())
        m = env.metrics()
        assert m["total_cost"] == pytest.approx(-ret)  # team return is minus the total cost
        out.append(m)
    return {k: float(np.mean([m[k] for m in out])) for k in out[0] if k != "stage"}


@pytest.mark.parametrize("stage,continuous", [("simple", True), ("medium", True), ("complex", True),
                                              ("medium", False)])
def test_base_stock_heuristic_beats_random_on_cost(stage, continuous):
    heur = episode_metrics(lambda e, s: HeuristicPolicy(e), stage=stage, continuous_actions=continuous)
    rand = episode_metrics(lambda e, s: RandomPolicy(e, 100 + s), stage=stage, continuous_actions=continuous)
    # seeds 0..4: continuous random over-orders (~50x the heuristic's cost); discrete random ~2x
    assert heur["cost_to_serve"] < 0.6 * rand["cost_to_serve"], (heur, rand)
    assert heur["units_refused"] == 0 or not continuous  # it does not order from a supplier it sees down


def test_heuristic_is_a_base_stock_rule_on_the_inventory_position():
    env = supply_chain_v0.parallel_env(stage="simple")
    env.reset(seed=0)
    z = supply_chain_v0.Z_ROLE
    assert z[0] == pytest.approx(0.8416, abs=1e-4)                      # critical ratio 2 / 2.5
    obs = np.zeros(OBS_DIM, np.float32)
    obs[0] = 1.0                                                        # a retailer
    f = obs[3:3 + 8 * MAX_PRODUCTS].reshape(MAX_PRODUCTS, 8)             # a view into obs
    f[0, 5], f[0, 7] = 0.04, 1.0                                        # forecast 4 units, product handled
    f[0, 0], f[0, 2], f[0, 3], f[0, 1] = 0.03, 0.02, 0.01, 0.05          # on hand 3, transit 2, owed to 1, owes 5
    S = base_stock_level(4.0, 1, z[0])
    assert S == pytest.approx(8 + z[0] * np.sqrt(8))
    act = env.heuristic_action("retailer_0", obs)
    assert act[0] * env.max_order == pytest.approx(S - (3 + 2 + 1 - 5), rel=1e-4)
    assert (act[1:] == 0).all()                                          # products not handled: nothing
    obs[0], obs[2] = 0.0, 1.0                                           # a plant whose supplier is down
    f[0, 6] = 0.0
    assert env.heuristic_action("manufacturer_0", obs)[0] == 0.0
    f[0, 6] = 1.0
    L = supply_chain_v0.LEAD_TIME[2]
    assert env.heuristic_action("manufacturer_0", obs)[0] * env.max_order == pytest.approx(
        base_stock_level(4.0, L, z[2]) - 1, rel=1e-4)


# --- learning: MAPPO through the event log ----------------------------------------------------------
@pytest.mark.timeout(90)
def test_mappo_learns_to_beat_random():
    import torch

    from learners.evaluate import evaluate
    from learners.mappo import MAPPOConfig
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env

    torch.set_num_threads(1)
    # the discrete variant (orders as multiples of the forecast) at the first stage, 16-step episodes
    env = supply_chain_v0.parallel_env(stage="simple", max_cycles=16, continuous_actions=False)
    res = train_on_env(env, supply_chain_v0.ENV_ID, supply_chain_v0.ENV_VERSION, "mappo", transport=MemoryTransport(),
                       iterations=8, seed=1, config=MAPPOConfig(seed=1, episodes_per_update=10, learning_rate=3e-3))
    random_return = evaluate(env, RandomPolicy(env, seed=999), 20, 5000)
    trained = evaluate(env, res.learner, 20, 5000)
    # random: about -1710 per episode (minus the total cost of 16 steps); the base-stock rule about -990
    assert trained > random_return + 150, (random_return, trained, [r["charts/episodic_return"] for r in res.curve])

"""resource_allocation_v0 (seed 004): PettingZoo conformance, seeding, the max-min allocator under
contention, DRF fair shares, Jain of known vectors, the reward weights against hand-computed numbers,
waits and the p95, stages, the fair-share heuristic against random, and a short learning run."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from producers.envs import BUILTIN_ENVS, make_env, resource_allocation_v0
from producers.envs.resource_allocation_v0 import (CAPACITY, LATENCY_SCALE, MAX_SHARE, OBS_DIM, PROFILES, STAGES,
                                                   drf_jobs, jain, jobs_served, max_min_fair, p95, reward_terms,
                                                   slo_attainment, utilization)
from producers.policies import HeuristicPolicy, RandomPolicy


def quiet(stage="steady", **kw):
    """An env after reset with empty queues and no arrivals."""
    env = resource_allocation_v0.parallel_env(stage=stage, **kw)
    env.reset(seed=0)
    env._base[:] = 0.0
    env._queue = [[] for _ in range(env.n)]
    env._offered[:] = 0
    return env


def requests(env, **jobs):
    """Continuous actions asking for ``jobs[agent]`` jobs' worth of its profile; the rest ask nothing."""
    acts = {a: np.zeros(3, np.float32) for a in env.agents}
    for a, k in jobs.items():
        i = env.possible_agents.index(a)
        acts[a] = (k * env.profile[i] / env.cap).astype(np.float32)
    return acts


# --- conformance and seeding ----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"continuous_actions": False}, {"stage": "contended", "n_tenants": 3}],
                         ids=["continuous", "discrete", "contended-3"])
def test_parallel_api(kw):
    parallel_api_test(resource_allocation_v0.parallel_env(**kw), num_cycles=60)


def test_parallel_seed_test():
    parallel_seed_test(resource_allocation_v0.parallel_env)


def rollout(seed, policy_seed=3):
    env = resource_allocation_v0.parallel_env(max_cycles=30)
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
    assert ma["jobs_arrived"] != mc["jobs_arrived"]


def test_registered_docstring_and_bad_arguments():
    assert BUILTIN_ENVS["resource_allocation_v0"] == "producers.envs.resource_allocation_v0:parallel_env"
    env, env_id, version = make_env("resource_allocation_v0")
    assert env_id == "resource_allocation_v0" and version == "0"
    assert env.possible_agents == [f"tenant_{i}" for i in range(8)]
    doc = resource_allocation_v0.__doc__
    assert doc.splitlines()[0].startswith("resource_allocation_v0:")
    for word in ("Agents", "Observation", "Action", "State", "Rewards", "Episode end", "Stages", "Metrics",
                 "Arguments", "Confidential", "heuristic", "Weights", "max-min"):
        assert word.lower() in doc.lower(), word
    with pytest.raises(ValueError, match="unknown stage 'calm'; choose one of steady, bursty, contended"):
        resource_allocation_v0.parallel_env(stage="calm")
    with pytest.raises(ValueError, match="3 non-negative weights"):
        resource_allocation_v0.parallel_env(weights=(1.0, 1.0))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="needs 3"):
        env.step({"tenant_0": np.zeros(2, np.float32)})
    assert not hasattr(env, "subject_fields")  # nothing personal: runs without a key store


# --- allocator, fair shares, service (pure) ----------------------------------------------------------
def test_max_min_fair_grants_everything_uncontended_and_levels_under_contention():
    assert max_min_fair([2, 3, 1], 10).tolist() == [2, 3, 1]                   # fits: all granted
    # contended: 12 units among requests 2, 8, 8 -> 2 granted in full, the other two level at 5
    np.testing.assert_allclose(max_min_fair([2, 8, 8], 12), [2, 5, 5])
    np.testing.assert_allclose(max_min_fair([1, 2, 10, 10], 9), [1, 2, 3, 3])
    np.testing.assert_allclose(max_min_fair([9, 9, 9], 6), [2, 2, 2])          # equal split
    np.testing.assert_allclose(max_min_fair([20, 1], 30, cap=15), [15, 1])     # the cap binds uncontended too
    # overstating demand gains nothing at the level: 8 and 100 get the same
    np.testing.assert_allclose(max_min_fair([2, 8, 100], 12), [2, 5, 5])
    rng = np.random.default_rng(0)
    for _ in range(200):
        req, cap = rng.uniform(0, 10, 5), float(rng.uniform(1, 30))
        g = max_min_fair(req, cap)
        assert g.sum() <= cap + 1e-9 and (g <= req + 1e-12).all()
        if req.sum() > cap:
            assert g.sum() == pytest.approx(cap)
            short = g < req - 1e-9
            assert np.allclose(g[short], g[short].max())               # everyone cut is cut to one level
            assert (g[~short] <= g[short].max() + 1e-9).all()          # and only those above it are cut


def test_drf_shares_fill_the_pools_and_reduce_to_the_equal_share():
    profiles = PROFILES[np.arange(8) % 3]
    jobs = drf_jobs(profiles)
    use = (jobs[:, None] * profiles).sum(0) / CAPACITY
    assert use.max() == pytest.approx(1.0) and (use <= 1 + 1e-9).all()
    dominant = (jobs[:, None] * profiles / CAPACITY).max(axis=1)
    assert np.allclose(dominant, dominant[0])                           # equal dominant shares
    same = np.tile([[2.0, 4.0, 0.25]], (4, 1))
    np.testing.assert_allclose(drf_jobs(same, [48.0, 384.0, 24.0]), [6.0] * 4)  # 48 cores / 4 / 2 per job


def test_jobs_served_is_leontief_and_at_most_the_queue():
    grants = np.array([[4.0, 8.0, 1.0], [4.0, 8.0, 1.0]])
    profile = np.array([[2.0, 4.0, 0.25], [2.0, 16.0, 0.25]])
    np.testing.assert_allclose(jobs_served(grants, profile, [10, 10]), [2.0, 0.5])
    np.testing.assert_allclose(jobs_served(grants, profile, [1.5, 10]), [1.5, 0.5])


def test_fairness_is_jain_of_satisfaction_and_starving_everyone_is_not_fair():
    assert resource_allocation_v0.fairness([2, 1], [4, 2]) == 1.0              # both got half
    assert resource_allocation_v0.fairness([4, 0], [4, 2]) == pytest.approx(0.5)
    assert resource_allocation_v0.fairness([3, 0], [3, 0]) == 1.0              # the idle tenant is left out
    assert resource_allocation_v0.fairness([0, 0], [4, 2]) == 0.0              # work waited, none was served
    assert resource_allocation_v0.fairness([0, 0], [0, 0]) == 1.0              # nobody had work


def test_jain_of_known_vectors():
    assert jain([1, 1, 1, 1]) == 1.0
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain([1, 2, 3]) == pytest.approx(36 / 42)
    assert jain([]) == 1.0 and jain([0, 0]) == 1.0
    from stream_processors.fairness import jain as processor_jain  # the one definition it repeats
    for v in ([1, 2, 3], [5, 0, 1, 1], [0.2, 0.9]):
        assert jain(v) == pytest.approx(processor_jain(v))


def test_reward_terms_use_the_documented_weights():
    assert resource_allocation_v0.DEFAULT_WEIGHTS == (1.0, 1.0, 1.0) and LATENCY_SCALE == 10.0
    t = reward_terms(0.6, 0.9, 5)
    assert t == {"utilization": 0.6, "fairness": 0.9, "latency": pytest.approx(-0.5)}
    t = reward_terms(0.6, 0.9, 5, weights=(2.0, 0.5, 3.0))
    assert t == {"utilization": 1.2, "fairness": 0.45, "latency": pytest.approx(-1.5)}
    assert utilization([[24.0, 0.0, 0.0], [0.0, 96.0, 12.0]]) == pytest.approx((0.5 + 0.25 + 0.5) / 3)


def test_p95_and_slo_formulas():
    assert p95(list(range(1, 21))) == pytest.approx(19.05)      # numpy linear: 1 + 0.95 * 19
    assert p95([3]) == 3.0 and p95([]) == 0.0
    assert p95([1] * 95 + [10] * 5) == pytest.approx(1.45)
    assert slo_attainment([1, 2, 3, 5], [1, 4]) == pytest.approx(3 / 5)  # queued for 1 step: not known yet
    assert slo_attainment([], []) == 1.0


# --- the env's allocation, service and rewards against hand-computed numbers ----------------------
def test_contended_pool_is_shared_max_min_and_rewarded_with_the_weights():
    env = quiet(n_tenants=3)                        # tenants: compute, memory, network
    env._queue[0] = [0] * 20                        # compute tenant: 20 jobs waiting
    env._queue[1] = [0] * 2                         # memory tenant: 2 jobs
    acts = {"tenant_0": np.ones(3, np.float32),      # asks for its cap: 50% of every pool
            "tenant_1": np.ones(3, np.float32), "tenant_2": np.zeros(3, np.float32)}
    _, rew, _, _, infos = env.step(acts)
    # cpu: requests 24 + 24 = 48 = capacity: both granted; the compute tenant serves min(24/2, 192/4, 12/.25) = 12
    np.testing.assert_allclose(infos["tenant_0"]["granted"], MAX_SHARE * CAPACITY)
    assert infos["tenant_0"]["served"] == pytest.approx(12.0) and infos["tenant_0"]["completed"] == 12
    assert infos["tenant_1"]["served"] == pytest.approx(2.0) and infos["tenant_2"]["served"] == 0.0
    used = 12 * PROFILES[0] + 2 * PROFILES[1]
    U = float((used / CAPACITY).mean())
    J = jain([12 / 20, 2 / 2])                       # satisfaction of the tenants that had work
    assert infos["tenant_0"]["utilization"] == pytest.approx(U) and infos["tenant_0"]["jain"] == pytest.approx(J)
    assert rew["tenant_0"] == pytest.approx(U + J - 8 / 10)   # 8 jobs still waiting
    assert rew["tenant_1"] == pytest.approx(U + J) and rew["tenant_2"] == pytest.approx(U + J)
    m = env.metrics()
    assert m["utilization"] == pytest.approx(U) and m["jobs_completed"] == 14
    assert m["idle_grant"] > 0                        # the memory tenant's grant beyond 2 jobs idles


def test_over_asking_under_contention_gets_only_the_level():
    env = quiet(n_tenants=4)
    for i in range(4):
        env._queue[i] = [0] * 30
    full = {a: np.ones(3, np.float32) for a in env.agents}
    _, _, _, _, infos = env.step(full)
    for a in env.possible_agents:
        np.testing.assert_allclose(infos[a]["granted"], CAPACITY / 4)   # everyone capped at 50%: equal split
    env = quiet(n_tenants=4)
    for i in range(4):
        env._queue[i] = [0] * 30
    acts = requests(env, tenant_0=3)                                   # tenant_0 asks for 3 jobs' worth only
    acts.update({a: np.ones(3, np.float32) for a in env.possible_agents[1:]})
    _, _, _, _, infos = env.step(acts)
    np.testing.assert_allclose(infos["tenant_0"]["granted"], 3 * PROFILES[0], rtol=1e-5)
    np.testing.assert_allclose(infos["tenant_1"]["granted"][0], (48 - 6) / 3, rtol=1e-6)  # the rest, level


def test_jobs_are_served_first_come_first_served_with_partial_progress_and_waits():
    env = quiet(n_tenants=3)
    env._queue[0] = [0, 0, 0]
    env.step(requests(env, tenant_0=1.5))
    assert env._queue[0] == [0, 0] and env._progress[0] == pytest.approx(0.5, abs=1e-5)
    env.step(requests(env, tenant_0=1.5))
    assert env._queue[0] == [] and env._progress[0] == 0.0
    assert env._waits == [1, 2, 2]
    m = env.metrics()
    assert m["p95_wait"] == pytest.approx(2.0) and m["mean_wait"] == pytest.approx(5 / 3)
    assert m["slo_attainment"] == 1.0 and m["jain"] == 1.0


def test_waiting_jobs_count_in_the_p95_and_jain_of_served_over_offered():
    env = quiet(n_tenants=3)
    env._queue[0] = [0] * 4
    env._queue[1] = [0] * 4
    env._offered[:2] = 4
    for _ in range(5):
        env.step(requests(env, tenant_0=1))       # tenant_1 asks for nothing: its jobs wait
    m = env.metrics()
    assert env._waits == [1, 2, 3, 4] and m["jobs_queued"] == 4
    assert m["p95_wait"] == pytest.approx(p95([1, 2, 3, 4, 5, 5, 5, 5]))
    assert m["slo_attainment"] == pytest.approx(3 / 8)
    assert m["jain"] == pytest.approx(jain([1.0, 0.0]))


# --- stages -----------------------------------------------------------------------------------------
def test_stages_change_the_load_not_the_spaces():
    env = resource_allocation_v0.parallel_env(stage="steady")
    assert env.stages == STAGES == ("steady", "bursty", "contended")
    assert resource_allocation_v0.parallel_env().stage == "bursty"       # the documented default
    spaces = (env.observation_space("tenant_0"), env.action_space("tenant_0"), env.state_space)
    env.reset(seed=1)
    env.set_stage("contended")
    assert env.stage == "steady" and env.state_flags() == ["stage:steady"]  # the next reset switches
    arrived = {}
    for stage in ("contended", "bursty", "steady"):
        env.set_stage(stage)
        total = 0
        for seed in range(3):
            obs, _ = env.reset(seed=seed)
            assert env.stage == stage and env.state_flags() == [f"stage:{stage}"]
            assert (env.observation_space("tenant_0"), env.action_space("tenant_0"), env.state_space) == spaces
            assert obs["tenant_0"].shape == (OBS_DIM,) and env.state_space.contains(env.state())
            while env.agents:
                obs, *_ = env.step({a: c[0] for a, c in HeuristicPolicy(env).act(obs).items()})
            m = env.metrics()
            assert m["stage"] == stage and m["stage_index"] == STAGES.index(stage)
            total += m["jobs_arrived"]
        arrived[stage] = total
    assert arrived["steady"] < arrived["bursty"] < arrived["contended"]


def test_curriculum_criteria_name_metrics_and_are_ordered():
    env = resource_allocation_v0.parallel_env()
    env.reset(seed=0)
    keys = env.metrics()
    assert set(env.CURRICULUM) == set(STAGES)
    for c in env.CURRICULUM.values():
        assert c["metric"] in keys and c["promote_at"] > c["regress_below"]


# --- baselines ----------------------------------------------------------------------------------------
def episode_metrics(make_policy, seeds=range(5), **kw):
    out = []
    for s in seeds:
        env = resource_allocation_v0.parallel_env(**kw)
        obs, _ = env.reset(seed=s)
        pol, ret = make_policy(env, s), 0.0
        while env.agents:
            obs, rew, *_ = env.step({a: c[0] for a, c in pol.act(obs).items()})
            ret += sum(rew.values())
        m = env.metrics()
        assert m["objective"] * env.n * m["steps"] == pytest.approx(ret)  # objective: mean reward per tenant-step
        out.append(m)
    return {k: float(np.mean([m[k] for m in out])) for k in out[0] if k != "stage"}


@pytest.mark.parametrize("stage", STAGES)
def test_fair_share_heuristic_beats_random(stage):
    heur = episode_metrics(lambda e, s: HeuristicPolicy(e), stage=stage)
    rand = episode_metrics(lambda e, s: RandomPolicy(e, 100 + s), stage=stage)
    # seeds 0..4: SLO met for ~0.94 / 0.77 / 0.51 of jobs against ~0.35 / 0.23 / 0.06 for random
    assert heur["slo_attainment"] > rand["slo_attainment"] + 0.3, (heur, rand)
    assert heur["p95_wait"] < rand["p95_wait"] and heur["utilization"] > rand["utilization"], (heur, rand)
    assert heur["idle_grant"] < 1e-6 and rand["idle_grant"] > 0.1           # it asks for what it can use


def test_heuristic_asks_for_the_queue_up_to_its_drf_share():
    env = resource_allocation_v0.parallel_env()
    env.reset(seed=0)
    obs = np.zeros(OBS_DIM, np.float32)
    obs[0] = 2 / 50                                                   # 2 jobs queued
    act = env.heuristic_action("tenant_0", obs)
    np.testing.assert_allclose(act * env.cap, 2 * PROFILES[0], rtol=1e-5)
    obs[0] = 40 / 50                                                  # 40 jobs: capped at the DRF share
    act = env.heuristic_action("tenant_0", obs)
    np.testing.assert_allclose(act * env.cap, env.fair_jobs[0] * PROFILES[0], rtol=1e-5)
    assert env.fair_jobs[0] == pytest.approx(drf_jobs(env.profile)[0])


# --- learning: MAPPO through the event log ----------------------------------------------------------
@pytest.mark.timeout(90)
def test_mappo_learns_to_beat_random():
    import torch

    from learners.evaluate import evaluate
    from learners.mappo import MAPPOConfig
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env

    torch.set_num_threads(1)
    # the discrete variant (requests as multiples of the queue's need); bursty: the default stage
    env = resource_allocation_v0.parallel_env(stage="bursty", max_cycles=20, continuous_actions=False)
    res = train_on_env(env, resource_allocation_v0.ENV_ID, resource_allocation_v0.ENV_VERSION, "mappo",
                       transport=MemoryTransport(), iterations=10, seed=1,
                       config=MAPPOConfig(seed=1, episodes_per_update=10, learning_rate=3e-3))
    random_return = evaluate(env, RandomPolicy(env, seed=999), 20, 5000)
    trained = evaluate(env, res.learner, 20, 5000)
    # random: about +140 per episode (8 tenants, 20 steps); the fair-share rule about +176
    assert trained > random_return + 25, (random_return, trained, [r["charts/episodic_return"] for r in res.curve])

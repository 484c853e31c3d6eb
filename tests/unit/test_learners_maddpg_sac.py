"""MADDPG (learners/maddpg.py) and SAC (learners/sac.py): soft updates, the straight-through
Gumbel-softmax of discrete MADDPG, the entropy temperature, the joint-transition buffer and its alive
masks, the refusals, and learning: MADDPG on simple_spread_v3 with continuous actions and SAC on
retail_v0's continuous orders, each well above random, trained through the sealed event log. The
registry-wide tests (lineage, determinism, checkpoints, ONNX) run for both in
test_learners_algorithms.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from learners.maddpg import (MADDPG, MADDPGConfig, MLPEnsemble, TransitionBuffer, episode_transitions,
                             gumbel_softmax_st, soft_update)
from learners.replay import Episode, ReplayError, RunSpec, SpaceSpec
from learners.sac import SAC, SACConfig
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of

SMALL = dict(learning_starts=8, batch_size=16, train_frequency=4, hidden=16)


def _spec(kind="Box", action_ns=(3, 3), obs_dim=4, low=(0.0, 0.0), high=(1.0, 1.0)) -> RunSpec:
    agents = tuple(f"a{i}" for i in range(len(action_ns)))
    if kind == "Discrete":
        act = {a: SpaceSpec("Discrete", (), n, 0) for a, n in zip(agents, action_ns)}
    else:
        act = {a: SpaceSpec("Box", (len(low),), 0, 0, tuple(low), tuple(high)) for a in agents}
    return RunSpec("r1", "toy_v0", "0", 1, agents, {a: SpaceSpec("Box", (obs_dim,)) for a in agents}, act,
                   SpaceSpec("Box", (6,)))


def _episode(rng, T, N=2, D=4, A=2, alive=None, terminated=False) -> Episode:
    alive = np.ones((T, N), np.float32) if alive is None else alive
    return Episode(0, 0, rng.normal(size=(T, N, D)).astype(np.float32) * alive[..., None],
                   rng.normal(size=(T, 6)).astype(np.float32),
                   rng.uniform(0, 1, size=(T, N, A)).astype(np.float32) * alive[..., None],
                   rng.normal(size=(T, N)).astype(np.float32) * alive, alive, terminated)


@pytest.fixture(scope="module")
def replays():
    out = {}
    for cont in (False, True):
        env = MatchTarget(continuous=cont)
        out[cont] = replay_of(harness_run(env, RandomPolicy(env, seed=4), episodes=6, seed=7))
    return out


# --- soft updates -------------------------------------------------------------------------------
def test_soft_update_is_polyak_averaging():
    torch.manual_seed(0)
    target, source = MLPEnsemble(3, 5, 8, 2), MLPEnsemble(3, 5, 8, 2)
    with torch.no_grad():
        for p in (*target.parameters(), *source.parameters()):
            p.normal_()  # the biases start at zero in both
    before = [p.detach().clone() for p in target.parameters()]
    soft_update(target, source, 0.1)
    for t, t0, s in zip(target.parameters(), before, source.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-7) and not torch.equal(t, t0)
    soft_update(target, source, 0.0)   # tau 0: nothing moves
    assert all(torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-7)
               for t, t0, s in zip(target.parameters(), before, source.parameters()))
    soft_update(target, source, 1.0)   # tau 1: a copy
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), source.parameters()))


def test_targets_trail_the_online_networks_after_each_gradient_step(replays):
    learner = MADDPG(replays[True].spec, MADDPGConfig(**SMALL, tau=0.5))
    learner.update(replays[True])
    assert learner.optimizer_steps > 0
    for online, target in ((learner.actors, learner.target_actors), (learner.critics, learner.target_critics)):
        moved = [not torch.equal(o, t) for o, t in zip(online.parameters(), target.parameters())]
        assert any(moved)  # the targets follow, a step behind
    # one more step by hand: target' = 0.5 * target + 0.5 * online (after the online step)
    t0 = [p.detach().clone() for p in learner.target_critics.parameters()]
    learner._gradient_step(learner.buffer.sample(16))
    for t, old, o in zip(learner.target_critics.parameters(), t0, learner.critics.parameters()):
        assert torch.allclose(t, 0.5 * old + 0.5 * o, atol=1e-6)


def test_per_agent_networks_are_independent():
    """An MLPEnsemble member's output depends on its own weights only: MADDPG's actors are per agent."""
    torch.manual_seed(0)
    net = MLPEnsemble(3, 4, 8, 2)
    x = torch.randn(3, 5, 4)
    y = net(x)
    with torch.no_grad():
        net.weights[0][1].add_(1.0)  # change agent 1's first layer only
    y2 = net(x)
    assert torch.equal(y[0], y2[0]) and torch.equal(y[2], y2[2]) and not torch.equal(y[1], y2[1])


# --- discrete MADDPG: straight-through Gumbel-softmax ------------------------------------------------
def test_gumbel_softmax_is_one_hot_forward_and_softmax_backward():
    logits = torch.tensor([[1.0, 0.0, -1.0]]).repeat(20_000, 1).requires_grad_(True)
    y = gumbel_softmax_st(logits, torch.Generator().manual_seed(3))
    assert torch.equal(y.detach().sum(-1), torch.ones(20_000)) and set(y.detach().unique().tolist()) == {0.0, 1.0}
    # the samples follow softmax(logits) (Gumbel-max)
    freq = y.detach().mean(0)
    assert torch.allclose(freq, torch.softmax(logits[0].detach(), -1), atol=0.015), freq
    # straight through: the gradient is the soft sample's (same noise, same generator seed)
    w = torch.randn(3)
    (g_st,) = torch.autograd.grad((y * w).sum(), logits)
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(3))
    soft = torch.softmax(logits - torch.log(-torch.log(u.clamp(1e-20, 1.0)) + 1e-20), -1)
    (g_soft,) = torch.autograd.grad((soft * w).sum(), logits)
    assert torch.allclose(g_st, g_soft, atol=1e-6) and g_st.abs().sum() > 0
    # seeded: the same generator seed gives the same samples
    again = gumbel_softmax_st(logits.detach(), torch.Generator().manual_seed(3))
    assert torch.equal(again, y.detach())


def test_discrete_actor_update_flows_through_gumbel_and_respects_fewer_actions(replays):
    learner = MADDPG(replays[False].spec, MADDPGConfig(**SMALL))
    before = [p.detach().clone() for p in learner.actors.parameters()]
    learner.update(replays[False])
    assert learner.optimizer_steps > 0
    assert any(not torch.equal(p, b) for p, b in zip(learner.actors.parameters(), before))
    # mailbox-style agents with 2 and 4 actions: the first never takes actions 2 and 3
    spec = _spec("Discrete", action_ns=(2, 4))
    m = MADDPG(spec, MADDPGConfig(**{**SMALL, "learning_starts": 0}))
    with torch.no_grad():
        m.actors.body.biases[-1][:] = torch.tensor([0.0, 0.0, 0.0, 50.0])  # action 3 looks best to all
    rng = np.random.default_rng(0)
    for _ in range(50):
        acts = m.act({"a0": rng.normal(size=4), "a1": rng.normal(size=4)})
        assert acts["a0"][0] < 2 and acts["a1"][0] == 3 and acts["a1"][1] > -1e-3
    x = torch.as_tensor(np.concatenate([rng.normal(size=(2, 4)), np.eye(2)], 1), dtype=torch.float32)
    assert m.greedy(x).tolist()[1] == 3 and m.greedy(x).tolist()[0] < 2


@pytest.mark.timeout(60)
def test_discrete_maddpg_learns_match_target():
    """The Gumbel path learns: 800 env steps of MatchTarget (discrete) through the event log."""
    from learners.evaluate import GreedyPolicy, evaluate
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env

    torch.set_num_threads(1)
    env = MatchTarget()
    cfg = MADDPGConfig(seed=1, learning_starts=200, batch_size=64, train_frequency=2, hidden=32,
                       episodes_per_update=10)
    res = train_on_env(env, "match_target_v0", "0", "maddpg", transport=MemoryTransport(keep=False), iterations=10,
                       seed=1, config=cfg)
    random_return = evaluate(env, RandomPolicy(env, seed=999), 50, 5000)
    trained = evaluate(env, GreedyPolicy(res.learner), 50, 5000)
    # random 5.2 of 16; measured here 16.0 (every agent names its target)
    assert trained > random_return + 6.0, (random_return, trained, res.curve)


# --- SAC: the temperature ----------------------------------------------------------------------------
def test_temperature_moves_toward_the_target_entropy():
    learner = SAC(_spec(), SACConfig(**SMALL))
    assert learner.target_entropy == -2.0 and abs(learner.alpha - 0.2) < 1e-6
    # entropy -log_pi = 3 above the target -2: alpha falls; entropy -6 below it: alpha rises
    for log_pi, falls in ((torch.full((64,), -3.0), True), (torch.full((64,), 6.0), False)):
        a0 = learner.alpha
        for _ in range(20):
            learner.alpha_step(log_pi)
        assert (learner.alpha < a0) == falls and learner.alpha != a0


def test_temperature_is_learned_only_with_autotune(replays):
    rp = replays[True]
    tuned, fixed = SAC(rp.spec, SACConfig(**SMALL)), SAC(rp.spec, SACConfig(**SMALL, autotune=False))
    for learner in (tuned, fixed):
        out = learner.update(rp)
        assert out["optimizer_steps"] > 0 and "losses/policy" in out["losses"]
    assert abs(fixed.alpha - 0.2) < 1e-6 and abs(tuned.alpha - 0.2) > 1e-4


def test_sac_actions_stay_in_bounds_and_their_log_prob_matches_the_squashed_gaussian():
    spec = _spec(low=(-2.0, 0.0), high=(2.0, 10.0))
    learner = SAC(spec, SACConfig(**{**SMALL, "learning_starts": 0}))
    rng = np.random.default_rng(1)
    obs = {"a0": rng.normal(size=4), "a1": rng.normal(size=4)}
    for _ in range(50):
        for a, (act, logp) in learner.act(obs).items():
            assert act.shape == (2,) and (act >= [-2.0, 0.0]).all() and (act <= [2.0, 10.0]).all()
            assert np.isfinite(logp)
    # the log-probability is the Gaussian's minus the log-Jacobian of a = low + (tanh(u) + 1) (high - low) / 2
    x, noise = torch.randn(5, 6), torch.randn(5, 2)
    a, logp = learner.actor.sample(x, noise)
    mean, log_std = learner.actor._heads(x)
    u = mean + log_std.exp() * noise
    ref = torch.distributions.Normal(mean, log_std.exp()).log_prob(u) - torch.log(
        torch.tensor([2.0, 5.0]) * (1 - torch.tanh(u) ** 2) + 1e-6)
    assert torch.allclose(logp, ref.sum(-1), atol=1e-4)
    assert torch.allclose(learner.greedy(x), torch.tensor([-2.0, 0.0]) + (torch.tanh(mean) + 1) / 2 *
                          torch.tensor([4.0, 10.0]), atol=1e-6)


# --- refusals ----------------------------------------------------------------------------------------
def test_sac_refuses_discrete_and_both_refuse_unbounded_boxes():
    with pytest.raises(ReplayError, match="SAC needs a continuous .*use --algo maddpg"):
        SAC(_spec("Discrete"), SACConfig())
    for cls, cfg in ((SAC, SACConfig()), (MADDPG, MADDPGConfig())):
        with pytest.raises(ReplayError, match="squashes actions into the Box bounds.*finite bounds"):
            cls(_spec(low=(-np.inf, 0.0), high=(np.inf, 1.0)), cfg)


# --- the joint-transition buffer ------------------------------------------------------------------------
def test_episode_transitions_leave_out_a_truncated_last_step_and_mark_each_agents_end():
    rng = np.random.default_rng(0)
    left = np.ones((5, 2), np.float32)
    left[3:, 1] = 0.0                      # agent 1 leaves after step 2
    trunc = _episode(rng, 5, alive=left)
    rows = episode_transitions(trunc, trunc.actions)
    assert len(rows["rewards"]) == 4       # step 4's next observation is not recorded
    assert rows["dones"].tolist() == [[0, 0], [0, 0], [0, 1], [0, 0]]
    assert rows["next_alive"].tolist() == [[1, 1], [1, 1], [1, 0], [1, 0]]
    assert rows["alive"][3].tolist() == [1, 0] and rows["actions"][3, 1].sum() == 0 and rows["rewards"][3, 1] == 0
    assert np.array_equal(rows["next_obs"][:4], trunc.obs[1:5]) and np.array_equal(rows["obs"], trunc.obs[:4])
    term = _episode(rng, 3, terminated=True)
    rows = episode_transitions(term, term.actions)
    assert len(rows["rewards"]) == 3 and rows["dones"][2].tolist() == [1, 1]
    assert rows["next_obs"][2].sum() == 0 and rows["next_alive"][2].sum() == 0


def test_buffer_is_a_fifo_with_seeded_sampling_and_keeps_only_what_it_holds_in_its_state():
    def filled(seed):
        buf = TransitionBuffer(capacity=5, n_agents=2, obs_dim=1, action_dim=1, seed=seed)
        for start in (0, 3, 6):   # 9 rows into 5 slots: rows 4..8 remain
            n = 3
            buf.add(obs=np.arange(start, start + n, dtype=np.float32).reshape(n, 1, 1).repeat(2, 1),
                    actions=np.zeros((n, 2, 1), np.float32), rewards=np.full((n, 2), start, np.float32),
                    next_obs=np.zeros((n, 2, 1), np.float32), alive=np.ones((n, 2), np.float32),
                    next_alive=np.ones((n, 2), np.float32), dones=np.zeros((n, 2), np.float32))
        return buf

    buf = filled(1)
    assert buf.size == 5 and sorted(buf.obs[:, 0, 0].tolist()) == [4, 5, 6, 7, 8] and buf.pos == 4
    b1, b2, b3 = filled(1), filled(1), filled(2)
    s1 = [b1.sample(4)["obs"].tolist() for _ in range(5)]
    assert s1 == [b2.sample(4)["obs"].tolist() for _ in range(5)] and s1 != [b3.sample(4)["obs"].tolist()
                                                                              for _ in range(5)]
    # more rows than the capacity in one add: the newest survive
    big = TransitionBuffer(capacity=3, n_agents=1, obs_dim=1, action_dim=1, seed=0)
    z = np.zeros((7, 1), np.float32)
    big.add(obs=np.arange(7, dtype=np.float32).reshape(7, 1, 1), actions=z[..., None], rewards=z,
            next_obs=z[..., None], alive=z + 1, next_alive=z, dones=z)
    assert sorted(big.obs[:, 0, 0].tolist()) == [4, 5, 6] and big.size == 3
    # the state holds the rows held, and restores the ring and its sampler exactly
    half = TransitionBuffer(capacity=100, n_agents=1, obs_dim=1, action_dim=1, seed=0)
    half.add(obs=np.arange(7, dtype=np.float32).reshape(7, 1, 1), actions=z[..., None], rewards=z,
             next_obs=z[..., None], alive=z + 1, next_alive=z, dones=z)
    st = half.state_dict()
    assert st["obs"].shape == (7, 1, 1)
    copy = TransitionBuffer(capacity=100, n_agents=1, obs_dim=1, action_dim=1, seed=9)
    copy.load_state_dict(st)
    assert all(torch.equal(a, b) for a, b in zip(copy.sample(5).values(), half.sample(5).values()))


def test_buffer_lineage_names_the_batches_the_buffer_holds(replays):
    """42 joint transitions per replay (6 episodes x 7): a buffer of 50 holds the last two batches."""
    rp = replays[True]
    learner = MADDPG(rp.spec, MADDPGConfig(**SMALL, buffer_size=50))
    for _ in range(4):
        learner.update(rp)
    assert learner.buffer.size == 50 and [n for _, n in learner.buffer_lineage.batches] == [42, 42]
    assert learner.state_dict()["buffer_lineage"]["batches"][0][1] == 42


def test_an_absent_agent_adds_nothing_to_the_losses():
    """Rows where an agent is not alive: its reward and action do not reach the losses (MADDPG's
    critics are masked per agent; SAC leaves its rows out)."""
    rng = np.random.default_rng(2)
    left = np.ones((6, 2), np.float32)
    left[:, 1] = 0.0
    left[0, 1] = 1.0  # agent 1 acts at step 0 only
    ep = _episode(rng, 6, alive=left, terminated=True)
    for cls, cfg in ((MADDPG, MADDPGConfig(**SMALL)), (SAC, SACConfig(**SMALL))):
        learner = cls(_spec(), cfg)
        learner._add(ep)
        b = {k: torch.from_numpy(getattr(learner.buffer, k)[:learner.buffer.size].copy())
             for k in TransitionBuffer.FIELDS}
        assert b["alive"][1:, 1].sum() == 0
        changed = {k: v.clone() for k, v in b.items()}
        changed["rewards"][1:, 1] += 100.0  # rewards where agent 1 is absent
        changed["actions"][1:, 1] += 0.5    # and actions
        if cls is SAC:
            rows, rows2 = learner.agent_rows(b), learner.agent_rows(changed)
            assert rows[0].shape[0] == 7 and all(torch.equal(x, y) for x, y in zip(rows, rows2))
        else:
            twin = cls(_spec(), cfg)  # the same seed: the same initial networks and noise
            learner._gradient_step(b)
            twin._gradient_step({**b, "rewards": changed["rewards"]})
            assert all(torch.equal(x, y) for x, y in zip(learner.critics.parameters(), twin.critics.parameters()))
            assert all(torch.equal(x, y) for x, y in zip(learner.actors.parameters(), twin.actors.parameters()))
            third = cls(_spec(), cfg)
            third._gradient_step({**b, "rewards": b["rewards"] + 1.0})  # where agents are alive, it does count
            assert not all(torch.equal(x, y) for x, y in zip(learner.critics.parameters(),
                                                             third.critics.parameters()))


def test_acting_is_uniform_until_learning_starts():
    spec = _spec()
    m = MADDPG(spec, MADDPGConfig(**{**SMALL, "learning_starts": 10}, exploration_noise=0.0))
    obs = {"a0": np.zeros(4), "a1": np.zeros(4)}
    early = np.array([m.act(obs)["a0"][0] for _ in range(200)])
    assert early.std(0).min() > 0.2 and m.act(obs)["a0"][1] == pytest.approx(0.0)  # log(1) on [0, 1]^2
    m.buffer.size = 10  # enough rows: the actor acts (no noise: the same action each time)
    late = [m.act(obs)["a0"][0] for _ in range(3)]
    assert all(np.array_equal(x, late[0]) for x in late)
    assert np.allclose(late[0], m.greedy(torch.tensor([[0.0] * 4 + [1.0, 0.0]]))[0].detach().numpy())


# --- learning ----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_maddpg_learns_continuous_simple_spread_well_above_random():
    """MPE2 simple_spread_v3 with continuous actions (3 agents, 25 steps): 4,000 env steps through the
    sealed event log, 1,920 gradient steps."""
    from learners.evaluate import GreedyPolicy, evaluate
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env
    from producers.envs import make_env

    torch.set_num_threads(1)
    env, env_id, ver = make_env("simple_spread_v3", continuous=True)
    cfg = MADDPGConfig(seed=1, learning_starts=500, train_frequency=6, batch_size=128, hidden=128,
                       episodes_per_update=10)
    res = train_on_env(env, env_id, ver, "maddpg", transport=MemoryTransport(keep=False), iterations=16, seed=1,
                       config=cfg)
    random_return = evaluate(env, RandomPolicy(env, seed=999), 30, 5000)
    trained = evaluate(env, GreedyPolicy(res.learner), 30, 5000)
    # random (uniform forces) -81.5; measured here -68.3 (seed 1; -62.8 with seed 2) after 4,000 env steps
    assert trained > random_return + 8.0, (random_return, trained, res.curve)
    assert res.learner.env_steps == 4000 and res.learner.optimizer_steps == 1920


@pytest.mark.timeout(120)
def test_sac_learns_retail_continuous_orders_well_above_random():
    """retail_v0 (seed 003: 5 warehouses, 30 days, order and transfers in [0, 1]^5): 3,600 env steps
    through the sealed event log, 870 critic steps."""
    from learners.evaluate import GreedyPolicy, evaluate
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env
    from producers.envs import make_env

    torch.set_num_threads(1)
    env, env_id, ver = make_env("retail_v0")
    cfg = SACConfig(seed=1, learning_starts=300, train_frequency=20, batch_size=64, reward_scale=0.01,
                    learning_rate=3e-3, actor_learning_rate=1e-3, episodes_per_update=10)
    res = train_on_env(env, env_id, ver, "sac", transport=MemoryTransport(keep=False), iterations=12, seed=1,
                       config=cfg)
    random_return = evaluate(env, RandomPolicy(env, seed=999), 30, 5000)
    trained = evaluate(env, GreedyPolicy(res.learner), 30, 5000)
    # random ordering and transfers cost $2,253 per episode; measured here -1,412 (seed 1; -1,283 and -1,534
    # with seeds 2 and 3); the base-stock heuristic -340
    assert trained > random_return + 400.0, (random_return, trained, res.curve)
    assert res.learner.env_steps == 3600 and res.learner.alpha != 0.2


def test_train_online_command_runs_maddpg_and_sac_on_retail(tmp_path):
    import json

    from typer.testing import CliRunner

    from marlgrc.cli import app

    for algo in ("maddpg", "sac"):
        curve = tmp_path / f"{algo}.json"
        res = CliRunner().invoke(app, ["train-online", "--env", "retail_v0", "--algo", algo, "--iterations", "2",
                                       "--bootstrap", "memory", "--set", "episodes_per_update=2", "--set",
                                       "learning_starts=30", "--set", "batch_size=8", "--eval-episodes", "1",
                                       "--out", str(curve), "--home", str(tmp_path / "home")])
        assert res.exit_code == 0, res.output
        data = json.loads(curve.read_text())
        assert [r["env_steps"] for r in data["curve"]] == [60, 120]
        assert data["curve"][-1]["optimizer_steps"] > 0 and "losses/value" in data["curve"][-1]
        assert set(data["policies"]) == {"random", "heuristic", "learned (sampled)", "learned (greedy)"}
        assert res.stdout.strip().splitlines()[-1].startswith(f"retail_v0__{algo}__1__")

"""Continuous MAPPO: clipped Gaussian actions scored as a censored Gaussian (the recorded, clipped
action alone gives the exact log-probability), the regression for the Gaussian mean that ran out of
the Box (learners/mappo.py's docstring), a Box(0, 1) task learned from the default start, and the
update on another device (``MAPPOConfig.device``): on any machine through the twin path (``cpu:0``),
on a GPU where there is one."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from eventlog.codec import default_codec
from learners.evaluate import GreedyPolicy, evaluate
from learners.ippo import IPPO, IPPOConfig
from learners.mappo import MAPPO, MAPPOConfig
from learners.networks import clipped_gaussian_log_prob
from learners.online import MemoryTransport
from marlgrc.training import spec_of, train_on_env
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class InsideTarget(ParallelEnv):
    """Each agent sees a target in [0.2, 0.4] and is paid -|a - target| for its action in Box(0, 1):
    the optimum lies strictly inside the Box. Random play scores about -0.29 per agent-step, a constant
    0.5 (the untrained policy's greedy action) -0.2, the optimum 0."""

    metadata = {"name": "inside_target_v0"}

    def __init__(self, n_agents: int = 2, length: int = 8):
        self.possible_agents = [f"agent_{i}" for i in range(n_agents)]
        self.length = length
        self._obs_space = spaces.Box(0.0, 1.0, (1,), np.float32)
        self._act_space = spaces.Box(0.0, 1.0, (1,), np.float32)

    def observation_space(self, agent):
        return self._obs_space

    def action_space(self, agent):
        return self._act_space

    def _observe(self):
        self.target = {a: float(self.rng.uniform(0.2, 0.4)) for a in self.agents}
        return {a: np.array([t], np.float32) for a, t in self.target.items()}

    def reset(self, seed=None, options=None):
        self.rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.t = 0
        return self._observe(), {a: {} for a in self.agents}

    def step(self, actions):
        rew = {a: -abs(float(np.clip(np.asarray(actions[a]).ravel()[0], 0.0, 1.0)) - self.target[a])
               for a in self.agents}
        self.t += 1
        done = self.t >= self.length
        obs = self._observe()
        out = (obs, rew, {a: False for a in self.agents}, {a: done for a in self.agents}, {a: {} for a in self.agents})
        if done:
            self.agents = []
        return out


def _mean_at_lower_bound(learner) -> None:
    """The start the reported collapse came from: the mean at the lower bound (an untrained body's
    ~0 on Box(0, 1), before the mean started in the middle of the Box) and std 0.61."""
    with torch.no_grad():
        learner.actor.body[-1].bias.copy_(learner.actor.low)
        learner.actor.log_std.fill_(-0.5)


# --- the log-probability ------------------------------------------------------------------------
def test_clipped_actions_have_the_censored_gaussian_probability():
    mean = torch.tensor([[-0.3, 0.5, 1.2]])
    std = torch.tensor([[0.4, 0.4, 0.4]])
    low, high = torch.zeros(3), torch.ones(3)
    normal = torch.distributions.Normal(mean, std)
    acts = torch.tensor([[0.0, 0.7, 1.0]])  # at low, inside, at high
    got = clipped_gaussian_log_prob(mean, std, acts, low, high)
    want = (normal.cdf(torch.tensor(0.0))[0, 0].log() + normal.log_prob(acts)[0, 1]
            + (1 - normal.cdf(torch.tensor(1.0))[0, 2]).log())
    assert got.shape == (1,) and float(got) == pytest.approx(float(want), abs=1e-5)
    # the point masses are what sampling-then-clipping gives
    g = torch.Generator().manual_seed(0)
    raw = mean + std * torch.randn((200_000, 3), generator=g)
    clipped = torch.maximum(torch.minimum(raw, high), low)
    at_low, at_high = (clipped[:, 0] == 0.0).float().mean(), (clipped[:, 2] == 1.0).float().mean()
    assert float(at_low) == pytest.approx(math.exp(float(torch.special.log_ndtr(torch.tensor(0.3 / 0.4)))), abs=0.005)
    assert float(at_high) == pytest.approx(math.exp(float(torch.special.log_ndtr(torch.tensor(-(1 - 1.2) / 0.4)))),
                                           abs=0.005)
    # infinite bounds: the plain density
    inf = torch.full((3,), float("inf"))
    assert torch.allclose(clipped_gaussian_log_prob(mean, std, acts, -inf, inf), normal.log_prob(acts).sum(-1))


def test_at_the_bound_the_gradient_points_back_into_the_box():
    """The mechanism of the collapse: with the mean below the lower bound, an action clipped to the
    bound becomes more likely as the mean moves further out. Its density did the opposite, so a bad
    clipped action (pushed down by PPO) pushed the mean further out of the Box."""
    mean = torch.tensor([[-0.3]], requires_grad=True)
    std = torch.tensor([[0.5]])
    a, low, high = torch.zeros(1, 1), torch.zeros(1), torch.ones(1)
    (g_censored,) = torch.autograd.grad(clipped_gaussian_log_prob(mean, std, a, low, high).sum(), mean)
    (g_density,) = torch.autograd.grad(torch.distributions.Normal(mean, std).log_prob(a).sum(), mean)
    assert float(g_censored) < 0 < float(g_density)


def test_the_recorded_event_gives_the_exact_log_prob_of_what_was_executed():
    """Through the harness: every recorded action is in the Box (what the env executed), clipped ones
    sit exactly on the bound, and the log-probability the learner recomputes from the event's float32
    action equals the one recorded at acting time."""
    env = MatchTarget(continuous=True)
    spec = replay_of(harness_run(env, RandomPolicy(env, seed=1), episodes=1, seed=0)).spec
    learner = MAPPO(spec, MAPPOConfig(seed=3))
    _mean_at_lower_bound(learner)  # half of the actions clipped at -1
    sink = harness_run(env, learner, episodes=3, seed=5)
    rp = replay_of(sink)
    recorded = [x["log_prob"] for topic, _, v in sink.sent if topic == "marl.joint.action"
                for x in default_codec().decode(v)[1]["actions"]]
    acts = np.concatenate([ep.actions.reshape(-1, 1) for ep in rp.episodes])
    assert acts.min() >= -1.0 and acts.max() <= 1.0
    clipped = acts[:, 0] == -1.0
    assert 0.3 < clipped.mean() < 0.7, clipped.mean()
    with torch.no_grad():
        x = torch.cat([learner.actor_inputs(torch.as_tensor(ep.obs)).reshape(-1, learner.actor_in)
                       for ep in rp.episodes])
        logp, _ = learner.actor.log_prob_entropy(x, torch.as_tensor(acts))
        d = learner.actor.dist(x)
        mass = torch.special.log_ndtr((-1.0 - d.mean) / d.stddev).squeeze(-1)
    np.testing.assert_allclose(logp.numpy(), recorded, atol=1e-5)
    np.testing.assert_allclose(logp.numpy()[clipped], mass.numpy()[clipped], atol=1e-6)


# --- the regression: resource_allocation_v0, the reported collapse -------------------------------
@pytest.mark.timeout(90)
def test_mean_starting_at_the_lower_bound_climbs_into_the_box_on_resource_allocation():
    """The report: on resource_allocation_v0 (Box(0, 1) requests), the Gaussian means went below 0
    within a few updates and the tenants stopped asking for resources. From that same start (mean at
    the lower bound), with the clipped actions scored as a censored Gaussian the means move into the
    Box and the greedy policy improves. Scored with the density (the old code, same seed and
    budget), the means sank to -0.9 after 8 updates with 68% of them below the bound."""
    from producers.envs import resource_allocation_v0 as ra

    env = ra.parallel_env(stage="bursty", max_cycles=20, continuous_actions=True)
    spec = spec_of(env, "ra_bound", ra.ENV_ID, ra.ENV_VERSION, 1)
    learner = MAPPO(spec, MAPPOConfig(seed=1, episodes_per_update=10, learning_rate=3e-3))
    _mean_at_lower_bound(learner)
    probe = []  # actor inputs seen under random play
    rand = RandomPolicy(env, seed=5)
    for ep in range(2):
        obs, _ = env.reset(seed=777 + ep)
        while env.agents:
            probe += [np.r_[obs[a], np.eye(len(spec.agents))[spec.agents.index(a)]] for a in env.agents]
            obs, *_ = env.step({a: x[0] for a, x in rand.act(obs).items()})
    probe = torch.as_tensor(np.array(probe, np.float32))
    start = evaluate(env, GreedyPolicy(learner), 10, 5000)
    train_on_env(env, ra.ENV_ID, ra.ENV_VERSION, "mappo", transport=MemoryTransport(keep=False), iterations=8,
                 seed=1, learner=learner)
    with torch.no_grad():
        mu = learner.actor.body(probe)
    trained = evaluate(env, GreedyPolicy(learner), 10, 5000)
    # measured: mean 0.14 with 18% of the means below 0 (the density: -0.92 and 68%); greedy return
    # from about -530 to about -230 (random play about -70, the DRF heuristic +165)
    assert float(mu.mean()) > 0.05 and float((mu < 0).float().mean()) < 0.3, (mu.mean(0), (mu < 0).float().mean())
    assert trained > start + 150, (start, trained)


# --- learning in Box(0, 1) from the default start -----------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ["mappo", "ippo"])
def test_box01_task_with_an_inside_optimum_is_learned(algo):
    env = InsideTarget()
    cls, cfg_cls = (MAPPO, MAPPOConfig) if algo == "mappo" else (IPPO, IPPOConfig)
    spec = spec_of(env, f"inside_{algo}", "inside_target_v0", "0", 1)
    learner = cls(spec, cfg_cls(seed=1, episodes_per_update=10, learning_rate=3e-3))
    untrained = evaluate(env, GreedyPolicy(learner), 50, 5000)
    train_on_env(env, "inside_target_v0", "0", algo, transport=MemoryTransport(keep=False), iterations=8, seed=1,
                 learner=learner)
    random_return = evaluate(env, RandomPolicy(env, seed=999), 50, 5000)
    trained = evaluate(env, GreedyPolicy(learner), 50, 5000)
    # 2 agents x 8 steps: random about -4.5, the untrained greedy action (0.5, the Box's middle) -3.2,
    # the optimum 0; measured after 8 updates: about -0.7
    assert trained > random_return + 2.5 and trained > untrained + 1.5, (random_return, untrained, trained)


# --- the update's device -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replays():
    out = {}
    for cont in (False, True):
        env = MatchTarget(continuous=cont)
        out[cont] = replay_of(harness_run(env, RandomPolicy(env, seed=11), episodes=6, seed=3))
    return out


def _all_on_cpu(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(_all_on_cpu(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_on_cpu(v) for v in obj)
    return True


@pytest.mark.parametrize("cont", [False, True], ids=["discrete", "continuous"])
def test_the_twin_path_is_the_cpu_update_bit_for_bit(cont, replays):
    """``cpu:0`` is a device other than plain ``cpu``, so it takes the path a GPU takes (twins that the
    optimizer steps, weights copied back to the CPU modules after the update), with CPU arithmetic:
    everything must equal the plain CPU update exactly."""
    rp = replays[cont]
    plain, twin = MAPPO(rp.spec, MAPPOConfig(seed=2, hidden=32)), MAPPO(rp.spec, MAPPOConfig(seed=2, hidden=32,
                                                                                             device="cpu:0"))
    assert not plain.twins and twin.twins and twin.train_actor is not twin.actor
    assert twin.config_hash == plain.config_hash  # the device is not part of what was learned
    for _ in range(2):
        a, b = plain.update(rp), twin.update(rp)
        assert a == b
        assert twin.weights_sha256() == plain.weights_sha256() and twin.version == plain.version
    obs = {"agent_0": np.array([0.3] * rp.spec.obs_dim, np.float32), "agent_1": np.zeros(rp.spec.obs_dim, np.float32)}
    assert str(plain.act(obs)) == str(twin.act(obs))  # acting reads the CPU modules, synced
    state = twin.state_dict()
    assert "device" not in state["config"] and _all_on_cpu(state)
    resumed = MAPPO(rp.spec, MAPPOConfig(seed=2, hidden=32, device="cpu:0"))
    resumed.load_state_dict(state)  # the CPU state reaches the twins too
    assert resumed.update(rp) == plain.update(rp) and resumed.weights_sha256() == plain.weights_sha256()


def test_a_device_this_machine_lacks_is_a_clear_error(replays):
    spec = replays[False].spec
    with pytest.raises(ValueError, match="'gpu' is not a torch device; use cpu, cuda or cuda:N"):
        MAPPO(spec, MAPPOConfig(device="gpu"))
    with pytest.raises(ValueError, match="'meta': the learners run on cpu or cuda only"):
        MAPPO(spec, MAPPOConfig(device="meta"))
    if not CUDA:
        with pytest.raises(ValueError, match=r"'cuda': torch.cuda.is_available\(\) is false .* use device=cpu"):
            MAPPO(spec, MAPPOConfig(device="cuda"))
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            MAPPO(spec, MAPPOConfig(device=f"cuda:{torch.cuda.device_count()}"))


@pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is false: no GPU on this machine")
@pytest.mark.parametrize("cont", [False, True], ids=["discrete", "continuous"])
def test_update_on_cuda_matches_the_cpu_and_keeps_state_on_the_cpu(cont, replays, tmp_path):
    from eventlog.checkpoint import Signer
    from learners.checkpoint import learner_from_checkpoint, save_checkpoint
    from learners.export import export_onnx
    from producers.policies import OnnxPolicy

    rp = replays[cont]
    cpu = MAPPO(rp.spec, MAPPOConfig(seed=2, hidden=32))
    gpu = MAPPO(rp.spec, MAPPOConfig(seed=2, hidden=32, device="cuda"))
    again = MAPPO(rp.spec, MAPPOConfig(seed=2, hidden=32, device="cuda"))
    for learner in (cpu, gpu, again):
        learner.update(rp)
        learner.update(rp)
    assert gpu.train_actor.body[0].weight.device.type == "cuda" and gpu.actor.body[0].weight.device.type == "cpu"
    assert gpu.weights_sha256() == again.weights_sha256()  # deterministic on the GPU too
    for p, q in zip(cpu.actor.parameters(), gpu.actor.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)  # the same update, other arithmetic
    for p, q in zip(gpu.actor.parameters(), gpu.train_actor.parameters()):
        assert torch.equal(p, q.cpu())  # acting uses the update's weights
    assert _all_on_cpu(gpu.state_dict())
    signer = Signer.generate()
    save_checkpoint(tmp_path / "ck", gpu, signer._key)
    loaded = learner_from_checkpoint(tmp_path / "ck", signer.public_key)  # on the CPU, anywhere
    assert not loaded.twins and loaded.weights_sha256() == gpu.weights_sha256()
    path = export_onnx(gpu, tmp_path / "p.onnx", signer)
    x = np.concatenate([np.full((4, rp.spec.obs_dim), 0.2, np.float32), np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]], 1)
    with torch.no_grad():
        want = loaded.greedy(torch.as_tensor(x)).numpy()
    got = OnnxPolicy(path, signer.public_key).actions(x)
    if cont:
        np.testing.assert_allclose(got, np.clip(want, -1.0, 1.0), atol=1e-5)
    else:
        assert np.array_equal(got, want)

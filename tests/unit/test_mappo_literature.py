"""MAPPO's literature options (Yu et al. 2021; Andrychowicz et al. 2021): learning-rate annealing
(``MAPPOConfig.anneal_lr_env_steps``), observation normalization (``MAPPOConfig.obs_norm``,
``networks.RunningNorm``) and the critic's time column (``MAPPOConfig.time_horizon``; Pardo et al.
2018). Each defaults to the behaviour before they existed: no new modules, the
same config hash, a constant rate. Enabled, they stay deterministic (same replay + seed + config ->
the same weights), survive a checkpoint round trip and the ONNX export, and run the twin path."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from eventlog.checkpoint import Signer
from learners.export import export_onnx, greedy_module
from learners.ippo import IPPO, IPPOConfig
from learners.mappo import MAPPO, MAPPOConfig
from learners.networks import RunningNorm, config_hash, weights_sha256
from producers.policies import OnnxPolicy, RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def replay():
    env = MatchTarget()
    return replay_of(harness_run(env, RandomPolicy(env, seed=11), episodes=6, seed=3))


def _live_rows(replay, field):
    rows = []
    for ep in replay.episodes:
        live = np.asarray(ep.alive) > 0  # [T, N]
        if field == "obs":
            rows.append(np.asarray(ep.obs)[live])
        else:  # the state, once per live agent-step (as the critic sees it)
            st = np.asarray(ep.state)
            rows.append(np.repeat(st[:, None, :], live.shape[1], 1)[live])
    return np.concatenate(rows).astype(np.float64)


# --- RunningNorm ---------------------------------------------------------------------------------
def test_running_norm_is_the_exact_running_mean_and_variance_and_leaves_the_id_alone():
    rng = np.random.default_rng(0)
    norm = RunningNorm(3)
    x0 = torch.as_tensor(rng.normal(size=(4, 5)).astype(np.float32))
    assert torch.equal(norm(x0), x0)  # before any update: the identity (mean 0, var 1)
    batches = [rng.normal(loc=[5.0, -2.0, 0.0], scale=[3.0, 0.5, 1e-3], size=(n, 3)) for n in (7, 1, 40)]
    for b in batches:
        ids = np.eye(2)[rng.integers(2, size=len(b))]
        norm.update(torch.as_tensor(np.concatenate([b, ids], 1), dtype=torch.float32))
    allx = np.concatenate([b.astype(np.float32).astype(np.float64) for b in batches])
    assert np.allclose(norm.mean.numpy(), allx.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(norm.var.numpy(), allx.var(0), rtol=1e-10, atol=1e-15)
    assert int(norm.count) == len(allx)
    x = torch.tensor([[5.0, -2.0, 1.0, 0.0, 1.0], [8.0, -1.5, 0.0, 1.0, 0.0]])
    y = norm(x)
    assert torch.equal(y[:, 3:], x[:, 3:])  # the one-hot id passes through
    expected = (x[:, :3].double() - norm.mean) / (norm.var + 1e-8).sqrt()
    assert torch.allclose(y[:, :3], expected.float().clamp(-10, 10), atol=1e-5)
    assert y[0, 2] == 10.0  # 1.0 on a column of std 1e-3: clipped
    with pytest.raises(ValueError, match="at least one column"):
        RunningNorm(0)


# --- defaults: as before --------------------------------------------------------------------------
def test_defaults_add_no_module_keep_the_config_hash_and_a_constant_rate(replay):
    learner = MAPPO(replay.spec, MAPPOConfig(hidden=16))
    keys = [*learner.actor.state_dict(), *learner.critic.state_dict()]
    assert not any("obs_norm" in k or k in ("0.mean", "0.var", "0.count") for k in keys)
    before = {k: v for k, v in asdict(learner.config).items()
              if k not in ("device", "anneal_lr_env_steps", "obs_norm", "time_horizon")}
    assert learner.config_hash == config_hash(before)  # the hash a config had before the new fields
    assert MAPPO(replay.spec, MAPPOConfig(hidden=16, obs_norm=True)).config_hash != learner.config_hash
    assert MAPPO(replay.spec, MAPPOConfig(hidden=16, time_horizon=25)).config_hash != learner.config_hash
    assert learner.critic[0].in_features == learner.critic_in_dim()  # no time column
    for _ in range(3):
        learner.update(replay)
        assert learner.optimizer.param_groups[0]["lr"] == learner.config.learning_rate


# --- learning-rate annealing -------------------------------------------------------------------------
def test_learning_rate_falls_linearly_to_zero_at_the_budget(replay):
    steps = replay.env_steps
    c = MAPPOConfig(hidden=16, learning_rate=1e-3, anneal_lr_env_steps=3 * steps)
    learner = MAPPO(replay.spec, c)
    seen = []
    for _ in range(3):
        learner.update(replay)
        seen.append(learner.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3], rel=1e-12)
    actor = weights_sha256(learner.actor, learner.critic)
    learner.update(replay)  # at the budget: rate 0, the networks no longer move
    assert learner.optimizer.param_groups[0]["lr"] == 0.0
    assert weights_sha256(learner.actor, learner.critic) == actor
    # the schedule follows the env steps, so a resumed learner continues it
    resumed = MAPPO(replay.spec, c)
    resumed.load_state_dict(learner.state_dict())
    resumed.update(replay)
    assert resumed.optimizer.param_groups[0]["lr"] == 0.0


# --- observation normalization -----------------------------------------------------------------------
@pytest.mark.parametrize("cls,cfg", [(MAPPO, MAPPOConfig), (IPPO, IPPOConfig)], ids=["mappo", "ippo"])
def test_obs_norm_statistics_are_those_of_the_replayed_live_rows(cls, cfg, replay):
    learner = cls(replay.spec, cfg(hidden=16, obs_norm=True))
    learner.update(replay)
    obs = _live_rows(replay, "obs")
    an = learner.actor.obs_norm
    assert int(an.count) == len(obs)
    assert np.allclose(an.mean.numpy(), obs.mean(0), atol=1e-12)
    assert np.allclose(an.var.numpy(), obs.var(0), atol=1e-12)
    cn = learner.critic[0]
    crit = obs if cls is IPPO else _live_rows(replay, "state")  # IPPO's critic sees the observation
    assert cn.dim == crit.shape[1]
    assert np.allclose(cn.mean.numpy(), crit.mean(0), atol=1e-12)
    learner.update(replay)  # the same rows again: the mean stays, the count doubles
    assert int(an.count) == 2 * len(obs) and np.allclose(an.mean.numpy(), obs.mean(0), atol=1e-12)


def test_obs_norm_and_annealing_are_deterministic_and_change_the_weights(replay):
    def train(**kw):
        learner = MAPPO(replay.spec, MAPPOConfig(seed=4, hidden=16, **kw))
        for _ in range(2):
            learner.update(replay)
        return learner.weights_sha256()

    both = {"obs_norm": True, "anneal_lr_env_steps": 5 * replay.env_steps}
    assert train(**both) == train(**both)
    assert len({train(), train(obs_norm=True), train(anneal_lr_env_steps=5 * replay.env_steps), train(**both)}) == 4


def test_obs_norm_twin_path_is_bit_identical_to_the_cpu_path(replay):
    """``device`` other than ``cpu`` (here ``cpu:0``) updates twins: their normalizers must receive the
    same statistics, and the CPU modules the same weights."""
    out = []
    for device in ("cpu", "cpu:0"):
        learner = MAPPO(replay.spec, MAPPOConfig(seed=2, hidden=16, obs_norm=True, device=device))
        for _ in range(2):
            learner.update(replay)
        out.append(learner.weights_sha256())
    assert out[0] == out[1]


def test_obs_norm_survives_a_checkpoint_round_trip_and_is_in_the_onnx_graph(replay, tmp_path):
    learner = MAPPO(replay.spec, MAPPOConfig(hidden=16, obs_norm=True))
    learner.update(replay)
    # make the statistics matter: a far-off mean on every observation column
    learner.actor.obs_norm.mean.fill_(3.0)
    learner.actor.obs_norm.var.fill_(0.25)
    again = MAPPO(replay.spec, MAPPOConfig(hidden=16, obs_norm=True))
    assert again.weights_sha256() != learner.weights_sha256()
    again.load_state_dict(learner.state_dict())
    assert again.weights_sha256() == learner.weights_sha256()
    signer = Signer.generate()
    pol = OnnxPolicy(export_onnx(learner, tmp_path / "p.onnx", signer), signer.public_key)
    spec = learner.spec
    rng = np.random.default_rng(1)
    obs = rng.uniform(0, 6, (500, spec.obs_dim)).astype(np.float32)
    ids = np.eye(len(spec.agents), dtype=np.float32)[rng.integers(len(spec.agents), size=500)]
    x = np.concatenate([obs, ids], 1)
    with torch.no_grad():
        expected = greedy_module(learner)(torch.as_tensor(x)).numpy()
        unnormalized = learner.actor.body(torch.as_tensor(x)).argmax(-1).numpy()
    assert np.array_equal(pol.actions(x), expected)
    assert not np.array_equal(expected, unnormalized)  # the graph did normalize


# --- the critic's time column ------------------------------------------------------------------------
@pytest.mark.parametrize("cls,cfg", [(MAPPO, MAPPOConfig), (IPPO, IPPOConfig)], ids=["mappo", "ippo"])
def test_time_column_is_the_fraction_of_steps_left_after_the_critic_inputs(cls, cfg, replay):
    learner = cls(replay.spec, cfg(hidden=16, time_horizon=4))
    assert learner.critic[0].in_features == learner.critic_in_dim() + 1
    ep = replay.episodes[0]
    obs, state = torch.as_tensor(ep.obs), torch.as_tensor(ep.state)
    cx = learner.critic_features(obs, state)
    T, N = obs.shape[:2]
    assert cx.shape == (T, N, learner.critic_in_dim() + 1)
    assert torch.equal(cx[..., :-1], learner.critic_inputs(obs, state))  # the inputs as they were
    left = torch.tensor([max(0.0, 1 - t / 4) for t in range(T)], dtype=torch.float32)
    assert torch.equal(cx[..., -1], left[:, None].expand(T, N))  # the same for every agent at a step
    assert torch.equal(cls(replay.spec, cfg(hidden=16)).critic_features(obs, state),
                       learner.critic_inputs(obs, state))  # time_horizon 0: unchanged


def test_time_column_is_deterministic_survives_a_checkpoint_and_leaves_the_actor_alone(replay, tmp_path):
    def train(**kw):
        learner = MAPPO(replay.spec, MAPPOConfig(seed=4, hidden=16, **kw))
        for _ in range(2):
            learner.update(replay)
        return learner

    a, b = train(time_horizon=25), train(time_horizon=25)
    assert a.weights_sha256() == b.weights_sha256()
    assert a.weights_sha256() != train().weights_sha256()
    again = MAPPO(replay.spec, MAPPOConfig(seed=4, hidden=16, time_horizon=25))
    again.load_state_dict(a.state_dict())
    assert again.weights_sha256() == a.weights_sha256()
    # the actor's inputs (and so acting and the ONNX export) do not change with the time column
    assert a.actor.body[0].in_features == MAPPO(replay.spec, MAPPOConfig(hidden=16)).actor.body[0].in_features
    signer = Signer.generate()
    pol = OnnxPolicy(export_onnx(a, tmp_path / "p.onnx", signer), signer.public_key)
    x = np.concatenate([np.asarray(replay.episodes[0].obs, np.float32).reshape(-1, replay.spec.obs_dim),
                        np.tile(np.eye(len(replay.spec.agents), dtype=np.float32), (len(replay.episodes[0].obs), 1))], 1)
    with torch.no_grad():
        assert np.array_equal(pol.actions(x), greedy_module(a)(torch.as_tensor(x)).numpy())

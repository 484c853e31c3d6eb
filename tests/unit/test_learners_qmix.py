"""QMIX (learners/qmix.py): the mixer is monotonic, targets are copied on schedule, the episode buffer
pads and samples correctly, TD targets match a step-by-step reference, fewer-action agents stay in
their actions, and it learns: on banking_v0 (seed 003's QMIX demo) well above random, trained
through the event log. The registry-wide tests (lineage, determinism, checkpoints, ONNX) run for
QMIX in test_learners_algorithms.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from learners.qmix import QMIX, EpisodeBuffer, QMixer, QMIXConfig
from learners.replay import Episode, Replay, ReplayError, RunSpec, SpaceSpec
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of

SMALL = dict(learning_starts=2, batch_size=4, train_frequency=16, hidden_layers=(16,), mixing_embed_dim=8,
             hypernet_embed=16)


def _spec(action_ns=(3, 3), obs_dim=4, state_dim=6, kind="Discrete") -> RunSpec:
    agents = tuple(f"a{i}" for i in range(len(action_ns)))
    act = {a: SpaceSpec(kind, () if kind == "Discrete" else (2,), n if kind == "Discrete" else 0, 0,
                        () if kind == "Discrete" else (-1.0, -1.0), () if kind == "Discrete" else (1.0, 1.0))
           for a, n in zip(agents, action_ns)}
    return RunSpec("r1", "toy_v0", "0", 1, agents, {a: SpaceSpec("Box", (obs_dim,)) for a in agents}, act,
                   SpaceSpec("Box", (state_dim,)))


def _episode(rng, T, N=2, D=4, S=6, n_actions=3, alive=None, terminated=False) -> Episode:
    alive = np.ones((T, N), np.float32) if alive is None else alive
    return Episode(0, 0, rng.normal(size=(T, N, D)).astype(np.float32) * alive[..., None],
                   rng.normal(size=(T, S)).astype(np.float32), rng.integers(n_actions, size=(T, N)),
                   rng.normal(size=(T, N)).astype(np.float32) * alive, alive, terminated)


@pytest.fixture(scope="module")
def replay():
    env = MatchTarget()
    return replay_of(harness_run(env, RandomPolicy(env, seed=2), episodes=6, seed=5))


def test_mixer_is_monotonic_in_every_agent_q():
    torch.manual_seed(0)
    mixer = QMixer(n_agents=3, state_dim=5, embed=8, hypernet_embed=16)
    q = torch.randn(512, 3, requires_grad=True) * 10
    s = torch.randn(512, 5) * 3
    grads = torch.autograd.grad(mixer(q, s).sum(), q)[0]
    assert (grads >= 0).all() and (grads > 0).float().mean() > 0.9
    # the greedy joint action on Q_tot is each agent's own greedy action: raising any q_i never lowers Q_tot
    q2 = q.detach() + torch.rand(512, 3)
    assert (mixer(q2, s) >= mixer(q.detach(), s) - 1e-5).all()


def test_mixer_stays_monotonic_after_training(replay):
    learner = QMIX(replay.spec, QMIXConfig(**SMALL))
    for _ in range(3):
        learner.update(replay)
    assert learner.optimizer_steps > 0
    q = torch.randn(256, 2, requires_grad=True)
    s = torch.randn(256, replay.spec.state_dim)
    assert (torch.autograd.grad(learner.mixer(q, s).sum(), q)[0] >= 0).all()


def test_target_networks_are_copied_every_target_network_frequency_steps(replay):
    # 6 episodes x 16 agent-transitions, a step per 16: 6 optimizer steps per update
    learner = QMIX(replay.spec, QMIXConfig(**{**SMALL, "learning_starts": 6}, target_network_frequency=9))
    init_target = [t.clone() for t in learner.target_mixer.state_dict().values()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    learner.update(replay)
    assert learner.optimizer_steps == 6
    assert all(torch.equal(x, y) for x, y in zip(learner.target_mixer.state_dict().values(), init_target))
    assert not same(learner.agent_q, learner.target_agent_q) and not same(learner.mixer, learner.target_mixer)
    learner.update(Replay(replay.spec, replay.episodes[:3], replay.lineage, True, None))  # 3 steps: the 9th copies
    assert learner.optimizer_steps == 9
    assert same(learner.agent_q, learner.target_agent_q) and same(learner.mixer, learner.target_mixer)


def test_episode_buffer_pads_masks_and_samples_seeded_without_replacement():
    rng = np.random.default_rng(0)
    left = np.ones((5, 2), np.float32)
    left[3:, 1] = 0.0  # agent 1 leaves after step 2
    eps = [_episode(rng, 3, terminated=True), _episode(rng, 5, alive=left)]
    learner = QMIX(_spec(), QMIXConfig(**SMALL))
    for e in eps:
        learner._add(e)
    b = EpisodeBuffer.batch(learner.buffer.episodes)
    assert b["inputs"].shape == (2, 5, 2, 4 + 2) and b["state"].shape == (2, 5, 6)
    assert b["step"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["last"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    # a terminated episode's last step is learned (target r); a truncated one's is not (its future is unknown)
    assert b["learn"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert torch.equal(b["alive"][1], torch.as_tensor(left)) and b["alive"][0, 3:].sum() == 0
    assert torch.allclose(b["team_reward"][1], torch.as_tensor(eps[1].rewards.sum(1)))
    assert b["team_reward"][0, 3:].abs().sum() == 0 and b["inputs"][0, 3:].abs().sum() == 0
    assert torch.equal(b["inputs"][0, :3, :, :4], torch.as_tensor(eps[0].obs))
    assert torch.equal(b["inputs"][0, 0, :, 4:], torch.eye(2))  # one-hot agent ids after the observation

    def draws(seed):
        buf = EpisodeBuffer(capacity=4, seed=seed)
        for i in range(6):  # FIFO: episodes 2..5 remain, 4 and 5 in the slots of 0 and 1
            L = i + 1
            buf.add({"inputs": np.full((L, 2, 6), i, np.float32), "state": np.full((L, 6), i, np.float32),
                     "actions": np.zeros((L, 2), np.int64), "team_reward": np.full(L, float(i), np.float32),
                     "alive": np.ones((L, 2), np.float32), "terminated": False})
        assert sorted(int(e["team_reward"][0]) for e in buf.episodes) == [2, 3, 4, 5]
        return [buf.sample(3)["team_reward"][:, 0].tolist() for _ in range(5)]

    a, b2, c = draws(1), draws(1), draws(2)
    assert a == b2 and a != c
    assert all(len(set(row)) == 3 for row in a)  # without replacement


def test_td_targets_match_a_step_by_step_reference():
    rng = np.random.default_rng(3)
    left = np.ones((4, 2), np.float32)
    left[2:, 0] = 0.0
    learner = QMIX(_spec(), QMIXConfig(**SMALL, gamma=0.9))
    for p in learner.target_agent_q.parameters():  # targets differ from the online nets
        p.data.add_(0.1)
    eps = [_episode(rng, 2, terminated=True), _episode(rng, 4, alive=left)]
    for e in eps:
        learner._add(e)
    b = EpisodeBuffer.batch(learner.buffer.episodes)
    y = learner.td_targets(b)
    with torch.no_grad():
        for i, e in enumerate(eps):
            x = torch.as_tensor(learner._inputs(e.obs))
            for t in range(e.length):
                want = float(e.rewards[t].sum())
                if t < e.length - 1:  # bootstrap from the next step; double Q: online argmax, target value
                    a = learner.agent_q(x[t + 1]).argmax(-1)
                    tq = learner.target_agent_q(x[t + 1]).gather(-1, a[:, None]).squeeze(-1) * torch.as_tensor(e.alive[t + 1])
                    want += 0.9 * float(learner.target_mixer(tq[None], torch.as_tensor(e.state[t + 1])[None]))
                assert abs(float(y[i, t]) - want) < 1e-4, (i, t, float(y[i, t]), want)
    # the loss counts the terminated episode's last reward, not the truncated episode's
    with torch.no_grad():
        loss = float(learner.td_loss(b)[0])
        for i, changes in ((0, True), (1, False)):
            moved = {k: v.clone() for k, v in b.items()}
            moved["team_reward"][i, eps[i].length - 1] += 5.0
            assert (float(learner.td_loss(moved)[0]) != loss) == changes


def test_agents_with_fewer_actions_never_take_the_missing_ones():
    spec = _spec(action_ns=(2, 4))
    learner = QMIX(spec, QMIXConfig(**SMALL))
    with torch.no_grad():
        learner.agent_q.net[-1].bias[:] = torch.tensor([0.0, 0.0, 0.0, 100.0])  # action 3 looks best to all
    rng = np.random.default_rng(0)
    for eps_greedy in (0, 10**6):  # epsilon 1.0 (explore), then 0.05
        learner.episodes = eps_greedy
        for _ in range(50):
            acts = learner.act({"a0": rng.normal(size=4), "a1": rng.normal(size=4)})
            assert acts["a0"][0] < 2 and acts["a1"][0] < 4
    x = torch.as_tensor(np.concatenate([rng.normal(size=(2, 4)), np.eye(2)], 1), dtype=torch.float32)
    greedy = learner.greedy(x).tolist()
    assert greedy[0] < 2 and greedy[1] == 3


def test_continuous_actions_are_refused():
    with pytest.raises(ReplayError, match="QMIX needs a Discrete action space.*mappo or ippo"):
        QMIX(_spec(kind="Box"), QMIXConfig())


def test_epsilon_falls_linearly_over_episodes():
    learner = QMIX(_spec(), QMIXConfig(start_e=1.0, end_e=0.1, epsilon_anneal_episodes=100))
    seen = []
    for n in (0, 50, 100, 1000):
        learner.episodes = n
        seen.append(round(learner.epsilon, 6))
    assert seen == [1.0, 0.55, 0.1, 0.1]


@pytest.mark.timeout(120)
def test_learns_banking_well_above_random(tmp_path):
    """Seed 003's banking demo (3 routers, 50 steps): 3,000 env steps through the sealed event log."""
    from eventlog.privacy import FieldProtector, LocalKeyStore
    from learners.evaluate import GreedyPolicy, evaluate
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env
    from producers.envs import make_env

    torch.set_num_threads(1)
    env, env_id, ver = make_env("banking_v0")
    keys = LocalKeyStore(tmp_path / "subjects.db")
    cfg = QMIXConfig(seed=1, episodes_per_update=10, epsilon_anneal_episodes=40, learning_rate=1e-3,
                     train_frequency=50, learning_starts=8, batch_size=16, target_network_frequency=50)
    res = train_on_env(env, env_id, ver, "qmix", transport=MemoryTransport(keep=False), iterations=6, seed=1,
                       config=cfg, protector=FieldProtector(keys))
    keys.close()
    random_return = evaluate(env, RandomPolicy(env, seed=999), 30, 5000)
    trained = evaluate(env, GreedyPolicy(res.learner), 30, 5000)
    # random routing pays blockchain fees and overloads the internal channel: -426.6 per episode; measured
    # here -254.9 (the env's hand-written heuristic: -272.9)
    assert trained > random_return + 100, (random_return, trained, res.curve)
    assert res.learner.env_steps == 3000 and all(r["optimizer_steps"] > 0 for r in res.curve[1:])


@pytest.mark.timeout(120)
def test_learns_simple_spread_well_above_random():
    """MPE2 simple_spread_v3 (3 agents, 25 steps, discrete): 8,000 env steps through the sealed event log."""
    from learners.evaluate import GreedyPolicy, evaluate
    from learners.online import MemoryTransport
    from marlgrc.training import train_on_env
    from producers.envs import make_env

    torch.set_num_threads(1)
    env, env_id, ver = make_env("simple_spread_v3")
    cfg = QMIXConfig(seed=1, epsilon_anneal_episodes=150, train_frequency=25, target_network_frequency=100)
    res = train_on_env(env, env_id, ver, "qmix", transport=MemoryTransport(keep=False), iterations=16, seed=1,
                       config=cfg)
    random_return = evaluate(env, RandomPolicy(env, seed=999), 50, 5000)
    trained = evaluate(env, GreedyPolicy(res.learner), 50, 5000)
    # random about -81 (docs/results.md: -76.7 on other seeds; the fixed-assignment rule -46.5); measured
    # here -65.6 (seed 1) and -67.3 (seed 2) after 8,000 env steps
    assert trained > random_return + 8.0, (random_return, trained, res.curve)
    assert res.learner.env_steps == 8000


def test_train_online_command_runs_qmix_on_simple_spread(tmp_path):
    import json

    from typer.testing import CliRunner

    from marlgrc.cli import app

    curve = tmp_path / "c.json"
    res = CliRunner().invoke(app, ["train-online", "--env", "simple_spread_v3", "--algo", "qmix", "--iterations", "2",
                                   "--bootstrap", "memory", "--set", "episodes_per_update=3", "--set",
                                   "learning_starts=2", "--set", "batch_size=2", "--eval-episodes", "2",
                                   "--out", str(curve), "--home", str(tmp_path / "home")])
    assert res.exit_code == 0, res.output
    data = json.loads(curve.read_text())
    assert [r["env_steps"] for r in data["curve"]] == [75, 150]
    assert data["curve"][-1]["optimizer_steps"] > 0 and "losses/td" in data["curve"][-1]
    assert set(data["policies"]) == {"random", "learned (sampled)", "learned (greedy)"}
    assert res.stdout.strip().splitlines()[-1].startswith("simple_spread_v3__qmix__1__")

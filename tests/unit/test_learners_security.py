"""Learning on a security env: MAPPO trained on-policy through sealed events on mailbox_v0 (personal
data protected by a FieldProtector, as the harness requires) beats a random policy on reward and
on breaches (plain OPENs of malicious items). Fixed seeds, small budget."""
from __future__ import annotations

import pytest

from eventlog.privacy import FieldProtector, LocalKeyStore
from learners.mappo import MAPPOConfig
from learners.evaluate import GreedyPolicy, evaluate_security
from learners.online import MemoryTransport
from marlgrc.training import train_on_env
from producers.envs import make_env
from producers.harness import HarnessError
from producers.policies import RandomPolicy


@pytest.mark.timeout(120)
def test_mappo_on_mailbox_beats_random_on_reward_and_breaches(tmp_path):
    env, env_id, ver = make_env("mailbox_v0")
    with pytest.raises(HarnessError, match="FieldProtector"):  # no protector: personal data is refused
        train_on_env(env, env_id, ver, "mappo", transport=MemoryTransport(), iterations=1)
    with LocalKeyStore(tmp_path / "subjects.db") as keys:
        transport = MemoryTransport()
        res = train_on_env(env, env_id, ver, "mappo", transport=transport, iterations=6, seed=1,
                           config=MAPPOConfig(seed=1, episodes_per_update=20, update_epochs=10),
                           protector=FieldProtector(keys))
    # the personal data never reached the events in the clear
    raw = {s.encode() for s in env.raw_identifiers()}
    assert not any(r in value for _, _, value in transport.sink.sent[-2000:] for r in raw)
    rand = evaluate_security(env, RandomPolicy(env, seed=7), 40, seed=50_000)
    learned = evaluate_security(env, GreedyPolicy(res.learner), 40, seed=50_000)
    # random: about -6 team reward and 1.3 breaches per 20-item episode
    assert learned["mean_return"] > rand["mean_return"] + 8.0, (rand, learned, res.curve[-1])
    assert learned["breaches_per_episode"] < 0.5 * rand["breaches_per_episode"], (rand, learned)


def _mixed_spec():
    from learners.replay import RunSpec, SpaceSpec

    ids = ("get", "open", "bin")
    obs = {"get": SpaceSpec("Box", (4,)), "open": SpaceSpec("Box", (6,)), "bin": SpaceSpec("Box", (4,))}
    acts = {"get": SpaceSpec("Discrete", (), n=3), "open": SpaceSpec("Discrete", (), n=5),
            "bin": SpaceSpec("Discrete", (), n=2)}
    return RunSpec("r", "mailbox_v0", "0", 0, ids, obs, acts, SpaceSpec("Box", (9,)))


@pytest.mark.parametrize("name", ["mappo", "ippo", "dqn"])
def test_agents_with_fewer_actions_never_get_an_action_they_lack(name, tmp_path):
    import numpy as np
    import torch

    from eventlog.checkpoint import Signer
    from learners import algorithm
    from learners.export import export_onnx, greedy_module
    from producers.policies import OnnxPolicy

    spec = _mixed_spec()
    assert spec.n_actions == 5 and spec.action_mask().tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    a = algorithm(name)
    learner = a.learner_cls(spec, a.config_cls(seed=3))
    rng = np.random.default_rng(0)
    seen = {ag: set() for ag in spec.agents}
    for _ in range(300):
        obs = {ag: rng.uniform(0, 1, spec.observation_spaces[ag].shape).astype(np.float32) for ag in spec.agents}
        for ag, (act, logp) in learner.act(obs).items():
            seen[ag].add(act)
            assert np.isfinite(logp)
    assert seen == {"get": {0, 1, 2}, "open": {0, 1, 2, 3, 4}, "bin": {0, 1}}
    # the exported greedy policy masks too, and equals torch's
    x = np.concatenate([rng.uniform(-3, 3, (600, spec.obs_dim)).astype(np.float32),
                        np.eye(3, dtype=np.float32)[np.arange(600) % 3]], 1)
    signer = Signer.generate()
    pol = OnnxPolicy(export_onnx(learner, tmp_path / "p.onnx", signer), signer.public_key)
    got = pol.actions(x)
    with torch.no_grad():
        assert np.array_equal(got, greedy_module(learner)(torch.as_tensor(x)).numpy())
    n_own = np.array([3, 5, 2])[np.arange(600) % 3]
    assert (got < n_own).all()

"""Learning on sandbox_v0 (seed 002's containment env) with its aligned reward (version 1): MAPPO
trained on-policy through sealed events beats random AND the env's heuristic on reward and on
security (malicious steps left uncontained). Under reward version 0 (isolation paid every step) the
reward-optimal policy never contained a malicious sample; this test would fail on security there.
Fixed seeds, small budget (60 updates of 20 episodes). Known weakness: early on every policy
falls into "contain everything" (+0.25 per sample on average, no uncontained steps); leaving it needs
exploration of watching benign samples. Seed 2 leaves it by update ~45; seed 1 is still in it after
80 updates with these settings (the 10-minute runs in docs/results.md leave it), so this test pins
seed 2."""
from __future__ import annotations

import pytest

from learners.mappo import MAPPOConfig
from learners.evaluate import GreedyPolicy, evaluate_security
from learners.online import MemoryTransport
from marlgrc.training import train_on_env
from producers.envs import make_env
from producers.policies import HeuristicPolicy, RandomPolicy


@pytest.mark.timeout(150)
def test_mappo_on_sandbox_beats_random_and_heuristic_on_reward_and_security():
    import torch

    torch.set_num_threads(1)
    env, env_id, ver = make_env("sandbox_v0")
    res = train_on_env(env, env_id, ver, "mappo", transport=MemoryTransport(), iterations=60, seed=2,
                       config=MAPPOConfig(seed=2, episodes_per_update=20, update_epochs=10))
    rand = evaluate_security(env, RandomPolicy(env, seed=7), 40, seed=50_000)
    heur = evaluate_security(env, HeuristicPolicy(env), 40, seed=50_000)
    learned = evaluate_security(env, GreedyPolicy(res.learner), 40, seed=50_000)
    info = (rand, heur, learned, res.curve[-1])
    # random about -0.85 reward / 1.3 uncontained malicious steps; heuristic about 2.26 / 1.45; optimum 3.5 / 0
    assert learned["mean_return"] > heur["mean_return"] + 0.5, info
    assert learned["mean_return"] > rand["mean_return"] + 3.0, info
    assert learned["exposure_steps_per_episode"] < 0.5 * min(heur["exposure_steps_per_episode"],
                                                             rand["exposure_steps_per_episode"]), info
    assert learned["breaches_per_episode"] <= heur["breaches_per_episode"], info
    assert learned["false_positives_per_episode"] < 0.5 * rand["false_positives_per_episode"], info

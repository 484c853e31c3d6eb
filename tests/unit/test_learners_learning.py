"""Learning tests: each algorithm, trained on-policy through the event log (harness -> sealed events
-> verified replay -> update), beats a random policy on MatchTarget by a clear margin. Fixed seeds,
small budgets (a few thousand agent-steps each)."""
from __future__ import annotations

import pytest

from learners import algorithm
from marlgrc.online import MemoryTransport, evaluate, train_online
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget

CASES = {
    "mappo": (False, dict(learning_rate=3e-3), 8),
    "ippo": (False, dict(learning_rate=3e-3), 8),
    "mappo-continuous": (True, dict(learning_rate=3e-3), 12),
    "dqn": (False, dict(learning_rate=1e-3, learning_starts=200, train_frequency=2, target_network_frequency=100,
                        e_decay=0.9, hidden_layers=(64,)), 8),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_learns_match_target_well_above_random(case):
    name = case.split("-")[0]
    continuous, overrides, iterations = CASES[case]
    env = MatchTarget(continuous=continuous)
    cfg = algorithm(name).config_cls(seed=1, episodes_per_update=10, **overrides)
    res = train_online(env, "match_target_v0", "0", name, transport=MemoryTransport(), iterations=iterations,
                       seed=1, config=cfg)
    random_return = evaluate(env, RandomPolicy(env, seed=999), 50, 5000)
    if name == "dqn":
        res.learner.episodes = 10**6  # evaluate at the final epsilon (0.1), not the training one
    trained = evaluate(env, res.learner, 50, 5000)
    # MatchTarget, 2 agents x 8 steps: random scores ~5.3 (discrete, optimum 16) or ~-10.5 (continuous, optimum 0)
    margin = 4.0
    assert trained > random_return + margin, (case, random_return, trained, res.curve)
    assert all(u > 0 for u in [r["optimizer_steps"] for r in res.curve[-1:]])

"""Built-in policies: ``random`` (uniform over each agent's action space) and ``heuristic`` (the
env's own rule, ``env.heuristic_action(agent, observation)``). Both satisfy ``producers.policy.Policy``."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from gymnasium import spaces


class RandomPolicy:
    """Uniform random actions, seeded; log-probabilities are exact for Discrete/MultiDiscrete/
    MultiBinary and bounded Boxes (0.0 for an unbounded Box, which has no uniform density)."""

    version = "random-v1"

    def __init__(self, env: Any, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._space = {a: env.action_space(a) for a in env.possible_agents}
        self._logp = {a: self._log_prob(s) for a, s in self._space.items()}
        self._n = {a: (int(s.n), int(s.start)) for a, s in self._space.items() if isinstance(s, spaces.Discrete)}

    @staticmethod
    def _log_prob(s: Any) -> float:
        if isinstance(s, spaces.Discrete):
            return -math.log(int(s.n))
        if isinstance(s, spaces.MultiDiscrete):
            return -float(np.log(s.nvec.astype(np.float64)).sum())
        if isinstance(s, spaces.MultiBinary):
            return -math.log(2) * int(np.prod(s.shape))
        if isinstance(s, spaces.Box) and s.is_bounded():
            width = (s.high.astype(np.float64) - s.low.astype(np.float64))
            return -float(np.log(np.where(width > 0, width, 1.0)).sum())
        return 0.0

    def _sample(self, agent: str) -> Any:
        n = self._n.get(agent)
        if n is not None:
            return int(self._rng.integers(n[0])) + n[1]
        s = self._space[agent]
        if isinstance(s, spaces.MultiDiscrete):
            return (self._rng.random(s.nvec.shape) * s.nvec).astype(s.dtype)
        if isinstance(s, spaces.MultiBinary):
            return self._rng.integers(0, 2, size=s.shape, dtype=s.dtype)
        low = np.where(np.isfinite(s.low), s.low, -1.0)
        high = np.where(np.isfinite(s.high), s.high, 1.0)
        return self._rng.uniform(low, high).astype(s.dtype)

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> dict[str, tuple[Any, float]]:
        return {a: (self._sample(a), self._logp[a]) for a in observations}


class HeuristicPolicy:
    """Deterministic rule from the env (``heuristic_action(agent, observation)``); log-prob 0.0."""

    version = "heuristic-v1"

    def __init__(self, env: Any):
        rule = getattr(env, "heuristic_action", None)
        if rule is None:
            raise ValueError(f"env {type(env).__name__} has no heuristic_action(agent, observation); "
                             f"use --policy random, or give the env such a method")
        self._rule = rule

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> dict[str, tuple[Any, float]]:
        return {a: (self._rule(a, o), 0.0) for a, o in observations.items()}


BUILTIN = ("random", "heuristic")


def builtin_policy(name: str, env: Any, seed: int = 0):
    if name == "random":
        return RandomPolicy(env, seed)
    if name == "heuristic":
        return HeuristicPolicy(env)
    raise ValueError(f"unknown policy {name!r}; built in: {', '.join(BUILTIN)}")

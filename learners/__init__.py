"""Learners: MAPPO, IPPO and DQN trained from replayed, verified topics (see docs/LEARNERS.md).

``ALGORITHMS`` is the registry: each entry names its config class and learner class and declares
what it can do, so tests and the CLI are parametrized over it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    config_cls: type
    learner_cls: type
    on_policy: bool
    centralized_critic: bool
    continuous_actions: bool


def _registry() -> dict[str, Algorithm]:
    from .dqn import DQN, DQNConfig
    from .ippo import IPPO, IPPOConfig
    from .mappo import MAPPO, MAPPOConfig

    return {
        "mappo": Algorithm("mappo", MAPPOConfig, MAPPO, True, True, True),
        "ippo": Algorithm("ippo", IPPOConfig, IPPO, True, False, True),
        "dqn": Algorithm("dqn", DQNConfig, DQN, False, False, False),
    }


def algorithms() -> dict[str, Algorithm]:
    return _registry()


def algorithm(name: str) -> Algorithm:
    reg = _registry()
    if name not in reg:
        raise KeyError(f"unknown algorithm {name!r}; choose one of {sorted(reg)}")
    return reg[name]

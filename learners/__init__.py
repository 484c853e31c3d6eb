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


def config_overrides(config_cls: type, items: list[str]) -> dict:
    """``["update_epochs=10", ...]`` as typed values of the config's fields (bools from 1/true/yes,
    tuples from comma-separated ints); a field the config lacks or a value of the wrong type is a
    ``ValueError`` naming it."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(config_cls)}
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or k not in defaults:
            raise ValueError(f"--set {item}: {config_cls.__name__} has no field {k!r}; fields: {sorted(defaults)}")
        d = defaults[k]
        try:
            out[k] = (v.lower() in ("1", "true", "yes")) if isinstance(d, bool) else \
                tuple(int(x) for x in v.split(",")) if isinstance(d, tuple) else type(d)(v)
        except ValueError:
            raise ValueError(f"--set {item}: {k} takes a {type(d).__name__} (default {d!r})") from None
    return out

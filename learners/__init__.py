"""Learners: MAPPO, IPPO, DQN, QMIX, MADDPG and SAC trained from replayed, verified topics (see docs/LEARNERS.md).

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
    discrete_actions: bool = True


def _registry() -> dict[str, Algorithm]:
    from .dqn import DQN, DQNConfig
    from .ippo import IPPO, IPPOConfig
    from .maddpg import MADDPG, MADDPGConfig
    from .mappo import MAPPO, MAPPOConfig
    from .qmix import QMIX, QMIXConfig
    from .sac import SAC, SACConfig

    return {
        "mappo": Algorithm("mappo", MAPPOConfig, MAPPO, True, True, True),
        "ippo": Algorithm("ippo", IPPOConfig, IPPO, True, False, True),
        "dqn": Algorithm("dqn", DQNConfig, DQN, False, False, False),
        "qmix": Algorithm("qmix", QMIXConfig, QMIX, False, True, False),
        "maddpg": Algorithm("maddpg", MADDPGConfig, MADDPG, False, True, True),
        "sac": Algorithm("sac", SACConfig, SAC, False, False, True, discrete_actions=False),
    }


def algorithms() -> dict[str, Algorithm]:
    return _registry()


def algorithm(name: str) -> Algorithm:
    reg = _registry()
    if name not in reg:
        raise KeyError(f"unknown algorithm {name!r}; choose one of {sorted(reg)}")
    return reg[name]


def config_overrides(config_cls: type, items: list[str]) -> dict:
    """``["update_epochs=10", ...]`` as typed values of the config's fields, validated by pydantic
    against the config dataclass's annotations (bools from 1/true/yes, tuples from comma-separated
    values); a field the config lacks or a value of the wrong type is a ``ValueError`` naming it."""
    from dataclasses import fields

    from pydantic import TypeAdapter, ValidationError

    defaults = {f.name: f.default for f in fields(config_cls)}
    raw: dict = {}
    given: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or k not in defaults:
            raise ValueError(f"--set {item}: {config_cls.__name__} has no field {k!r}; fields: {sorted(defaults)}")
        raw[k] = v.split(",") if isinstance(defaults[k], tuple) else v
        given[k] = v
    try:
        config = TypeAdapter(config_cls).validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(f"--set {e['loc'][0]}={given.get(e['loc'][0])}: {e['msg']} (default "
                             f"{defaults.get(e['loc'][0])!r})" for e in exc.errors())
        raise ValueError(problems) from None
    return {k: getattr(config, k) for k in raw}

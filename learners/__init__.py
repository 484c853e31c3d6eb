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


def config_from_record(name: str, fields: dict):
    """Algorithm ``name``'s config from the ``asdict`` JSON a run recorded (lists back to tuples)."""
    return algorithm(name).config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def config_overrides(config_cls: type, items: list[str]) -> dict:
    """``["update_epochs=10", ...]`` as typed values of the config's fields, validated by pydantic
    against the config dataclass's annotations (bools from 1/true/yes, tuples from comma-separated
    values); a field the config lacks or a value of the wrong type is a ``ValueError`` naming it."""
    import math
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
        def where(e: dict) -> str:
            k = e["loc"][0] if e["loc"] else None
            return f"--set {k}={given.get(k)}" if k in given else f"--set {' '.join(items)}"
        problems = "; ".join(f"{where(e)}: {e['msg']} (default {defaults.get(e['loc'][0] if e['loc'] else None)!r})"
                             for e in exc.errors())
        raise ValueError(problems) from None
    out = {k: getattr(config, k) for k in raw}
    for k, v in out.items():
        values = v if isinstance(v, tuple) else (v,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise ValueError(f"--set {k}={given[k]}: not a finite number (default {defaults[k]!r}); give a number "
                             f"such as {defaults[k]!r}")
    return out

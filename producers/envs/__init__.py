"""Built-in environments, by versioned name, and the one way an env is found from its name."""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

BUILTIN_ENVS = {
    "mailbox_v0": "producers.envs.mailbox_v0:parallel_env",
    "sandbox_v0": "producers.envs.sandbox_v0:parallel_env",
    "market_v0": "producers.envs.market_v0:parallel_env",
    "retail_v0": "producers.envs.retail_v0:parallel_env",
    "banking_v0": "producers.envs.banking_v0:parallel_env",
    "trading_v0": "producers.envs.trading_v0:parallel_env",
    "supply_chain_v0": "producers.envs.supply_chain_v0:parallel_env",
    "resource_allocation_v0": "producers.envs.resource_allocation_v0:parallel_env",
}
# installed PettingZoo envs known by their versioned name alone (docs/results.md trains on them)
KNOWN_ENVS = {
    "simple_spread_v3": "mpe2.simple_spread_v3:parallel_env",
}


class EnvError(ValueError):
    """An env name that cannot be found or built; the message says what to pass instead."""


@dataclass(frozen=True)
class EnvSpec:
    factory: Callable[..., Any]
    env_id: str
    env_version: str
    spec: str


def resolve_env(spec: str) -> EnvSpec:
    """A built-in env (``mailbox_v0``), a known installed one (``simple_spread_v3``) or
    ``module:factory`` of any installed PettingZoo env."""
    target = BUILTIN_ENVS.get(spec) or KNOWN_ENVS.get(spec) or spec
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise EnvError(f"--env {spec!r} is neither a built-in env ({', '.join([*BUILTIN_ENVS, *KNOWN_ENVS])}) nor "
                       f"module:factory (e.g. mpe2.simple_spread_v3:parallel_env)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvError(f"--env {spec!r}: cannot import {module_name} ({exc.__class__.__name__}: {exc}); "
                       f"is the package installed in this environment?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EnvError(f"--env {spec!r}: {module_name} has no callable {attr!r}")
    name = spec if spec in BUILTIN_ENVS else getattr(module, "ENV_ID", None) or module_name.rsplit(".", 1)[-1]
    m = re.search(r"_v(\d+)$", name)
    version = getattr(module, "ENV_VERSION", None) or (m.group(1) if m else "0")
    return EnvSpec(factory, name, str(version), spec)


def make_env(spec: str, *, continuous: bool = False, **kwargs: Any) -> tuple[Any, str, str]:
    """(env, env_id, env_version): ``resolve_env(spec)`` built with ``kwargs``; ``continuous`` asks an
    env that has both kinds (MPE2's ``continuous_actions``) for continuous actions."""
    found = resolve_env(spec)
    if continuous:
        kwargs = {**kwargs, "continuous_actions": True}
    try:
        env = found.factory(**kwargs)
    except TypeError as exc:
        raise EnvError(f"--env {spec!r} does not take these arguments ({exc}); "
                       f"given: {', '.join(sorted(kwargs)) or 'none'}") from None
    return env, found.env_id, found.env_version

"""Gymnasium spaces as the contract's ``Space`` records (schemas/run_started.avsc), and back to flat
float vectors for the events. Learners rebuild their networks from these records alone."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from gymnasium import spaces

NO_SPACE = {"kind": "none", "shape": [], "dtype": "", "n": 0, "start": 0, "nvec": [], "low": [], "high": []}


class UnsupportedSpace(TypeError):
    """A space kind the event contract cannot describe (Box, Discrete, MultiDiscrete, MultiBinary only)."""


def space_record(space: Any) -> dict:
    """The exact ``marlgrc.Space`` record of a Gymnasium space; ``None`` gives kind ``none``."""
    if space is None:
        return dict(NO_SPACE)
    base = {"shape": [int(d) for d in (space.shape or ())], "dtype": str(np.dtype(space.dtype)) if space.dtype else "",
            "n": 0, "start": 0, "nvec": [], "low": [], "high": []}
    if isinstance(space, spaces.Discrete):
        return {**base, "kind": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {**base, "kind": "Box", "low": [float(x) for x in np.asarray(space.low, dtype=np.float64).ravel()],
                "high": [float(x) for x in np.asarray(space.high, dtype=np.float64).ravel()]}
    if isinstance(space, spaces.MultiDiscrete):
        return {**base, "kind": "MultiDiscrete", "nvec": [int(x) for x in np.asarray(space.nvec).ravel()]}
    if isinstance(space, spaces.MultiBinary):
        return {**base, "kind": "MultiBinary", "n": int(np.prod(space.shape))}
    raise UnsupportedSpace(
        f"space {space!r} ({type(space).__name__}) cannot be written to run.started: the contract describes "
        f"Box, Discrete, MultiDiscrete and MultiBinary; flatten it (gymnasium.wrappers.FlattenObservation) first")


def flat_floats(x: Any) -> list[float]:
    """An observation or state as a flat list of floats (the events' ``array<float>``): a copy, so an
    env that reuses its arrays cannot change it, and the form fastavro encodes fastest (a list of
    Python floats; a float32 value is exact as a float, so the bytes are those of the array)."""
    return np.asarray(x, dtype=np.float32).ravel().tolist()


def action_encoder(space: Any) -> Callable[[Any], tuple[int, list[float]]]:
    """A function from an action in ``space`` to the contract's (discrete, continuous) pair."""
    if isinstance(space, spaces.Discrete):
        return lambda a: (int(a), [])
    return lambda a: (-1, np.asarray(a, dtype=np.float32).ravel().tolist())

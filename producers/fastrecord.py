"""The harness's step recorder: C (``producers/_record.c``, compiled on first use like eventlog's C
modules) or Python.

For an env whose events are sealed as they happen, the harness records a step with two calls:
``observe`` seals the env.state and each live agent's observation and returns their hashes; ``act``
builds the joint.action payload, seals it naming them and returns the episode's return so far. The
Python functions the harness passes in (``observe`` and ``joint_action``) are the reference: the C
recorder builds the same payloads and makes the same sealer calls, and hands any call whose arguments
are not of the plain kinds it checks to those functions, unchanged, before it seals anything.
``MARLGRC_NO_NATIVE=1`` turns it off.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from eventlog.chain import Event
from eventlog.native import build_extension

SOURCE = Path(__file__).with_name("_record.c")


def _probes() -> list[tuple[np.ndarray, int, np.dtype]]:
    base = np.arange(12, dtype=np.float64)
    arrays = [base, base.astype(np.float32), base.astype(np.float32).reshape(3, 4), base.astype(">f4"),
              base.astype(np.float32)[::2], np.array(1.0, np.float32), np.zeros(0, np.float32), base.astype(np.int32),
              base.astype(np.float32).reshape(2, 3, 2)]
    return [(a, a.ndim, a.dtype) for a in arrays]


def _load():
    mod = build_extension(SOURCE, "_record", purpose="the harness's C step recorder")
    if mod is not None and not mod.set_ndarray(np.ndarray, np.dtype(np.float32), _probes()):
        return None  # numpy's array layout is not the one _ndarray.h mirrors: the Python recorder
    return mod


_native = _load()
NATIVE = _native is not None


class PyRecorder:
    """The recorder in Python: the reference functions, and the joint action sealed."""

    __slots__ = ("observe", "_joint_action", "_append_action")

    def __init__(self, observe: Callable, joint_action: Callable, append_action: Callable):
        self.observe, self._joint_action, self._append_action = observe, joint_action, append_action

    def act(self, ep, step, live, actions, chosen, rewards, terms, truncs, cut, sources, ep_return):
        payload, ep_return = self._joint_action(ep, step, live, actions, chosen, rewards, terms, truncs, cut, ep_return)
        self._append_action(payload, sources)
        return ep_return


def recorder(*, append_state: Callable, append_obs: dict[str, Callable], append_action: Callable,
             discrete: dict[str, bool], observe: Callable, joint_action: Callable, float_view: Callable,
             native: bool = True) -> Any:
    """The C recorder where it is built (and ``native``), else ``PyRecorder``."""
    if native and NATIVE:
        return _native.Recorder(append_state, append_obs, append_action, discrete, observe, joint_action,
                                float_view, Event)
    return PyRecorder(observe, joint_action, append_action)

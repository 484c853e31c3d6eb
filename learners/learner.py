"""What every learner keeps beside its networks: the run-time counters, the last losses and return,
the version string producers record in ``joint.action``, and the bookkeeping at the end of an update.
The algorithms (``mappo.py``, ``dqn.py``, ...) hold the learning; this holds what is the same in all
of them, so a counter or a chart key means one thing everywhere."""
from __future__ import annotations

from typing import Any

import numpy as np

from .networks import weights_sha256
from .replay import Replay


class Learner:
    """Base of the learners. A subclass sets ``algorithm`` and defines ``modules()`` (what is hashed and
    checkpointed) and ``_version()``; it calls ``_start_counters()`` once its networks exist and ends
    ``update`` with ``return self._finish_update(...)``."""

    algorithm = ""
    #: counters kept in checkpoints (off-policy learners add "pending_transitions")
    counter_names: tuple[str, ...] = ("updates", "optimizer_steps", "env_steps", "episodes")

    def _start_counters(self) -> None:
        # run time, all from 0: policy.update events, optimizer (or critic) steps, env steps and
        # episodes trained on (and, off-policy, agent-transitions not yet paid for by a gradient step)
        for k in self.counter_names:
            setattr(self, k, 0)
        self.last_losses: dict[str, float] = {}
        self.last_return = float("nan")

    def _finish_update(self, replay: Replay, losses: dict[str, float], steps_before: int, **charts: Any) -> dict:
        """Count the replay's env steps and episodes and this update, keep the losses and the batch's mean
        team return, move the version; the update's report (``charts``: extra ``charts/...`` entries)."""
        if replay.episodes:
            self.last_return = float(np.mean([e.team_return for e in replay.episodes]))
        self.env_steps += replay.env_steps
        self.episodes += len(replay.episodes)
        self.updates += 1
        self.last_losses = losses
        self.version = self._version()
        return {"optimizer_steps": self.optimizer_steps - steps_before, "env_steps": replay.env_steps,
                "losses": losses, "charts/episodic_return": self.last_return, **charts}

    def weights_sha256(self) -> bytes:
        return weights_sha256(*self.modules())

    def counters(self) -> dict[str, int]:
        """The counters as a checkpoint keeps them."""
        return {k: getattr(self, k) for k in self.counter_names}

    def load_counters(self, counters: dict[str, int]) -> None:
        for k, v in counters.items():
            setattr(self, k, v)
        self.version = self._version()

    # subclasses
    def modules(self) -> list:
        raise NotImplementedError

    def _version(self) -> str:
        raise NotImplementedError

"""Offline training from a replayed run (``marlgrc train --run R``): the same update and lineage as
online training, over the episodes already in the topics."""
from __future__ import annotations

from typing import Any

from eventlog.log import EventLog

from . import algorithm
from .lineage import continue_policy_chain, emit_policy_update
from .replay import Replay, ReplayError


def train_offline(replay: Replay, algo: str, *, log: EventLog, seed: int = 1, updates: int = 1,
                  config: Any = None, learner: Any = None) -> tuple[Any, list]:
    """``updates`` updates over the replayed episodes, each followed by ``policy.update`` on ``log``.

    ``learner`` resumes a checkpointed learner (its spec must match the run's agents and spaces).
    Off-policy learners (DQN) add the episodes to their buffer once; later updates only train.
    """
    a = algorithm(algo)
    if learner is None:
        learner = a.learner_cls(replay.spec, config or a.config_cls(seed=seed))
    elif learner.algorithm != algo:
        raise ReplayError(f"the checkpoint holds a {learner.algorithm} learner, not {algo}; pass --algo {learner.algorithm}")
    elif (learner.spec.agents, learner.spec.action_spaces, learner.spec.obs_dim) != (
            replay.spec.agents, replay.spec.action_spaces, replay.spec.obs_dim):
        raise ReplayError(f"the checkpoint was trained on run {learner.spec.run_id} with agents {list(learner.spec.agents)}; "
                          f"run {replay.spec.run_id} has {list(replay.spec.agents)} or other spaces: it cannot resume on it")
    continue_policy_chain(log, replay, algo)
    events = []
    for i in range(updates):
        data = replay
        if not a.on_policy and i > 0:
            data = Replay(replay.spec, [], replay.lineage, replay.verified, replay.report)
            learner.pending_transitions += replay.env_steps * len(replay.spec.agents)
        parent = learner.version
        out = learner.update(data)
        events.append(emit_policy_update(log, learner, out, replay, parent_version=parent))
    return learner, events

"""Wiring of the curriculum (``learners.curriculum``, seed 004) into on-policy training.

``marlgrc.training.train_on_env(..., curriculum=)`` wraps its ``collect`` (the harness on the env)
in ``StagedCollect``. For each batch the training loop collects:

1. ``env.set_stage(curriculum.stage)``: the batch's episodes are played at the curriculum's stage
   (the env applies it at the next ``reset()``); the stage also goes into the batch's ``run.started``
   config (``curriculum_stage``), and the env writes it on every ``env.state`` (``stage:NAME`` flag)
   and ``episode.summary`` (``stage`` text metric).
2. The harness runs the batch. Its log's sink is tapped meanwhile (``marlgrc.metrics.TappedSink``)
   to keep the batch's ``episode.summary`` events as sealed: the curriculum observes exactly the
   metrics the run recorded, and a decision names those events by hash.
3. Each episode's metrics go to ``curriculum.observe`` in order (numbered by their position in the
   run: 0 = the run's first episode). On a stage change, ``curriculum.stage`` is appended to the
   batch's log on ``{run}:curriculum`` (``learners.curriculum.emit_stage_change``), so the batch's
   signed checkpoint covers it; the batch's later episodes, played at the old stage, are not fed.

The decision takes effect at the next batch. ``annotate(row)`` adds the stage of the update's
batches to the loop's learning-curve rows.
"""
from __future__ import annotations

from typing import Any, Callable

from eventlog.codec import default_codec
from learners.curriculum import Curriculum, CurriculumConfig, Decision, decision_dict, emit_stage_change

from .metrics import LIFECYCLE_TOPIC, TappedSink

SUMMARY = "episode_summary"


class CurriculumEnvError(ValueError):
    """An env without the stages a curriculum needs (``STAGES``/``stages``, ``CURRICULUM``, ``set_stage``)."""


def curriculum_for(env: Any, env_id: str, config: CurriculumConfig | None = None) -> Curriculum:
    """A ``Curriculum`` over ``env``'s stages and criteria, starting at its easiest stage."""
    stages = getattr(env, "stages", None) or getattr(env, "STAGES", None)
    criteria = getattr(env, "CURRICULUM", None)
    if not stages or not criteria or not callable(getattr(env, "set_stage", None)):
        raise CurriculumEnvError(f"env {env_id} has no curriculum stages (it needs STAGES, CURRICULUM and "
                                 f"set_stage(), as trading_v0 and supply_chain_v0 have); drop --curriculum for it")
    try:
        return Curriculum(stages, criteria, config)
    except ValueError as exc:
        raise CurriculumEnvError(f"env {env_id}: {exc}") from None


def summary_metrics(rec: dict) -> dict:
    """An episode.summary record as one metrics mapping: its numeric and text metrics by name, and
    ``episode_return`` (the team's) where the env's metrics have no entry of that name."""
    out: dict = {"episode_return": rec["episode_return"]}
    out.update((m["name"], m["value"]) for m in rec["metrics"])
    out.update((m["name"], m["text"]) for m in rec["text_metrics"])
    return out


class StagedCollect:
    """``collect`` of ``learners.online.train_online`` with the curriculum applied (module docstring).

    ``decisions``: (Decision, its curriculum.stage event's hash) in order; ``batch_stages``: the stage
    each batch was played at."""

    def __init__(self, env: Any, curriculum: Curriculum, collect: Callable[..., Any]):
        self.env, self.curriculum, self.inner = env, curriculum, collect
        self.codec = default_codec()
        self.episodes = 0                   # episodes of the run collected so far
        self.batch_stages: list[str] = []
        self.decisions: list[tuple[Decision, bytes]] = []
        self._reported = 0                  # decisions already named in a learning-curve row

    def __call__(self, policy: Any, log: Any, *, episodes: int, seed: int, config: dict) -> Any:
        cur = self.curriculum
        stage = cur.stage
        self.env.set_stage(stage)
        self.batch_stages.append(stage)
        run_id = log.run_id
        summaries: list[tuple[dict, bytes]] = []

        def tap(topic: str, value: bytes) -> None:
            if topic == LIFECYCLE_TOPIC:
                name, rec = self.codec.decode(value)
                if name == SUMMARY and rec["run_id"] == run_id:
                    summaries.append((rec, bytes(value[-32:])))

        sink = log.sink
        log.sink = TappedSink(sink, tap)  # the harness's appenders are made inside the call: they send here
        try:
            out = self.inner(policy, log, episodes=episodes, seed=seed,
                             config={**config, "curriculum_stage": stage})
        finally:
            log.sink = sink
        first = self.episodes
        self.episodes += len(summaries)
        for i, (rec, h) in enumerate(summaries):
            try:
                d = cur.observe(summary_metrics(rec), episode=first + i, source=h)
            except ValueError as exc:  # the env's metrics do not fit its CURRICULUM
                raise CurriculumEnvError(f"run {run_id} episode {first + i}: {exc}") from None
            if d is not None:
                ev = emit_stage_change(log, run_id, d, cur.config, policy_version=policy.version,
                                       source_event_hashes=d.sources)
                self.decisions.append((d, ev.event_hash))
                break  # the batch's later episodes were played at the old stage
        return out

    def annotate(self, row: dict) -> dict:
        """Add to a learning-curve row: ``stage`` (the stage the update's last batch was played at; the
        next batch's is ``curriculum.stage``) and ``stage_changes`` (each decision since the last row)."""
        if self.batch_stages:
            row["stage"] = self.batch_stages[-1]
            row["stage_index"] = self.curriculum.stages.index(row["stage"])
        new = self.decisions[self._reported:]
        self._reported = len(self.decisions)
        if new:
            row["stage_changes"] = [f"{d.reason} {d.from_stage} -> {d.to_stage} (mean {d.metric} "
                                    f"{d.stats.mean:.4g}, trend {d.stats.trend})" for d, _ in new]
        return row


def curriculum_summary(cur: Curriculum) -> dict:
    """For the learning-curve file: the stages, the rule's settings, where the run ended and the hardest
    stage it reached, and every change (``learners.curriculum.decision_dict``)."""
    return {"stages": list(cur.stages), "config": vars(cur.config).copy(), "final": cur.stage,
            "highest": cur.stages[cur.highest], "changes": [decision_dict(d) for d in cur.history]}

"""The event contract: one Avro schema (.avsc) per event type, and where each event type lives.

Every schema's first field is ``prev_event_hash: fixed(32)`` and its last ``event_hash: fixed(32)``
(docs/HASHING.md). ``history/`` keeps schemas as they were first published, so that events written
by an older writer are still read by the current reader.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent

# event_type -> (schema file stem, logical topic)
EVENT_TYPES: dict[str, tuple[str, str]] = {
    "run.started": ("run_started", "marl.run.lifecycle"),
    "run.finished": ("run_finished", "marl.run.lifecycle"),
    "episode.summary": ("episode_summary", "marl.run.lifecycle"),
    "env.state": ("env_state", "marl.env.state"),
    "agent.observation": ("agent_observation", "marl.agent.observation"),
    "joint.action": ("joint_action", "marl.joint.action"),
    "di.credit": ("credit_assignment", "marl.di.credit"),
    "fairness.metrics": ("fairness_metrics", "marl.fairness.metrics"),
    "policy.update": ("policy_update", "marl.policy.update"),
    "policy.rollback": ("policy_rollback", "marl.policy.update"),
    # the curriculum's stage changes (seed 004), beside the policy chain whose updates they explain
    "curriculum.stage": ("curriculum_stage", "marl.policy.update"),
    "audit.checkpoint": ("audit_checkpoint", "marl.audit.checkpoints"),
    "compliance.deletion": ("compliance_deletion", "marl.compliance.deletions"),
    "dead.letter": ("dead_letter", "marl.dlq"),
}

TOPICS: tuple[str, ...] = (
    "marl.run.lifecycle",
    "marl.env.state",
    "marl.agent.observation",
    "marl.joint.action",
    "marl.di.credit",
    "marl.fairness.metrics",
    "marl.policy.update",
    "marl.audit.checkpoints",
    "marl.compliance.deletions",
    "marl.dlq",
)


def schema_name(event_type: str) -> str:
    try:
        return EVENT_TYPES[event_type][0]
    except KeyError:
        raise KeyError(f"unknown event type {event_type!r}; known: {sorted(EVENT_TYPES)}") from None


def topic_of(event_type: str) -> str:
    return EVENT_TYPES[event_type][1]


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The current schema ``name`` (file stem, e.g. ``joint_action``) as JSON."""
    path = SCHEMA_DIR / f"{name}.avsc"
    if not path.exists():
        raise FileNotFoundError(f"no schema {name!r} in {SCHEMA_DIR}")
    return json.loads(path.read_text())


def current() -> dict[str, dict]:
    """Every current schema by name."""
    return {p.stem: load(p.stem) for p in sorted(SCHEMA_DIR.glob("*.avsc"))}


def history() -> dict[str, dict]:
    """Earlier published versions, keyed ``name.vN`` (file stem)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((SCHEMA_DIR / "history").glob("*.avsc"))}

"""Topic specifications: partitions, cleanup policy and retention per data classification."""
from __future__ import annotations

from dataclasses import dataclass

import schemas as schema_files

from .chain import MICROS_PER_DAY, RETENTION_DAYS

# default classification of each topic's events
TOPIC_CLASSIFICATION = {
    "marl.run.lifecycle": "internal",
    "marl.env.state": "confidential",
    "marl.agent.observation": "confidential",
    "marl.joint.action": "internal",
    "marl.di.credit": "internal",
    "marl.fairness.metrics": "internal",
    "marl.policy.update": "internal",
    "marl.audit.checkpoints": "public",
    "marl.compliance.deletions": "restricted",
    "marl.dlq": "restricted",
}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    classification: str
    compacted: bool = False
    """Keyed state topics only (a processor's committed state); never an audit topic."""

    @property
    def config(self) -> dict[str, str]:
        # Audit topics are never compacted: compaction would remove links from a hash chain.
        if self.compacted:
            return {"cleanup.policy": "compact", "min.insync.replicas": "1"}
        return {
            "cleanup.policy": "delete",
            "retention.ms": str(RETENTION_DAYS[self.classification] * MICROS_PER_DAY // 1000),
            "min.insync.replicas": "1",
            "message.timestamp.type": "CreateTime",
        }


def topic_specs(partitions: int = 3) -> list[TopicSpec]:
    return [TopicSpec(t, partitions, TOPIC_CLASSIFICATION[t]) for t in schema_files.TOPICS]


def physical(prefix: str, logical: str) -> str:
    """Kafka topic name of a logical topic under a deployment prefix (tests use one per test)."""
    return prefix + logical


def logical(prefix: str, physical_name: str) -> str:
    if not physical_name.startswith(prefix):
        raise ValueError(f"topic {physical_name!r} is not under prefix {prefix!r}")
    return physical_name[len(prefix):]

"""Topic specifications: partitions, cleanup policy and retention per data classification."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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
            # a reader restores by reading the whole topic: roll a segment every hour or 64 MiB and clean
            # at 10% dirty, so what it reads stays near the live keys (Kafka's defaults, 7 days / 1 GiB /
            # 50%, let a busy worker's state topic grow to a gigabyte between cleanings)
            return {"cleanup.policy": "compact", "min.insync.replicas": "1", "segment.ms": "3600000",
                    "segment.bytes": str(64 * 1024 * 1024), "min.cleanable.dirty.ratio": "0.1"}
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


# ---------------------------------------------------------------- co-partitioning (docs/HASHING.md, "Partitions")
def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (the default partitioner's hash), as a signed 32-bit int."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length - tail
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def run_of(chain_id: str) -> str:
    """The run a chain belongs to: its id up to the first colon (``r1:obs:agent_0`` -> ``r1``)."""
    return chain_id.partition(":")[0]


@lru_cache(maxsize=65536)
def _positive_hash(run: str) -> int:
    return murmur2(run.encode("utf-8")) & 0x7FFFFFFF


def run_hash(chain_id: str) -> int:
    """Kafka's positive murmur2 of the chain's run id (what its default partitioner computes for that key)."""
    return _positive_hash(run_of(chain_id))


def run_partition(chain_id: str, partitions: int) -> int:
    """The partition of a chain on a topic of ``partitions`` partitions: every chain of one run lands
    in the same partition number of every topic (co-partitioning), the one Kafka's default partitioner
    would pick for a message keyed by the run id. A chain still lives in exactly one partition."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    return _positive_hash(run_of(chain_id)) % partitions


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of the marl.* topics on a cluster of ``brokers``
    brokers: three replicas, two in sync for ``acks=all``, once there are three; else one per broker."""
    if brokers >= 3:
        return 3, 2
    return max(1, brokers), 1

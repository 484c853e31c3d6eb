"""The chain writer: one writer per (topic, chain_id), seq from 0, each event linked to the last."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Callable, Iterable, NamedTuple

import schemas as schema_files

from .avro_encoder import long_bytes
from .codec import ZERO_HASH, Codec, default_codec

CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")
# days an event of each classification is kept (topic retention.ms and each event's retention_expiry)
RETENTION_DAYS = {"public": 3650, "internal": 365, "confidential": 180, "restricted": 30}
MICROS_PER_DAY = 86_400_000_000


def now_micros() -> int:
    return time.time_ns() // 1000


def _string(s: str) -> bytes:
    b = s.encode()
    return long_bytes(len(b)) + b


class ChainHead(NamedTuple):
    """The last event written to a chain; ``seq == -1`` for an empty chain."""

    seq: int = -1
    event_hash: bytes = ZERO_HASH


GENESIS = ChainHead()


class Event(NamedTuple):
    """One sealed event: its exact bytes and where it belongs."""

    topic: str
    chain_id: str
    seq: int
    event_hash: bytes
    value: bytes
    event_type: str


def event_id_prefix() -> str:
    """Random UUIDv8 prefix of one writer instance; the last 48 bits of each event id are its seq."""
    u = uuid.uuid4().hex
    return f"{u[:8]}-{u[8:12]}-8{u[13:16]}-{'89ab'[int(u[16], 16) & 3]}{u[17:20]}-"


@dataclass
class ChainWriter:
    """Appends events to one chain. Not thread-safe: one writer per chain (DESIGN.md).

    ``topic`` is the logical topic name (``marl.joint.action``); a deployment prefix is applied by
    the Kafka layer, so hashes never depend on it. The header is encoded here directly, in the
    schema's field order (the codec checks every schema opens with exactly these fields); the
    payload goes through the schema's compiled encoder.
    """

    topic: str
    chain_id: str
    run_id: str
    producer_id: str
    data_classification: str = "internal"
    feature_schema_version: str = "1"
    head: ChainHead = GENESIS
    codec: Codec = field(default_factory=default_codec)
    clock: Callable[[], int] = now_micros
    id_prefix: str = field(default_factory=event_id_prefix)

    def __post_init__(self) -> None:
        if self.data_classification not in CLASSIFICATIONS:
            raise ValueError(
                f"data_classification {self.data_classification!r} is not one of {CLASSIFICATIONS}")
        self._chain = _string(self.chain_id)
        self._event_id_prefix = b"\x48" + self.id_prefix.encode()  # event_id: 36 chars, length 36 -> 0x48
        self._tail_const = _string(self.feature_schema_version)
        self._types: dict[str, tuple[str, bytes, bytes]] = {}
        self._classes = {c: (_string(self.producer_id) + _string(c), RETENTION_DAYS[c] * MICROS_PER_DAY)
                         for c in CLASSIFICATIONS}

    def _type(self, event_type: str) -> tuple[str, bytes, bytes]:
        t = self._types.get(event_type)
        if t is None:
            name = schema_files.schema_name(event_type)
            if schema_files.topic_of(event_type) != self.topic:
                raise ValueError(f"{event_type} belongs on {schema_files.topic_of(event_type)}, not {self.topic}")
            t = self._types[event_type] = (name, self.codec.prefix(name),
                                           _string(event_type) + _string(self.run_id))
        return t

    def append(self, event_type: str, payload: dict, *, policy_version: str = "", rule_version: str = "",
               source_event_hashes: Iterable[bytes] = (), data_classification: str | None = None) -> Event:
        """Encode ``payload`` (the schema's fields after the header) as the chain's next event."""
        name, prefix, type_run = self._types.get(event_type) or self._type(event_type)
        try:
            producer_class, retention = self._classes[data_classification or self.data_classification]
        except KeyError:
            raise ValueError(f"data_classification {data_classification!r} is not one of {CLASSIFICATIONS}") from None
        head_seq, head_hash = self.head
        seq = head_seq + 1
        produced_at = self.clock()
        if source_event_hashes:
            sources = list(source_event_hashes)
            if any(len(h) != 32 for h in sources):
                raise ValueError("source_event_hashes must be 32-byte SHA-256 digests")
        else:
            sources = ()
        body = b"".join((
            prefix, head_hash, long_bytes(seq), self._chain,
            self._event_id_prefix, b"%012x" % seq,
            type_run, long_bytes(produced_at), producer_class, long_bytes(produced_at + retention),
            self._tail_const, _string(policy_version) if policy_version else b"\x00",
            _string(rule_version) if rule_version else b"\x00",
            (long_bytes(len(sources)) + b"".join(sources) + b"\x00") if sources else b"\x00",
            self.codec.encode_payload(name, payload),
        ))
        event_hash = sha256(body).digest()
        self.head = ChainHead(seq, event_hash)
        return Event(self.topic, self.chain_id, seq, event_hash, body + event_hash, event_type)

"""Decoding consumer side of the backbone: every record is decoded and its hash checked; what cannot
be read goes to ``marl.dlq`` with its reason, and reading goes on. Nothing is skipped silently."""
from __future__ import annotations

from hashlib import sha256
from typing import Iterable, Iterator

from .codec import Codec, DecodeError, default_codec
from .hashing import MIN_EVENT_LEN, compute_hash
from .kafka import Record
from .log import EventLog


def dead_letter_payload(record: Record, error_kind: str, reason: str, consumer: str) -> dict:
    """The dead.letter payload for a record that could not be processed; keeps its exact bytes."""
    value = record.value if record.value is not None else b""
    return {
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "source_key": (record.key or "").encode(),
        "error_kind": error_kind,
        "reason": reason,
        "consumer": consumer,
        "payload": value,
        "payload_sha256": sha256(value).digest(),
    }


def check_event(record: Record, codec: Codec) -> tuple[str, dict]:
    """Decode and check the event's own hash; raises DecodeError with a kind."""
    value = record.value
    if value is None:
        raise DecodeError("empty", "message has no value (a tombstone on an audit topic)")
    name, rec = codec.decode(value)
    if len(value) < MIN_EVENT_LEN or compute_hash(value) != rec["event_hash"]:
        raise DecodeError("hash_mismatch", "event_hash does not match SHA-256 of the event's bytes")
    return name, rec


def decode_or_dead_letter(records: Iterable[Record], dlq: EventLog, *, consumer: str,
                          codec: Codec | None = None) -> Iterator[tuple[Record, str, dict]]:
    """Yield (record, schema name, decoded record) for good events; dead-letter the rest on
    chain ``{dlq.run_id}:dlq:{consumer}``."""
    codec = codec or default_codec()
    chain = f"{dlq.run_id}:dlq:{consumer}"
    for r in records:
        try:
            name, rec = check_event(r, codec)
        except DecodeError as exc:
            dlq.append(chain, "dead.letter", dead_letter_payload(r, exc.kind, exc.reason, consumer))
            continue
        yield r, name, rec

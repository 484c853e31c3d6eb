"""Records on their way into the ledger: decoded into row tuples and checked against their chains.

Pure functions of the records, the chain heads and, for the few events that are not simply their
chain's next one, what the store already holds. The SQL is in ``ledger/store.py`` and
``ledger/postgres.py``; ``ledger/materialize.py`` runs the loop.

Findings use the auditor's vocabulary, ``eventlog.verify.BreakKind`` (its values are what
``integrity_findings.kind`` holds), for everything about a chain, and ``IngestKind`` for the two
things that are not a chain break: bytes that do not decode as any known event, and an event on a
topic its type does not belong to. A chain starts at seq 0 and grows by 1 (docs/HASHING.md):

==============  ==========================================================================
``edited``      the event's bytes do not hash to its ``event_hash``; or its link does not
                match the previous event's hash; or its ``event_id`` is already in the ledger with
                other bytes (that copy is not stored: a row is never replaced)
``missing``     its seq is beyond the next one (the chain starts at 3, or jumps 4 -> 6)
``duplicated``  an event already seen (same ``event_id``, same bytes) comes again at another
                offset: not stored twice
``reordered``   its seq is behind the chain's head and no event holds that seq yet
``inserted``    its seq is behind the chain's head and another event already holds that seq
``wrong_key``   its Kafka key is not its chain id
==============  ==========================================================================

Every event that decodes is stored except the two copies named above, so ``ledger verify`` sees
what the topics held. Reading the very same record again (same topic, partition, offset and bytes,
e.g. after offsets were rewound or by a second writer) is idempotent: no row, no finding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from hashlib import sha256
from typing import Iterable, NamedTuple

import schemas as schema_files
from eventlog.codec import ZERO_HASH, Codec, DecodeError, default_codec
from eventlog.verify import BreakKind

from .tables import HEADER_COLUMNS, LINEAGE, row_tuples_for_event

__all__ = ["IngestKind", "Finding", "StoredCopy", "CheckedBatch", "decode_rows", "check_batch", "copy_findings"]


class IngestKind(str, Enum):
    """Findings that are not chain breaks (those are ``eventlog.verify.BreakKind``)."""

    UNDECODABLE = "undecodable"   # not a marlgrc event this ledger can read; not stored
    WRONG_TOPIC = "wrong_topic"   # an event whose type belongs on another topic; stored


EDITED, MISSING, DUPLICATED = BreakKind.EDITED.value, BreakKind.MISSING.value, BreakKind.DUPLICATED.value
REORDERED, INSERTED, WRONG_KEY = BreakKind.REORDERED.value, BreakKind.INSERTED.value, BreakKind.WRONG_KEY.value
UNDECODABLE, WRONG_TOPIC = IngestKind.UNDECODABLE.value, IngestKind.WRONG_TOPIC.value


@dataclass(frozen=True)
class Finding:
    """An integrity problem met while ingesting (recorded in ``integrity_findings``). ``kind`` is the
    value of a ``BreakKind`` or an ``IngestKind``."""

    kind: str
    topic: str
    partition: int
    offset: int
    chain_id: str
    seq: int
    event_id: str
    detail: str

    def describe(self) -> str:
        return (f"{self.kind} in {self.topic} chain {self.chain_id} at partition {self.partition} offset "
                f"{self.offset} seq {self.seq}: {self.detail}")


class StoredCopy(NamedTuple):
    """Where the ledger holds an event (by ``event_id``), and its bytes."""

    topic: str
    partition: int
    offset: int
    raw: bytes


# positions in an event row (``Table.columns`` order), named from the header
_COL = {name: i for i, (name, _) in enumerate(HEADER_COLUMNS)}
ID, TOPIC, PARTITION, OFFSET = _COL["event_id"], _COL["topic"], _COL["kafka_partition"], _COL["kafka_offset"]
CHAIN, SEQ, EVENT_TYPE = _COL["chain_id"], _COL["seq"], _COL["event_type"]
PREV, RAW = _COL["prev_event_hash"], _COL["raw"]
_TOPIC_OF_TYPE = {event_type: topic for event_type, (_, topic) in schema_files.EVENT_TYPES.items()}


def decode_rows(value: bytes, topic: str, partition: int, offset: int,
                codec: Codec | None = None) -> tuple[str, list[tuple[str, tuple]]]:
    """An event's bytes to its ledger rows: the codec's decode, then ``row_tuples_for_event``.
    Raises ``eventlog.codec.DecodeError`` for bytes that are not a known event."""
    name, rec = (codec or default_codec()).decode(value)
    return name, row_tuples_for_event(name, rec, topic, partition, offset, value)


@dataclass
class _Pending:
    """An event behind its chain's head, judged with what the store holds (``CheckedBatch.resolve``)."""

    index: int                          # its placeholder in ``findings``
    event_id: str
    topic: str
    partition: int
    offset: int
    chain_id: str
    seq: int
    head_seq: int
    raw: bytes
    positions: list[tuple[str, int]]    # its rows: (table, index in rows[table])
    earlier: StoredCopy | None          # an earlier record of this batch with the same event_id
    slot_taken: bool                    # an earlier record of this batch has this (topic, chain, seq)


@dataclass
class CheckedBatch:
    """One batch of records checked against the chain heads: its rows, the offsets that follow it, its
    findings and the chain heads it moved. ``pending`` lists the events behind their chain's head that
    were not seen earlier in the batch; their findings are ``None`` until ``resolve`` fills them in."""

    records: int
    rows: dict[str, list[tuple]]
    offsets: dict[tuple[str, int], int]
    findings: list[Finding | None]
    pending: list[_Pending] = field(default_factory=list)
    heads: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)

    def pending_ids(self) -> list[str]:
        return [p.event_id for p in self.pending]

    def pending_seqs(self) -> list[tuple[str, str, str, int]]:
        """(table, topic, chain, seq) of each pending event."""
        return [(p.positions[0][0], p.topic, p.chain_id, p.seq) for p in self.pending]

    def resolve(self, stored: dict[str, StoredCopy], taken: set[tuple[str, str, int]]) -> list[Finding]:
        """Judge the pending events given the store's copies of their event ids (``stored``) and which
        of their (topic, chain, seq) the store holds (``taken``); drops the rows of events the ledger
        holds already (stored, or met earlier in the batch). Returns the batch's findings."""
        drop: dict[str, set[int]] = {}
        for p in self.pending:
            copy = stored.get(p.event_id) or p.earlier
            if copy is not None:
                finding = _copy_finding(copy, p.event_id, p.topic, p.partition, p.offset, p.chain_id, p.seq, p.raw)
                for table, i in p.positions:
                    drop.setdefault(table, set()).add(i)
            elif p.slot_taken or (p.topic, p.chain_id, p.seq) in taken:
                finding = Finding(INSERTED, p.topic, p.partition, p.offset, p.chain_id, p.seq, p.event_id,
                                  f"seq {p.seq} is already held by another event of this chain; this one "
                                  f"(event {p.event_id}) arrives after seq {p.head_seq}")
            else:
                finding = Finding(REORDERED, p.topic, p.partition, p.offset, p.chain_id, p.seq, p.event_id,
                                  f"seq {p.seq} arrives after seq {p.head_seq}")
            self.findings[p.index] = finding
        for table, gone in drop.items():
            self.rows[table] = [r for i, r in enumerate(self.rows[table]) if i not in gone]
        self.pending = []
        return [f for f in self.findings if f is not None]


def _copy_finding(copy: StoredCopy, event_id: str, topic: str, partition: int, offset: int, chain: str, seq: int,
                  raw: bytes) -> Finding | None:
    """What it means that ``event_id`` is held already (``copy``) when this record brings it again:
    nothing (the same record read again), ``duplicated`` (the same bytes at another offset) or
    ``edited`` (other bytes under the same event id)."""
    if bytes(copy.raw) == bytes(raw):
        if (copy.topic, copy.partition, copy.offset) == (topic, partition, offset):
            return None
        return Finding(DUPLICATED, topic, partition, offset, chain, seq, event_id,
                       f"event {event_id} (seq {seq}) appears again; it was read from {copy.topic} partition "
                       f"{copy.partition} offset {copy.offset}")
    return Finding(EDITED, topic, partition, offset, chain, seq, event_id,
                   f"event_id {event_id} is already in the ledger with other bytes (from {copy.topic} partition "
                   f"{copy.partition} offset {copy.offset}, SHA-256 {sha256(bytes(copy.raw)).hexdigest()[:16]}); "
                   f"this copy (SHA-256 {sha256(bytes(raw)).hexdigest()[:16]}) is not stored")


def copy_findings(rows: list[tuple], stored: dict[str, StoredCopy]) -> tuple[list[Finding], set[str]]:
    """After inserting event ``rows`` with ``ON CONFLICT DO NOTHING``: the findings for rows whose
    ``event_id`` the store holds from another record (``stored``: the store's copy of each), and the
    event ids of those rows (not stored; their lineage rows must not be either)."""
    findings: list[Finding] = []
    refused: set[str] = set()
    for row in rows:
        copy = stored.get(row[ID])
        if copy is None or (copy.topic, copy.partition, copy.offset) == (row[TOPIC], row[PARTITION], row[OFFSET]):
            continue  # this row (or the same record, stored before)
        refused.add(row[ID])
        finding = _copy_finding(copy, row[ID], row[TOPIC], row[PARTITION], row[OFFSET], row[CHAIN], row[SEQ], row[RAW])
        if finding is not None:
            findings.append(finding)
    return findings, refused


def check_batch(records: Iterable, heads: dict[tuple[str, str], tuple[int, bytes]],
                codec: Codec | None = None) -> CheckedBatch:
    """Decode and check one batch of records (``(topic, partition, offset, key, value)`` tuples or
    ``eventlog.kafka.Record``) against ``heads`` ((topic, chain) -> (seq, event_hash) of the chain's
    last event; updated in place): every event's hash is recomputed, its key, topic, seq and link
    checked. A pure function of the records and the heads."""
    codec = codec or default_codec()
    topic_of = _TOPIC_OF_TYPE
    rows: dict[str, list[tuple]] = {}
    findings: list[Finding | None] = []
    pending: list[_Pending] = []
    offsets: dict[tuple[str, int], int] = {}
    changed: dict[tuple[str, str], tuple[int, bytes]] = {}
    # built once an event arrives behind its chain's head, then kept up to date:
    # event_id -> (topic, partition, offset, raw), and (topic, chain, seq) held in this batch
    seen: dict[str, StoredCopy] | None = None
    slots: set[tuple[str, str, int]] | None = None
    n = 0
    for record in records:
        n += 1
        topic, partition, offset, key, v = record[:5]
        offsets[(topic, partition)] = offset + 1
        try:
            _, event_rows = decode_rows(v, topic, partition, offset, codec)
        except DecodeError as exc:
            findings.append(Finding(UNDECODABLE, topic, partition, offset, key, -1, "",
                                    f"{exc}; value SHA-256 {sha256(v or b'').hexdigest()}"))
            continue
        except TypeError as exc:  # a value that is not bytes (a tombstone)
            findings.append(Finding(UNDECODABLE, topic, partition, offset, key, -1, "",
                                    f"value is not event bytes ({type(v).__name__}): {exc}"))
            continue
        row = event_rows[0][1]
        event_id, chain, seq, event_type, event_hash = row[ID], row[CHAIN], row[SEQ], row[EVENT_TYPE], v[-32:]
        if topic_of.get(event_type) != topic:
            findings.append(Finding(WRONG_TOPIC, topic, partition, offset, chain, seq, event_id,
                                    f"{event_type} belongs on {topic_of.get(event_type)}, found on {topic}"))
        if key != chain:
            findings.append(Finding(WRONG_KEY, topic, partition, offset, chain, seq, event_id,
                                    f"Kafka key {key!r} is not the event's chain id"))
        if sha256(v[:-32]).digest() != event_hash:
            findings.append(Finding(EDITED, topic, partition, offset, chain, seq, event_id,
                                    "event_hash does not match SHA-256 of the event's bytes"))
        hkey = (topic, chain)
        head_seq, head_hash = heads.get(hkey) or (-1, ZERO_HASH)
        if seq == head_seq + 1 and row[PREV] == head_hash:  # the chain's next event
            heads[hkey] = changed[hkey] = (seq, event_hash)
        elif seq > head_seq:
            if seq > head_seq + 1:
                findings.append(Finding(MISSING, topic, partition, offset, chain, seq, event_id,
                                        f"seq {head_seq + 1}..{seq - 1} missing before seq {seq}"))
            elif head_seq < 0:
                findings.append(Finding(EDITED, topic, partition, offset, chain, seq, event_id,
                                        "the chain's first event does not link to 32 zero bytes"))
            else:
                findings.append(Finding(EDITED, topic, partition, offset, chain, seq, event_id,
                                        f"prev_event_hash does not match the hash of seq {head_seq}"))
            heads[hkey] = changed[hkey] = (seq, event_hash)
        else:  # behind the head: a copy of an event met before, or one out of place; the store decides
            if seen is None:
                seen, slots = _batch_index(rows)
            positions = []
            for table, trow in event_rows:
                table_rows = rows.setdefault(table, [])
                positions.append((table, len(table_rows)))
                table_rows.append(trow)
            slot = (topic, chain, seq)
            pending.append(_Pending(len(findings), event_id, topic, partition, offset, chain, seq, head_seq, v,
                                    positions, seen.get(event_id), slot in slots))
            findings.append(None)
            seen.setdefault(event_id, StoredCopy(topic, partition, offset, v))
            slots.add(slot)
            continue
        if seen is not None:
            seen.setdefault(event_id, StoredCopy(topic, partition, offset, v))
            slots.add((topic, chain, seq))
        for table, trow in event_rows:
            rows.setdefault(table, []).append(trow)
    return CheckedBatch(n, rows, offsets, findings, pending, changed)


def _batch_index(rows: dict[str, list[tuple]]) -> tuple[dict[str, StoredCopy], set[tuple[str, str, int]]]:
    seen: dict[str, StoredCopy] = {}
    slots: set[tuple[str, str, int]] = set()
    for table, table_rows in rows.items():
        if table == LINEAGE.name:
            continue
        for r in table_rows:
            seen.setdefault(r[ID], StoredCopy(r[TOPIC], r[PARTITION], r[OFFSET], r[RAW]))
            slots.add((r[TOPIC], r[CHAIN], r[SEQ]))
    return seen, slots

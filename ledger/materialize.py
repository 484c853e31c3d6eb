"""The materializer: marl.* topics into ledger rows, exactly once, chains checked on the way in.

Each batch of records becomes one transaction holding its rows, the consumer offsets that follow
them (``ingest_offsets``) and any integrity findings. A crash anywhere rolls the whole batch back,
and a restart reads from the stored offsets: nothing is lost and nothing is written twice (rows are
also inserted idempotently by ``event_id``).

On ingest, every event's hash is recomputed and its link checked against its chain's head
(``eventlog.hashing``); a break becomes an ``integrity_findings`` row and the event is still
stored, so ``ledger verify`` sees exactly what the topic held.
"""
from __future__ import annotations

import time
from itertools import chain
from collections import defaultdict
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Callable, Iterable, Iterator

import schemas as schema_files
from eventlog.codec import ZERO_HASH, Codec, DecodeError, default_codec
from eventlog.kafka import Record, record_batches

from .fastrows import check_rows, decode_rows
from .store import Finding, LedgerStore, PendingWrite
from .tables import row_tuples_for_event


@dataclass
class IngestStats:
    records: int = 0
    batches: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CheckedBatch:
    """One batch of records checked against the chain heads: its rows, the offsets that follow it and
    its findings. ``pending`` lists the events that arrived behind their chain's head and were not
    seen earlier in the batch: only the store can tell whether each is a duplicate (dropped, finding
    ``duplicated``) or an inserted/reordered event (kept, finding ``reordered_or_inserted``); their
    findings are ``None`` placeholders until ``resolve`` fills them in."""

    records: int
    rows: dict[str, list[tuple]]
    offsets: dict[tuple[str, int], int]
    findings: list[tuple | None]
    pending: list[tuple[int, str, list[tuple[str, int]], tuple, tuple]]
    heads: dict[tuple[str, str], tuple[int, bytes]]

    def resolve(self, stored: set[str]) -> list[Finding]:
        """Fill in the pending findings given which of their event ids the store holds already; drops
        the rows of those duplicates. Returns the batch's findings."""
        dropped: dict[str, set[int]] = defaultdict(set)
        for index, event_id, positions, duplicated, reordered in self.pending:
            if event_id in stored:
                self.findings[index] = duplicated
                for table, i in positions:
                    dropped[table].add(i)
            else:
                self.findings[index] = reordered
        for table, gone in dropped.items():
            self.rows[table] = [r for i, r in enumerate(self.rows[table]) if i not in gone]
        self.pending = []
        return [Finding(*f) for f in self.findings]


_TOPIC_OF_TYPE = {event_type: topic for event_type, (_, topic) in schema_files.EVENT_TYPES.items()}


def check_batch(records: Iterable, heads: dict[tuple[str, str], tuple[int, bytes]],
                decode: Callable[[bytes, str, int, int], tuple[str, list[tuple[str, tuple]]]] = decode_rows
                ) -> CheckedBatch:
    """Decode and check one batch of records (``(topic, partition, offset, key, value)`` tuples or
    ``eventlog.kafka.Record``) against ``heads`` (updated in place): every event's hash is recomputed
    and its link checked against its chain's head. A pure function of the records and the heads.

    With the C build and the default ``decode``, runs of normal events (the chain's next event, hash
    right, right topic and key, decoded in C) are handled by ``fastrows.check_rows``; every other
    record goes through the loop below, with exactly the same results."""
    records = list(records)
    if records and len(records[0]) != 5:
        records = [r[:5] for r in records]
    rows: dict[str, list[tuple]] = {}
    findings: list[tuple | None] = []
    pending: list[tuple[int, str, list[tuple[str, int]], tuple, tuple]] = []
    offsets: dict[tuple[str, int], int] = {}
    changed: dict[tuple[str, str], tuple[int, bytes]] = {}
    seen_ids: set[str] | None = None  # event ids met in this batch, collected once one arrives behind its head
    topic_of = _TOPIC_OF_TYPE
    fast = check_rows if decode is decode_rows else None
    i, n = 0, len(records)
    while i < n:
        if fast is not None:
            i = fast(records, i, heads, changed, offsets, rows, topic_of, seen_ids)
            if i >= n:
                break
        topic, partition, offset, key, v = records[i]
        i += 1
        offsets[(topic, partition)] = offset + 1
        try:
            name, event_rows = decode(v, topic, partition, offset)
        except DecodeError as exc:
            findings.append(("undecodable", topic, partition, offset, key, -1, "",
                             f"{exc}; value SHA-256 {sha256(v or b'').hexdigest()}"))
            continue
        row = event_rows[0][1]
        event_id, chain, seq, event_type, event_hash = row[0], row[4], row[5], row[7], row[17]
        if topic_of.get(event_type) != topic:
            findings.append(("wrong_topic", topic, partition, offset, chain, seq, event_id,
                             f"{event_type} belongs on {topic_of.get(event_type)}, found on {topic}"))
        if key != chain:
            findings.append(("wrong_key", topic, partition, offset, chain, seq, event_id,
                             f"Kafka key {key!r} is not the event's chain id"))
        if sha256(v[:-32]).digest() != event_hash:
            findings.append(("edited", topic, partition, offset, chain, seq, event_id,
                             "event_hash does not match SHA-256 of the event's bytes"))
        hkey = (topic, chain)
        head = heads.get(hkey)
        if head is None:
            head = (-1, ZERO_HASH)
        if seq == head[0] + 1 and row[16] == head[1]:  # the common case: the chain's next event
            heads[hkey] = changed[hkey] = (seq, event_hash)
        elif seq <= head[0]:
            if seen_ids is None:
                seen_ids = {r[0] for table_rows in rows.values() for r in table_rows}
            duplicated = ("duplicated", topic, partition, offset, chain, seq, event_id,
                          f"event {event_id} (seq {seq}) appears again after seq {head[0]}")
            if event_id in seen_ids:
                findings.append(duplicated)
                continue
            reordered = ("reordered_or_inserted", topic, partition, offset, chain, seq, event_id,
                         f"seq {seq} arrives after seq {head[0]}")
            positions = []
            for table, trow in event_rows:
                table_rows = rows.setdefault(table, [])
                positions.append((table, len(table_rows)))
                table_rows.append(trow)
            pending.append((len(findings), event_id, positions, duplicated, reordered))
            findings.append(None)
            seen_ids.add(event_id)
            continue
        else:
            if seq > head[0] + 1:
                findings.append(("missing", topic, partition, offset, chain, seq, event_id,
                                 f"seq {head[0] + 1}..{seq - 1} missing before seq {seq}"))
            else:
                findings.append(("edited", topic, partition, offset, chain, seq, event_id,
                                 f"link to seq {seq - 1} does not match its hash"))
            heads[hkey] = changed[hkey] = (seq, event_hash)
        if seen_ids is not None:
            seen_ids.add(event_id)
        for table, trow in event_rows:
            rows.setdefault(table, []).append(trow)
    return CheckedBatch(len(records), rows, offsets, findings, pending, changed)


class Materializer:
    """Turns records into ledger rows in one store. Resumes from the store's offsets and heads."""

    def __init__(self, store: LedgerStore, codec: Codec | None = None):
        self.store = store
        self.codec = codec or default_codec()
        self._decode = decode_rows if codec is None or codec is default_codec() else self._decode_with_codec
        self.heads: dict[tuple[str, str], tuple[int, bytes]] = store.chain_heads()
        self.offsets: dict[tuple[str, int], int] = store.offsets()

    def _decode_with_codec(self, value: bytes, topic: str, partition: int,
                           offset: int) -> tuple[str, list[tuple[str, tuple]]]:
        name, rec = self.codec.decode(value)
        return name, row_tuples_for_event(name, rec, topic, partition, offset, value)

    def ingest(self, records: Iterable[Record], *, commit_every: int = 5000,
               on_batch: Callable[[IngestStats], None] | None = None) -> IngestStats:
        """Materialize ``records`` in transactions of ``commit_every`` records."""
        heads = dict(self.heads)   # runs ahead of self.heads by at most the batch being committed
        return self.write_batches((check_batch(batch, heads, self._decode)
                                   for batch in _batches(records, commit_every)), on_batch=on_batch)

    def write_batches(self, checked_batches: Iterable[CheckedBatch], *,
                      on_batch: Callable[[IngestStats], None] | None = None) -> IngestStats:
        """Write checked batches, one transaction each, in order.

        Each batch is written with ``store.begin_write`` (SQLCipher: inserts and COMMIT on a thread
        of their own, without the GIL) while this thread produces the next batch (reads and checks
        it); the next batch is written only after that one committed, so transactions stay in order
        and a failed write stops the ingest with nothing after it written."""
        stats = IngestStats()
        t0 = time.perf_counter()
        writing: tuple[PendingWrite, CheckedBatch, list[Finding]] | None = None
        try:
            for checked in checked_batches:
                if writing is not None:
                    self._committed(stats, *writing, on_batch)
                    writing = None
                findings = self._resolve(checked)
                writing = (self.store.begin_write(checked.rows, checked.offsets, findings), checked, findings)
            if writing is not None:
                self._committed(stats, *writing, on_batch)
                writing = None
        finally:
            if writing is not None:  # an error on this thread while a batch was written: let it end
                try:
                    writing[0].wait()
                    self._advance(writing[1])  # committed: offsets and heads move with it
                except Exception:  # noqa: BLE001 - the error being raised here says more
                    pass
        stats.seconds = time.perf_counter() - t0
        return stats

    def ingest_batch(self, batch: list[Record]) -> list[Finding]:
        """Rows, offsets and findings of ``batch`` in one transaction; returns the findings."""
        checked = check_batch(batch, dict(self.heads), self._decode)
        findings = self._resolve(checked)
        self.store.write(checked.rows, checked.offsets, findings)
        self._advance(checked)
        return findings

    def _resolve(self, checked: CheckedBatch) -> list[Finding]:
        """Resolve a checked batch's pending events against the store; its findings."""
        stored = self.store.event_ids([p[1] for p in checked.pending]) if checked.pending else set()
        return checked.resolve(stored)

    def _advance(self, checked: CheckedBatch) -> None:
        self.heads.update(checked.heads)
        self.offsets.update(checked.offsets)

    def _committed(self, stats: IngestStats, done: PendingWrite, checked: CheckedBatch, findings: list[Finding],
                   on_batch: Callable[[IngestStats], None] | None) -> None:
        done.wait()  # raises the write's error
        self._advance(checked)
        stats.records += checked.records
        stats.batches += 1
        stats.findings.extend(findings)
        if on_batch is not None:
            on_batch(stats)


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for r in records:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def sync(store: LedgerStore, bootstrap: str, *, prefix: str = "", follow: bool = False,
         poll_interval: float = 1.0, commit_every: int = 5000, topics: Iterable[str] = schema_files.TOPICS,
         should_stop: Callable[[], bool] = lambda: False,
         on_batch: Callable[[IngestStats], None] | None = None) -> IngestStats:
    """Read every marl.* topic from the ledger's stored offsets to the end (``follow``: again and
    again until ``should_stop()``), materializing as it goes.

    One process: this thread reads and checks while the store's writer thread inserts and commits
    the previous batch (without the GIL where the C batch writer runs)."""
    m = Materializer(store)
    topics = list(topics)
    total = IngestStats()
    t0 = time.perf_counter()
    while True:
        records = chain.from_iterable(record_batches(bootstrap, topics, prefix=prefix,
                                                     start_offsets=dict(m.offsets)))
        stats = m.ingest(records, commit_every=commit_every, on_batch=on_batch)
        total.records += stats.records
        total.batches += stats.batches
        total.findings.extend(stats.findings)
        if not follow or should_stop():
            break
        if stats.records == 0:
            time.sleep(poll_interval)
    total.seconds = time.perf_counter() - t0
    return total

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
from collections import defaultdict
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Callable, Iterable, Iterator

import schemas as schema_files
from eventlog.codec import ZERO_HASH, Codec, DecodeError, default_codec
from eventlog.hashing import PREV_END, PREV_START
from eventlog.kafka import Record, read_records

from .store import Finding, LedgerStore
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


class Materializer:
    """Turns records into ledger rows in one store. Resumes from the store's offsets and heads."""

    def __init__(self, store: LedgerStore, codec: Codec | None = None):
        self.store = store
        self.codec = codec or default_codec()
        self.heads: dict[tuple[str, str], tuple[int, bytes]] = store.chain_heads()
        self.offsets: dict[tuple[str, int], int] = store.offsets()

    def ingest(self, records: Iterable[Record], *, commit_every: int = 5000,
               on_batch: Callable[[IngestStats], None] | None = None) -> IngestStats:
        stats = IngestStats()
        t0 = time.perf_counter()
        for batch in _batches(records, commit_every):
            findings = self.ingest_batch(batch)
            stats.records += len(batch)
            stats.batches += 1
            stats.findings.extend(findings)
            if on_batch is not None:
                on_batch(stats)
        stats.seconds = time.perf_counter() - t0
        return stats

    def ingest_batch(self, batch: list[Record]) -> list[Finding]:
        """Rows, offsets and findings of ``batch`` in one transaction; returns the findings."""
        rows: dict[str, list[tuple]] = defaultdict(list)
        findings: list[Finding] = []
        offsets: dict[tuple[str, int], int] = {}
        heads = dict(self.heads)
        seen_ids: set[str] = set()
        decode = self.codec.decode
        event_types = schema_files.EVENT_TYPES
        for r in batch:
            offsets[(r.topic, r.partition)] = r.offset + 1
            v = r.value
            try:
                name, rec = decode(v)
            except DecodeError as exc:
                findings.append(Finding("undecodable", r.topic, r.partition, r.offset, r.key, -1, "",
                                        f"{exc}; value SHA-256 {sha256(v or b'').hexdigest()}"))
                continue
            chain, seq, event_id = rec["chain_id"], rec["seq"], rec["event_id"]

            def finding(kind: str, detail: str) -> None:
                findings.append(Finding(kind, r.topic, r.partition, r.offset, chain, seq, event_id, detail))

            expected_topic = event_types.get(rec["event_type"], (None, None))[1]
            if expected_topic != r.topic:
                finding("wrong_topic", f"{rec['event_type']} belongs on {expected_topic}, found on {r.topic}")
            if r.key != chain:
                finding("wrong_key", f"Kafka key {r.key!r} is not the event's chain id")
            if sha256(v[:-32]).digest() != v[-32:]:
                finding("edited", "event_hash does not match SHA-256 of the event's bytes")
            key = (r.topic, chain)
            head = heads.get(key)
            next_seq, last_hash = (head[0] + 1, head[1]) if head else (0, ZERO_HASH)
            prev = v[PREV_START:PREV_END]
            if seq < next_seq:
                if event_id in seen_ids or self.store.event_ids([event_id]):
                    finding("duplicated", f"event {event_id} (seq {seq}) appears again after seq {next_seq - 1}")
                    continue
                finding("reordered_or_inserted", f"seq {seq} arrives after seq {next_seq - 1}")
            elif seq > next_seq:
                finding("missing", f"seq {next_seq}..{seq - 1} missing before seq {seq}")
            elif prev != last_hash:
                finding("edited", f"link to seq {seq - 1} does not match its hash")
            if seq >= next_seq:
                heads[key] = (seq, bytes(v[-32:]))
            seen_ids.add(event_id)
            for table, row in row_tuples_for_event(name, rec, r.topic, r.partition, r.offset, v):
                rows[table].append(row)
        self.store.write(rows, offsets, findings)
        self.heads = heads
        self.offsets.update(offsets)
        return findings


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
    again until ``should_stop()``), materializing as it goes."""
    m = Materializer(store)
    total = IngestStats()
    topics = list(topics)
    t0 = time.perf_counter()
    while True:
        stats = m.ingest(read_records(bootstrap, topics, prefix=prefix, start_offsets=dict(m.offsets)),
                         commit_every=commit_every, on_batch=on_batch)
        total.records += stats.records
        total.batches += stats.batches
        total.findings.extend(stats.findings)
        if not follow or should_stop():
            break
        if stats.records == 0:
            time.sleep(poll_interval)
    total.seconds = time.perf_counter() - t0
    return total

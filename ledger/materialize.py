"""The materializer: marl.* topics into ledger rows, exactly once, chains checked on the way in.

Each batch of records becomes one transaction holding its rows, the consumer offsets that follow
them (``ingest_offsets``) and any integrity findings. A crash anywhere rolls the whole batch back,
and a restart reads from the stored offsets: nothing is lost and nothing is written twice (rows are
also inserted idempotently by ``event_id``).

The checks are ``ledger.ingest.check_batch`` (pure); a break becomes an ``integrity_findings`` row
and the event is still stored, so ``ledger verify`` sees exactly what the topic held.

Erasure applies to every ledger (``ledger.erasure``): a batch's transaction also applies the
``compliance.deletion`` events it stores and deletes the rows of every subject erased before that
arrive in it, so no erased subject's row is ever committed past its batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Iterable, Iterator

import schemas as schema_files
from eventlog.codec import Codec
from eventlog.kafka import Record, record_batches

from .erasure import Erasure, plan_erasures
from .ingest import CheckedBatch, Finding, check_batch
from .store import DeletionSummary, LedgerStore, PendingWrite


@dataclass
class IngestStats:
    records: int = 0
    batches: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    deletions: list[str] = field(default_factory=list)   # request ids of the compliance.deletion events applied
    erased: dict[str, int] = field(default_factory=dict)  # rows their erasures deleted (late rows too), per table

    @property
    def erased_rows(self) -> int:
        return sum(self.erased.values())

    def add(self, other: "IngestStats") -> None:
        self.records += other.records
        self.batches += other.batches
        self.findings.extend(other.findings)
        self.deletions.extend(other.deletions)
        for t, n in other.erased.items():
            self.erased[t] = self.erased.get(t, 0) + n

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class Materializer:
    """Turns records into ledger rows in one store. Resumes from the store's offsets and heads."""

    def __init__(self, store: LedgerStore, codec: Codec | None = None):
        self.store = store
        self.codec = codec
        self.heads: dict[tuple[str, str], tuple[int, bytes]] = store.chain_heads()
        self.offsets: dict[tuple[str, int], int] = store.offsets()
        self.erased: dict[bytes, Erasure] = store.erasures()   # subject_ref -> the request that erased it

    def apply_stored_deletions(self) -> list[DeletionSummary]:
        """Apply the ``compliance.deletion`` events this ledger stores without their erasure (stored
        by a sync from before the sync applied them), one transaction each."""
        done = []
        for e in self.store.unapplied_deletions():
            done.append(self.store.erase_subject(e.subject_ref, e.request_id, e.requester, e.legal_basis))
            self.erased.setdefault(e.subject_ref, e)
        return done

    def ingest(self, records: Iterable[Record], *, commit_every: int = 5000,
               on_batch: Callable[[IngestStats], None] | None = None) -> IngestStats:
        """Materialize ``records`` in transactions of ``commit_every`` records."""
        heads = dict(self.heads)   # runs ahead of self.heads by at most the batch being committed
        return self.write_batches((check_batch(batch, heads, self.codec)
                                   for batch in _batches(records, commit_every)), on_batch=on_batch)

    def write_batches(self, checked_batches: Iterable[CheckedBatch], *,
                      on_batch: Callable[[IngestStats], None] | None = None) -> IngestStats:
        """Write checked batches, one transaction each, in order.

        Each batch's rows are inserted on this thread; its COMMIT (where SQLCipher encrypts and writes
        the pages, without the GIL) runs on another while this thread reads and checks the next batch.
        The next batch is written only after that one committed, so transactions stay in order and a
        failed commit stops the ingest with nothing after it written."""
        stats = IngestStats()
        t0 = time.perf_counter()
        writing: tuple[PendingWrite, CheckedBatch, list[Finding], list[Erasure], dict] | None = None
        try:
            for checked in checked_batches:
                if writing is not None:
                    self._committed(stats, *writing, on_batch)
                    writing = None
                findings = self._resolve(checked)
                erasures, erased = plan_erasures(checked.rows, self.erased)
                done = self.store.begin_write(checked.rows, checked.offsets, findings, erasures=erasures)
                writing = (done, checked, findings + done.findings, erasures, erased)
            if writing is not None:
                self._committed(stats, *writing, on_batch)
                writing = None
        finally:
            if writing is not None:  # an error on this thread while a batch was committed: let it end
                try:
                    writing[0].wait()
                    self._advance(writing[1], writing[4])  # committed: offsets and heads move with it
                except Exception:  # noqa: BLE001 - the error being raised here says more
                    pass
        stats.seconds = time.perf_counter() - t0
        return stats

    def ingest_batch(self, batch: list[Record]) -> list[Finding]:
        """Rows, offsets, findings and erasures of ``batch`` in one transaction; returns the findings."""
        checked = check_batch(batch, dict(self.heads), self.codec)
        findings = self._resolve(checked)
        erasures, erased = plan_erasures(checked.rows, self.erased)
        findings += self.store.write(checked.rows, checked.offsets, findings, erasures=erasures)
        self._advance(checked, erased)
        return findings

    def _resolve(self, checked: CheckedBatch) -> list[Finding]:
        """Judge a checked batch's pending events against the store; its findings."""
        if not checked.pending:
            return checked.resolve({}, set())
        return checked.resolve(self.store.stored_copies(checked.pending_ids()),
                               self.store.taken_seqs(checked.pending_seqs()))

    def _advance(self, checked: CheckedBatch, erased: dict[bytes, Erasure]) -> None:
        self.heads.update(checked.heads)
        self.offsets.update(checked.offsets)
        self.erased = erased

    def _committed(self, stats: IngestStats, done: PendingWrite, checked: CheckedBatch, findings: list[Finding],
                   erasures: list[Erasure], erased: dict[bytes, Erasure],
                   on_batch: Callable[[IngestStats], None] | None) -> None:
        done.wait()  # raises the commit's error
        self._advance(checked, erased)
        stats.records += checked.records
        stats.batches += 1
        stats.findings.extend(findings)
        stats.deletions.extend(e.request_id for e in erasures if e.event_ids is None)
        for t, n in done.erased.items():
            stats.erased[t] = stats.erased.get(t, 0) + n
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
         on_batch: Callable[[IngestStats], None] | None = None,
         on_position: Callable[[dict[tuple[str, int], int]], None] | None = None) -> IngestStats:
    """Read every marl.* topic from the ledger's stored offsets to the end (``follow``: again and
    again until ``should_stop()``), materializing as it goes and applying the ``compliance.deletion``
    events it reads (``ledger.erasure``), and first any this ledger stores without having applied them.

    ``on_batch`` gets the stats of the current read round after each committed batch; ``on_position``
    the ledger's offsets ({(topic, partition): next offset}) at the start, after each committed batch
    and after each read round (the topics' end offsets minus these: progress and consumer lag)."""
    m = Materializer(store)
    topics = list(topics)
    total = IngestStats()
    t0 = time.perf_counter()
    for summary in m.apply_stored_deletions():
        total.deletions.append(summary.request_id)
        for ev in summary.evidence:
            total.erased[ev.source_table] = total.erased.get(ev.source_table, 0) + ev.count

    def committed(stats: IngestStats) -> None:
        if on_batch is not None:
            on_batch(stats)
        if on_position is not None:
            on_position(dict(m.offsets))

    if on_position is not None:
        on_position(dict(m.offsets))
    while True:
        records = chain.from_iterable(record_batches(bootstrap, topics, prefix=prefix,
                                                     start_offsets=dict(m.offsets)))
        stats = m.ingest(records, commit_every=commit_every, on_batch=committed)
        total.add(stats)
        if on_position is not None:
            on_position(dict(m.offsets))
        if not follow or should_stop():
            break
        if stats.records == 0:
            time.sleep(poll_interval)
    total.seconds = time.perf_counter() - t0
    return total

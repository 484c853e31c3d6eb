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

import marshal
import multiprocessing
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Callable, Iterable, Iterator

import schemas as schema_files
from eventlog.codec import ZERO_HASH, Codec, DecodeError, default_codec
from eventlog.kafka import Record, backlog, read_records

from .fastrows import decode_rows
from .store import Finding, LedgerError, LedgerStore
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
    findings are ``None`` placeholders until ``resolve`` fills them in.

    Plain tuples, dicts and lists only, so a batch crosses a process boundary with ``marshal``."""

    rows: dict[str, list[tuple]]
    offsets: dict[tuple[str, int], int]
    findings: list[tuple | None]
    pending: list[tuple[int, str, list[tuple[str, int]], tuple, tuple]]
    heads: dict[tuple[str, str], tuple[int, bytes]]

    def to_wire(self) -> tuple:
        return (self.rows, list(self.offsets.items()), self.findings, self.pending, list(self.heads.items()))

    @classmethod
    def from_wire(cls, wire: tuple) -> "CheckedBatch":
        rows, offsets, findings, pending, heads = wire
        return cls(rows, dict(offsets), findings, pending, dict(heads))

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


def check_batch(records: Iterable, heads: dict[tuple[str, str], tuple[int, bytes]],
                decode: Callable[[bytes, str, int, int], tuple[str, list[tuple[str, tuple]]]] = decode_rows
                ) -> CheckedBatch:
    """Decode and check one batch of records (``(topic, partition, offset, key, value, ...)``, e.g.
    ``eventlog.kafka.Record``) against ``heads`` (updated in place): every event's hash is recomputed
    and its link checked against its chain's head. A pure function of the records and the heads."""
    rows: dict[str, list[tuple]] = defaultdict(list)
    findings: list[tuple | None] = []
    pending: list[tuple[int, str, list[tuple[str, int]], tuple, tuple]] = []
    offsets: dict[tuple[str, int], int] = {}
    changed: dict[tuple[str, str], tuple[int, bytes]] = {}
    seen_ids: set[str] = set()
    event_types = schema_files.EVENT_TYPES
    for r in records:
        topic, partition, offset, key, v = r[0], r[1], r[2], r[3], r[4]
        offsets[(topic, partition)] = offset + 1
        try:
            name, event_rows = decode(v, topic, partition, offset)
        except DecodeError as exc:
            findings.append(("undecodable", topic, partition, offset, key, -1, "",
                             f"{exc}; value SHA-256 {sha256(v or b'').hexdigest()}"))
            continue
        row = event_rows[0][1]
        event_id, chain, seq, event_type = row[0], row[4], row[5], row[7]
        expected_topic = event_types.get(event_type, (None, None))[1]
        if expected_topic != topic:
            findings.append(("wrong_topic", topic, partition, offset, chain, seq, event_id,
                             f"{event_type} belongs on {expected_topic}, found on {topic}"))
        if key != chain:
            findings.append(("wrong_key", topic, partition, offset, chain, seq, event_id,
                             f"Kafka key {key!r} is not the event's chain id"))
        event_hash = row[17]
        if sha256(v[:-32]).digest() != event_hash:
            findings.append(("edited", topic, partition, offset, chain, seq, event_id,
                             "event_hash does not match SHA-256 of the event's bytes"))
        hkey = (topic, chain)
        head = heads.get(hkey)
        next_seq, last_hash = (head[0] + 1, head[1]) if head else (0, ZERO_HASH)
        if seq < next_seq:
            duplicated = ("duplicated", topic, partition, offset, chain, seq, event_id,
                          f"event {event_id} (seq {seq}) appears again after seq {next_seq - 1}")
            if event_id in seen_ids:
                findings.append(duplicated)
                continue
            reordered = ("reordered_or_inserted", topic, partition, offset, chain, seq, event_id,
                         f"seq {seq} arrives after seq {next_seq - 1}")
            positions = []
            for table, trow in event_rows:
                positions.append((table, len(rows[table])))
                rows[table].append(trow)
            pending.append((len(findings), event_id, positions, duplicated, reordered))
            findings.append(None)
            seen_ids.add(event_id)
            continue
        if seq > next_seq:
            findings.append(("missing", topic, partition, offset, chain, seq, event_id,
                             f"seq {next_seq}..{seq - 1} missing before seq {seq}"))
        elif row[16] != last_hash:
            findings.append(("edited", topic, partition, offset, chain, seq, event_id,
                             f"link to seq {seq - 1} does not match its hash"))
        heads[hkey] = changed[hkey] = (seq, event_hash)
        seen_ids.add(event_id)
        for table, trow in event_rows:
            rows[table].append(trow)
    return CheckedBatch(dict(rows), offsets, findings, pending, changed)


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
        stats = IngestStats()
        t0 = time.perf_counter()
        for batch in _batches(records, commit_every):
            self._account(stats, len(batch), self.ingest_batch(batch), on_batch)
        stats.seconds = time.perf_counter() - t0
        return stats

    def ingest_batch(self, batch: list[Record]) -> list[Finding]:
        """Rows, offsets and findings of ``batch`` in one transaction; returns the findings."""
        heads = dict(self.heads)
        checked = check_batch(batch, heads, self._decode)
        findings = self.write_checked(checked)
        self.heads = heads
        return findings

    def write_checked(self, checked: CheckedBatch) -> list[Finding]:
        """Resolve a checked batch's pending events against the store and write it in one transaction."""
        stored = self.store.event_ids([p[1] for p in checked.pending]) if checked.pending else set()
        findings = checked.resolve(stored)
        self.store.write(checked.rows, checked.offsets, findings)
        self.heads.update(checked.heads)
        self.offsets.update(checked.offsets)
        return findings

    @staticmethod
    def _account(stats: IngestStats, n: int, findings: list[Finding],
                 on_batch: Callable[[IngestStats], None] | None) -> None:
        stats.records += n
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


# Below this many pending offsets a sync decodes in its own process: starting a reader process
# costs about half a second, and only a long backlog repays it.
READER_PROCESS_MIN_BACKLOG = 20_000


def sync(store: LedgerStore, bootstrap: str, *, prefix: str = "", follow: bool = False,
         poll_interval: float = 1.0, commit_every: int = 5000, topics: Iterable[str] = schema_files.TOPICS,
         should_stop: Callable[[], bool] = lambda: False,
         on_batch: Callable[[IngestStats], None] | None = None,
         reader_process: bool | None = None) -> IngestStats:
    """Read every marl.* topic from the ledger's stored offsets to the end (``follow``: again and
    again until ``should_stop()``), materializing as it goes.

    ``reader_process``: read, decode and check in a second process while this one only writes (the
    two overlap on two cores; the database is still written by this process alone, one transaction
    per batch with its offsets, so a crash of either process loses and duplicates nothing). ``None``
    decides by the backlog: a second process for ``READER_PROCESS_MIN_BACKLOG`` offsets or more, or
    in follow mode."""
    m = Materializer(store)
    topics = list(topics)
    if reader_process is None:
        reader_process = follow or backlog(bootstrap, topics, prefix=prefix,
                                           start_offsets=dict(m.offsets)) >= READER_PROCESS_MIN_BACKLOG
    if reader_process:
        return _sync_with_reader(m, bootstrap, prefix, follow, poll_interval, commit_every, topics, should_stop,
                                 on_batch)
    total = IngestStats()
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


def _sync_with_reader(m: Materializer, bootstrap: str, prefix: str, follow: bool, poll_interval: float,
                      commit_every: int, topics: list[str], should_stop: Callable[[], bool],
                      on_batch: Callable[[IngestStats], None] | None) -> IngestStats:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding a database and Kafka threads
    receive, send = ctx.Pipe(duplex=False)
    reader = ctx.Process(target=_reader_main, name="marlgrc-ledger-reader", daemon=True, args=(
        send, bootstrap, prefix, follow, poll_interval, commit_every, topics, dict(m.offsets), dict(m.heads)))
    reader.start()
    send.close()
    total = IngestStats()
    t0 = time.perf_counter()
    try:
        while True:
            if follow and should_stop():
                break
            if not receive.poll(0.2):
                if not reader.is_alive() and not receive.poll(0):
                    raise LedgerError(f"the ledger's reader process died (exit code {reader.exitcode}) without "
                                      f"an error report; nothing of its unfinished batch was written. Run the "
                                      f"sync again: it resumes from the stored offsets")
                continue
            try:
                kind, body = marshal.loads(receive.recv_bytes())
            except EOFError:
                continue
            if kind == "batch":
                m._account(total, body[5], m.write_checked(CheckedBatch.from_wire(body[:5])), on_batch)
            elif kind == "done":
                break
            else:  # "error": the reader's exception, pickled, raised here as it would be in-process
                raise pickle.loads(body)
    finally:
        if reader.is_alive():
            reader.terminate()
        reader.join(5)
        receive.close()
    total.seconds = time.perf_counter() - t0
    return total


def _reader_main(send, bootstrap: str, prefix: str, follow: bool, poll_interval: float, commit_every: int,
                 topics: list[str], offsets: dict[tuple[str, int], int],
                 heads: dict[tuple[str, str], tuple[int, bytes]]) -> None:
    """The reader process: Kafka -> decoded, checked batches -> the writer, until the end (or forever
    in follow mode). Its state (offsets, heads) only runs ahead of what the writer committed; a
    restart begins again from the store's."""
    try:
        while True:
            n = 0
            for batch in _batches(read_records(bootstrap, topics, prefix=prefix, start_offsets=dict(offsets)),
                                  commit_every):
                checked = check_batch(batch, heads)
                offsets.update(checked.offsets)
                send.send_bytes(marshal.dumps(("batch", checked.to_wire() + (len(batch),))))
                n += len(batch)
            if not follow:
                break
            if n == 0:
                time.sleep(poll_interval)
        send.send_bytes(marshal.dumps(("done", None)))
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the writer, which raises it
        try:
            body = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an unpicklable exception still says what it was
            body = pickle.dumps(LedgerError(f"ledger reader failed: {type(exc).__name__}: {exc}"))
        try:
            send.send_bytes(marshal.dumps(("error", body)))
        except OSError:
            pass
    finally:
        send.close()

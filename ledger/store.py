"""Ledger storage: what every backend offers, and the SQLCipher backend (the default).

A backend writes one batch of rows, the consumer offsets and the integrity findings in one
transaction; reads chain heads and offsets back on restart; purges and erases through its
deletion procedure only (tables are append-only otherwise); and hashes its contents.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Iterable, Iterator

import schemas as schema_files
from eventlog.merkle import merkle_root

from .erasure import Erasure, deletion_erasures
from .ingest import Finding, StoredCopy, copy_findings
from .keys import KeyProvider, LedgerKeyError
from .tables import (ALL_TABLES, EVENT_TABLES, INGEST_OFFSETS, INTEGRITY_FINDINGS, LINEAGE, SCHEMA_TABLE, TABLES,
                     Table)


class LedgerError(RuntimeError):
    """The ledger cannot be opened or written; the message says what to do."""


class AppendOnlyError(LedgerError):
    """An UPDATE or DELETE outside the purge and erasure procedures was refused."""


class LedgerAccessError(LedgerError):
    """The database refused the connection's role something a command needs (PostgreSQL roles)."""


@dataclass(frozen=True)
class Evidence:
    """What one deletion removed from one chain: seqs first..last (``count`` rows), the Merkle root
    of their hashes, the hash before the range (``prev_hash``) and the last deleted hash (``head_hash``)."""

    deletion_id: int
    kind: str
    source_table: str
    topic: str
    chain_id: str
    first_seq: int
    last_seq: int
    count: int
    merkle_root: bytes
    prev_hash: bytes
    head_hash: bytes


@dataclass
class DeletionSummary:
    """One purge or erasure: the tombstone's counts per table and the evidence rows written.

    An erasure whose request this ledger had applied already (``repeated``) wrote no tombstone:
    ``counts`` are the first tombstone's, ``evidence`` what this call deleted (late rows), if any."""

    kind: str
    counts: dict[str, int] = field(default_factory=dict)
    evidence: list[Evidence] = field(default_factory=list)
    repeated: bool = False
    first_deleted_at: int | None = None
    request_id: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def late(self) -> int:
        """Rows a repeated erasure deleted (rows of the subject that arrived after its tombstone)."""
        return sum(e.count for e in self.evidence) if self.repeated else 0


@dataclass(frozen=True)
class StoredEvent:
    table: str
    topic: str
    partition: int
    offset: int
    chain_id: str
    seq: int
    raw: bytes


DELETABLE = tuple(t.name for t in EVENT_TABLES)
SUBJECT_TABLES = tuple(t.name for t in EVENT_TABLES if t.subject_refs)
_FINDING_COLS = [c for c in INTEGRITY_FINDINGS.column_names if c != "finding_id"]
_WRITE_ORDER = tuple(t.name for t in EVENT_TABLES) + (LINEAGE.name,)  # lineage after its policy updates
# the tables a topic's events are stored in: one chain may span several (marl.run.lifecycle: run.started
# and run.finished in runs, episode.summary in episode_summaries)
TOPIC_TABLES: dict[str, tuple[str, ...]] = {}
for _schema, _topic in schema_files.EVENT_TYPES.values():
    if SCHEMA_TABLE[_schema] not in TOPIC_TABLES.get(_topic, ()):
        TOPIC_TABLES[_topic] = TOPIC_TABLES.get(_topic, ()) + (SCHEMA_TABLE[_schema],)


def contiguous_ranges(rows: Iterable[tuple]) -> list[list[tuple]]:
    """Group ``(topic, chain_id, seq, event_hash, prev_event_hash)`` rows, sorted by topic, chain and
    seq, into runs of consecutive seqs within one chain."""
    out: list[list[tuple]] = []
    for row in rows:
        if out and out[-1][-1][0] == row[0] and out[-1][-1][1] == row[1] and out[-1][-1][2] + 1 == row[2]:
            out[-1].append(row)
        else:
            out.append([row])
    return out


class PendingWrite:
    """A batch written but not yet committed (``LedgerStore.begin_write``): ``wait()`` returns once it
    is committed and raises what stopped it otherwise. ``findings``: what the store found while
    inserting it (``event_id`` conflicts, ``LedgerStore.write``); ``erased``: the rows its erasures
    deleted, per table."""

    def __init__(self, store: "LedgerStore", findings: list[Finding], erased: dict[str, int] | None = None):
        self.findings = findings
        self.erased = erased or {}   # rows the batch's erasures deleted, per table
        self._error: list[BaseException] = []

        def run():
            try:
                store.commit()
            except BaseException as exc:  # noqa: BLE001 - handed to wait()
                self._error.append(exc)

        self._thread = threading.Thread(target=run, name="ledger-commit", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if self._error:
            raise self._error[0]


class LedgerStore(ABC):
    """A ledger backend. Subclasses supply the connection and their SQL dialect."""

    dialect: str
    ph: str  # parameter placeholder

    # ----------------------------------------------------------------- dialect
    @abstractmethod
    def _begin(self): ...

    def _commit(self):  # both backends keep their connection in self.conn
        self.conn.execute("COMMIT")

    @abstractmethod
    def _rollback(self): ...

    def _cursor(self):
        return self.conn.cursor()

    @abstractmethod
    def _purge(self, cutoff: int) -> None:
        """Inside an open transaction: delete the rows expired before ``cutoff``, with evidence and a
        tombstone."""

    @abstractmethod
    def _erase(self, erasure: Erasure) -> dict[str, int]:
        """Inside an open transaction: delete the subject's rows (``erasure.event_ids`` only, when
        given) with evidence per chain range, and a tombstone unless one for this request and
        subject exists already. Returns the rows deleted now, per table."""

    def _after_deletion(self) -> None:
        """After a transaction that deleted rows has committed (SQLCipher: clear the WAL)."""

    @abstractmethod
    def close(self) -> None: ...

    def _json_param(self, col: str) -> str:
        return self.ph

    def explain(self, exc: BaseException) -> str | None:
        """One line for an error this backend's database raised mid-command; None for anything else."""
        return None

    # ----------------------------------------------------------------- writing
    def _insert_sql(self, table: Table) -> str:
        cols = table.column_names
        params = ", ".join(self._json_param(c) if k == "json" else self.ph for c, k in table.columns)
        return f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({params}) ON CONFLICT DO NOTHING"

    def _tail_statements(self, offsets: dict[tuple[str, int], int],
                         findings: list[Finding]) -> list[tuple[str, list[tuple]]]:
        """The ``(sql, parameter rows)`` that end a batch's transaction after its event rows: the
        findings, then the consumer offsets."""
        out: list[tuple[str, list[tuple]]] = []
        if findings:
            now = _now_micros()
            out.append((
                f"INSERT INTO integrity_findings ({', '.join(_FINDING_COLS)}) "
                f"VALUES ({', '.join([self.ph] * len(_FINDING_COLS))})",
                [(now, f.kind, f.topic, f.partition, f.offset, f.chain_id, f.seq, f.event_id, f.detail)
                 for f in findings]))
        if offsets:
            out.append((
                f"INSERT INTO ingest_offsets (topic, kafka_partition, next_offset) VALUES ({self.ph}, {self.ph}, "
                f"{self.ph}) ON CONFLICT (topic, kafka_partition) DO UPDATE SET next_offset = excluded.next_offset",
                [(t, p, o) for (t, p), o in sorted(offsets.items())]))
        return out

    def _insert_rows(self, cur, rows: dict[str, list[dict] | list[tuple]]) -> list[Finding]:
        """Insert a batch's rows (lineage after its policy updates), each table with one
        ``executemany``. Where a table stored fewer rows than it was given, some ``event_id`` was
        held already: ``ingest.copy_findings`` says which rows came from another record, and what
        they are (the same bytes again: ``duplicated``; other bytes: ``edited``). Returns those
        findings; the lineage rows of a refused policy update are not inserted."""
        findings: list[Finding] = []
        refused: set[str] = set()
        for name in _WRITE_ORDER:
            batch = rows.get(name)
            if not batch:
                continue
            table = TABLES[name]
            if not isinstance(batch[0], tuple):
                cols = table.column_names
                batch = [tuple(r.get(c) for c in cols) for r in batch]
            if name == LINEAGE.name and refused:
                batch = [r for r in batch if r[0] not in refused]
            cur.executemany(self._insert_sql(table), batch)
            if table.event_table and cur.rowcount != len(batch):
                found, gone = copy_findings(batch, self.stored_copies([r[0] for r in batch], [name]))
                findings += found
                refused |= gone
        return findings

    def write(self, rows: dict[str, list[dict] | list[tuple]], offsets: dict[tuple[str, int], int],
              findings: list[Finding] = (), *, erasures: Iterable[Erasure] = (), commit: bool = True) -> list[Finding]:
        """Rows, consumer offsets (next offset to read) and findings, in one transaction. A table's
        rows are dicts (column -> value, missing columns NULL) or tuples in ``Table.columns`` order.
        ``erasures`` run after the rows are inserted, in the same transaction (``ledger.erasure``);
        the rows they deleted are in ``last_erased``. Returns the findings the store adds
        (``_insert_rows``), written in the same transaction. ``commit=False`` leaves the transaction
        open for ``commit()`` (or ``rollback()``), which may be called from another thread; nothing
        else may use the store until then."""
        cur = self._cursor()
        erasures = list(erasures)
        erased: dict[str, int] = {}
        self._begin()
        try:
            added = self._insert_rows(cur, rows)
            for erasure in erasures:
                for table, n in self._erase(erasure).items():
                    erased[table] = erased.get(table, 0) + n
            for sql, params in self._tail_statements(offsets, list(findings) + added):
                cur.executemany(sql, params)
            self._erased_pending = self._erased_pending or bool(erasures)
            if commit:
                self._commit()
        except BaseException:
            self._erased_pending = False
            self._rollback()
            raise
        self.last_erased = erased
        if commit and self._erased_pending:
            self._erased_pending = False
            self._after_deletion()
        return added

    _erased_pending = False
    last_erased: dict[str, int] = {}

    def begin_write(self, rows: dict[str, list[dict] | list[tuple]], offsets: dict[tuple[str, int], int],
                    findings: list[Finding] = (), *, erasures: Iterable[Erasure] = ()) -> PendingWrite:
        """``write`` on this thread, then its COMMIT on another (the GIL is free while the database
        writes its pages): the result's ``wait()`` returns when the batch is committed and raises
        (after the rollback) when it is not. Nothing else may use the store until then."""
        added = self.write(rows, offsets, findings, erasures=erasures, commit=False)
        return PendingWrite(self, added, self.last_erased)

    def commit(self) -> None:
        """Commit the transaction a ``write(..., commit=False)`` left open (rolled back if that fails)."""
        try:
            self._commit()
        except BaseException:
            self._erased_pending = False
            self._rollback()
            raise
        if self._erased_pending:
            self._erased_pending = False
            self._after_deletion()

    def rollback(self) -> None:
        self._rollback()

    # ----------------------------------------------------------------- reading
    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        cur = self._cursor()
        cur.execute(sql, params)
        return cur.fetchall()

    def count(self, table: str) -> int:
        return self.query(f"SELECT COUNT(*) FROM {TABLES[table].name}")[0][0]

    def offsets(self) -> dict[tuple[str, int], int]:
        return {(t, p): o for t, p, o in self.query("SELECT topic, kafka_partition, next_offset FROM ingest_offsets")}

    def chain_heads(self) -> dict[tuple[str, str], tuple[int, bytes]]:
        """Per chain, (seq, event_hash) of its last stored event, or of the last deleted one where a
        deletion took the chain's tail."""
        heads: dict[tuple[str, str], tuple[int, bytes]] = {}
        last: dict[tuple[str, str], int] = {}  # a chain's highest offset so far (its events may span tables)
        for t in EVENT_TABLES:
            for topic, chain, seq, h, offset in self.query(
                    f"SELECT topic, chain_id, seq, event_hash, kafka_offset FROM (SELECT topic, chain_id, seq, "
                    f"event_hash, kafka_offset, ROW_NUMBER() OVER (PARTITION BY topic, chain_id ORDER BY "
                    f"kafka_offset DESC) AS rn FROM {t.name}) x WHERE rn = 1"):
                if last.get((topic, chain), -1) < offset:
                    last[(topic, chain)] = offset
                    heads[(topic, chain)] = (seq, bytes(h))
        for ev in self.evidence():
            cur = heads.get((ev.topic, ev.chain_id))
            if cur is None or ev.last_seq > cur[0]:
                heads[(ev.topic, ev.chain_id)] = (ev.last_seq, ev.head_hash)
        return heads

    def stored_copies(self, event_ids: list[str], tables: Iterable[str] = DELETABLE) -> dict[str, StoredCopy]:
        """Where the store holds each of ``event_ids`` (those it holds), with its bytes."""
        found: dict[str, StoredCopy] = {}
        for name in tables:
            for i in range(0, len(event_ids), 500):
                chunk = event_ids[i:i + 500]
                marks = ", ".join([self.ph] * len(chunk))
                for r in self.query(f"SELECT event_id, topic, kafka_partition, kafka_offset, raw FROM {name} "
                                    f"WHERE event_id IN ({marks})", tuple(chunk)):
                    found[r[0]] = StoredCopy(r[1], r[2], r[3], bytes(r[4]))
        return found

    def taken_seqs(self, slots: list[tuple[str, str, str, int]]) -> set[tuple[str, str, int]]:
        """Which ``(table, topic, chain_id, seq)`` hold an event already, as ``(topic, chain_id, seq)``:
        in any table of the topic (``TOPIC_TABLES``), since a chain may span several."""
        ph = self.ph
        return {(topic, chain, seq) for table, topic, chain, seq in slots
                if any(self.query(f"SELECT 1 FROM {TABLES[name].name} WHERE topic = {ph} AND chain_id = {ph} "
                                  f"AND seq = {ph} LIMIT 1", (topic, chain, seq))
                       for name in TOPIC_TABLES.get(topic, (table,)))}

    def stored_events(self) -> Iterator[StoredEvent]:
        """Every stored event with its raw bytes, in (topic, partition, offset) order per table, or per
        group of tables that share a topic (``TOPIC_TABLES``: a chain's events in its offset order)."""
        done: set[str] = set()
        for t in EVENT_TABLES:
            if t.name in done:
                continue
            group = [t.name] + [n for ns in TOPIC_TABLES.values() if t.name in ns for n in ns if n != t.name]
            done.update(group)
            union = " UNION ALL ".join(f"SELECT '{n}' AS source_table, topic, kafka_partition, kafka_offset, "
                                       f"chain_id, seq, raw FROM {n}" for n in group)
            cur = self._cursor()
            cur.execute(f"SELECT * FROM ({union}) x ORDER BY topic, kafka_partition, kafka_offset")
            for name, topic, p, o, chain, seq, raw in cur:
                yield StoredEvent(name, topic, p, o, chain, seq, bytes(raw))

    def evidence(self) -> list[Evidence]:
        rows = self.query(
            "SELECT deletion_id, kind, source_table, topic, chain_id, first_seq, last_seq, row_count, merkle_root, "
            "prev_hash, head_hash FROM deletion_events WHERE topic IS NOT NULL ORDER BY deletion_id")
        return [Evidence(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]), bytes(r[9]), bytes(r[10]))
                for r in rows]

    def findings(self) -> list[Finding]:
        return [Finding(*r) for r in self.query(
            "SELECT kind, topic, kafka_partition, kafka_offset, chain_id, seq, event_id, detail "
            "FROM integrity_findings ORDER BY finding_id")]

    def tombstones(self) -> list[dict]:
        cols = ["deletion_id", "kind", "request_id", "requester", "legal_basis", "deleted_at", "cutoff", "counts"]
        out = []
        for r in self.query(f"SELECT {', '.join(cols)} FROM deletion_events WHERE topic IS NULL ORDER BY deletion_id"):
            d = dict(zip(cols, r))
            d["counts"] = d["counts"] if isinstance(d["counts"], dict) else json.loads(d["counts"] or "{}")
            out.append(d)
        return out

    def erasures(self) -> dict[bytes, Erasure]:
        """The erasures this ledger has applied: per subject_ref, the first request's tombstone."""
        out: dict[bytes, Erasure] = {}
        for ref, request_id, requester, basis in self.query(
                "SELECT subject_ref, request_id, requester, legal_basis FROM deletion_events "
                "WHERE kind = 'erasure' AND topic IS NULL AND subject_ref IS NOT NULL ORDER BY deletion_id"):
            out.setdefault(bytes(ref), Erasure(bytes(ref), request_id, requester, basis))
        return out

    def unapplied_deletions(self) -> list[Erasure]:
        """The ``compliance.deletion`` events stored here whose erasure has no tombstone in this
        ledger (stored by a sync that did not apply them), in the order they were produced."""
        done = {(r, bytes(ref)) for r, ref in self.query(
            "SELECT request_id, subject_ref FROM deletion_events WHERE kind = 'erasure' AND topic IS NULL "
            "AND subject_ref IS NOT NULL")}
        cols = ", ".join(TABLES["compliance_deletions"].column_names)
        rows = self.query(f"SELECT {cols} FROM compliance_deletions ORDER BY produced_at, event_id")
        out = []
        for e in deletion_erasures({"compliance_deletions": rows}):
            if (e.request_id, e.subject_ref) not in done:
                done.add((e.request_id, e.subject_ref))
                out.append(e)
        return out

    # ----------------------------------------------------------------- deletion
    def _deleting_transaction(self, work) -> None:
        self._begin()
        try:
            work()
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self._after_deletion()

    def purge(self, now_micros: int | None = None) -> DeletionSummary:
        """Delete every row whose ``retention_expiry`` is before ``now_micros``, in one transaction,
        with evidence per chain range and a tombstone in ``deletion_events``."""
        now = _now_micros() if now_micros is None else now_micros
        before = self._last_deletion_id()
        self._deleting_transaction(lambda: self._purge(now))
        return self._summary_since(before, "retention")

    def erase_subject(self, subject_ref: bytes, request_id: str, requester: str, legal_basis: str) -> DeletionSummary:
        """Delete every row carrying ``subject_ref`` (a 32-byte pseudonym) in one transaction, with a
        tombstone (request id, requester, legal basis, counts) in ``deletion_events``.

        Idempotent per request: when this ledger holds a tombstone for ``request_id`` and this subject
        already, no second one is written and the summary is the first one's (``repeated``); rows of
        the subject stored since (late rows) are deleted, with evidence under the same request id."""
        if len(subject_ref) != 32:
            raise ValueError("subject_ref is the 32-byte HMAC pseudonym of the subject")
        for name, value in (("request_id", request_id), ("requester", requester), ("legal_basis", legal_basis)):
            if not value:
                raise ValueError(f"an erasure needs a {name}")
        before = self._last_deletion_id()
        erasure = Erasure(bytes(subject_ref), request_id, requester, legal_basis)
        self._deleting_transaction(lambda: self._erase(erasure))
        return self._erasure_summary(erasure, before)

    def _erasure_summary(self, erasure: Erasure, before: int) -> DeletionSummary:
        ph = self.ph
        (deletion_id, deleted_at, counts), = self.query(
            f"SELECT deletion_id, deleted_at, counts FROM deletion_events WHERE kind = 'erasure' AND topic IS NULL "
            f"AND request_id = {ph} AND subject_ref = {ph} ORDER BY deletion_id LIMIT 1",
            (erasure.request_id, erasure.subject_ref))
        counts = counts if isinstance(counts, dict) else json.loads(counts or "{}")
        return DeletionSummary("erasure", dict(counts), [e for e in self.evidence() if e.deletion_id > before],
                               repeated=deletion_id <= before, first_deleted_at=deleted_at,
                               request_id=erasure.request_id)

    def _last_deletion_id(self) -> int:
        return self.query("SELECT COALESCE(MAX(deletion_id), 0) FROM deletion_events")[0][0]

    def _summary_since(self, before: int, kind: str) -> DeletionSummary:
        s = DeletionSummary(kind)
        s.evidence = [e for e in self.evidence() if e.deletion_id > before]
        for t in self.tombstones():
            if t["deletion_id"] > before:
                s.counts = {k: v for k, v in t["counts"].items()}
        return s

    # ----------------------------------------------------------------- contents
    def content_hash(self) -> str:
        """SHA-256 over every event row, lineage row, finding and offset, in primary-key order.

        Values are normalized (bytes as hex, JSON re-serialized with sorted keys, booleans as 0/1) so
        the hash does not depend on the backend. Deletion evidence and ingest timestamps are left out.
        """
        h = sha256()
        specs: list[tuple[Table, list[str], str]] = [
            (t, t.column_names, "event_id") for t in EVENT_TABLES]
        specs.append((LINEAGE, LINEAGE.column_names, "policy_update_event_id, idx"))
        specs.append((INTEGRITY_FINDINGS, [c for c in _FINDING_COLS if c != "found_at"],
                      "topic, kafka_partition, kafka_offset, kind"))
        specs.append((INGEST_OFFSETS, INGEST_OFFSETS.column_names, "topic, kafka_partition"))
        for table, cols, order in specs:
            kinds = dict(table.columns)
            h.update(f"\x00{table.name}\x00".encode())
            cur = self._cursor()
            cur.execute(f"SELECT {', '.join(cols)} FROM {table.name} ORDER BY {order}")
            for row in cur:
                h.update(json.dumps([_norm(v, kinds[c]) for c, v in zip(cols, row)], separators=(",", ":"),
                                    sort_keys=True).encode() + b"\n")
        return h.hexdigest()

    def table_counts(self) -> dict[str, int]:
        return {t.name: self.count(t.name) for t in ALL_TABLES}


def _norm(v, kind: str):
    if v is None:
        return None
    if kind == "bytes":
        return bytes(v).hex()
    if kind == "json":
        return json.loads(v) if isinstance(v, (str, bytes)) else v
    if kind == "bool":
        return int(bool(v))
    return v


def _now_micros() -> int:
    return time.time_ns() // 1000


# ======================================================================== SQLite / SQLCipher
_SQLITE_TYPES = {"text": "TEXT", "int": "INTEGER", "real": "REAL", "bool": "INTEGER", "bytes": "BLOB", "json": "TEXT"}
_HEADER_NOT_NULL = {"event_id", "topic", "kafka_partition", "kafka_offset", "chain_id", "seq", "run_id",
                    "event_type", "produced_at", "retention_expiry", "prev_event_hash", "event_hash", "raw"}


def sqlite_ddl() -> list[str]:
    stmts = []
    for t in EVENT_TABLES:
        cols = ",\n  ".join(f"{c} {_SQLITE_TYPES[k]}{' NOT NULL' if c in _HEADER_NOT_NULL else ''}"
                            for c, k in t.columns)
        stmts.append(f"CREATE TABLE IF NOT EXISTS {t.name} (\n  {cols},\n  PRIMARY KEY (event_id)\n)")
        stmts.append(f"CREATE INDEX IF NOT EXISTS {t.name}_chain ON {t.name} (topic, chain_id, seq)")
        stmts.append(f"CREATE INDEX IF NOT EXISTS {t.name}_expiry ON {t.name} (retention_expiry)")
        stmts.append(f"CREATE INDEX IF NOT EXISTS {t.name}_run ON {t.name} (run_id)")
    stmts.append(
        "CREATE TABLE IF NOT EXISTS policy_update_lineage (\n"
        "  policy_update_event_id TEXT NOT NULL REFERENCES policy_updates (event_id) ON DELETE CASCADE,\n"
        "  idx INTEGER NOT NULL, lineage_topic TEXT NOT NULL, lineage_partition INTEGER NOT NULL,\n"
        "  first_offset INTEGER NOT NULL, last_offset INTEGER NOT NULL, chain_id TEXT NOT NULL,\n"
        "  first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, head_event_hash BLOB NOT NULL,\n"
        "  PRIMARY KEY (policy_update_event_id, idx))")
    stmts.append(
        "CREATE TABLE IF NOT EXISTS deletion_events (\n"
        "  deletion_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL CHECK (kind IN ('retention', 'erasure')),\n"
        "  request_id TEXT, requester TEXT, legal_basis TEXT, subject_ref BLOB, deleted_at INTEGER NOT NULL,\n"
        "  cutoff INTEGER, counts TEXT, source_table TEXT, topic TEXT, chain_id TEXT, first_seq INTEGER,\n"
        "  last_seq INTEGER, row_count INTEGER, merkle_root BLOB, prev_hash BLOB, head_hash BLOB)")
    stmts.append(
        "CREATE TABLE IF NOT EXISTS integrity_findings (\n"
        "  finding_id INTEGER PRIMARY KEY AUTOINCREMENT, found_at INTEGER NOT NULL, kind TEXT NOT NULL,\n"
        "  topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, kafka_offset INTEGER NOT NULL, chain_id TEXT,\n"
        "  seq INTEGER, event_id TEXT, detail TEXT NOT NULL)")
    stmts.append(
        "CREATE TABLE IF NOT EXISTS ingest_offsets (\n"
        "  topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,\n"
        "  PRIMARY KEY (topic, kafka_partition))")
    for name in [t.name for t in EVENT_TABLES] + ["policy_update_lineage"]:
        stmts.append(f"CREATE TRIGGER IF NOT EXISTS {name}_append_only_update BEFORE UPDATE ON {name} BEGIN "
                     f"SELECT RAISE(ABORT, 'ledger table {name} is append-only: UPDATE refused'); END")
        # ledger_deletion_allowed() exists only on connections opened by this module, and answers true
        # only inside purge() / erase_subject(): any other DELETE is refused.
        stmts.append(f"CREATE TRIGGER IF NOT EXISTS {name}_append_only_delete BEFORE DELETE ON {name} "
                     f"WHEN NOT ledger_deletion_allowed() BEGIN SELECT RAISE(ABORT, 'ledger table {name} is "
                     f"append-only: DELETE refused outside `marlgrc ledger purge` and erasure'); END")
    for name in ("deletion_events", "integrity_findings"):
        for op in ("UPDATE", "DELETE"):
            stmts.append(f"CREATE TRIGGER IF NOT EXISTS {name}_append_only_{op.lower()} BEFORE {op} ON {name} BEGIN "
                         f"SELECT RAISE(ABORT, 'ledger table {name} is append-only: {op} refused'); END")
    stmts.extend(view_ddl("sqlite"))
    return stmts


def view_ddl(dialect: str) -> list[str]:
    """Analyst views: every table without its restricted columns, and the seeds' analyses."""
    stmts = []
    create = "CREATE VIEW IF NOT EXISTS" if dialect == "sqlite" else "CREATE OR REPLACE VIEW"
    for t in ALL_TABLES:
        cols = ", ".join(c for c in t.column_names if c not in t.restricted)
        stmts.append(f"{create} v_{t.name} AS SELECT {cols} FROM {t.name}")
    stmts.append(f"{create} v_reward_convergence AS SELECT run_id, episode, COUNT(*) AS steps, "
                 f"SUM(team_reward) AS episode_return, AVG(team_reward) AS mean_step_reward "
                 f"FROM joint_actions GROUP BY run_id, episode")
    if dialect == "sqlite":
        share = ("FROM di_credit_assignment d, json_each(d.shares) s",
                 "json_extract(s.value, '$.agent_id')", "json_extract(s.value, '$.credit')")
        metric = ("FROM fairness_metrics f, json_each(f.metrics) m",
                  "json_extract(m.value, '$.name')", "json_extract(m.value, '$.value')")
        domain = ("FROM episode_summaries e, json_each(e.metrics) m",
                  "json_extract(m.value, '$.name')", "json_extract(m.value, '$.value')")
        tier = ("FROM joint_actions j, json_each(j.actions) a",
                "json_extract(a.value, '$.agent_id')", "json_extract(a.value, '$.decision_tier')")
    else:
        share = ("FROM di_credit_assignment d CROSS JOIN LATERAL jsonb_array_elements(d.shares) s(value)",
                 "s.value->>'agent_id'", "(s.value->>'credit')::double precision")
        metric = ("FROM fairness_metrics f CROSS JOIN LATERAL jsonb_array_elements(f.metrics) m(value)",
                  "m.value->>'name'", "(m.value->>'value')::double precision")
        domain = ("FROM episode_summaries e CROSS JOIN LATERAL jsonb_array_elements(e.metrics) m(value)",
                  "m.value->>'name'", "(m.value->>'value')::double precision")
        tier = ("FROM joint_actions j CROSS JOIN LATERAL jsonb_array_elements(j.actions) a(value)",
                "a.value->>'agent_id'", "a.value->>'decision_tier'")
    stmts.append(f"{create} v_credit_per_agent AS SELECT d.run_id AS run_id, d.episode AS episode, "
                 f"{share[1]} AS agent_id, SUM({share[2]}) AS credit, COUNT(*) AS steps, "
                 f"AVG(d.global_reward) AS mean_global_reward {share[0]} GROUP BY d.run_id, d.episode, {share[1]}")
    stmts.append(f"{create} v_fairness_over_time AS SELECT f.run_id AS run_id, f.episode AS episode, "
                 f"f.window_kind AS window_kind, f.window_start AS window_start, f.window_end AS window_end, "
                 f"{metric[1]} AS metric, {metric[2]} AS value {metric[0]}")
    # the env's numeric domain metrics (episode.summary), one row per run, episode and metric
    stmts.append(f"{create} v_episode_metrics AS SELECT e.run_id AS run_id, e.episode AS episode, "
                 f"{domain[1]} AS metric, {domain[2]} AS value {domain[0]}")
    # decisions per tier (joint.action's decision_tier: policy | heuristic | random), per run, episode
    # and agent; 'unknown' for actions written before the field existed
    stmts.append(f"{create} v_decision_tiers AS SELECT j.run_id AS run_id, j.episode AS episode, "
                 f"{tier[1]} AS agent_id, COALESCE(NULLIF({tier[2]}, ''), 'unknown') AS decision_tier, "
                 f"COUNT(*) AS decisions {tier[0]} GROUP BY 1, 2, 3, 4")
    return stmts


PAGE_SIZE = 16384
# SQLCipher settings (name, pragmas after the key), current first. "v2": 16 KiB pages with
# HMAC-SHA256 page authentication (AES-256-CBC as before). On this workload (bench/bench_ledger.py,
# row D) it inserts about 20% faster than SQLCipher 4's defaults: a quarter of the per-page work and
# SHA-256 runs on the CPU's SHA extensions. "sqlcipher4": the defaults (4 KiB pages, HMAC-SHA512),
# for ledgers created before 2026-11-21.
CIPHER_PROFILES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("v2", (f"PRAGMA cipher_page_size = {PAGE_SIZE}", "PRAGMA cipher_hmac_algorithm = HMAC_SHA256")),
    ("sqlcipher4", ()),
)


class SqliteLedger(LedgerStore):
    """The ledger in one SQLCipher file (or, for benchmarks only, a plain SQLite file).

    Opens with ``PRAGMA key`` (a raw 32-byte key from the key provider), checks the key with one
    query, then sets ``secure_delete=ON``, ``foreign_keys=ON`` and WAL. The file is created with
    mode 0600; an existing file readable by others is refused.
    """

    dialect = "sqlite"
    ph = "?"

    def __init__(self, path: Path, key: KeyProvider | None, *, encrypted: bool = True):
        self.path = Path(path)
        self.encrypted = encrypted
        self._deleting = False
        if encrypted and key is None:
            raise LedgerKeyError("an encrypted ledger needs a key: pass --key-file or set MARLGRC_LEDGER_KEY")
        if encrypted:
            from sqlcipher3 import dbapi2 as module
        else:
            module = sqlite3
        self._module = module
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise LedgerError(f"ledger file {self.path} has mode {oct(mode)}; it must be 0600: chmod 600 {self.path}")
        new_file = self.path.stat().st_size == 0
        old_umask = os.umask(0o077)  # the -wal and -shm files too
        try:
            if encrypted:
                raw = key.ledger_key()
                try:
                    # a new ledger gets the current settings; an existing one opens with those it was
                    # created with (tried in order: only the right key and settings pass SQLCipher's check)
                    profiles = CIPHER_PROFILES[:1] if new_file else CIPHER_PROFILES
                    for i, profile in enumerate(profiles):
                        self.conn = module.connect(str(self.path), isolation_level=None, check_same_thread=False)
                        self.conn.execute("PRAGMA cipher_log_level = NONE")  # its own "hmac check failed" lines
                        self.conn.execute(f"PRAGMA key = \"x'{raw.hex()}'\"")
                        for pragma in profile[1]:
                            self.conn.execute(pragma)
                        if self._opens(module, last=i == len(profiles) - 1):
                            self.cipher_profile = profile[0]
                            break
                finally:
                    del raw  # not left in a traceback's frame
            else:
                self.conn = module.connect(str(self.path), isolation_level=None, check_same_thread=False)
                if new_file:
                    self.conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # as the encrypted ledger's pages
                self._opens(module, last=True)
                self.cipher_profile = "none"
            self.conn.create_function("ledger_deletion_allowed", 0, lambda: 1 if self._deleting else 0)
            self.conn.execute("PRAGMA secure_delete = ON")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL loses at most the last transactions on power loss, never consistency; offsets
            # live in the same transactions, so those events are simply read again.
            self.conn.execute("PRAGMA synchronous = NORMAL")
            # 64 MiB of page cache (default 2 MiB): index pages stay decrypted in memory instead of
            # being read back and decrypted again on every insert of a long sync
            self.conn.execute("PRAGMA cache_size = -65536")
            self._install()
        finally:
            os.umask(old_umask)
        self._pending: PendingWrite | None = None

    def _opens(self, module, *, last: bool) -> bool:
        """Whether the connection reads the file (key and settings right); raises on the last try."""
        try:
            self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return True
        except module.DatabaseError as exc:
            self.conn.close()
            if not last and "not a database" in str(exc):
                return False
            if "not a database" in str(exc):
                raise LedgerKeyError(
                    f"cannot open ledger {self.path}: the key does not decrypt it (SQLCipher: file is not a "
                    f"database). Use the key this ledger was created with (--key-file or MARLGRC_LEDGER_KEY)"
                    f"{'' if self.encrypted else ', or open it as an encrypted ledger'}") from None
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from None

    def _install(self) -> None:
        self._begin()
        for stmt in sqlite_ddl():
            self.conn.execute(stmt)
        self._commit()

    def _begin(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def _rollback(self):
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def write(self, rows, offsets, findings=(), *, erasures=(), commit=True):
        try:
            return super().write(rows, offsets, findings, erasures=erasures, commit=commit)
        except self._module.Error as exc:
            raise self._refused(exc, "") from None

    def begin_write(self, rows, offsets, findings=(), *, erasures=()):
        self._pending = super().begin_write(rows, offsets, findings, erasures=erasures)
        return self._pending

    def commit(self):
        try:
            super().commit()
        except self._module.Error as exc:
            raise self._refused(exc, " at commit") from None

    def explain(self, exc):
        if isinstance(exc, self._module.Error):
            return f"ledger {self.path}: {exc}"
        return None

    def _refused(self, exc: Exception, where: str) -> LedgerError:
        if isinstance(exc, self._module.IntegrityError):
            return LedgerError(f"ledger {self.path} refused a batch{where}: {exc}")
        return LedgerError(f"ledger {self.path}: writing a batch failed{where}: {exc}; it was rolled back, and "
                           f"the next sync continues from the stored offsets")

    def _delete_ranges(self, kind: str, tables: Iterable[str], where: str, args: tuple, *, request_id: str | None,
                       requester: str | None, legal_basis: str | None, subject_ref: bytes | None,
                       cutoff: int | None, deleted_at: int) -> dict[str, int]:
        """Inside an open transaction: one evidence row per contiguous seq range of each chain whose
        rows match ``where``, then delete them; the rows deleted per table."""
        cur = self.conn.cursor()
        counts: dict[str, int] = {}
        for name in tables:
            rows = cur.execute(f"SELECT topic, chain_id, seq, event_hash, prev_event_hash FROM {name} "
                               f"WHERE {where} ORDER BY topic, chain_id, seq", args).fetchall()
            if not rows:
                counts[name] = 0
                continue
            for rng in contiguous_ranges(rows):
                cur.execute(
                    "INSERT INTO deletion_events (kind, request_id, requester, legal_basis, subject_ref, "
                    "deleted_at, cutoff, source_table, topic, chain_id, first_seq, last_seq, row_count, "
                    "merkle_root, prev_hash, head_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (kind, request_id, requester, legal_basis, subject_ref, deleted_at, cutoff, name, rng[0][0],
                     rng[0][1], rng[0][2], rng[-1][2], len(rng), merkle_root([bytes(r[3]) for r in rng]),
                     bytes(rng[0][4]), bytes(rng[-1][3])))
            self._deleting = True
            try:
                counts[name] = cur.execute(f"DELETE FROM {name} WHERE {where}", args).rowcount
            finally:
                self._deleting = False
        return counts

    def _tombstone(self, kind: str, request_id: str | None, requester: str | None, legal_basis: str | None,
                   subject_ref: bytes | None, cutoff: int | None, deleted_at: int, counts: dict[str, int]) -> None:
        self.conn.execute(
            "INSERT INTO deletion_events (kind, request_id, requester, legal_basis, subject_ref, deleted_at, "
            "cutoff, counts) VALUES (?,?,?,?,?,?,?,?)",
            (kind, request_id, requester, legal_basis, subject_ref, deleted_at, cutoff,
             json.dumps(counts, sort_keys=True)))

    def _purge(self, cutoff):
        counts = self._delete_ranges("retention", DELETABLE, "retention_expiry < ?", (cutoff,), request_id=None,
                                     requester=None, legal_basis=None, subject_ref=None, cutoff=cutoff,
                                     deleted_at=cutoff)
        self._tombstone("retention", None, None, None, None, cutoff, cutoff, counts)

    def _erase(self, erasure):
        e, now = erasure, _now_micros()
        applied = self.conn.execute(
            "SELECT 1 FROM deletion_events WHERE kind = 'erasure' AND topic IS NULL AND request_id = ? "
            "AND subject_ref = ? LIMIT 1", (e.request_id, e.subject_ref)).fetchone() is not None
        where, args = "instr(subject_refs, ?) > 0", (e.subject_ref.hex(),)
        if e.event_ids is not None:
            where, args = where + " AND event_id IN (SELECT value FROM json_each(?))", args + (json.dumps(e.event_ids),)
        counts = self._delete_ranges("erasure", SUBJECT_TABLES, where, args, request_id=e.request_id,
                                     requester=e.requester, legal_basis=e.legal_basis, subject_ref=e.subject_ref,
                                     cutoff=None, deleted_at=now)
        if not applied:
            self._tombstone("erasure", e.request_id, e.requester, e.legal_basis, e.subject_ref, None, now, counts)
        return counts

    def _after_deletion(self):
        # erased pages must not linger in the WAL either (secure_delete zeroes them in the main file)
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def checkpoint(self) -> None:
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.wait()  # its thread uses the connection: let it end first
            except Exception:  # noqa: BLE001 - rolled back; the caller that started it hears of it
                pass
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing twice is harmless
            pass


def drop_sqlite(path: Path) -> None:
    """Remove a ledger file and its WAL and shared-memory files (``marlgrc ledger rebuild``)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.unlink()

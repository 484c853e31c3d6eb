"""The auditor's verifier: hash chains, signed checkpoints and trusted state (docs/HASHING.md).

Compute, then compare: each event's hash is recomputed from its bytes and compared with the hash it
carries and with the next event's link; each checkpoint's Merkle root is recomputed from the events
and compared with the signed one. The first break of each chain is named by kind and location.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .checkpoint import CheckpointStatement, key_id, signature_valid
from .codec import DecodeError, ZERO_HASH, Codec, default_codec
from .chain import LOW14, UVARINT14, long_bytes
from .hashing import MIN_EVENT_LEN, PREV_END, PREV_START, seq_and_chain
from .kafka import Record
from .merkle import root_from_leaves

CHECKPOINT_TOPIC = "marl.audit.checkpoints"
LIFECYCLE_TOPIC = "marl.run.lifecycle"
_LOOKAHEAD = 64      # records kept after a break to classify it
_CHUNK = 2048        # records accepted per call of ``accept_chain``; the last two chunks classify a break


def accept_chain(values: list[bytes], prev: bytes, next_seq: int, leaves: list[bytes] | None) -> tuple[int, bytes]:
    """The verifier's hot loop: accept the longest prefix of a chain's next ``values`` in which each
    event's SHA-256(value[:-32]) equals value[-32:], value[10:42] links to the previous hash (the
    first to ``prev``) and its seq is the one expected (the first ``next_seq``, then one more each).
    Appends each accepted event's Merkle leaf to ``leaves`` (a list, or None). Returns (number
    accepted, hash of the last accepted).

    A varint is prefix-free, so ``value.startswith(long_bytes(seq), 42)`` holds exactly when the
    event's seq is written as the chain writer writes ``seq`` (the expression in the loop is
    ``long_bytes`` for seqs below 2**27, inline)."""
    last, seq = prev, next_seq
    uv, low = UVARINT14, LOW14
    for v in values:
        z = seq << 1
        if (len(v) < MIN_EVENT_LEN or v[PREV_START:PREV_END] != last
                or not v.startswith(uv[z] if z < 16384 else low[z & 0x3FFF] + uv[z >> 14] if z < 268435456
                                    else long_bytes(seq), PREV_END)):
            break
        h = sha256(v[:-32]).digest()
        if h != v[-32:]:
            break
        if leaves is not None:
            leaves.append(sha256(b"\x00" + h).digest())
        last = h
        seq += 1
    return seq - next_seq, last




class BreakKind(str, Enum):
    EDITED = "edited"
    MISSING = "missing"
    REORDERED = "reordered"
    DUPLICATED = "duplicated"
    INSERTED = "inserted"
    TRUNCATED = "truncated_after_checkpoint"
    BAD_SIGNATURE = "bad_signature"
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"      # chain differs from its signed checkpoint (rewritten)
    INCONSISTENT = "inconsistent_with_trusted"       # history does not extend the trusted checkpoint
    WRONG_KEY = "wrong_key"                          # an event found under a Kafka key that is not its chain id
    UNSIGNED = "unsigned"                            # events no signed checkpoint covers (a finished run, or required)


@dataclass(frozen=True)
class Break:
    kind: BreakKind
    topic: str
    chain_id: str
    partition: int
    offset: int
    seq: int
    detail: str

    def describe(self) -> str:
        return (f"{self.kind.value} in {self.topic} chain {self.chain_id} at partition {self.partition} "
                f"offset {self.offset} seq {self.seq}: {self.detail}")


@dataclass
class ChainReport:
    topic: str
    chain_id: str
    events: int = 0
    last_seq: int = -1
    head_hash: str = ZERO_HASH.hex()
    checkpoints_verified: int = 0
    signed_through_seq: int = -1
    first_break: Break | None = None

    @property
    def unsigned(self) -> int:
        """Events after the last one a signed checkpoint covers."""
        return self.last_seq - self.signed_through_seq


@dataclass
class Report:
    chains: list[ChainReport]
    notes: list[str] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(c.events for c in self.chains)

    @property
    def breaks(self) -> list[Break]:
        return [c.first_break for c in self.chains if c.first_break is not None]

    @property
    def ok(self) -> bool:
        return not self.breaks

    def to_json(self) -> str:
        def enc(o):
            if isinstance(o, Enum):
                return o.value
            raise TypeError(type(o))
        return json.dumps({"ok": self.ok, "events": self.events, "notes": self.notes,
                           "chains": [asdict(c) for c in self.chains]}, default=enc, indent=2)


class TrustedStateError(ValueError):
    """A trusted-state file (``--trusted``) that cannot be read as one; the message names what failed."""


_TRUSTED_REMEDY = ("it is written by `marlgrc verify --trusted FILE`; restore your own copy of it (a file you "
                   "did not keep cannot be trusted), or verify without --trusted to start a new one")


@dataclass
class TrustedState:
    """What an auditor verified last time: per chain, (last_seq, head hash) of its last checkpoint."""

    heads: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "TrustedState":
        """The state ``save`` wrote (none yet: empty). Raises ``TrustedStateError`` naming what is
        wrong with a file that is not one."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise TrustedStateError(f"cannot read trusted state {path} ({exc.strerror or exc})") from None
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested past the reader's limit
            raise TrustedStateError(f"trusted state {path} is not JSON ({type(exc).__name__}); {_TRUSTED_REMEDY}") from None
        heads: dict[tuple[str, str], tuple[int, bytes]] = {}
        chains = data.get("chains") if isinstance(data, dict) else None
        if not isinstance(chains, list):
            raise TrustedStateError(f"trusted state {path} has no list \"chains\"; {_TRUSTED_REMEDY}")
        for i, c in enumerate(chains):
            ok = (isinstance(c, dict) and isinstance(c.get("topic"), str) and isinstance(c.get("chain_id"), str)
                  and type(c.get("last_seq")) is int and c["last_seq"] >= 0 and isinstance(c.get("head_event_hash"), str))
            try:
                head = bytes.fromhex(c["head_event_hash"]) if ok else b""
            except ValueError:
                head = b""
            if len(head) != 32:
                raise TrustedStateError(f"trusted state {path}: chains[{i}] is not a chain head (topic, chain_id, "
                                        f"last_seq >= 0 and a 64-hex-digit head_event_hash); {_TRUSTED_REMEDY}")
            heads[(c["topic"], c["chain_id"])] = (c["last_seq"], head)
        return cls(heads)

    def save(self, path: Path) -> None:
        rows = [{"topic": t, "chain_id": c, "last_seq": s, "head_event_hash": h.hex()}
                for (t, c), (s, h) in sorted(self.heads.items())]
        Path(path).write_text(json.dumps({"chains": rows}, indent=2) + "\n")


@dataclass
class _Chain:
    topic: str
    chain_id: str
    next_seq: int = 0
    last_hash: bytes = ZERO_HASH
    last_partition: int = -1
    last_offset: int = -1
    count: int = 0
    # the last accepted chunks (first seq, records), to classify a break against recent events
    tails: list = field(default_factory=list)
    # checkpoint ranges, sorted; Merkle leaves of accepted events from seq leaves_base on
    checkpoints: list = field(default_factory=list)
    cp_index: int = 0
    loc_index: int = 0
    range_starts: dict = field(default_factory=dict)
    leaves: list = field(default_factory=list)
    leaves_base: int = 0
    checkpoints_verified: int = 0
    signed_through: int = -1
    trusted: tuple | None = None
    resumed: bool = False       # continued past a range removed with evidence (``resume``)
    self_signed: set = field(default_factory=set)  # seqs of checkpoint events that sign this chain's range before them
    broken: Break | None = None
    suspect: Record | None = None
    lookahead: list = field(default_factory=list)
    key_checked: bool = False   # the first event read under this key names this chain


class Verifier:
    """Feeds records (any interleaving of chains, each chain in offset order) and reports.

    Use: ``add_checkpoints(records of marl.audit.checkpoints)`` first, then ``feed(data records)``,
    then ``finish()``. Without a public key, checkpoint signatures cannot be checked and the report
    says so.

    Events after the last signed checkpoint of their chain are ``unsigned``: a break where
    ``require_signed``, or where their run has finished (a ``run.finished`` event was read) and a
    public key was given (every writer signs its chains when it closes); else a note.

    ``topics``: the topics the caller reads (default: all). A checkpoint of a chain on another topic
    is not held against it (no "truncated" chain that was simply not read); the report notes it.
    """

    def __init__(self, public_key: Ed25519PublicKey | None = None, trusted: TrustedState | None = None,
                 codec: Codec | None = None, *, require_signed: bool = False, topics: Iterable[str] | None = None):
        self.public_key = public_key
        self.require_signed = require_signed
        # the topics being read (None: all): checkpoints of chains elsewhere cannot be checked here
        self.topics = None if topics is None else frozenset(topics) | {CHECKPOINT_TOPIC}
        self._finished_runs: set[str] = set()
        self.key_id = key_id(public_key) if public_key is not None else None
        self.trusted = trusted or TrustedState()
        self.codec = codec or default_codec()
        self._chains: dict[tuple[str, str], _Chain] = {}
        self._pending_cps: dict[tuple[str, str], list[tuple[CheckpointStatement, Record]]] = {}
        self._mbufs: dict[str, dict[bytes, tuple[list, list]]] = {}  # topic -> key -> (messages, values)
        self._mchain: dict[tuple[str, bytes], _Chain] = {}
        # checkpoint events that sign their own chain up to the event before them
        self._self_signed: dict[tuple[str, str], set[int]] = {}
        self.notes: list[str] = []

    # --- checkpoints -------------------------------------------------------------------------
    def add_checkpoints(self, records: Iterable[Record]) -> None:
        """Check each checkpoint's signature and keep its statement, then verify the checkpoint
        chain(s) themselves as chains (a checkpoint chain's own range is signed by a checkpoint on
        it too, written when its writer closes)."""
        records = list(records)
        if self.public_key is None and records:
            self.notes.append("no public key given: checkpoint signatures were NOT checked")
        refused: list[tuple[Record, BreakKind, int, str]] = []
        for r in records:
            try:
                name, rec = self.codec.decode(r.value)
            except DecodeError as exc:
                refused.append((r, BreakKind.EDITED, -1, f"checkpoint does not decode: {exc}"))
                continue
            if name != "audit_checkpoint":
                continue
            stmt = CheckpointStatement.from_record(rec)
            if self.public_key is not None:
                if rec["signer_key_id"] != self.key_id:
                    refused.append((r, BreakKind.BAD_SIGNATURE, rec["seq"],
                                    f"signed by key {rec['signer_key_id'].hex()[:16]}…, not the trusted key "
                                    f"{self.key_id.hex()[:16]}…"))
                    continue
                if not signature_valid(self.public_key, stmt, rec["signature"]):
                    refused.append((r, BreakKind.BAD_SIGNATURE, rec["seq"],
                                    f"Ed25519 signature does not verify for {stmt.topic} {stmt.chain_id} "
                                    f"seq {stmt.first_seq}..{stmt.last_seq}"))
                    continue
            self._pending_cps.setdefault((stmt.topic, stmt.chain_id), []).append((stmt, r))
            if (stmt.topic, stmt.chain_id) == (r.topic, r.key) and rec["seq"] == stmt.last_seq + 1:
                self._self_signed.setdefault((r.topic, r.key), set()).add(rec["seq"])
        self.feed(records)
        for r, kind, seq, detail in refused:
            self._break_at(self._chains[(r.topic, r.key)], kind, r, seq, detail)

    def _chain_of(self, r: Record) -> _Chain:
        """The chain a record was read from, started if this is its first record."""
        return self._chains.get((r.topic, r.key)) or self._new_chain(r.topic, r.key)

    def _install_checkpoints(self, st: _Chain) -> None:
        cps = sorted(self._pending_cps.pop((st.topic, st.chain_id), []), key=lambda x: x[0].first_seq)
        prev: CheckpointStatement | None = None
        good = []
        for stmt, r in cps:
            if prev is not None and (stmt.first_seq != prev.last_seq + 1 or stmt.prev_head_hash != prev.head_event_hash):
                cst = self._chain_of(r)  # the checkpoint's own chain (maybe not read yet)
                self._break_at(cst, BreakKind.INCONSISTENT, r, -1,
                               f"checkpoint {stmt.first_seq}..{stmt.last_seq} of {stmt.topic} {stmt.chain_id} does "
                               f"not extend the previous one ({prev.first_seq}..{prev.last_seq})")
                break
            trusted = self.trusted.heads.get((st.topic, st.chain_id))
            if trusted is not None and stmt.last_seq == trusted[0] and stmt.head_event_hash != trusted[1]:
                cst = self._chain_of(r)  # the checkpoint's own chain (maybe not read yet)
                self._break_at(cst, BreakKind.INCONSISTENT, r, -1,
                               f"checkpoint head at seq {trusted[0]} is {stmt.head_event_hash.hex()[:16]}…, the "
                               f"trusted state says {trusted[1].hex()[:16]}…: history was rewritten or forked")
                break
            good.append(stmt)
            prev = stmt
        st.checkpoints = good

    # --- data --------------------------------------------------------------------------------
    def _new_chain(self, topic: str, chain_id: str) -> _Chain:
        st = _Chain(topic, chain_id)
        st.trusted = self.trusted.heads.get((topic, chain_id))
        st.self_signed = self._self_signed.get((topic, chain_id), set())
        self._chains[(topic, chain_id)] = st
        self._install_checkpoints(st)
        return st

    def resume(self, topic: str, chain_id: str, next_seq: int, last_hash: bytes) -> int:
        """Continue a chain at ``next_seq`` linked to ``last_hash``, past a range removed with
        evidence (the ledger's purge and erasure). Checkpoints overlapping the skipped seqs cannot be
        recomputed; they are skipped, and their number returned. A skipped checkpoint's signature was
        checked (with the checkpoint chain), so the chain counts as signed through it; its Merkle root
        is not, so the events after the gap in its range are not proven by it (a caller reports the
        skipped checkpoints as spanning deleted ranges). Requires next_seq >= the chain's."""
        st = self._chains.get((topic, chain_id)) or self._new_chain(topic, chain_id)
        if next_seq < st.next_seq:
            raise ValueError(f"cannot resume {topic} {chain_id} at seq {next_seq}: already at {st.next_seq}")
        st.next_seq, st.last_hash = next_seq, last_hash
        st.resumed = True
        skipped = 0
        while st.cp_index < len(st.checkpoints) and st.checkpoints[st.cp_index].first_seq < next_seq:
            st.signed_through = max(st.signed_through, st.checkpoints[st.cp_index].last_seq)
            st.cp_index += 1
            skipped += 1
        st.loc_index = max(st.loc_index, st.cp_index)
        st.leaves = []
        st.leaves_base = next_seq
        st.tails = []
        return skipped

    def expects(self, topic: str, chain_id: str) -> tuple[int, bytes, bool]:
        """(next seq, last hash, already broken) of a chain."""
        st = self._chains.get((topic, chain_id))
        if st is None:
            return 0, ZERO_HASH, False
        return st.next_seq, st.last_hash, st.broken is not None

    def feed(self, records: Iterable[Record]) -> None:
        """Buffer records per chain and accept them in chunks through the fast path."""
        bufs: dict[tuple[str, str], list[Record]] = {}
        for r in records:
            key = (r.topic, r.key)
            b = bufs.get(key)
            if b is None:
                b = bufs[key] = []
                if key not in self._chains:
                    self._new_chain(r.topic, r.key)
            b.append(r)
            if len(b) >= _CHUNK:
                self._flush(self._chains[key], b)
                bufs[key] = []
        for key, b in bufs.items():
            if b:
                self._flush(self._chains[key], b)

    def feed_runs(self, records: Iterable[Record]) -> None:
        """Like ``feed``, for records that come a chain at a time (a bundle stores them so): each run
        of one chain's records is accepted in one call."""
        for key, run in itertools.groupby(records, key=lambda r: (r.topic, r.key)):
            st = self._chains.get(key) or self._new_chain(*key)
            self._flush(st, list(run))

    def feed_entries(self, entries: Iterable[dict], to_record: Callable[[dict], Record]) -> int:
        """Like ``feed_runs``, for a bundle's entries as fastavro reads them (dicts with topic, key
        and value): only the few entries a report or a break needs become Records (``to_record``).
        Returns the number of entries read."""
        run: list[dict] = []
        key = None
        n = 0
        for e in entries:
            k = (e["topic"], e["key"])
            if k != key:
                if run:
                    n += len(run)
                    self._flush_run(key, run, to_record)
                run, key = [], k
            run.append(e)
            if len(run) >= _CHUNK:
                n += len(run)
                self._flush_run(key, run, to_record)
                run = []
        if run:
            self._flush_run(key, run, to_record)
        return n + len(run)

    def _flush_run(self, key: tuple[str, str], run: list[dict], to_record) -> None:
        st = self._chains.get(key) or self._new_chain(*key)
        self._flush(st, run, to_record, [e["value"] for e in run])

    def feed_messages(self, msgs: list, prefix: str = "") -> None:
        """Like ``feed``, for a batch of confluent-kafka Messages: the Kafka reader's hot path, which
        turns into a Record only the few messages a report or a break needs."""
        bufs = self._mbufs
        for m in msgs:
            if m.error() is not None:
                raise RuntimeError(f"Kafka error while reading: {m.error()}")
            topic, key = m.topic(), m.key()
            by_key = bufs.get(topic)
            entry = None if by_key is None else by_key.get(key)
            if entry is None:
                name, chain = topic[len(prefix):], (key or b"").decode("utf-8", "backslashreplace")
                self._mchain[(topic, key)] = self._chains.get((name, chain)) or self._new_chain(name, chain)
                entry = bufs.setdefault(topic, {})[key] = ([], [])
            ms, vs = entry
            ms.append(m)
            vs.append(m.value())
            if len(ms) >= _CHUNK:
                bufs[topic][key] = ([], [])
                self._flush(self._mchain[(topic, key)], ms, self._conv(prefix), vs)

    def flush_messages(self, prefix: str = "") -> None:
        for topic, keys in self._mbufs.items():
            for key, (ms, vs) in keys.items():
                if ms:
                    self._flush(self._mchain[(topic, key)], ms, self._conv(prefix), vs)
        self._mbufs.clear()

    @staticmethod
    def _conv(prefix: str):
        n = len(prefix)
        return lambda m: Record(m.topic()[n:], m.partition(), m.offset(),
                                (m.key() or b"").decode("utf-8", "backslashreplace"), m.value(), m.timestamp()[1])

    def _flush(self, st: _Chain, items: list, conv=None, values: list | None = None) -> None:
        """Accept the longest valid prefix of a chain's next ``items`` (Records, or Messages with
        ``conv`` to turn one into a Record; ``values``: their values, if already taken) in one call
        of ``accept_chain``; a break stops the chain."""
        rec = conv or (lambda x: x)
        if st.broken is not None:
            if st.suspect is not None and len(st.lookahead) < _LOOKAHEAD:
                st.lookahead.extend(rec(x) for x in items[:_LOOKAHEAD - len(st.lookahead)])
            return
        first = st.next_seq
        want_leaves = st.cp_index < len(st.checkpoints)
        if values is None:
            values = [x.value for x in items] if conv is None else [x.value() for x in items]
        if not st.key_checked and values:
            # events are grouped by Kafka key: the first under a key must name that chain (later ones
            # must link to it, which the chain check sees), else a valid event copied under another
            # key would pass as a chain of its own
            st.key_checked = True
            try:
                named = seq_and_chain(values[0])[1]
            except (ValueError, UnicodeDecodeError, TypeError):
                named = st.chain_id  # unreadable: the hash check below reports it
            if named != st.chain_id:
                self._break_at(st, BreakKind.WRONG_KEY, rec(items[0]), _seq_or(values[0], first),
                               f"the event names chain {named!r} but was found under key {st.chain_id!r}")
                return
        try:
            n, last = accept_chain(values, st.last_hash, first, st.leaves if want_leaves else None)
        except TypeError:  # a value that is not bytes (a tombstone): accept nothing, classify below
            n, last = 0, st.last_hash
        if n:
            st.next_seq = first + n
            st.count += n
            st.last_hash = last
            lr = rec(items[n - 1])
            st.last_partition, st.last_offset = lr.partition, lr.offset
            st.tails = st.tails[-1:] + [(first, items[:n], rec)]
            if want_leaves:
                self._settle_checkpoints(st, first, items, values, rec)
            if st.topic == LIFECYCLE_TOPIC:
                self._note_finished(values[:n])
            t = st.trusted
            if t is not None and first <= t[0] < first + n and values[t[0] - first][-32:] != t[1]:
                self._break_at(st, BreakKind.INCONSISTENT, rec(items[t[0] - first]), t[0],
                               "event at the trusted head's seq differs from the trusted head hash")
        if n < len(items) and st.broken is None:
            r = rec(items[n])
            v = r.value
            if v is None or len(v) < MIN_EVENT_LEN or sha256(v[:-32]).digest() != v[-32:]:
                self._break_at(st, BreakKind.EDITED, r, _seq_or(v or b"", st.next_seq),
                               "event_hash does not match SHA-256 of the event's bytes")
            else:
                st.broken = Break(BreakKind.EDITED, st.topic, st.chain_id, r.partition, r.offset, -1, "pending")
                st.suspect = r
                st.lookahead = [rec(x) for x in items[n + 1:n + 1 + _LOOKAHEAD]]

    def _note_finished(self, values: list[bytes]) -> None:
        for v in values:
            try:
                _, rec = self.codec.decode(v)
            except DecodeError:
                continue  # hashes and links hold, so the writer wrote it so; a reader reports it
            if rec["event_type"] == "run.finished":
                self._finished_runs.add(rec["run_id"])

    def _settle_checkpoints(self, st: _Chain, first: int, items: list, values: list[bytes], rec) -> None:
        """Compare every checkpoint range completed by the accepted events with its signed root."""
        end = st.next_seq
        cps = st.checkpoints
        while st.loc_index < len(cps) and cps[st.loc_index].first_seq < end:
            cp = cps[st.loc_index]
            if cp.first_seq >= first:
                r = rec(items[cp.first_seq - first])
                st.range_starts[cp.first_seq] = (r.partition, r.offset)
            st.loc_index += 1
        while st.cp_index < len(cps) and cps[st.cp_index].last_seq < end:
            cp = cps[st.cp_index]
            st.cp_index += 1
            if cp.first_seq < st.leaves_base:
                continue  # range began before the events we read (a partial replay): cannot check it
            start = cp.first_seq - st.leaves_base
            root = root_from_leaves(st.leaves[start:start + cp.last_seq - cp.first_seq + 1])
            head = values[cp.last_seq - first][-32:] if cp.last_seq >= first else None
            if root != cp.merkle_root or (head is not None and head != cp.head_event_hash):
                p, o = st.range_starts.get(cp.first_seq, (st.last_partition, st.last_offset))
                st.broken = Break(BreakKind.CHECKPOINT_MISMATCH, st.topic, st.chain_id, p, o, cp.first_seq,
                                  f"events seq {cp.first_seq}..{cp.last_seq} have Merkle root {root.hex()[:16]}…; "
                                  f"the signed checkpoint says {cp.merkle_root.hex()[:16]}… (chain rewritten)")
                return
            st.checkpoints_verified += 1
            st.signed_through = cp.last_seq
        keep_from = cps[st.cp_index].first_seq if st.cp_index < len(cps) else end
        drop = max(0, min(keep_from, end) - st.leaves_base)
        if drop:
            del st.leaves[:drop]
            st.leaves_base += drop

    def _break_at(self, st: _Chain, kind: BreakKind, r: Record, seq: int, detail: str) -> None:
        if st.broken is None or st.suspect is not None:
            st.broken = Break(kind, st.topic, st.chain_id, r.partition, r.offset, seq, detail)
            st.suspect = None

    # --- classification ----------------------------------------------------------------------
    def _classify(self, st: _Chain) -> Break:
        x = st.suspect
        g = st.next_seq - 1
        hg = st.last_hash
        xv = x.value
        xh = bytes(xv[-32:])
        xp = bytes(xv[PREV_START:PREV_END])
        try:
            xs, xchain = seq_and_chain(xv)
        except (ValueError, UnicodeDecodeError):
            return Break(BreakKind.EDITED, st.topic, st.chain_id, x.partition, x.offset, g + 1, "header unreadable")

        def at(kind, rec, seq, detail):
            return Break(kind, st.topic, st.chain_id, rec.partition, rec.offset, seq, detail)

        recent_base = st.tails[0][0] if st.tails else 0
        recent = [(r.value[-32:], r.partition, r.offset) for _, chunk, rec in st.tails for r in map(rec, chunk)]
        if xh in {e[0] for e in recent}:
            return at(BreakKind.DUPLICATED, x, xs, f"the event with seq {xs} appears again after seq {g}")
        if xp == hg:  # linked where it should be: only its seq is wrong
            return self._classify_seq(st, x, xs, g + 1)
        y = st.lookahead[0] if st.lookahead else None
        x_is_linked = any(r.value[PREV_START:PREV_END] == xh for r in st.lookahead)
        if y is not None and y.value[PREV_START:PREV_END] == hg and _seq_or(y.value, -1) == g + 1:
            if x_is_linked:
                return at(BreakKind.REORDERED, x, xs, f"seq {xs} arrives before seq {g + 1}")
            return at(BreakKind.INSERTED, x, xs, f"an event (seq {xs}) that the chain does not link through "
                                                 f"stands between seq {g} and seq {g + 1}")
        y_links_x = y is not None and y.value[PREV_START:PREV_END] == xh
        if xs == g + 1:
            if y_links_x and recent:
                _, p, o = recent[-1]
                return Break(BreakKind.EDITED, st.topic, st.chain_id, p, o, g,
                             f"seq {g} was changed and re-hashed: seq {g + 1} links to a different hash")
            return at(BreakKind.EDITED, x, xs, f"link to seq {g} does not match")
        if xs > g + 1:
            later = any(_seq_or(r.value, -1) == g + 1 for r in st.lookahead)
            if later:
                return at(BreakKind.REORDERED, x, xs, f"seq {xs} arrives before seq {g + 1}")
            return at(BreakKind.MISSING, x, g + 1, f"seq {g + 1}..{xs - 1} missing before seq {xs}")
        # xs <= g: a second event for a seq already accepted: a fork
        i = xs - 1 - recent_base
        if y_links_x and 0 <= i < len(recent) and recent[i][0] == xp:
            _, p, o = recent[i + 1] if i + 1 < len(recent) else (None, x.partition, x.offset)
            return Break(BreakKind.INSERTED, st.topic, st.chain_id, p, o, xs,
                         f"seq {xs} was accepted, but the chain continues from another event with seq {xs}")
        return at(BreakKind.REORDERED, x, xs, f"seq {xs} arrives after seq {g}")

    @staticmethod
    def _classify_seq(st: _Chain, x: Record, xs: int, want: int) -> Break:
        """An event that hashes right and links to the previous one but does not carry the seq after
        it (HASHING.md §3: seq starts at 0 and grows by 1)."""
        def at(kind, seq, detail):
            return Break(kind, st.topic, st.chain_id, x.partition, x.offset, seq, detail)

        if xs > want:
            if any(_seq_or(r.value, -1) == want for r in st.lookahead):
                return at(BreakKind.REORDERED, xs, f"seq {xs} arrives before seq {want}")
            return at(BreakKind.MISSING, want, f"seq {want}..{xs - 1} missing before seq {xs} (the hash links "
                                               f"are intact: the chain was written without them)")
        if xs < want:
            return at(BreakKind.DUPLICATED, xs, f"seq {xs} appears again after seq {want - 1}")
        return at(BreakKind.EDITED, xs, f"seq {xs} is not written as the chain writer writes it (zigzag varint)")

    def finish(self) -> Report:
        """The report on everything fed so far (``feed`` may go on after it: a reader that trains
        batch after batch asks after each)."""
        notes = list(self.notes)
        unread = sorted({t for t, _ in self._pending_cps if self.topics is not None and t not in self.topics})
        if unread:
            notes.append(f"checkpoints of chains on topics that were not read were not checked: {', '.join(unread)}")
        for topic, chain_id in list(self._pending_cps):
            if self.topics is None or topic in self.topics:
                self._new_chain(topic, chain_id)  # checkpoints of chains of which no event was read
        reports = []
        for st in self._chains.values():
            if st.broken is not None and st.suspect is not None:
                st.broken = self._classify(st)
                st.suspect = None
            # breaks found at the end are reported, not kept: more events may still be fed
            brk, last = st.broken, st.next_seq - 1
            if brk is None and st.cp_index < len(st.checkpoints):
                brk = Break(BreakKind.TRUNCATED, st.topic, st.chain_id, st.last_partition, st.last_offset + 1,
                            st.next_seq, f"chain ends at seq {last}; a signed checkpoint covers up to seq "
                                         f"{st.checkpoints[-1].last_seq}")
            if brk is None and st.trusted is not None and last < st.trusted[0]:
                brk = Break(BreakKind.TRUNCATED, st.topic, st.chain_id, st.last_partition, st.last_offset + 1,
                            st.next_seq, f"chain ends at seq {last}; the trusted state has seq {st.trusted[0]}")
            # the checkpoint event that signs its own chain up to itself counts as signed
            signed = st.signed_through + (st.signed_through + 1 in st.self_signed)
            if st.checkpoints and st.checkpoints[0].first_seq > 0 and not st.resumed:
                signed = -1  # signed from the start or not at all: nothing signs the events before the first range
            if brk is None and last > signed:
                what = f"events seq {signed + 1}..{last} are not covered by any signed checkpoint"
                if signed < 0 < st.checkpoints[0].first_seq if st.checkpoints else False:
                    what += f" (the first checkpoint of the chain starts at seq {st.checkpoints[0].first_seq})"
                run = st.chain_id.split(":", 1)[0]
                if self.require_signed or (self.public_key is not None and run in self._finished_runs):
                    why = "signatures are required" if self.require_signed else f"run {run} has finished"
                    brk = Break(BreakKind.UNSIGNED, st.topic, st.chain_id, st.last_partition, st.last_offset,
                                signed + 1, f"{what} ({why}): anyone with write access could have rewritten or "
                                            f"appended them")
                else:
                    notes.append(f"{st.topic} {st.chain_id}: {what}")
            reports.append(ChainReport(st.topic, st.chain_id, st.count, last, st.last_hash.hex(),
                                       st.checkpoints_verified, signed, brk))
        reports.sort(key=lambda c: (c.topic, c.chain_id))
        return Report(reports, notes)

    def trusted_after(self) -> TrustedState:
        """Trusted state extended by every checkpoint verified in this run (call after finish)."""
        heads = dict(self.trusted.heads)
        for st in self._chains.values():
            if st.broken is None and st.checkpoints_verified:
                cp = st.checkpoints[st.cp_index - 1]
                heads[(st.topic, st.chain_id)] = (cp.last_seq, cp.head_event_hash)
        return TrustedState(heads)


def _seq_or(value: bytes, default: int) -> int:
    try:
        return seq_and_chain(value)[0]
    except (ValueError, UnicodeDecodeError):
        return default


def split_checkpoints(records: Iterable[Record]) -> tuple[list[Record], Iterator[Record]]:
    recs = list(records)
    return [r for r in recs if r.topic == CHECKPOINT_TOPIC], iter([r for r in recs if r.topic != CHECKPOINT_TOPIC])


def verify_records(records: Iterable[Record], public_key: Ed25519PublicKey | None = None,
                   trusted: TrustedState | None = None) -> Report:
    """Verify an in-memory set of records (checkpoints and data in any order)."""
    cps, data = split_checkpoints(records)
    v = Verifier(public_key, trusted)
    v.add_checkpoints(cps)
    v.feed(data)
    return v.finish()

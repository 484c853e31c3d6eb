"""Privacy primitives at the producer boundary (docs/PRIVACY.md).

- ``subject_ref = HMAC-SHA256(subject_key, namespace || 0x00 || raw_id)``: a pseudonym under a random
  32-byte key per data subject. Without the key it cannot be recomputed from the raw id.
- The key is found through a blind index ``HMAC-SHA256(index_key, namespace || 0x00 || raw_id)``.
- A field an authorized party must read back is AES-256-GCM encrypted under the subject key with
  associated data ``chain_id || 0x00 || seq (8 bytes, big-endian) || field``; stored as
  ``nonce (12) || ciphertext || tag (16)``.
- Erasure shreds the subject's key and its blind-index row; after it the ciphertext cannot be
  decrypted and the pseudonym cannot be recomputed, while hash chains (which cover only pseudonyms
  and ciphertext) still verify.

Raw identifiers are never logged, never put in exception texts and never returned by this module
except by ``FieldProtector.reveal`` to a caller holding the key store.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
import struct
import threading
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Protocol, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_LEN = 12
KEY_LEN = 32
KEYSTORE_KEY_ENV = "MARLGRC_KEYSTORE_KEY"
_IN_BATCH = 500  # blind indexes per SELECT ... IN (...) (SQLite allows 32766 parameters)


class PrivacyError(RuntimeError):
    """A key store or protected field could not be used. Messages never contain raw identifiers."""


class KeyShredded(PrivacyError):
    """The subject's key is gone (erased, or never existed in this key store)."""


class ProtectedValue(NamedTuple):
    """A value about a data subject, as an env hands it to the harness (never leaves the process).

    ``raw_id`` identifies the subject within ``namespace``; ``plaintext`` is what gets encrypted
    under that subject's key as ``field``."""

    namespace: str
    field: str
    raw_id: str
    plaintext: bytes


def _subject_input(namespace: str, raw_id: str) -> bytes:
    if "\x00" in namespace:
        raise PrivacyError("a namespace must not contain NUL")
    return namespace.encode() + b"\x00" + raw_id.encode()


def pseudonym(subject_key: bytes, namespace: str, raw_id: str) -> bytes:
    """``subject_ref``: HMAC-SHA256(subject_key, namespace || 0x00 || raw_id)."""
    return hmac.new(subject_key, _subject_input(namespace, raw_id), sha256).digest()


def blind_index(index_key: bytes, namespace: str, raw_id: str) -> bytes:
    """Where a subject's key is found: HMAC-SHA256(index_key, namespace || 0x00 || raw_id)."""
    return hmac.new(index_key, _subject_input(namespace, raw_id), sha256).digest()


def associated_data(chain_id: str, seq: int, field: str) -> bytes:
    """AES-GCM associated data binding a ciphertext to its event and field."""
    return chain_id.encode() + b"\x00" + struct.pack(">Q", seq) + field.encode()


def encrypt_field(subject_key: bytes, chain_id: str, seq: int, field: str, plaintext: bytes,
                  nonce: bytes | None = None) -> bytes:
    """``nonce || ciphertext || tag`` under AES-256-GCM; ``nonce`` is random unless given (vectors)."""
    nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
    return nonce + AESGCM(subject_key).encrypt(nonce, plaintext, associated_data(chain_id, seq, field))


def decrypt_field(subject_key: bytes, chain_id: str, seq: int, field: str, blob: bytes) -> bytes:
    try:
        return AESGCM(subject_key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], associated_data(chain_id, seq, field))
    except (InvalidTag, ValueError):
        raise PrivacyError(f"field {field!r} of {chain_id} seq {seq} does not decrypt: wrong key, or the "
                           f"ciphertext was moved to another event or field") from None


class KeyProvider(Protocol):
    """Per-subject keys behind a blind index. The local SQLCipher store implements it; a KMS can too."""

    def subject_key(self, namespace: str, raw_id: str, *, create: bool = True) -> bytes | None:
        """The subject's key (created on first use when ``create``); None when there is none."""
        ...

    def key_for_ref(self, namespace: str, subject_ref: bytes) -> bytes | None:
        """The key of the subject whose pseudonym is ``subject_ref``; None when shredded or unknown."""
        ...

    def shred(self, namespace: str, raw_id: str) -> "Shredded | None":
        """Delete the subject's key and blind-index row; None when the subject has no key."""
        ...


@dataclass(frozen=True)
class Shredded:
    """What an erasure removed: the subject's pseudonym (computed before the key went) and row counts."""

    namespace: str
    subject_ref: bytes
    keys_deleted: int
    index_rows_deleted: int


def _keystore_key(path: Path) -> bytes:
    given = os.environ.get(KEYSTORE_KEY_ENV)
    if given:
        try:
            key = bytes.fromhex(given)
        except ValueError:
            key = b""
        if len(key) != KEY_LEN:
            raise PrivacyError(f"{KEYSTORE_KEY_ENV} must be {KEY_LEN * 2} hex digits (a 256-bit key)")
        return key
    key_file = path.with_name(path.name + ".key")
    if key_file.exists():
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise PrivacyError(f"key store key {key_file} has mode {oct(mode)}; it must be 0600: chmod 600 {key_file}")
        try:
            key = bytes.fromhex(key_file.read_bytes().decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            key = b""  # not hex: the length check below says what the file must hold
        if len(key) != KEY_LEN:
            raise PrivacyError(f"key store key {key_file} is not {KEY_LEN * 2} hex digits")
        return key
    key = secrets.token_bytes(KEY_LEN)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    return key


class LocalKeyStore:
    """Subject keys in a local SQLCipher file (mode 0600), with ``secure_delete`` on.

    WAL with ``synchronous=NORMAL``: creating a subject's key costs no fsync (a new key survives a
    process crash; an OS crash may lose the newest keys, which leaves their ciphertext unreadable:
    erased, never exposed). A shred commits, checkpoints the WAL into the file and truncates it,
    then VACUUMs, so the shredded key is left neither in a free page nor in a WAL frame.

    The file is encrypted with a 256-bit key from ``$MARLGRC_KEYSTORE_KEY`` (hex) or, by default,
    from ``<path>.key`` (mode 0600, created on first use). The blind-index key lives inside the
    encrypted file. Thread-safe: one connection behind a lock.
    """

    def __init__(self, path: Path, *, key: bytes | None = None):
        import sqlcipher3

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077:
                raise PrivacyError(f"key store {self.path} has mode {oct(mode)}; it must be 0600: chmod 600 {self.path}")
        else:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        file_key = key if key is not None else _keystore_key(self.path)
        self._lock = threading.Lock()
        self._db = sqlcipher3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA key = \"x'{file_key.hex()}'\"")
        try:
            self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher3.DatabaseError:
            self._db.close()
            raise PrivacyError(f"key store {self.path} does not open with the given key (file is not a database): "
                               f"set {KEYSTORE_KEY_ENV} or restore {self.path}.key") from None
        for pragma in ("PRAGMA secure_delete=ON", "PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL",
                       "PRAGMA foreign_keys=ON"):
            self._db.execute(pragma)
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS blind_index (
                blind_index BLOB PRIMARY KEY, namespace TEXT NOT NULL, subject_ref BLOB NOT NULL UNIQUE);
            CREATE TABLE IF NOT EXISTS subject_keys (
                subject_ref BLOB PRIMARY KEY REFERENCES blind_index(subject_ref) ON DELETE CASCADE,
                subject_key BLOB NOT NULL, created_at INTEGER NOT NULL DEFAULT (unixepoch()));
            CREATE TABLE IF NOT EXISTS erasure_requests (
                request_id TEXT PRIMARY KEY, namespace TEXT NOT NULL, subject_ref BLOB NOT NULL,
                requester TEXT NOT NULL, legal_basis TEXT NOT NULL,
                created_at INTEGER NOT NULL DEFAULT (unixepoch()), steps TEXT NOT NULL DEFAULT '{}');
        """)
        row = self._db.execute("SELECT value FROM meta WHERE name='index_key'").fetchone()
        if row is None:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('index_key', ?)", (secrets.token_bytes(KEY_LEN),))
            row = self._db.execute("SELECT value FROM meta WHERE name='index_key'").fetchone()
        self._index_key = bytes(row[0])

    def subject_key(self, namespace: str, raw_id: str, *, create: bool = True) -> bytes | None:
        bi = blind_index(self._index_key, namespace, raw_id)
        with self._lock:
            row = self._db.execute(
                "SELECT k.subject_key FROM blind_index b JOIN subject_keys k USING (subject_ref) "
                "WHERE b.blind_index=?", (bi,)).fetchone()
            if row is not None:
                return bytes(row[0])
            if not create:
                return None
            key = secrets.token_bytes(KEY_LEN)
            ref = pseudonym(key, namespace, raw_id)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO blind_index VALUES (?, ?, ?)", (bi, namespace, ref))
                self._db.execute("INSERT INTO subject_keys (subject_ref, subject_key) VALUES (?, ?)", (ref, key))
                self._db.execute("COMMIT")
            except Exception:
                self._db.execute("ROLLBACK")
                raise
            return key

    def subject_keys(self, subjects: Sequence[tuple[str, str]]) -> list[bytes]:
        """The keys of ``subjects`` ((namespace, raw_id) pairs), in order: one query finds the known
        ones and one transaction creates the rest, committed before this returns."""
        bis = [blind_index(self._index_key, ns, raw) for ns, raw in subjects]
        unique = list(dict.fromkeys(bis))
        with self._lock:
            found: dict[bytes, bytes] = {}
            for i in range(0, len(unique), _IN_BATCH):
                chunk = unique[i:i + _IN_BATCH]
                found.update((bytes(b), bytes(k)) for b, k in self._db.execute(
                    "SELECT b.blind_index, k.subject_key FROM blind_index b JOIN subject_keys k USING (subject_ref) "
                    f"WHERE b.blind_index IN ({','.join('?' * len(chunk))})", chunk))
            new = [(bi, ns, raw) for bi, (ns, raw) in dict(zip(bis, subjects)).items() if bi not in found]
            if new:
                rows = []
                for bi, ns, raw in new:
                    key = secrets.token_bytes(KEY_LEN)
                    found[bi] = key
                    rows.append((bi, ns, pseudonym(key, ns, raw), key))
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT INTO blind_index VALUES (?, ?, ?)", [r[:3] for r in rows])
                    self._db.executemany("INSERT INTO subject_keys (subject_ref, subject_key) VALUES (?, ?)",
                                         [(r[2], r[3]) for r in rows])
                    self._db.execute("COMMIT")
                except Exception:
                    self._db.execute("ROLLBACK")
                    raise
        return [found[bi] for bi in bis]

    def key_for_ref(self, namespace: str, subject_ref: bytes) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT k.subject_key FROM subject_keys k JOIN blind_index b USING (subject_ref) "
                "WHERE k.subject_ref=? AND b.namespace=?", (bytes(subject_ref), namespace)).fetchone()
        return bytes(row[0]) if row is not None else None

    def shred(self, namespace: str, raw_id: str) -> Shredded | None:
        bi = blind_index(self._index_key, namespace, raw_id)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT subject_ref FROM blind_index WHERE blind_index=?", (bi,)).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return None
                ref = bytes(row[0])
                keys = self._db.execute("DELETE FROM subject_keys WHERE subject_ref=?", (ref,)).rowcount
                rows = self._db.execute("DELETE FROM blind_index WHERE blind_index=?", (bi,)).rowcount
                self._db.execute("COMMIT")
            except Exception:
                self._db.execute("ROLLBACK")
                raise
            self._scrub()
        return Shredded(namespace, ref, keys, rows)

    def open_erasure(self, request_id: str, namespace: str, raw_id: str, *, requester: str,
                     legal_basis: str) -> "ErasureRequest | None":
        """Record the intent to erase a subject under ``request_id`` (while its key still exists, so its
        pseudonym is known) and return the request; a request recorded before is returned as it is,
        with the steps it completed (``run_erasure`` then does the rest). None when the subject has
        no key and no request was recorded."""
        for what, value in (("request id", request_id), ("requester", requester), ("legal basis", legal_basis)):
            if not value.strip():
                raise PrivacyError(f"an erasure needs a {what}; nothing was changed")
        bi = blind_index(self._index_key, namespace, raw_id)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT subject_ref FROM blind_index WHERE blind_index=?", (bi,)).fetchone()
                ref = None if row is None else bytes(row[0])
                found = self._request(request_id)
                if found is not None:
                    if found.namespace != namespace or (ref is not None and ref != found.subject_ref):
                        raise PrivacyError(f"request {request_id} was recorded for another subject or namespace; "
                                           f"use a new request id")
                elif ref is not None:
                    self._db.execute("INSERT INTO erasure_requests (request_id, namespace, subject_ref, requester, "
                                     "legal_basis) VALUES (?, ?, ?, ?, ?)",
                                     (request_id, namespace, ref, requester, legal_basis))
                    found = self._request(request_id)
                self._db.execute("COMMIT")
            except Exception:
                self._db.execute("ROLLBACK")
                raise
        return found

    def erasure_request(self, request_id: str) -> "ErasureRequest | None":
        with self._lock:
            return self._request(request_id)

    def _request(self, request_id: str) -> "ErasureRequest | None":
        row = self._db.execute("SELECT namespace, subject_ref, requester, legal_basis, steps FROM erasure_requests "
                               "WHERE request_id=?", (request_id,)).fetchone()
        if row is None:
            return None
        return ErasureRequest(request_id, row[0], bytes(row[1]), row[2], row[3], json.loads(row[4]))

    def erasure_step_done(self, request_id: str, step: str, result: dict) -> None:
        """Record that ``step`` of the request completed with ``result`` (counts, event hash)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._record_step(request_id, step, result)
                self._db.execute("COMMIT")
            except Exception:
                self._db.execute("ROLLBACK")
                raise

    def _record_step(self, request_id: str, step: str, result: dict) -> None:
        """(Inside a transaction.) Add ``step`` and its result to the request's steps, in order."""
        steps = json.loads(self._db.execute("SELECT steps FROM erasure_requests WHERE request_id=?",
                                            (request_id,)).fetchone()[0])
        steps[step] = result
        self._db.execute("UPDATE erasure_requests SET steps=? WHERE request_id=?", (json.dumps(steps), request_id))

    def shred_ref(self, namespace: str, subject_ref: bytes, *, request_id: str | None = None) -> Shredded:
        """Delete the key and blind-index row of the subject with pseudonym ``subject_ref``; with a
        ``request_id``, the erasure's shred step is recorded in the same transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                keys = self._db.execute("DELETE FROM subject_keys WHERE subject_ref=?", (subject_ref,)).rowcount
                rows = self._db.execute("DELETE FROM blind_index WHERE subject_ref=?", (subject_ref,)).rowcount
                if request_id is not None:
                    self._record_step(request_id, SHRED_STEP, {"keystore.subject_keys": keys,
                                                               "keystore.blind_index": rows})
                self._db.execute("COMMIT")
            except Exception:
                self._db.execute("ROLLBACK")
                raise
            self._scrub()
        return Shredded(namespace, subject_ref, keys, rows)

    def _scrub(self) -> None:
        # no WAL frame and no free page may keep a shredded key (secure_delete zeroes the page)
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def subjects(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM subject_keys").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "LocalKeyStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FieldProtector:
    """Turns ``ProtectedValue`` items into the contract's ``ProtectedField`` records for one event.

    Keys are cached in memory per (namespace, raw_id) for the harness's step loop; ``forget`` drops
    a subject from the cache as well as from the key store. The subjects of one ``protect`` call
    that are not cached yet (or of one ``prepare`` call) are looked up and created together when
    the key provider has ``subject_keys`` (``LocalKeyStore`` has): one query and at most one
    transaction, committed before the call returns.
    """

    def __init__(self, keys: KeyProvider):
        self.keys = keys
        self._cache: dict[tuple[str, str], tuple[AESGCM, bytes]] = {}

    def _key(self, namespace: str, raw_id: str) -> tuple[AESGCM, bytes]:
        hit = self._cache.get((namespace, raw_id))
        if hit is None:
            key = self.keys.subject_key(namespace, raw_id, create=True)
            if key is None:
                raise PrivacyError(f"the key provider gave no key for a subject in namespace {namespace!r}")
            hit = self._cache[(namespace, raw_id)] = (AESGCM(key), pseudonym(key, namespace, raw_id))
        return hit

    def prepare(self, values: Iterable[ProtectedValue]) -> None:
        """Find (or create) the keys of every subject in ``values`` not cached yet, together: for a
        caller about to ``protect`` several events (the harness's batch of steps)."""
        cache = self._cache
        missing = [(v.namespace, v.raw_id) for v in values if (v.namespace, v.raw_id) not in cache]
        if missing:
            self._load(list(dict.fromkeys(missing)))

    def _load(self, subjects: list[tuple[str, str]]) -> None:
        """Cache the keys of ``subjects`` (not cached yet), in one batch where the provider can."""
        batch = getattr(self.keys, "subject_keys", None)
        if batch is None or len(subjects) == 1:
            for ns, raw in subjects:
                self._key(ns, raw)
            return
        for (ns, raw), key in zip(subjects, batch(subjects)):
            if key is None:
                raise PrivacyError(f"the key provider gave no key for a subject in namespace {ns!r}")
            self._cache[(ns, raw)] = (AESGCM(key), pseudonym(key, ns, raw))

    def subject_ref(self, namespace: str, raw_id: str) -> bytes:
        return self._key(namespace, raw_id)[1]

    def protect(self, chain_id: str, seq: int, values: Iterable[ProtectedValue]) -> list[dict]:
        values = values if isinstance(values, (list, tuple)) else list(values)
        cache = self._cache
        missing = [(v.namespace, v.raw_id) for v in values if (v.namespace, v.raw_id) not in cache]
        if missing:
            self._load(list(dict.fromkeys(missing)))
        out = []
        prefix = chain_id.encode() + b"\x00" + struct.pack(">Q", seq)
        urandom = os.urandom
        for v in values:
            aead, ref = cache[(v.namespace, v.raw_id)]
            nonce = urandom(NONCE_LEN)
            out.append({"namespace": v.namespace, "field": v.field, "subject_ref": ref,
                        "ciphertext": nonce + aead.encrypt(nonce, v.plaintext, prefix + v.field.encode())})
        return out

    def reveal(self, chain_id: str, seq: int, record: dict) -> bytes:
        """Decrypt one ``ProtectedField`` record of event (chain_id, seq); raises KeyShredded after erasure."""
        key = self.keys.key_for_ref(record["namespace"], bytes(record["subject_ref"]))
        if key is None:
            raise KeyShredded(f"no key for subject {bytes(record['subject_ref']).hex()[:16]}… in namespace "
                              f"{record['namespace']!r}: it was erased (or belongs to another key store)")
        return decrypt_field(key, chain_id, seq, record["field"], bytes(record["ciphertext"]))

    def forget(self, namespace: str, raw_id: str) -> Shredded | None:
        self._cache.pop((namespace, raw_id), None)
        return self.keys.shred(namespace, raw_id)


@dataclass(frozen=True)
class ErasureRequest:
    """An erasure recorded in the key store before anything was deleted, and the steps it completed."""

    request_id: str
    namespace: str
    subject_ref: bytes
    requester: str
    legal_basis: str
    steps: dict[str, dict]


SHRED_STEP = "keystore.shred"
ErasureStep = Callable[[ErasureRequest, dict], dict]


def run_erasure(keys: "LocalKeyStore", request: ErasureRequest,
                steps: Sequence[tuple[str, ErasureStep]]) -> tuple[list[str], dict[str, dict]]:
    """Run an erasure's steps in order, each at most once per request: a step recorded as done (by an
    earlier, interrupted run) is skipped, and each step's result is recorded as soon as it returns.
    A step gets the request and the results so far. The request was recorded (``open_erasure``)
    before any step, with the subject's pseudonym, so steps after the key is shredded
    (``shred_step``) can still run and a re-run completes what is left (docs/PRIVACY.md). A step must
    be idempotent for the request id: a crash after its effect and before its record repeats it.
    Returns (names of the steps done before this run, every step's result)."""
    before = list(request.steps)
    results = dict(request.steps)
    for name, step in steps:
        if name in results:
            continue
        results[name] = step(request, results)
        keys.erasure_step_done(request.request_id, name, results[name])
    return before, results


def shred_step(keys: "LocalKeyStore") -> tuple[str, ErasureStep]:
    """The step that deletes the subject's key and blind-index row (crypto-shredding), recorded in the
    key store's transaction that deletes them."""
    def shred(request: ErasureRequest, _results: dict) -> dict:
        s = keys.shred_ref(request.namespace, request.subject_ref, request_id=request.request_id)
        return {"keystore.subject_keys": s.keys_deleted, "keystore.blind_index": s.index_rows_deleted}
    return SHRED_STEP, shred


def deletion_payload(request: ErasureRequest, results: dict[str, dict]) -> dict:
    """The ``compliance.deletion`` payload of an erasure (no raw identifier in it): every count that
    its steps reported, by target."""
    actions = [{"target": target, "count": int(count)}
               for step in results.values() for target, count in step.items() if isinstance(count, int)]
    return {"request_id": request.request_id, "requester": request.requester, "legal_basis": request.legal_basis,
            "namespace": request.namespace, "subject_ref": request.subject_ref, "actions": actions}

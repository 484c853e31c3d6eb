"""Signed checkpoints: per chain, an RFC 6962 root over the event hashes since the previous
checkpoint and the chain head, signed with Ed25519 (docs/HASHING.md, "Checkpoints")."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .merkle import merkle_root

STATEMENT_TAG = b"marlgrc.checkpoint.v1\n"


class KeyFileError(RuntimeError):
    """A signing or public key file is missing, unreadable or too open."""


@dataclass(frozen=True)
class CheckpointStatement:
    """What a checkpoint signs: chain (topic, chain_id) holds, from ``first_seq`` to ``last_seq``,
    events whose hashes have root ``merkle_root``; the event before them hashes to ``prev_head_hash``
    and the last to ``head_event_hash``."""

    topic: str
    chain_id: str
    first_seq: int
    last_seq: int
    prev_head_hash: bytes
    head_event_hash: bytes
    merkle_root: bytes

    def to_bytes(self) -> bytes:
        t, c = self.topic.encode(), self.chain_id.encode()
        return b"".join([
            STATEMENT_TAG,
            struct.pack(">I", len(t)), t,
            struct.pack(">I", len(c)), c,
            struct.pack(">QQ", self.first_seq, self.last_seq),
            self.prev_head_hash, self.head_event_hash, self.merkle_root,
        ])

    @classmethod
    def from_record(cls, record: dict) -> "CheckpointStatement":
        return cls(record["checked_topic"], record["checked_chain_id"], record["first_seq"], record["last_seq"],
                   record["prev_head_hash"], record["head_event_hash"], record["merkle_root"])


def statement_for(topic: str, chain_id: str, first_seq: int, prev_head_hash: bytes,
                  event_hashes: list[bytes]) -> CheckpointStatement:
    """The statement over ``event_hashes`` (seq first_seq, first_seq+1, ...). Requires a non-empty list."""
    if not event_hashes:
        raise ValueError("a checkpoint covers at least one event")
    return CheckpointStatement(topic, chain_id, first_seq, first_seq + len(event_hashes) - 1,
                               prev_head_hash, event_hashes[-1], merkle_root(event_hashes))


def checkpoint_payload(stmt: CheckpointStatement, signer: "Signer") -> dict:
    """The ``audit.checkpoint`` payload signing ``stmt`` (appended with ``source_event_hashes`` =
    ``[stmt.head_event_hash]``); shared by every writer that signs its chains."""
    return {
        "checked_topic": stmt.topic, "checked_chain_id": stmt.chain_id,
        "first_seq": stmt.first_seq, "last_seq": stmt.last_seq,
        "prev_head_hash": stmt.prev_head_hash, "head_event_hash": stmt.head_event_hash,
        "merkle_root": stmt.merkle_root, "signer_key_id": signer.key_id,
        "signature": signer.sign(stmt),
    }


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> bytes:
    """SHA-256 of the raw 32-byte public key."""
    return sha256(public_key_raw(key)).digest()


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path_or_pem: Path | bytes) -> Ed25519PublicKey:
    data = path_or_pem if isinstance(path_or_pem, bytes) else Path(path_or_pem).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm, InternalError) as exc:  # InternalError: OpenSSL refused the key bytes
        raise KeyFileError(f"{path_or_pem if not isinstance(path_or_pem, bytes) else 'the given bytes'} is not a "
                           f"PEM public key ({exc}); the signer's operator prints it with `marlgrc public-key`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"the public key is {type(key).__name__.lstrip('_')}, not Ed25519: checkpoints are signed "
                           f"with Ed25519; get the signer's key with `marlgrc public-key`")
    return key


class Signer:
    """An Ed25519 signing key kept in a local PEM file with mode 0600."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def generate(cls) -> "Signer":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Signer":
        """Deterministic key for test vectors only."""
        return cls(Ed25519PrivateKey.from_private_bytes(sha256(seed).digest()))

    @classmethod
    def load_or_create(cls, path: Path) -> "Signer":
        path = Path(path)
        if path.exists():
            return cls.load(path)
        signer = cls.generate()
        signer.save(path)
        return signer

    @classmethod
    def load(cls, path: Path) -> "Signer":
        path = Path(path)
        try:
            mode = path.stat().st_mode & 0o777
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise KeyFileError(f"signing key {path} has mode {oct(mode)}; it must be 0600: chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError):  # TypeError: an encrypted key;
            # InternalError: OpenSSL refused the key bytes (e.g. an X25519 key of the wrong length)
            raise KeyFileError(f"signing key {path} is not an unencrypted PEM private key; "
                               f"move it away and a new one is created on next use") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"signing key {path} is not an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)

    def sign(self, statement: CheckpointStatement) -> bytes:
        return self._key.sign(statement.to_bytes())

    def sign_bytes(self, message: bytes) -> bytes:
        """Sign a message that carries its own domain tag (e.g. a bundle manifest)."""
        return self._key.sign(message)


def signature_valid(public_key: Ed25519PublicKey, statement: CheckpointStatement, signature: bytes) -> bool:
    """Whether ``signature`` signs ``statement``. A statement that has no byte form (a seq below 0 or
    past 2**64, read from a forged event) was never signed: False."""
    try:
        message = statement.to_bytes()
    except struct.error:
        return False
    try:
        public_key.verify(signature, message)
        return True
    except InvalidSignature:
        return False


# --- signed files (exported policies): one signature file beside the file, checked before use ---

SIGNED_FILE_TAG = b"marlgrc.signed-file.v1\n"
SIGNED_FILE_FORMAT = "marlgrc-signed-file/1"
ONNX_POLICY_KIND = "onnx-policy"  # an exported policy (learners.export writes it, producers.policies reads it)


class SignedFileError(RuntimeError):
    """A signed file has no signature beside it, is signed by another key, or holds other bytes than
    the ones that were signed. The message names the file, what failed and what to do."""


def signature_path(path: Path) -> Path:
    """Where a file's signature lives: ``PATH.sig.json``."""
    return Path(str(path) + ".sig.json")


def sign_file(path: Path, signer: Signer, kind: str, subject: str, context: dict) -> Path:
    """Sign the bytes of ``path`` as it is now; writes ``PATH.sig.json`` and returns its path.

    The statement is the canonical JSON (sorted keys, no spaces, ASCII) of ``kind``, ``subject`` (what
    the file is, in words), ``file_sha256``, ``file_size``, ``key_id`` and ``context``; the signature is
    Ed25519 over ``SIGNED_FILE_TAG`` followed by exactly those statement bytes, which the signature file
    keeps as a string, so a verifier checks them as written and never re-encodes anything.
    """
    path = Path(path)
    data = path.read_bytes()
    statement = json.dumps({"kind": kind, "subject": subject, "file_sha256": sha256(data).hexdigest(),
                            "file_size": len(data), "key_id": signer.key_id.hex(), "context": context},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    record = {"format": SIGNED_FILE_FORMAT, "statement": statement,
              "signature": signer.sign_bytes(SIGNED_FILE_TAG + statement.encode("ascii")).hex()}
    out = signature_path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def read_signed_file(path: Path, public_key: Ed25519PublicKey, kind: str, remedy: str) -> tuple[bytes, dict]:
    """The bytes of ``path`` and its signed statement, after checking, in this order: the signature file
    exists and is well formed, its key id is the trusted key's, the Ed25519 signature verifies with
    that key, it signs a ``kind``, and the SHA-256 of the bytes read is the signed one. Raises
    SignedFileError otherwise (``remedy`` says what to do). Use the returned bytes, not the file: they
    are the ones that were checked."""
    path = Path(path)
    sig = signature_path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignedFileError(f"cannot read {path}: {exc.strerror}") from None
    if not sig.exists():
        raise SignedFileError(f"{path} has no signature ({sig.name} is missing beside it), so it is not used; {remedy}")
    try:
        record = json.loads(sig.read_text())
        if record.get("format") != SIGNED_FILE_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, not {SIGNED_FILE_FORMAT!r}")
        text = record["statement"]
        signature = bytes.fromhex(record["signature"])
        statement = json.loads(text)
        signed_kid, signed_sha = statement["key_id"], statement["file_sha256"]
        if not isinstance(text, str):
            raise TypeError(f"statement is {type(text).__name__}, not a string")
    except RecursionError:
        raise SignedFileError(f"{path}: its signature file {sig.name} is damaged (JSON nested past any signature "
                              f"file's depth), so the file is not used; {remedy}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignedFileError(f"{path}: its signature file {sig.name} is damaged ({exc}), so the file is not used; "
                              f"{remedy}") from None
    trusted = key_id(public_key).hex()
    if signed_kid != trusted:
        raise SignedFileError(f"{path}: signed by key {str(signed_kid)[:16]}…, not the trusted key {trusted[:16]}…, "
                              f"so it is not used; if you trust its signer, pass the signer's public key "
                              f"(--public-key PEM; `marlgrc public-key` in the signer's home prints it); "
                              f"otherwise {remedy}")
    try:
        public_key.verify(signature, SIGNED_FILE_TAG + text.encode("utf-8"))
    except (InvalidSignature, ValueError):
        raise SignedFileError(f"{path}: the Ed25519 signature in {sig.name} does not verify with the trusted key "
                              f"{trusted[:16]}…: the signature file was altered; {remedy}") from None
    if statement.get("kind") != kind:
        raise SignedFileError(f"{path}: {sig.name} signs a {statement.get('kind')!r}, not a {kind!r}; {remedy}")
    actual = sha256(data).hexdigest()
    if actual != signed_sha:
        raise SignedFileError(f"{path}: its bytes have SHA-256 {actual[:16]}…, but {sig.name} signs "
                              f"{str(signed_sha)[:16]}… ({statement.get('subject', '?')}): the file was changed "
                              f"after it was signed, or {sig.name} belongs to another file. It is not used; {remedy}")
    return data, statement

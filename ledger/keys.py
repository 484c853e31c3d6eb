"""Where the ledger's encryption key comes from: a key file (mode 0600) or an environment variable.

A ``KeyProvider`` has one method, ``ledger_key() -> bytes`` (32 bytes); a KMS can implement it.
The key is handed to SQLCipher as a raw key (no passphrase KDF) and is never printed, logged or
put into an exception message.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ENV_VAR = "MARLGRC_LEDGER_KEY"
KEY_LEN = 32


class LedgerKeyError(RuntimeError):
    """The ledger key is missing, malformed, too exposed, or does not open the ledger."""


class KeyProvider(Protocol):
    def ledger_key(self) -> bytes: ...


def _parse(text: bytes, where: str) -> bytes:
    s = text.strip()
    try:
        key = bytes.fromhex(s.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_LEN:
        # deliberately not echoing what was found
        raise LedgerKeyError(f"{where} must hold a {KEY_LEN}-byte key as {2 * KEY_LEN} hex characters; "
                             f"create one with `marlgrc ledger keygen --key-file PATH`")
    return key


@dataclass(frozen=True)
class KeyFile:
    """A key file holding 64 hex characters, readable by its owner only."""

    path: Path

    def ledger_key(self) -> bytes:
        path = Path(self.path)
        try:
            mode = path.stat().st_mode & 0o777
            data = path.read_bytes()
        except OSError as exc:
            raise LedgerKeyError(f"cannot read ledger key file {path}: {exc.strerror}; "
                                 f"create one with `marlgrc ledger keygen --key-file {path}`") from None
        if mode & 0o077:
            raise LedgerKeyError(f"ledger key file {path} has mode {oct(mode)}; it must be 0600: chmod 600 {path}")
        return _parse(data, f"ledger key file {path}")

    @classmethod
    def create(cls, path: Path) -> "KeyFile":
        """Write a fresh random key with mode 0600; refuses to overwrite an existing file.

        The key appears at ``path`` whole or not at all: it is written and synced to a temporary file
        beside it, then hard-linked into place (which, like O_EXCL, fails if ``path`` exists). A
        process killed halfway (the first ``ledger sync`` creates the key) leaves no empty or partial
        key file that every later sync would refuse."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise LedgerKeyError(f"ledger key file {path} already exists; refusing to overwrite a key")
        text = secrets.token_hex(KEY_LEN) + "\n"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise LedgerKeyError(f"ledger key file {path} already exists; refusing to overwrite a key") from None
            except OSError:  # a file system without hard links: write in place, as exclusively
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    raise LedgerKeyError(f"ledger key file {path} already exists; refusing to overwrite a key"
                                         ) from None
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path)


@dataclass(frozen=True)
class EnvKey:
    """The key as 64 hex characters in an environment variable (``MARLGRC_LEDGER_KEY`` by default)."""

    var: str = ENV_VAR

    def ledger_key(self) -> bytes:
        value = os.environ.get(self.var)
        if not value:
            raise LedgerKeyError(f"environment variable {self.var} is not set; set it to the ledger key "
                                 f"(64 hex characters) or pass --key-file")
        return _parse(value.encode(), f"environment variable {self.var}")


@dataclass(frozen=True)
class StaticKey:
    """A key held in memory (tests, benchmarks)."""

    key: bytes

    def ledger_key(self) -> bytes:
        if len(self.key) != KEY_LEN:
            raise LedgerKeyError(f"a ledger key is {KEY_LEN} bytes")
        return self.key

    def __repr__(self) -> str:  # never show the key
        return "StaticKey(<hidden>)"

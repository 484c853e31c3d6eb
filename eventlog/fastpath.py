"""Bulk acceptance of a chain's events: the verifier's hot loop.

``check_chain(values, prev, leaves)`` accepts the longest prefix of ``values`` in which each event's
SHA-256(value[:-32]) equals value[-32:] and value[10:42] links to the previous hash (the first to
``prev``), appending each accepted event's Merkle leaf to ``leaves`` (a bytearray, or None). It
returns (number accepted, hash of the last accepted). ``merkle_root_from_leaves(leaves, start,
count)`` is the RFC 6962 root over 32-byte leaves. The C build (eventlog/_chaincheck.c, compiled on
first use into the user's cache) and the Python definitions below must agree; tests check both.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from hashlib import sha256
from pathlib import Path

from .hashing import MIN_EVENT_LEN
from .merkle import root_from_leaves
from .native import build_extension

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("_chaincheck.c")


def py_check_chain(values: list[bytes], prev: bytes, leaves: bytearray | None) -> tuple[int, bytes]:
    last = prev
    n = 0
    for v in values:
        if len(v) < MIN_EVENT_LEN:
            break
        h = sha256(v[:-32]).digest()
        if h != v[-32:] or v[10:42] != last:
            break
        if leaves is not None:
            leaves += sha256(b"\x00" + h).digest()
        last = h
        n += 1
    return n, last


def py_merkle_root_from_leaves(leaves, start: int, count: int) -> bytes:
    mv = memoryview(leaves)
    if start < 0 or count <= 0 or (start + count) * 32 > len(mv):
        raise ValueError("leaf range outside the buffer")
    return root_from_leaves([bytes(mv[i * 32:(i + 1) * 32]) for i in range(start, start + count)])


def _build() -> object | None:
    """Compile (once per source version and Python) and load the C module; None if impossible."""
    mod = build_extension(SOURCE, "_chaincheck", purpose="the verifier's fast path")
    if mod is None:
        return None
    lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
    mod.set_sha256(*(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value
                     for f in ("SHA256_Init", "SHA256_Update", "SHA256_Final")))
    return mod


try:
    _native = _build()
except Exception as exc:  # noqa: BLE001 - any failure falls back to the reference implementation
    log.warning("verifier fast path unavailable (%s); using the pure-Python path", exc)
    _native = None

NATIVE = _native is not None
check_chain = _native.check_chain if NATIVE else py_check_chain
merkle_root_from_leaves = _native.merkle_root_from_leaves if NATIVE else py_merkle_root_from_leaves

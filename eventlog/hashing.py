"""The hash contract on raw event bytes; no Avro decoding (docs/HASHING.md).

value = C3 01 | fingerprint(8) | prev_event_hash(32) | seq (zigzag varint) | chain_id (varint length
+ UTF-8) | ... | event_hash(32), and event_hash = SHA-256(value[:-32]).
"""
from __future__ import annotations

from hashlib import sha256

from .codec import HASH_LEN, PREFIX_LEN

PREV_START = PREFIX_LEN
PREV_END = PREFIX_LEN + HASH_LEN
MIN_EVENT_LEN = PREV_END + 2 + HASH_LEN  # prefix, prev, seq, empty chain id, event hash


def compute_hash(value: bytes) -> bytes:
    """SHA-256 over every byte before the trailing event_hash."""
    return sha256(memoryview(value)[:-HASH_LEN]).digest()


def stored_hash(value: bytes) -> bytes:
    return bytes(value[-HASH_LEN:])


def prev_hash(value: bytes) -> bytes:
    return bytes(value[PREV_START:PREV_END])


def _varint(value: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(value):
            raise ValueError("varint runs past the end of the value")
        b = value[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def seq_and_chain(value: bytes) -> tuple[int, str]:
    """Read ``seq`` and ``chain_id``, the second and third fields, straight from the bytes."""
    z, pos = _varint(value, PREV_END)
    seq = (z >> 1) ^ -(z & 1)
    z, pos = _varint(value, pos)
    n = (z >> 1) ^ -(z & 1)
    if n < 0 or pos + n > len(value) - HASH_LEN:
        raise ValueError("chain_id length runs past the end of the value")
    return seq, bytes(value[pos:pos + n]).decode("utf-8")


def seal(unsealed: bytes) -> bytes:
    """Replace the trailing 32 placeholder bytes with SHA-256 of everything before them."""
    head = memoryview(unsealed)[:-HASH_LEN]
    return bytes(head) + sha256(head).digest()

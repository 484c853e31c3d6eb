"""Bulk acceptance of a chain's events: the verifier's hot loop.

``check_chain(values, prev, leaves)`` accepts the longest prefix of ``values`` in which each event's
SHA-256(value[:-32]) equals value[-32:] and value[10:42] links to the previous hash (the first to
``prev``), appending each accepted event's Merkle leaf to ``leaves`` (a bytearray, or None). It
returns (number accepted, hash of the last accepted). ``merkle_root_from_leaves(leaves, start,
count)`` is the RFC 6962 root over 32-byte leaves; ``merkle_root_of_event_hashes(hashes)`` the root
over a list of event hashes (a writer's checkpoint). ``group_messages(msgs, start, bufs, chunk)`` is
the Kafka reader's per-message loop: it sorts confluent-kafka Messages into per-(topic, key) buffers
and stops at whatever Python must handle (an error, a new key, a full buffer). The C build
(eventlog/_chaincheck.c, compiled on first use into the user's cache) and the Python definitions
below must agree; tests check both.
"""
from __future__ import annotations

from hashlib import sha256
from pathlib import Path

from .hashing import MIN_EVENT_LEN
from .merkle import merkle_root, root_from_leaves
from .native import load_hashing_extension

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


GROUP_DONE, GROUP_ERROR, GROUP_NEW_KEY, GROUP_FULL = 0, 1, 2, 3


def py_group_messages(msgs: list, start: int, bufs: dict, chunk: int,
                      untrack: type | None = None) -> tuple[int, int, object, object]:
    """From ``msgs[start]`` on, append each message ``m`` to ``bufs[m.topic()][m.key()]``, a pair
    (messages, values), and ``m.value()`` to its values. Returns (index, what, topic, key) when it
    stops: GROUP_ERROR at a message whose ``error()`` is not None; GROUP_NEW_KEY at a topic or key
    not in ``bufs`` (the caller adds it and calls again from that index); GROUP_FULL with the index
    after a message that filled its buffer to ``chunk`` (the caller empties it); GROUP_DONE at the
    end (index len(msgs)). Topic and key are None for GROUP_ERROR and GROUP_DONE. (The C build also
    takes messages of exactly the type ``untrack`` off the cyclic GC's lists; Python cannot.)"""
    for i in range(max(start, 0), len(msgs)):
        m = msgs[i]
        if m.error() is not None:
            return i, GROUP_ERROR, None, None
        topic, key = m.topic(), m.key()
        entry = bufs.get(topic, {}).get(key)
        if entry is None:
            return i, GROUP_NEW_KEY, topic, key
        ms, vs = entry
        ms.append(m)
        vs.append(m.value())
        if len(ms) >= chunk:
            return i + 1, GROUP_FULL, topic, key
    return len(msgs), GROUP_DONE, None, None


def py_merkle_root_from_leaves(leaves, start: int, count: int) -> bytes:
    mv = memoryview(leaves)
    if start < 0 or count <= 0 or (start + count) * 32 > len(mv):
        raise ValueError("leaf range outside the buffer")
    return root_from_leaves([bytes(mv[i * 32:(i + 1) * 32]) for i in range(start, start + count)])


def py_merkle_root_of_event_hashes(hashes: list[bytes]) -> bytes:
    if not hashes:
        raise ValueError("a root needs at least one event hash")
    if any(len(h) != 32 for h in hashes):
        raise ValueError("event hashes must be 32-byte digests")
    return merkle_root(hashes)


_native = load_hashing_extension(SOURCE, "_chaincheck", purpose="the verifier's fast path")
NATIVE = _native is not None
check_chain = _native.check_chain if NATIVE else py_check_chain
merkle_root_from_leaves = _native.merkle_root_from_leaves if NATIVE else py_merkle_root_from_leaves
group_messages = _native.group_messages if NATIVE else py_group_messages
merkle_root_of_event_hashes = _native.merkle_root_of_event_hashes if NATIVE else py_merkle_root_of_event_hashes

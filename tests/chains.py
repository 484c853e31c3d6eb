"""One test helper for a chain read back from a topic: its records link, each hash is the SHA-256 of
the bytes before it, and the seqs come out in offset order. Independent of ``eventlog.verify`` (a
second reading of the hash contract in HASHING.md), for tests that check what a writer put on a
topic."""
from __future__ import annotations

from hashlib import sha256

from eventlog.codec import default_codec


def chain_seqs(records: list) -> list[int]:
    """Seqs of one chain's records in offset order; asserts each links to the one before and carries
    the hash of its own bytes."""
    codec = default_codec()
    seqs, prev = [], bytes(32)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        rec = codec.decode(r.value)[1]
        assert rec["prev_event_hash"] == prev, f"chain {rec['chain_id']} forks or has a hole at seq {rec['seq']}"
        assert sha256(r.value[:-32]).digest() == r.value[-32:]
        prev = r.value[-32:]
        seqs.append(rec["seq"])
    return seqs

"""Corruptions an attacker or a faulty pipeline can inflict on a stream: a test fixture for the verifiers.

Each function takes a list of records (checkpoints and data, each chain in order) and returns
(new records, expected kind, the expected break's record) — offsets are renumbered per partition as
a topic holding the corrupted stream would number them. ``tools/make_vectors.py`` writes one bundle
per corruption under tests/vectors/tamper/, and tests walk them.
"""
from __future__ import annotations

from typing import Callable

from eventlog.chain import ChainHead, ChainWriter
from eventlog.codec import HEADER_FIELDS, default_codec
from eventlog.kafka import Record
from eventlog.verify import CHECKPOINT_TOPIC, BreakKind

Corrupted = tuple[list[Record], BreakKind, Record]


def renumber(records: list[Record]) -> list[Record]:
    nxt: dict[tuple[str, int], int] = {}
    out = []
    for r in records:
        k = (r.topic, r.partition)
        o = nxt.get(k, 0)
        nxt[k] = o + 1
        out.append(r._replace(offset=o))
    return out


def _chain_positions(records: list[Record], topic: str, chain_id: str) -> list[int]:
    return [i for i, r in enumerate(records) if r.topic == topic and r.key == chain_id]


def _finish(records: list[Record], kind: BreakKind, marker: Record) -> Corrupted:
    """Renumber, and find the marker record (by identity of its value and key) in the result."""
    idx = next(i for i, r in enumerate(records) if r is marker)
    out = renumber(records)
    return out, kind, out[idx]


def edited_payload(records, topic, chain_id, seq) -> Corrupted:
    recs = list(records)
    i = _chain_positions(recs, topic, chain_id)[seq]
    v = bytearray(recs[i].value)
    v[len(v) // 2] ^= 0x01
    recs[i] = recs[i]._replace(value=bytes(v))
    return _finish(recs, BreakKind.EDITED, recs[i])


def missing_event(records, topic, chain_id, seq) -> Corrupted:
    recs = list(records)
    pos = _chain_positions(recs, topic, chain_id)
    del recs[pos[seq]]
    return _finish(recs, BreakKind.MISSING, recs[pos[seq + 1] - 1])


def reordered(records, topic, chain_id, seq) -> Corrupted:
    recs = list(records)
    pos = _chain_positions(recs, topic, chain_id)
    a, b = pos[seq], pos[seq + 1]
    recs[a], recs[b] = recs[b], recs[a]
    return _finish(recs, BreakKind.REORDERED, recs[a])


def duplicated(records, topic, chain_id, seq) -> Corrupted:
    recs = list(records)
    pos = _chain_positions(recs, topic, chain_id)
    copy = recs[pos[seq]]._replace()
    recs.insert(pos[seq + 2] + 1, copy)
    return _finish(recs, BreakKind.DUPLICATED, copy)


def inserted(records, topic, chain_id, seq) -> Corrupted:
    """A forged event with a valid hash and a valid link to ``seq``, placed before ``seq + 1``."""
    recs = list(records)
    pos = _chain_positions(recs, topic, chain_id)
    before = recs[pos[seq]]
    name, rec = default_codec().decode(before.value)
    payload = {k: v for k, v in rec.items() if k not in _HEADER_AND_HASH}
    w = ChainWriter(topic, chain_id, rec["run_id"], "forger", rec["data_classification"],
                    head=ChainHead(seq, bytes(before.value[-32:])))
    forged = w.append(rec["event_type"], payload)
    fake = before._replace(value=forged.value)
    recs.insert(pos[seq + 1], fake)
    return _finish(recs, BreakKind.INSERTED, fake)


def truncated_after_checkpoint(records, topic, chain_id, keep: int) -> Corrupted:
    """Keep only the first ``keep`` events of the chain (a checkpoint covers more)."""
    recs = list(records)
    pos = _chain_positions(recs, topic, chain_id)
    last_kept = recs[pos[keep - 1]]
    for i in reversed(pos[keep:]):
        del recs[i]
    out = renumber(recs)
    idx = next(i for i, r in enumerate(recs) if r is last_kept)
    marker = out[idx]._replace(offset=out[idx].offset + 1)
    return out, BreakKind.TRUNCATED, marker


def rewritten(records, topic, chain_id) -> Corrupted:
    """The whole chain re-encoded with a changed payload and recomputed hashes: every link valid."""
    codec = default_codec()
    recs = list(records)
    pos = _chain_positions(recs, topic, chain_id)
    w = None
    for n, i in enumerate(pos):
        name, rec = codec.decode(recs[i].value)
        if w is None:
            w = ChainWriter(topic, chain_id, rec["run_id"], rec["producer_id"], rec["data_classification"])
        payload = {k: v for k, v in rec.items() if k not in _HEADER_AND_HASH}
        if "step" in payload and n == 0:
            payload["step"] += 1000
        ev = w.append(rec["event_type"], payload, policy_version=rec["policy_version"],
                      rule_version=rec["rule_version"], source_event_hashes=rec["source_event_hashes"])
        recs[i] = recs[i]._replace(value=ev.value)
    return _finish(recs, BreakKind.CHECKPOINT_MISMATCH, recs[pos[0]])


def bad_signature(records) -> Corrupted:
    """The last checkpoint's signature altered and its event re-sealed (so only the signature fails)."""
    codec = default_codec()
    recs = list(records)
    i = max(j for j, r in enumerate(recs) if r.topic == CHECKPOINT_TOPIC)
    name, rec = codec.decode(recs[i].value)
    sig = bytearray(rec["signature"])
    sig[0] ^= 0xFF
    prev = rec["prev_event_hash"]
    w = ChainWriter(CHECKPOINT_TOPIC, rec["chain_id"], rec["run_id"], rec["producer_id"], rec["data_classification"],
                    head=ChainHead(rec["seq"] - 1, prev))
    payload = {k: v for k, v in rec.items() if k not in _HEADER_AND_HASH}
    payload["signature"] = bytes(sig)
    ev = w.append("audit.checkpoint", payload, source_event_hashes=rec["source_event_hashes"])
    recs[i] = recs[i]._replace(value=ev.value)
    return _finish(recs, BreakKind.BAD_SIGNATURE, recs[i])


_HEADER_AND_HASH = set(HEADER_FIELDS) | {"event_hash"}

def standard_cases(topic: str = "marl.joint.action", chain_id: str = "r1:actions", seq: int = 5,
                   keep: int = 30) -> dict[str, Callable[[list[Record]], Corrupted]]:
    """Every corruption, aimed at one chain: the suite that tests, vectors and tools share.
    Requires the chain to hold more than ``keep`` events and a checkpoint covering them."""
    return {
        "edited-payload": lambda s: edited_payload(s, topic, chain_id, seq),
        "missing-event": lambda s: missing_event(s, topic, chain_id, seq),
        "reordered": lambda s: reordered(s, topic, chain_id, seq),
        "duplicated": lambda s: duplicated(s, topic, chain_id, seq),
        "inserted": lambda s: inserted(s, topic, chain_id, seq),
        "truncated-after-checkpoint": lambda s: truncated_after_checkpoint(s, topic, chain_id, keep),
        "rewritten-chain": lambda s: rewritten(s, topic, chain_id),
        "bad-signature": bad_signature,
    }

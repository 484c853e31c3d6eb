"""What an auditor runs: verify topics or a bundle, export a bundle, prove one event's inclusion."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import schemas as schema_files

from .bundle import bundle_entries, check_manifest, entry_record, read_bundle
from .checkpoint import CheckpointStatement, signature_valid
from .codec import default_codec
from .hashing import seq_and_chain
from .kafka import Record, message_batches, read_records
from .merkle import inclusion_proof, verify_inclusion
from .verify import CHECKPOINT_TOPIC, Break, BreakKind, ChainReport, Report, TrustedState, Verifier

DATA_TOPICS = tuple(t for t in schema_files.TOPICS if t != CHECKPOINT_TOPIC)


def _of_run(records: Iterable[Record], run_id: str | None) -> Iterable[Record]:
    if run_id is None:
        return records
    p = f"{run_id}:"
    return (r for r in records if r.key.startswith(p))


def _counted(records: Iterable[Record], progress: Callable[[int], None] | None, every: int = 10000) -> Iterator[Record]:
    n = 0
    for r in records:
        yield r
        n += 1
        if progress is not None and n % every == 0:
            progress(every)
    if progress is not None:
        progress(n % every)


def verify_kafka(bootstrap: str, *, prefix: str = "", run_id: str | None = None,
                 topics: Iterable[str] = DATA_TOPICS, public_key: Ed25519PublicKey | None = None,
                 trusted: TrustedState | None = None, require_signed: bool = False,
                 progress: Callable[[int], None] | None = None) -> tuple[Report, Verifier]:
    """Verify the chains on ``topics`` (all data topics by default), or only those of ``run_id``,
    against the signed checkpoints on marl.audit.checkpoints (``require_signed``: every event must
    be covered by one)."""
    topics = list(topics)
    v = Verifier(public_key, trusted, require_signed=require_signed, topics=topics)
    v.add_checkpoints(_of_run(read_records(bootstrap, [CHECKPOINT_TOPIC], prefix=prefix), run_id))
    if run_id is not None:
        v.feed(_counted(_of_run(read_records(bootstrap, topics, prefix=prefix), run_id), progress))
    else:  # whole topics: the Kafka fast path, no Record per message
        for msgs in message_batches(bootstrap, topics, prefix=prefix):
            v.feed_messages(msgs, prefix)
            if progress is not None:
                progress(len(msgs))
        v.flush_messages(prefix)
    return v.finish(), v


def verify_bundle(bundle_dir: Path, *, public_key: Ed25519PublicKey | None = None, pinned: bool = False,
                  require_signed: bool | None = None, trusted: TrustedState | None = None,
                  run_id: str | None = None, progress: Callable[[int], None] | None = None
                  ) -> tuple[Report, Verifier]:
    """Verify a bundle written by ``write_bundle`` (checkpoints are stored first). ``pinned``: the
    public key was obtained out of band (not the bundle's copy); then the manifest must be signed by
    it, and (by default) every event must be covered by a signed checkpoint (``require_signed``)."""
    failures, notes = check_manifest(bundle_dir, public_key, pinned=pinned)  # a clear error for a non-bundle too
    v = Verifier(public_key, trusted, require_signed=pinned if require_signed is None else require_signed)
    entries = bundle_entries(bundle_dir)
    if run_id is not None:
        p = f"{run_id}:"
        entries = (e for e in entries if e["key"].startswith(p))
    cps: list[Record] = []
    first_data = None
    for e in entries:
        if e["topic"] != CHECKPOINT_TOPIC:
            first_data = e
            break
        cps.append(entry_record(e))
    v.add_checkpoints(cps)
    if first_data is not None:
        n = v.feed_entries(itertools.chain([first_data], entries), entry_record)
        if progress is not None:
            progress(n)
    report = v.finish()
    report.notes.extend(notes)
    for p in failures:
        report.chains.insert(0, ChainReport("(bundle)", "manifest.json", first_break=Break(
            BreakKind.BAD_SIGNATURE if "sign" in p else BreakKind.EDITED, "(bundle)", "manifest.json", -1, -1, -1, p)))
    return report, v


@dataclass(frozen=True)
class InclusionProof:
    topic: str
    chain_id: str
    seq: int
    event_hash: bytes
    first_seq: int
    last_seq: int
    leaf_index: int
    tree_size: int
    path: list[bytes]
    merkle_root: bytes
    signature: bytes

    def to_json(self) -> dict:
        return {"topic": self.topic, "chain_id": self.chain_id, "seq": self.seq, "event_hash": self.event_hash.hex(),
                "checkpoint": {"first_seq": self.first_seq, "last_seq": self.last_seq,
                               "merkle_root": self.merkle_root.hex(), "signature": self.signature.hex()},
                "leaf_index": self.leaf_index, "tree_size": self.tree_size, "path": [p.hex() for p in self.path]}


class ProofError(LookupError):
    """No proof can be made: the event or a checkpoint covering it was not found."""


def prove_inclusion(records: Iterable[Record], topic: str, chain_id: str, seq: int,
                    public_key: Ed25519PublicKey | None = None) -> InclusionProof:
    """Build the inclusion proof of event ``seq`` of a chain against the signed checkpoint covering it,
    and check it (and the checkpoint's signature, given a key) before returning it."""
    codec = default_codec()
    recs = list(records)
    covering = None
    for r in recs:
        if r.topic != CHECKPOINT_TOPIC:
            continue
        name, rec = codec.decode(r.value)
        if (rec["checked_topic"], rec["checked_chain_id"]) == (topic, chain_id) and rec["first_seq"] <= seq <= rec["last_seq"]:
            covering = rec
    if covering is None:
        raise ProofError(f"no checkpoint of {topic} {chain_id} covers seq {seq}; checkpoints are written when a "
                         f"producer closes or every N events: wait for the next one")
    stmt = CheckpointStatement.from_record(covering)
    if public_key is not None and not signature_valid(public_key, stmt, covering["signature"]):
        raise ProofError(f"the checkpoint covering seq {seq} has a bad signature")
    hashes: dict[int, bytes] = {}
    for r in recs:
        if r.topic == topic and r.key == chain_id:
            s = seq_and_chain(r.value)[0]
            if stmt.first_seq <= s <= stmt.last_seq:
                hashes[s] = bytes(r.value[-32:])
    leaves = [hashes.get(s) for s in range(stmt.first_seq, stmt.last_seq + 1)]
    if any(h is None for h in leaves):
        raise ProofError(f"events of {topic} {chain_id} in {stmt.first_seq}..{stmt.last_seq} are missing")
    index = seq - stmt.first_seq
    path = inclusion_proof(leaves, index)
    verify_inclusion(leaves[index], index, len(leaves), path, stmt.merkle_root)
    return InclusionProof(topic, chain_id, seq, leaves[index], stmt.first_seq, stmt.last_seq, index, len(leaves),
                          path, stmt.merkle_root, covering["signature"])


def records_for_proof(bootstrap: str | None, bundle: Path | None, topic: str, chain_id: str,
                      prefix: str = "") -> Iterator[Record]:
    if bundle is not None:
        yield from (r for r in read_bundle(bundle) if r.topic in (topic, CHECKPOINT_TOPIC))
    else:
        assert bootstrap is not None
        yield from read_records(bootstrap, [CHECKPOINT_TOPIC, topic], prefix=prefix)

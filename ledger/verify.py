"""Re-verify a ledger on its own: every stored event's raw bytes through ``eventlog.verify.Verifier``
(hashes, links, signed checkpoints), with ranges removed by a purge or an erasure bridged by their
deletion evidence.

A gap is bridged only where evidence rows, in order, start at the seq the chain expects next and
link to the hash the chain ended on (``prev_hash``), and the next stored event links to the last
evidence's ``head_hash``. A row deleted behind the ledger's back leaves a gap with no evidence, and
the Verifier reports it (``missing``). Checkpoints whose range overlaps a deleted range cannot be
recomputed from the stored events; they are counted as bridged instead of verified.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from eventlog.kafka import Record
from eventlog.verify import CHECKPOINT_TOPIC, Report, Verifier

from .ingest import Finding
from .store import Evidence, LedgerStore


@dataclass
class LedgerReport:
    chains: Report
    findings: list[Finding]
    bridged: list[Evidence] = field(default_factory=list)
    checkpoints_bridged: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.chains.ok and not self.findings

    def lines(self) -> list[str]:
        out = [f"{self.chains.events} stored events in {len(self.chains.chains)} chains checked; "
               f"{len(self.bridged)} deleted ranges bridged by evidence "
               f"({sum(e.count for e in self.bridged)} events); {self.checkpoints_bridged} checkpoints "
               f"span deleted ranges"]
        out += [f"BREAK {b.describe()}" for b in self.chains.breaks]
        out += [f"FINDING (at ingest) {f.describe()}" for f in self.findings]
        out += [f"note: {n}" for n in self.chains.notes + self.notes]
        out.append("ledger verifies" if self.ok else "ledger does NOT verify")
        return out


class _LedgerVerifier(Verifier):
    """The auditor's Verifier, plus one step it needs here: continue a chain after a deleted range."""

    def bridge(self, topic: str, chain_id: str, evidence: list[Evidence]) -> int:
        """Advance the chain past ``evidence`` (consecutive ranges from its next seq). Returns the number
        of checkpoints skipped because they overlap the bridged seqs (``Verifier.resume``: their
        signatures were checked, their Merkle roots cannot be recomputed without the deleted events;
        the report counts them as spanning deleted ranges, not as verified)."""
        return self.resume(topic, chain_id, evidence[-1].last_seq + 1, evidence[-1].head_hash)


def _bridge_run(evidence: list[Evidence], next_seq: int, last_hash: bytes, until_seq: int | None) -> list[Evidence]:
    """The evidence ranges that, in order, continue a chain from (next_seq, last_hash), stopping
    before ``until_seq``; empty when the first does not fit."""
    run: list[Evidence] = []
    for ev in evidence:
        if until_seq is not None and ev.first_seq >= until_seq:
            break
        if ev.first_seq == next_seq and ev.prev_hash == last_hash:
            run.append(ev)
            next_seq, last_hash = ev.last_seq + 1, ev.head_hash
    return run


def verify_ledger(store: LedgerStore, public_key: Ed25519PublicKey | None = None) -> LedgerReport:
    """Verify every chain stored in the ledger, bridging deletions that left evidence."""
    v = _LedgerVerifier(public_key)
    by_chain: dict[tuple[str, str], list[Record]] = defaultdict(list)
    checkpoints: list[Record] = []
    for e in store.stored_events():
        rec = Record(e.topic, e.partition, e.offset, e.chain_id, e.raw, 0)
        (checkpoints if e.topic == CHECKPOINT_TOPIC else by_chain[(e.topic, e.chain_id)]).append(rec)
    evidence: dict[tuple[str, str], list[Evidence]] = defaultdict(list)
    for ev in store.evidence():
        evidence[(ev.topic, ev.chain_id)].append(ev)
    for evs in evidence.values():
        evs.sort(key=lambda e: (e.first_seq, e.deletion_id))
    v.add_checkpoints(checkpoints)
    bridged: list[Evidence] = []
    skipped = 0
    for key in sorted(set(by_chain) | set(evidence)):
        if key[0] == CHECKPOINT_TOPIC:
            continue
        evs = evidence.get(key, [])
        for rec in by_chain.get(key, []):
            if evs:
                next_seq, last_hash, broken = v.expects(*key)
                seq = _seq(rec)
                if not broken and seq > next_seq:
                    run = _bridge_run(evs, next_seq, last_hash, seq)
                    if run and run[-1].last_seq + 1 == seq:
                        skipped += v.bridge(*key, run)
                        bridged.extend(run)
            v.feed([rec])
        if evs:  # a deleted tail, or a chain deleted whole
            next_seq, last_hash, broken = v.expects(*key)
            run = _bridge_run(evs, next_seq, last_hash, None)
            if run and not broken:
                skipped += v.bridge(*key, run)
                bridged.extend(run)
    report = v.finish()
    unused = sum(len(evs) for evs in evidence.values()) - len(bridged)
    notes = [f"{unused} deletion evidence rows did not fit the chains they name"] if unused else []
    return LedgerReport(report, store.findings(), bridged, skipped, notes)


def _seq(rec: Record) -> int:
    from eventlog.hashing import seq_and_chain

    try:
        return seq_and_chain(rec.value)[0]
    except (ValueError, UnicodeDecodeError):
        return -1

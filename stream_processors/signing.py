"""Signed checkpoints of a processor's chains, the checkpoint chain's own included (docs/HASHING.md §4).

A processor seals events onto output chains and, once per transaction (the DI worker) or per input
record with outputs (the faust app), signs them: one ``audit.checkpoint`` per chain that got events,
on a checkpoint chain ``{owner}:checkpoints:{producer_id}`` (owner: the run, or for a chain of no run
such as a dead-letter chain, that chain), then one checkpoint of that checkpoint
chain itself, as ``eventlog.log.EventLog.checkpoint`` does. Both processors keep what this needs in
the state they commit with their events (``CheckpointChain``), so a restart continues the chain and
its self-checkpoints without a hole or a fork.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from eventlog.chain import ChainHead, ChainWriter, Event
from eventlog.checkpoint import CheckpointStatement, Signer, checkpoint_payload, statement_for

CHECKPOINT_TOPIC = "marl.audit.checkpoints"


def checkpoint_chain_id(owner: str, producer_id: str) -> str:
    """``{run}:checkpoints:{producer}`` for a run's chains (docs/HASHING.md §4). A chain of no run (a
    processor's dead letters, ``dlq:{consumer}``) is its own owner: ``dlq:{consumer}:checkpoints:{producer}``,
    one checkpoint chain per such chain, so each has one writer (the verifier's run of both is ``dlq``)."""
    return f"{owner}:checkpoints:{producer_id}"


@dataclass
class Unsigned:
    """One chain's events since its last checkpoint: they follow the event ``prev`` (seq, hash)."""

    prev: ChainHead
    hashes: list[bytes] = field(default_factory=list)

    def statement(self, topic: str, chain_id: str) -> CheckpointStatement:
        return statement_for(topic, chain_id, self.prev.seq + 1, self.prev.event_hash, self.hashes)


@dataclass
class CheckpointChain:
    """What a writer of a checkpoint chain keeps between transactions: the chain's ``head`` and
    ``covered``, the last event its previous self-checkpoint covered (the event just before that
    self-checkpoint). The next self-checkpoint covers ``covered.seq + 1`` (the previous
    self-checkpoint) up to the event before it, with ``prev_head_hash = covered.event_hash``, so
    consecutive self-checkpoints are contiguous. Invariant: ``head.seq`` is ``covered.seq + 1`` (the
    head is the last self-checkpoint) or ``covered.seq`` (nothing written yet, or a state saved before
    checkpoint chains signed themselves: their older events stay unsigned)."""

    head: ChainHead = field(default_factory=ChainHead)
    covered: ChainHead = field(default_factory=ChainHead)

    def to_json(self) -> list:
        return [self.head.seq, self.head.event_hash.hex(), self.covered.seq, self.covered.event_hash.hex()]

    @classmethod
    def from_json(cls, d: list | None, *, legacy_head: ChainHead | None = None) -> "CheckpointChain":
        """``d`` from ``to_json``; None for a state saved before it existed: then a checkpoint chain
        at ``legacy_head`` whose events no self-checkpoint covers (the next one starts after them)."""
        if d is None:
            head = legacy_head or ChainHead()
            return cls(head, head)
        return cls(ChainHead(d[0], bytes.fromhex(d[1])), ChainHead(d[2], bytes.fromhex(d[3])))


def sign(writer: ChainWriter, chain: CheckpointChain, statements: Iterable[CheckpointStatement],
         signer: Signer) -> tuple[list[Event], CheckpointChain]:
    """Append one checkpoint per statement to the checkpoint chain of ``writer`` (at ``chain.head``),
    then a checkpoint of that chain itself from its previous self-checkpoint up to the event before
    this one. Returns the events in order and the chain's new state; nothing and ``chain`` unchanged
    when there are no statements (no checkpoint of one checkpoint). Requires ``writer.head ==
    chain.head`` and the ``CheckpointChain`` invariant."""
    if writer.head != chain.head:
        raise ValueError(f"checkpoint chain {writer.chain_id} is at seq {writer.head.seq}, its saved state at "
                         f"{chain.head.seq}: a second writer, or state restored from another commit")
    if chain.head.seq not in (chain.covered.seq, chain.covered.seq + 1):
        raise ValueError(f"checkpoint chain {writer.chain_id}: head seq {chain.head.seq} is not the self-checkpoint "
                         f"after seq {chain.covered.seq}; the events between cannot be signed")
    hashes = [chain.head.event_hash] if chain.head.seq == chain.covered.seq + 1 else []
    out = []
    for stmt in statements:
        ev = writer.append("audit.checkpoint", checkpoint_payload(stmt, signer), source_event_hashes=[stmt.head_event_hash])
        out.append(ev)
        hashes.append(ev.event_hash)
    if not out:
        return out, chain
    covered = writer.head
    own = statement_for(writer.topic, writer.chain_id, chain.covered.seq + 1, chain.covered.event_hash, hashes)
    out.append(writer.append("audit.checkpoint", checkpoint_payload(own, signer),
                             source_event_hashes=[own.head_event_hash]))
    return out, CheckpointChain(writer.head, covered)

"""The ``policy.update`` event: what an update changed and exactly which events it learned from."""
from __future__ import annotations

from eventlog.chain import ChainHead, Event
from eventlog.log import EventLog

from .replay import LineageRange, Replay


def policy_chain(run_id: str, algorithm: str) -> str:
    return f"{run_id}:policy:{algorithm}"


def emit_policy_update(log: EventLog, learner, result: dict, replay: Replay, *, parent_version: str) -> Event:
    """Append ``policy.update`` on ``{run}:policy:{algo}`` (the replayed run's id).

    ``policy_updated`` is true only where an optimizer step happened; ``optimizer_steps`` and
    ``env_steps`` count this update; the header's ``policy_version`` is the new version and its
    ``source_event_hashes`` are the head hashes of every chain read.

    An off-policy learner samples from a buffer that holds earlier batches too: where the learner has
    a ``buffer_lineage`` (a ``BufferLineage``), the lineage names what the buffer held at this update
    (every batch not yet evicted), not only this batch.
    """
    ranges = learner.buffer_lineage.ranges() if getattr(learner, "buffer_lineage", None) else replay.lineage
    lineage = [r.to_record() for r in ranges]
    return log.append(policy_chain(replay.spec.run_id, learner.algorithm), "policy.update", {
        "algorithm": learner.algorithm,
        "config_hash": learner.config_hash,
        "seed": int(learner.config.seed),
        "parent_policy_version": parent_version,
        "policy_updated": result["optimizer_steps"] > 0,
        "optimizer_steps": int(result["optimizer_steps"]),
        "env_steps": int(result["env_steps"]),
        "losses": [{"name": k, "value": float(v)} for k, v in sorted(result["losses"].items())],
        "weights_sha256": learner.weights_sha256(),
        "verified": bool(replay.verified),
        "lineage": lineage,
    }, policy_version=learner.version, source_event_hashes=[r.head_event_hash for r in ranges])


class BufferLineage:
    """The replayed ranges an off-policy replay buffer holds: for an update to be replayed exactly, its
    ``policy.update`` must name every event its samples could come from.

    ``add(replay.lineage, n)`` after the learner put ``n`` transitions of a batch into its buffer (a
    FIFO of ``capacity`` transitions); batches whose transitions have all been overwritten are dropped.
    ``ranges()`` merges the batches still held per (topic, partition, chain): the first offset and seq
    of the oldest batch held, the last offset, seq and head hash of the newest. A batch partly
    overwritten is still named whole, so the ranges may name a little more than the buffer holds,
    never less. Part of the learner's state (``state_dict``), so a resumed learner names the same.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.batches: list[tuple[list[LineageRange], int]] = []

    def add(self, lineage: list[LineageRange], n: int) -> None:
        if n <= 0:
            return
        self.batches.append((list(lineage), int(n)))
        # drop the oldest batches while the newer ones alone fill the buffer
        while len(self.batches) > 1 and sum(k for _, k in self.batches[1:]) >= self.capacity:
            self.batches.pop(0)

    def ranges(self) -> list[LineageRange]:
        merged: dict[tuple[str, int, str], LineageRange] = {}
        for lineage, _ in self.batches:
            for r in lineage:
                k = (r.topic, r.partition, r.chain_id)
                old = merged.get(k)
                merged[k] = r if old is None else LineageRange(
                    r.topic, r.partition, min(old.first_offset, r.first_offset), max(old.last_offset, r.last_offset),
                    r.chain_id, min(old.first_seq, r.first_seq), max(old.last_seq, r.last_seq),
                    r.head_event_hash if r.last_seq >= old.last_seq else old.head_event_hash)
        return [merged[k] for k in sorted(merged)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "batches": [([r.to_record() for r in lin], n) for lin, n in self.batches]}

    def load_state_dict(self, s: dict) -> None:
        self.capacity = s["capacity"]
        self.batches = [([LineageRange(**r) for r in lin], n) for lin, n in s["batches"]]


def continue_policy_chain(log: EventLog, replay: Replay, algorithm: str) -> None:
    """One writer per chain: a new training session on a run continues ``{run}:policy:{algo}`` from the
    head the replay read and verified, instead of forking it at seq 0. Its checkpoints go on the
    session's own checkpoint chain (give each session's log a producer id of its own): a checkpoint
    chain continued by another log would leave its last self-checkpoint uncovered."""
    run = replay.spec.run_id
    mine = ("marl.policy.update", policy_chain(run, algorithm))
    for c in replay.report.chains:
        if (c.topic, c.chain_id) == mine and c.last_seq >= 0:
            log.writer(c.topic, c.chain_id, head=ChainHead(c.last_seq, bytes.fromhex(c.head_hash)))

"""The ``policy.update`` event: what an update changed and exactly which events it learned from."""
from __future__ import annotations

from eventlog.chain import ChainHead, Event
from eventlog.log import EventLog

from .replay import Replay


def policy_chain(run_id: str, algorithm: str) -> str:
    return f"{run_id}:policy:{algorithm}"


def emit_policy_update(log: EventLog, learner, result: dict, replay: Replay, *, parent_version: str) -> Event:
    """Append ``policy.update`` on ``{run}:policy:{algo}`` (the replayed run's id).

    ``policy_updated`` is true only where an optimizer step happened; ``optimizer_steps`` and
    ``env_steps`` count this update; the header's ``policy_version`` is the new version and its
    ``source_event_hashes`` are the head hashes of every chain read.
    """
    lineage = [r.to_record() for r in replay.lineage]
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
    }, policy_version=learner.version, source_event_hashes=[r.head_event_hash for r in replay.lineage])


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

"""Train a run's learner again from its topics alone and check every update against the weights hash
its ``policy.update`` recorded: the auditor's answer to "did this policy come from these events?".

Two kinds of run are reproduced:

- one-process online runs (``learners.online.train_online``: `marlgrc train-online`, `marlgrc run
  --algo`, `--online` behind the safety gate, `--curriculum`): the first batch's ``run.started``
  records the learner's config (and torch's thread count); update ``i`` learned from the events of
  each data chain up to the ``last_seq`` its lineage names, after those of update ``i - 1``. A
  ``policy.rollback`` that refused update ``i`` restores the learner as the gate did (the state
  before the update, the experience counters after it), and the restored weights are checked against
  the hash the rollback recorded.
- many-producer runs (``learners.distributed``): ``distributed.retrain``.

Every learner acts with a random generator of its own and updates with others
(``MAPPO.sampler``/``shuffler``, ``DQN.explorer``/``rng``, ...), so an update depends on the
learner's state and its batch only, never on the acting in between: the updates can be replayed
without the env. The records are verified first (hash chains, and checkpoint signatures where a
public key is given); a break stops the reproduction unless ``allow_unverified``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from eventlog.codec import default_codec
from eventlog.hashing import seq_and_chain
from eventlog.kafka import Record
from eventlog.verify import CHECKPOINT_TOPIC, verify_records

from . import algorithm, config_from_record
from .checkpoint import load_torch_state
from .lineage import policy_chain
from .networks import torch_device
from .replay import ONLINE_TOPICS, POLICY_TOPIC, ReplayError, RunReader, RunSpec, UnverifiedStream


@dataclass
class UpdateCheck:
    """One recorded update and its retrained twin."""

    seq: int                     # of the policy.update on the policy chain
    policy_version: str
    recorded: bytes              # weights_sha256 in the policy.update
    retrained: bytes
    rolled_back: bool = False    # a policy.rollback refused it
    restored: bool = True        # rolled back: the restored weights hash to the rollback's checkpoint hash

    @property
    def equal(self) -> bool:
        return self.recorded == self.retrained and self.restored


@dataclass
class Reproduction:
    run_id: str
    kind: str                    # "online" (one process) or "group" (many producers)
    algo: str
    checks: list[UpdateCheck] = field(default_factory=list)
    learner: Any = None          # the retrained learner after the last update
    events: int = 0              # records of the run verified
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.equal for c in self.checks)

    @property
    def first_difference(self) -> UpdateCheck | None:
        return next((c for c in self.checks if not c.equal), None)


def _started_config(records: Sequence[Record], run_id: str) -> tuple[dict, dict]:
    """(first run.started of the run's lifecycle chain, its config)."""
    codec = default_codec()
    for r in records:
        if r.topic == "marl.run.lifecycle" and r.key == f"{run_id}:lifecycle":
            name, rec = codec.decode(r.value)
            if name == "run_started":
                return rec, json.loads(rec["config_json"])
    raise ReplayError(f"run {run_id}: no run.started among the records; read marl.run.lifecycle from its "
                      f"beginning (or check the run id)")


def reproduce(records: Iterable[Record], run_id: str, *, public_key=None, allow_unverified: bool = False
              ) -> Reproduction:
    """Retrain run ``run_id`` from ``records`` (whole topics are fine: other runs' records are skipped)
    and compare each update's weights with the hash its ``policy.update`` recorded."""
    from .distributed import read_group_run, retrain

    own = [r for r in records if r.key.startswith(f"{run_id}:") or r.key.startswith(f"{run_id}.p")]
    started, cfg = _started_config(own, run_id)
    if "producer_runs" in cfg:   # the learner's run G and its producers' runs G.pK
        group = read_group_run(own, run_id)
        if not group.updates:
            raise ReplayError(f"run {run_id}: no policy.update on its policy chain; nothing to reproduce")
        runs = {run_id, *group.runs}
        mine = [r for r in own if r.key.split(":", 1)[0] in runs]
        count, signed = _verify(mine, run_id, public_key, allow_unverified)
        learner, hashes = retrain(mine, group, public_key=public_key)
        checks = [UpdateCheck(u["seq"], u["policy_version"], bytes(u["weights_sha256"]), h)
                  for u, h in zip(group.updates, hashes)]
        return Reproduction(run_id, "group", group.algo, checks, learner, count, signed)
    mine = [r for r in own if r.key.startswith(f"{run_id}:")]
    return _reproduce_online(mine, run_id, started, cfg, public_key, allow_unverified)


def _verify(records: list[Record], run_id: str, public_key, allow_unverified: bool) -> tuple[int, bool]:
    report = verify_records(records, public_key)
    if report.breaks and not allow_unverified:
        raise UnverifiedStream(f"run {run_id}: {len(report.breaks)} chain(s) failed verification; first: "
                               f"{report.breaks[0].describe()}. Run `marlgrc verify` to inspect")
    return report.events, public_key is not None


def _snapshot(learner: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    return buf.getvalue()


def _reproduce_online(records: list[Record], run_id: str, started: dict, cfg: dict, public_key,
                      allow_unverified: bool) -> Reproduction:
    if "learner_config" not in cfg:
        raise ReplayError(f"run {run_id}: its run.started records no learner config, so its updates cannot be "
                          f"replayed (a run of `marlgrc run` without --algo, or written before reproduction "
                          f"existed); train a learner from its events with `marlgrc train --run {run_id}`")
    algo = algorithm(cfg["algorithm"]).name
    count, signed = _verify(records, run_id, public_key, allow_unverified)
    codec = default_codec()
    updates: list[dict] = []
    rollbacks: dict[bytes, dict] = {}
    chain = policy_chain(run_id, algo)
    for r in records:
        if r.topic == POLICY_TOPIC and r.key == chain:
            name, rec = codec.decode(r.value)
            if name == "policy_update":
                updates.append(rec | {"event_hash": bytes(r.value[-32:])})
            elif name == "policy_rollback":
                rollbacks[bytes(rec["rejected_update_event_hash"])] = rec
    updates.sort(key=lambda u: u["seq"])
    if not updates:
        raise ReplayError(f"run {run_id}: no policy.update on {chain}; nothing to reproduce")
    data: dict[tuple[str, str], list[tuple[int, Record]]] = {}   # chain -> [(seq, record)] in offset (= seq) order
    for r in records:
        if r.topic in ONLINE_TOPICS and r.topic != CHECKPOINT_TOPIC:
            data.setdefault((r.topic, r.key), []).append((seq_and_chain(r.value)[0], r))

    spec = RunSpec.from_run_started(run_id, started)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.get("torch_threads", threads)))  # float sums depend on the split
    try:
        config = config_from_record(algo, cfg["learner_config"])
        device = getattr(config, "device", "cpu")
        if device != "cpu":   # CUDA's sums are not the CPU's: only the same kind of device reproduces them
            try:
                torch_device(device)
            except ValueError as exc:
                raise ReplayError(f"run {run_id} updated on {device!r}, which this machine cannot give ({exc}); "
                                  f"reproduce it on a machine with that device") from None
        learner = algorithm(algo).learner_cls(spec, config)
        if learner.version != cfg.get("policy_version"):
            raise ReplayError(f"run {run_id}: its first batch was collected by policy {cfg.get('policy_version')}, "
                              f"not by a new learner of its config ({learner.version}): the session resumed a "
                              f"checkpoint, so its updates cannot be replayed from the topics alone")
        # signatures were checked above, over the whole run: the reader checks the hash chains batch by
        # batch, as the online loop read them
        reader = RunReader(run_id, allow_unverified=allow_unverified, topics=ONLINE_TOPICS)
        fed: dict[tuple[str, str], int] = {}   # chain -> how many of its records were fed (seqs ascend)
        checks = []
        for u in updates:
            window = []
            for x in u["lineage"]:
                key = (x["topic"], x["chain_id"])
                rows, i = data.get(key, ()), fed.get(key, 0)
                while i < len(rows) and rows[i][0] <= x["last_seq"]:
                    window.append(rows[i][1])
                    i += 1
                fed[key] = i
            replay = reader.add(window)
            rollback = rollbacks.get(u["event_hash"])
            before = _snapshot(learner) if rollback is not None else None
            learner.update(replay)
            check = UpdateCheck(u["seq"], u["policy_version"], bytes(u["weights_sha256"]), learner.weights_sha256())
            if rollback is not None:  # as the gate restored it: the state before, the counters after
                acted = learner.env_steps, learner.episodes
                learner.load_state_dict(load_torch_state(before, f"{run_id} before update {u['policy_version']}"))
                learner.env_steps, learner.episodes = acted
                check.rolled_back = True
                check.restored = learner.weights_sha256() == bytes(rollback["checkpoint_weights_sha256"])
            checks.append(check)
    finally:
        torch.set_num_threads(threads)
    return Reproduction(run_id, "online", algo, checks, learner, count, signed)


__all__ = ["Reproduction", "UpdateCheck", "reproduce"]

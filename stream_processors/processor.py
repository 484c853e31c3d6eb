"""The processor's state machine: input records in, sealed output events out, deterministically.

It joins each ``joint.action`` with the ``env.state`` it names, picks the run's rule set from
``run.started``, applies the pure rules (``rules.py``), computes fairness from the credit payloads
alone (``fairness.py``, the same windows as the faust app's), and
seals the results onto the run's ``{run}:credit`` and ``{run}:fairness`` chains. Bad input becomes a
``dead.letter`` event on ``dlq:{consumer}``. The rolling state of a run (chain heads, the normalizer,
fairness tallies) snapshots to bytes per run, and each record waiting for a join is its own entry
(``take_join_changes``: the original bytes, written once and deleted when joined), so a worker can
commit all of it in the same Kafka transaction as its outputs and input offsets (DESIGN.md "hash
contract") and no single state message grows with the backlog (the broker's 1 MB limit).

Determinism: for one run, credit events come out in the order of the run's joint.action chain,
whatever the interleaving of the input topics, because a joint action waits (in ``pending``) until
its state and the run's ``run.started`` have been seen. The live worker and ``marlgrc reprocess``
both drive this class, so the same input and rule version give the same payloads.

Signed checkpoints: with a ``signer``, ``checkpoint()`` signs what every chain it writes got since the
last call: one ``audit.checkpoint`` per chain (seq range, Merkle root, head) on the run's
``{run}:checkpoints:{producer_id}`` chain (``dlq:{consumer}:checkpoints:{producer_id}`` for the
dead-letter chain), then one checkpoint of that checkpoint chain itself (``signing.py``), as ``eventlog.EventLog``
does for the producers' chains. The worker calls it once per transaction, so every chain, checkpoint
chains included, is signed through its head whenever a transaction commits, and an auditor detects a
chain truncated after a checkpoint.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Callable, Iterable

from eventlog.chain import ChainHead, ChainWriter, Event, now_micros
from eventlog.checkpoint import Signer
from eventlog.codec import Codec, DecodeError, default_codec

from . import fairness as fair
from .rules import InvalidDecision, Normalizer, RuleSet, decision_from_records, rules_for
from .signing import CHECKPOINT_TOPIC, CheckpointChain, Unsigned, checkpoint_chain_id, sign

INPUT_TOPICS = ("marl.run.lifecycle", "marl.env.state", "marl.joint.action")
# episode.summary (the harness's per-episode metrics) shares the lifecycle chain: read, nothing derived
EXPECTED = {"marl.run.lifecycle": ("run_started", "run_finished", "episode_summary"), "marl.env.state": ("env_state",),
            "marl.joint.action": ("joint_action",)}
DLQ_TOPIC = "marl.dlq"


@dataclass
class RunState:
    run_id: str
    env_id: str | None = None
    config_json: str = ""
    rules_env: str | None = None          # fixed at the run's first credit
    norm: Normalizer = field(default_factory=Normalizer)
    credit_head: ChainHead = field(default_factory=ChainHead)
    fairness_head: ChainHead = field(default_factory=ChainHead)
    pending: deque = field(default_factory=deque)       # joint actions waiting for a state / run.started
    states: dict = field(default_factory=dict)          # state hash hex -> [state, flags], insertion order
    fairness: fair.Windows = field(default_factory=fair.Windows)   # over the run's credits
    checkpoints: CheckpointChain = field(default_factory=CheckpointChain)  # {run}:checkpoints:{producer}
    last_action_seq: int = -1             # highest seq of the run's joint-action chain read so far
    finished_action_seq: int | None = None  # the joint-action chain's head seq named by run.finished

    @property
    def complete(self) -> bool:
        """run.finished read, every joint action it names read and scored (or dead-lettered), and
        nothing waiting: no joint action, and no env.state (an env.state read ahead of its joint action
        may belong to steps written after run.finished)."""
        return (self.finished_action_seq is not None and self.last_action_seq >= self.finished_action_seq
                and not self.pending and not self.states)

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id, "env_id": self.env_id, "config_json": self.config_json,
            "rules_env": self.rules_env, "norm": [self.norm.count, self.norm.mean, self.norm.m2],
            "credit_head": [self.credit_head.seq, self.credit_head.event_hash.hex()],
            "fairness_head": [self.fairness_head.seq, self.fairness_head.event_hash.hex()],
            **self.fairness.to_json(),
            # the head alone, as the revision before self-checkpoints kept it (a rollback still continues the chain)
            "checkpoint_head": [self.checkpoints.head.seq, self.checkpoints.head.event_hash.hex()],
            "checkpoint_chain": self.checkpoints.to_json(),
            "last_action_seq": self.last_action_seq, "finished_action_seq": self.finished_action_seq,
        }

    @classmethod
    def from_json(cls, d: dict) -> "RunState":
        return cls(
            d["run_id"], d["env_id"], d["config_json"], d["rules_env"], Normalizer(*d["norm"]),
            ChainHead(d["credit_head"][0], bytes.fromhex(d["credit_head"][1])),
            ChainHead(d["fairness_head"][0], bytes.fromhex(d["fairness_head"][1])),
            deque(d.get("pending", ())), dict(d.get("states", {})), fair.Windows.from_json(d),
            # states saved before the checkpoint chain signed itself, or before anything was signed
            CheckpointChain.from_json(d.get("checkpoint_chain"), legacy_head=ChainHead(
                d["checkpoint_head"][0], bytes.fromhex(d["checkpoint_head"][1])) if "checkpoint_head" in d else None),
            int(d.get("last_action_seq", -1)), d.get("finished_action_seq"))


class Processor:
    """Feed it input records; it returns the events to produce (already sealed, in order).

    ``max_pending`` / ``max_states`` bound what waits for a join (None: unbounded, for batch mode,
    where ``finish()`` dead-letters what never joined). ``rules_override`` applies one rule set
    to every run (reprocessing with new rules) instead of
    choosing by the run's env id; ``default_env`` is the rule set for envs without their own and
    for runs whose run.started has not arrived after ``max_pending`` joint actions.
    """

    def __init__(self, *, consumer: str = "marlgrc-di", producer_id: str = "marlgrc-di",
                 default_env: str = "passthrough", rules_override: str | None = None,
                 window: int = 100, hop: int = 25, max_pending: int | None = 1000,
                 max_states: int | None = 1000,
                 credit_stream: str = "credit", fairness_stream: str = "fairness",
                 codec: Codec | None = None, clock: Callable[[], int] = now_micros, track_joins: bool = False,
                 signer: Signer | None = None):
        self.consumer = consumer
        self.producer_id = producer_id
        self.default_env = default_env
        self.rules_override = rules_override
        self.window, self.hop = window, hop
        self.max_pending, self.max_states = max_pending, max_states
        self.credit_stream, self.fairness_stream = credit_stream, fairness_stream
        self.codec = codec or default_codec()
        self.clock = clock
        self.runs: dict[str, RunState] = {}
        # runs complete and released from memory (``release_complete``): their ids only. ``reload``
        # gives a released run's last committed state back (the worker reads its state topic), for a
        # record of it that comes after all (a run that goes on after its run.finished)
        self.finished: set[str] = set()
        self.reload: Callable[[str], bytes | None] | None = None
        self.dlq_head = ChainHead()
        self.dlq_checkpoints = CheckpointChain()   # dlq:{consumer}:checkpoints:{producer_id}
        self.dirty: set[str] = set()
        self._writers: dict[tuple[str, str], ChainWriter] = {}
        self._rules: dict[str, RuleSet] = {}
        self.track_joins = track_joins
        self._join_changes: dict[tuple[str, str, str], bytes | None] = {}
        self._join_persisted: set[tuple[str, str, str]] = set()
        self._arrival = 0
        self.signer = signer
        # (logical topic, chain id) -> the partition the chain must be read from, or None: a scaled-out
        # worker owns one partition number; a record of a chain placed elsewhere is dead-lettered
        # ("misplaced") instead of giving its run a second writer
        self.placement: Callable[[str, str], int | None] | None = None
        # (topic, chain) -> (run id, or None for the dead-letter chain; its events not checkpointed yet)
        self._unsigned: dict[tuple[str, str], tuple[str | None, Unsigned]] = {}
        rules_for(rules_override or default_env)  # fail fast on an unknown name

    # -- state -----------------------------------------------------------------------------

    def snapshot(self, run_id: str) -> bytes:
        return json.dumps(self.runs[run_id].to_json(), separators=(",", ":")).encode()

    def restore(self, run_id: str, data: bytes) -> None:
        self.runs[run_id] = RunState.from_json(json.loads(data))
        self.finished.discard(run_id)
        self._writers = {k: w for k, w in self._writers.items() if not k[1].startswith(f"{run_id}:")}
        self._unsigned = {k: v for k, v in self._unsigned.items() if v[0] != run_id}

    # -- signed checkpoints ----------------------------------------------------------------

    def _sealed(self, run_id: str | None, topic: str, chain_id: str, prev: ChainHead, ev: Event) -> None:
        """Record ``ev`` (sealed after ``prev``) for the next checkpoint; run None: the dead-letter chain."""
        if self.signer is None:
            return
        entry = self._unsigned.get((topic, chain_id))
        if entry is None:
            self._unsigned[(topic, chain_id)] = (run_id, Unsigned(prev, [ev.event_hash]))
        else:
            entry[1].hashes.append(ev.event_hash)

    def checkpoint(self) -> list[Event]:
        """Sign every chain's events since the last call: one ``audit.checkpoint`` per chain on its
        run's checkpoint chain (the dead-letter chain's on ``dlq:{consumer}:checkpoints:{producer}``), then one
        checkpoint of each checkpoint chain that got any, covering it up to the event before that
        one (``signing.sign``). Nothing without a signer, or when nothing was sealed."""
        by_owner: dict[str | None, list] = {}
        for (topic, chain_id), (run_id, unsigned) in self._unsigned.items():
            by_owner.setdefault(run_id, []).append(unsigned.statement(topic, chain_id))
        self._unsigned = {}
        out: list[Event] = []
        for run_id, statements in by_owner.items():
            if run_id is None:
                chain = checkpoint_chain_id(self.dlq_chain, self.producer_id)
                w = self._writer(CHECKPOINT_TOPIC, chain, "", self.dlq_checkpoints.head)
                events, self.dlq_checkpoints = sign(w, self.dlq_checkpoints, statements, self.signer)
                self.dirty.add("")
            else:
                r = self._run(run_id)
                w = self._writer(CHECKPOINT_TOPIC, checkpoint_chain_id(run_id, self.producer_id), run_id,
                                 r.checkpoints.head)
                events, r.checkpoints = sign(w, r.checkpoints, statements, self.signer)
            out += events
        return out

    def snapshot_dlq(self) -> bytes:
        return json.dumps([self.dlq_head.seq, self.dlq_head.event_hash.hex(), *self.dlq_checkpoints.to_json()]).encode()

    def restore_dlq(self, data: bytes) -> None:
        d = json.loads(data)
        self.dlq_head = ChainHead(d[0], bytes.fromhex(d[1]))
        # [seq, hash]: saved before the dead-letter chain was signed (its checkpoint chain did not exist)
        self.dlq_checkpoints = CheckpointChain.from_json(d[2:] if len(d) > 2 else None)
        self._writers.pop((DLQ_TOPIC, self.dlq_chain), None)
        self._writers.pop((CHECKPOINT_TOPIC, checkpoint_chain_id(self.dlq_chain, self.producer_id)), None)
        self._unsigned = {k: v for k, v in self._unsigned.items() if v[0] is not None}

    # -- join entries: one state record per waiting joint action / env.state ------------------

    def _join_put(self, run_id: str, kind: str, h: str, meta: dict, value: bytes) -> None:
        if self.track_joins:
            self._join_changes[(run_id, kind, h)] = json.dumps(meta, separators=(",", ":")).encode() + b"\n" + value

    def _join_del(self, run_id: str, kind: str, h: str) -> None:
        if not self.track_joins:
            return
        k = (run_id, kind, h)
        if k in self._join_persisted:
            self._join_changes[k] = None       # written by an earlier transaction: delete (tombstone)
        else:
            self._join_changes.pop(k, None)    # added and joined within one transaction: never written

    def take_join_changes(self) -> dict[tuple[str, str, str], bytes | None]:
        """(run, "a"|"s", event hash hex) -> entry bytes, or None to delete it, since the last call."""
        ch, self._join_changes = self._join_changes, {}
        for k, v in ch.items():
            (self._join_persisted.add if v is not None else self._join_persisted.discard)(k)
        return ch

    def restore_joins(self, entries: Iterable[tuple[str, str, str, bytes]]) -> None:
        """Rebuild waiting joint actions and states from ``(run, kind, hash, entry bytes)`` (after
        ``restore`` of the runs), in arrival order."""
        decoded = []
        for run_id, kind, h, data in entries:
            meta_raw, value = data.split(b"\n", 1)
            decoded.append((json.loads(meta_raw), run_id, kind, h, value))
            self._join_persisted.add((run_id, kind, h))
        decoded.sort(key=lambda e: e[0]["n"])
        for meta, run_id, kind, h, value in decoded:
            r = self.runs.get(run_id) or self.runs.setdefault(run_id, RunState(run_id))
            _, rec = self.codec.decode(value)
            if kind == "s":
                r.states[h] = [list(rec["state"]), list(rec["flags"])]
            else:
                r.pending.append(self._pending_entry(rec, value, meta["where"], meta["key"], meta["n"]))
            self._arrival = max(self._arrival, meta["n"] + 1)

    @staticmethod
    def _pending_entry(rec: dict, value: bytes, where: list, key: str, n: int) -> dict:
        return {"hash": bytes(value[-32:]).hex(), "sources": [bytes(h).hex() for h in rec["source_event_hashes"]],
                "policy_version": rec["policy_version"], "episode": rec["episode"], "step": rec["step"],
                "actions": [{k: (list(v) if k == "continuous" else v) for k, v in a.items()} for a in rec["actions"]],
                "where": list(where), "key": key, "n": n, "value": bytes(value)}

    def take_dirty(self) -> set[str]:
        d, self.dirty = self.dirty, set()
        return d

    def release_complete(self) -> list[str]:
        """Release the runs that are complete (run.finished read, every joint action it names read,
        none waiting) and whose events are all signed: their state leaves memory (a long-running worker
        would otherwise keep every run it ever scored: about 100 kB each, mostly the fairness window)
        and only the id stays. Call it right after a commit (or a restore): the run's state as last
        committed is its state. A record of a released run read later (a run that goes on after its
        run.finished) brings the state back through ``reload`` and is scored from it, as if the run had
        stayed; without ``reload``, or if it finds nothing, the record is dead-lettered
        (``after_finish``), never scored from an empty state (that would fork the run's chains). A run
        with an env.state still waiting for its joint action stays (``RunState.complete``)."""
        unsigned = {v[0] for v in self._unsigned.values()}
        done = [run_id for run_id, r in self.runs.items() if r.complete and run_id not in unsigned]
        for run_id in done:
            self.runs.pop(run_id)
            self._writers = {k: w for k, w in self._writers.items() if not k[1].startswith(f"{run_id}:")}
            self.finished.add(run_id)
        return done

    @property
    def dlq_chain(self) -> str:
        return f"dlq:{self.consumer}"

    def _run(self, run_id: str) -> RunState:
        r = self.runs.get(run_id)
        if r is None:
            r = self.runs[run_id] = RunState(run_id)
        self.dirty.add(run_id)
        return r

    def _writer(self, topic: str, chain_id: str, run_id: str, head: ChainHead) -> ChainWriter:
        w = self._writers.get((topic, chain_id))
        if w is None or w.head != head:
            w = ChainWriter(topic, chain_id, run_id, self.producer_id, head=head, codec=self.codec, clock=self.clock)
            self._writers[(topic, chain_id)] = w
        return w

    # -- input -----------------------------------------------------------------------------

    def feed(self, topic: str, partition: int, offset: int, key: bytes | str | None, value: bytes | None
             ) -> list[Event]:
        """Process one input record (logical topic name). Never raises on bad input: it becomes a
        dead letter."""
        raw_key = key.encode() if isinstance(key, str) else (key or b"")
        if value is None:
            return [self._dead(topic, partition, offset, raw_key, b"", "empty", "record has no value (tombstone?)")]
        try:
            name, rec = self.codec.decode(value)
        except DecodeError as exc:
            return [self._dead(topic, partition, offset, raw_key, value, exc.kind, str(exc))]
        if sha256(memoryview(value)[:-32]).digest() != value[-32:]:
            return [self._dead(topic, partition, offset, raw_key, value, "integrity",
                               f"{name} event_hash does not match SHA-256 of its bytes: edited in transit")]
        if name not in EXPECTED.get(topic, ()):
            return [self._dead(topic, partition, offset, raw_key, value, "wrong_schema",
                               f"a {name} event on {topic}, which carries {EXPECTED.get(topic)}")]
        want = self.placement(topic, rec["chain_id"]) if self.placement is not None else None
        if want is not None and want != partition:
            return [self._dead(topic, partition, offset, raw_key, value, "misplaced",
                               f"{name} of chain {rec['chain_id']!r} read from partition {partition} of {topic}; "
                               f"co-partitioning puts it in partition {want} (docs/HASHING.md), and a scaled-out "
                               f"processor scores a run in one partition number only: write it with "
                               f"eventlog.kafka.EventProducer, which co-partitions")]
        if rec["run_id"] in self.finished:
            data = self.reload(rec["run_id"]) if self.reload is not None else None
            if data is None:
                return [self._dead(topic, partition, offset, raw_key, value, "after_finish",
                                   f"{name} of run {rec['run_id']!r} read after the run was complete (its run.finished "
                                   f"and every joint action it names were scored) and its state released, which "
                                   f"cannot be read back: not scored from an empty state")]
            self.restore(rec["run_id"], data)
            self.runs[rec["run_id"]].finished_action_seq = None  # it went on: only a new run.finished ends it
        try:
            if name == "run_started":
                r = self._run(rec["run_id"])
                r.env_id, r.config_json = rec["env_id"], rec["config_json"]
                return self._drain(r)
            if name == "env_state":
                r = self._run(rec["run_id"])
                h = bytes(value[-32:]).hex()
                r.states[h] = [list(rec["state"]), list(rec["flags"])]
                self._join_put(r.run_id, "s", h, {"n": self._arrival}, value)
                self._arrival += 1
                while self.max_states is not None and len(r.states) > self.max_states:  # a state no joint action named
                    old = next(iter(r.states))
                    del r.states[old]
                    self._join_del(r.run_id, "s", old)
                return self._drain(r)
            if name == "joint_action":
                r = self.runs.get(rec["run_id"])
                if r is not None:  # read, scored or not (an invalid one is dead-lettered below)
                    r.last_action_seq = max(r.last_action_seq, rec["seq"])
                decision_from_records(rec, None)  # validate now, so a bad action never blocks the run
                if not rec["source_event_hashes"]:
                    raise InvalidDecision("joint.action names no source events (it must name its env.state)")
                r = self._run(rec["run_id"])
                r.last_action_seq = max(r.last_action_seq, rec["seq"])
                where, k = [topic, partition, offset], raw_key.decode("utf-8", "replace")
                r.pending.append(self._pending_entry(rec, value, where, k, self._arrival))
                self._join_put(r.run_id, "a", r.pending[-1]["hash"], {"n": self._arrival, "where": where, "key": k}, value)
                self._arrival += 1
                return self._drain(r)
            if name == "run_finished":  # nothing to derive; it says how many joint actions the run wrote
                head = next((h for h in rec["chain_heads"] if h["topic"] == "marl.joint.action"
                             and h["chain_id"] == f"{rec['run_id']}:actions"), None)
                if head is not None:
                    r = self._run(rec["run_id"])
                    r.finished_action_seq = int(head["seq"])
            return []  # episode.summary: nothing to derive
        except (InvalidDecision, KeyError, TypeError, ValueError) as exc:
            return [self._dead(topic, partition, offset, raw_key, value, "invalid", f"{name}: {exc}")]

    def backlog(self, runs: Iterable[str] | None = None) -> tuple[int, int]:
        """(most joint actions waiting in one run, most states waiting in one run), over ``runs``
        (default: all): the worker pauses the topic that runs ahead, so that snapshots stay small."""
        rs = self.runs.values() if runs is None else [self.runs[r] for r in runs if r in self.runs]
        return (max((len(r.pending) for r in rs), default=0), max((len(r.states) for r in rs), default=0))

    def finish(self) -> list[Event]:
        """End of a batch: joint actions still waiting can never join; dead-letter them (or score
        them with the default rule set when only run.started is missing)."""
        saved, self.max_pending = self.max_pending, -1
        try:
            return [ev for r in list(self.runs.values()) for ev in self._drain(r)]
        finally:
            self.max_pending = saved

    def _rules_for(self, r: RunState) -> RuleSet:
        env = r.rules_env
        rs = self._rules.get(r.run_id)
        if rs is None:
            rs = self._rules[r.run_id] = rules_for(env, r.config_json, self.default_env)
        return rs

    def _drain(self, r: RunState) -> list[Event]:
        out: list[Event] = []
        while r.pending:
            ja = r.pending[0]
            over = self.max_pending is not None and len(r.pending) > self.max_pending
            if r.rules_env is None:
                if self.rules_override:
                    r.rules_env = self.rules_override
                elif r.env_id is not None:
                    r.rules_env = r.env_id
                elif over:
                    r.rules_env = self.default_env
                else:
                    break
            state_hash = next((h for h in ja["sources"] if h in r.states), None)
            if state_hash is None:
                if not over:
                    break
                r.pending.popleft()
                self._join_del(r.run_id, "a", ja["hash"])
                t, p, o = ja["where"]
                out.append(self._dead(t, p, o, ja["key"].encode(), ja.get("value", b""), "unjoinable",
                                      f"joint.action {ja['hash']} (episode {ja['episode']} step {ja['step']}): none of "
                                      f"its source events is an env.state that reached this processor "
                                      f"(gave up waiting); check the producer wrote marl.env.state"))
                continue
            r.pending.popleft()
            self._join_del(r.run_id, "a", ja["hash"])
            st, flags = r.states.pop(state_hash)
            self._join_del(r.run_id, "s", state_hash)
            try:
                out.extend(self._credit(r, ja, state_hash, {"state": st, "flags": flags}))
            except InvalidDecision as exc:
                t, p, o = ja["where"]
                out.append(self._dead(t, p, o, ja["key"].encode(), ja.get("value", b""), "invalid",
                                      f"joint.action {ja['hash']}: {exc}"))
        return out

    def _credit(self, r: RunState, ja: dict, state_hash: str, state: dict) -> list[Event]:
        rules = self._rules_for(r)
        decision = decision_from_records(ja, state)
        credit, norm = rules.interpret(decision, r.norm)
        jah = bytes.fromhex(ja["hash"])
        payload = credit.payload(decision.episode, decision.step, jah)
        try:  # fairness sees the credit event only, as every fairness processor does
            o = fair.outcome(payload)
        except fair.InvalidCredit as exc:  # a rule set's bug, dead-lettered with the joint action it scored
            raise InvalidDecision(f"rule set {rules.version} gave a credit fairness cannot use: {exc}") from exc
        r.norm = norm
        w = self._writer("marl.di.credit", f"{r.run_id}:{self.credit_stream}", r.run_id, r.credit_head)
        ev = w.append("di.credit", payload, policy_version=ja["policy_version"], rule_version=rules.version,
                      source_event_hashes=[jah, bytes.fromhex(state_hash)])
        self._sealed(r.run_id, w.topic, w.chain_id, r.credit_head, ev)
        r.credit_head = w.head
        # an episode closes when the next episode's first credit arrives (in add), or on all-done
        windows = r.fairness.add(decision.episode, o, ev.event_hash, f"{rules.version};{fair.VERSION}",
                                 size=self.window, hop=self.hop)
        if decision.episode_over:
            windows.append(r.fairness.close_episode())
        return [ev, *(self._fairness_event(r, win) for win in windows if win is not None)]

    def _fairness_event(self, r: RunState, win: fair.Window) -> Event:
        w = self._writer("marl.fairness.metrics", f"{r.run_id}:{self.fairness_stream}", r.run_id, r.fairness_head)
        ev = w.append("fairness.metrics", win.payload, rule_version=win.rule_version, source_event_hashes=win.sources)
        self._sealed(r.run_id, w.topic, w.chain_id, r.fairness_head, ev)
        r.fairness_head = w.head
        return ev

    def _dead(self, topic: str, partition: int, offset: int, key: bytes, value: bytes, kind: str, reason: str
              ) -> Event:
        w = self._writer(DLQ_TOPIC, self.dlq_chain, "", self.dlq_head)
        ev = w.append("dead.letter", {
            "source_topic": topic, "source_partition": partition, "source_offset": offset, "source_key": key,
            "error_kind": kind, "reason": reason, "consumer": self.consumer, "payload": value,
            "payload_sha256": sha256(value).digest()})
        self._sealed(None, w.topic, w.chain_id, self.dlq_head, ev)
        self.dlq_head = w.head
        self.dirty.add("")
        return ev

"""Replay a run from its topics (or an auditor's bundle) into episodes a learner can train on.

Joins, by run, episode, step and agent: ``agent.observation`` (one chain per agent), ``env.state``,
``joint.action`` (actions, the env's raw rewards, terminated/truncated) and, where the decision
interpreter ran, ``di.credit`` (its per-agent ``shares[].credit`` replace the raw rewards; a credit
names the joint action it scores by ``joint_action_hash``). Spaces come from ``run.started``, so no
environment code is needed.

Every chain is verified while it is read (eventlog.verify): a stream with a break is refused with
``UnverifiedStream`` unless ``allow_unverified``, and then ``Replay.verified`` is False, which the
learner writes into its ``policy.update`` lineage.

Episode numbers restart whenever the harness starts a new batch on the same run, so each chain's
events are numbered into segments: a new segment starts where (episode, step) stops increasing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np

from eventlog.codec import DecodeError, default_codec
from eventlog.hashing import seq_and_chain
from eventlog.kafka import Record
from eventlog.verify import CHECKPOINT_TOPIC, Report, Verifier

RUN_TOPICS = ("marl.run.lifecycle", "marl.env.state", "marl.agent.observation", "marl.joint.action",
              "marl.di.credit", CHECKPOINT_TOPIC)
# What the online loop reads back: the harness's own topics. Credits are left out: the decision
# interpreter writes them asynchronously, so a batch's credits may land after the loop marked the
# batch's end (and before the next batch's start); online training learns from the env's rewards,
# and `marlgrc train --run R` retrains on the credits once the worker has scored the run.
ONLINE_TOPICS = tuple(t for t in RUN_TOPICS if t != "marl.di.credit")
POLICY_TOPIC = "marl.policy.update"
# read and verified (earlier policy updates and their checkpoints too), but never trained on
VERIFY_TOPICS = (*RUN_TOPICS, POLICY_TOPIC)


class ReplayError(RuntimeError):
    """The events of a run cannot be joined into episodes (missing run.started, observation, ...)."""


class UnverifiedStream(ReplayError):
    """A chain of the run failed verification and --allow-unverified was not given."""


@dataclass(frozen=True)
class SpaceSpec:
    """A Gymnasium space as ``run.started`` records it (schemas: marlgrc.Space)."""

    kind: str
    shape: tuple[int, ...]
    n: int = 0
    start: int = 0
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    @classmethod
    def from_record(cls, rec: dict) -> "SpaceSpec":
        return cls(rec["kind"], tuple(int(x) for x in rec["shape"]), int(rec.get("n", 0)),
                   int(rec.get("start", 0)), tuple(rec.get("low", ())), tuple(rec.get("high", ())))

    @cached_property
    def discrete(self) -> bool:
        return self.kind == "Discrete"

    @cached_property
    def flat_dim(self) -> int:
        if self.kind == "Discrete":
            return 1
        return int(np.prod(self.shape)) if self.shape else 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "n": self.n, "start": self.start,
                "low": list(self.low), "high": list(self.high)}


@dataclass(frozen=True)
class RunSpec:
    """Who acts and in which spaces, from ``run.started``."""

    run_id: str
    env_id: str
    env_version: str
    seed: int
    agents: tuple[str, ...]
    observation_spaces: dict[str, SpaceSpec]
    action_spaces: dict[str, SpaceSpec]
    state_space: SpaceSpec
    config_hash: str = ""

    @classmethod
    def from_run_started(cls, run_id: str, rec: dict) -> "RunSpec":
        agents = tuple(a["agent_id"] for a in rec["agents"])
        return cls(run_id, rec["env_id"], rec["env_version"], int(rec["seed"]), agents,
                   {a["agent_id"]: SpaceSpec.from_record(a["observation_space"]) for a in rec["agents"]},
                   {a["agent_id"]: SpaceSpec.from_record(a["action_space"]) for a in rec["agents"]},
                   SpaceSpec.from_record(rec["state_space"]), rec.get("config_hash", ""))

    @cached_property  # computed once: read per step by the learners
    def obs_dim(self) -> int:
        """Widest agent observation; narrower ones are zero-padded."""
        return max(s.flat_dim for s in self.observation_spaces.values())

    @cached_property
    def state_dim(self) -> int:
        """Global state width: env.state() where the env has one, else all observations side by side."""
        if self.state_space.kind not in ("none", "") and self.state_space.flat_dim > 0:
            return self.state_space.flat_dim
        return self.obs_dim * len(self.agents)

    @cached_property
    def action_space(self) -> SpaceSpec:
        """The one action space every agent shares (parameter sharing needs equal action spaces).

        Discrete spaces of different sizes (same ``start``) share ``Discrete(max n)``; each agent's
        actions beyond its own n are masked out (``action_mask``)."""
        spaces = set(self.action_spaces.values())
        if len(spaces) > 1 and {s.kind for s in spaces} == {"Discrete"} and len({s.start for s in spaces}) == 1:
            return SpaceSpec("Discrete", (), max(s.n for s in spaces), next(iter(spaces)).start)
        if len(spaces) != 1:
            raise ReplayError(f"run {self.run_id}: agents have different action spaces "
                              f"({sorted({s.kind + str(s.shape) + str(s.n) for s in spaces})}); the shared "
                              f"policy needs one action space for all agents")
        return next(iter(spaces))

    @cached_property
    def discrete(self) -> bool:
        return self.action_space.discrete

    @cached_property
    def n_actions(self) -> int:
        return self.action_space.n if self.discrete else 0

    def action_mask(self) -> np.ndarray | None:
        """[N, n_actions] 1.0 where agent i may take action j; None when every agent has every action."""
        if not self.discrete:
            return None
        n = self.n_actions
        own = [self.action_spaces[a].n for a in self.agents]
        if all(k == n for k in own):
            return None
        return (np.arange(n)[None, :] < np.asarray(own)[:, None]).astype(np.float32)

    @cached_property
    def action_dim(self) -> int:
        return 0 if self.discrete else self.action_space.flat_dim

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "env_id": self.env_id, "env_version": self.env_version, "seed": self.seed,
                "agents": list(self.agents),
                "observation_spaces": {a: s.to_dict() for a, s in self.observation_spaces.items()},
                "action_spaces": {a: s.to_dict() for a, s in self.action_spaces.items()},
                "state_space": self.state_space.to_dict(), "config_hash": self.config_hash}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        def sp(x):
            return SpaceSpec(x["kind"], tuple(x["shape"]), x["n"], x["start"], tuple(x["low"]), tuple(x["high"]))
        return cls(d["run_id"], d["env_id"], d["env_version"], d["seed"], tuple(d["agents"]),
                   {a: sp(s) for a, s in d["observation_spaces"].items()},
                   {a: sp(s) for a, s in d["action_spaces"].items()}, sp(d["state_space"]), d["config_hash"])


@dataclass
class Episode:
    """One episode, time-major; agent axis in ``RunSpec.agents`` order."""

    segment: int
    episode: int
    obs: np.ndarray          # [T, N, obs_dim] float32, zero-padded; zeros where an agent is absent
    state: np.ndarray        # [T, state_dim] float32
    actions: np.ndarray      # [T, N] int64 (discrete) or [T, N, A] float32 (continuous)
    rewards: np.ndarray      # [T, N] float32: credit shares where present, else the env's rewards
    alive: np.ndarray        # [T, N] float32: 1 where the agent acted at that step
    terminated: bool         # the last step ended the episode for good (no bootstrap)

    @property
    def length(self) -> int:
        return int(self.obs.shape[0])

    @property
    def team_return(self) -> float:
        """Sum of every agent's reward over the episode (run.finished's ``mean_return`` averages this)."""
        return float(self.rewards.sum())


@dataclass(frozen=True)
class LineageRange:
    """What one chain contributed to a replay (schemas/policy_update.avsc LineageRange)."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    chain_id: str
    first_seq: int
    last_seq: int
    head_event_hash: bytes

    def to_record(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "first_offset": self.first_offset,
                "last_offset": self.last_offset, "chain_id": self.chain_id, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "head_event_hash": self.head_event_hash}


@dataclass
class Replay:
    """Episodes completed by one batch of records, with what they were read from."""

    spec: RunSpec
    episodes: list[Episode]
    lineage: list[LineageRange]
    verified: bool
    report: Report
    credited_steps: int = 0

    @property
    def env_steps(self) -> int:
        return sum(e.length for e in self.episodes)


@dataclass
class _Step:
    state: list | None = None
    obs: dict = field(default_factory=dict)
    action: dict | None = None
    action_hash: bytes | None = None


class RunReader:
    """Reads one run's records, batch after batch (``add``), verifying and joining as it goes.

    Keeps each chain's verified head, segment counters and incomplete episodes between batches, so an
    online learner reads exactly the new offsets each time. ``public_key`` pins the checkpoint signer;
    without it signatures are not checked (the report notes it) but every hash chain still is.
    ``topics``: the topics the records come from; checkpoints of chains on other topics (the fairness
    chains the decision interpreter signs beside its credits) are not held against the run.
    """

    def __init__(self, run_id: str, *, public_key=None, allow_unverified: bool = False,
                 topics: Iterable[str] = VERIFY_TOPICS):
        self.run_id = run_id
        self.allow_unverified = allow_unverified
        self.public_key = public_key
        self.topics = frozenset(topics)
        self.codec = default_codec()
        self.spec: RunSpec | None = None
        self.verified = True
        self._prefix = f"{run_id}:"
        self._last: dict[tuple[str, str], tuple[int, int]] = {}   # chain -> last (episode, step)
        self._segment: dict[tuple[str, str], int] = {}
        self._steps: dict[tuple[int, int, int], _Step] = {}        # (segment, episode, step)
        self._credit: dict[bytes, dict] = {}                        # joint_action_hash -> credit record
        self._heads: dict[tuple[str, str], tuple[int, bytes]] = {}  # chain -> (next seq, last hash) verified

    def _segment_of(self, r: Record, episode: int, step: int) -> int:
        key = (r.topic, r.key)
        last = self._last.get(key)
        seg = self._segment.get(key, 0)
        if last is not None and (episode, step) <= last:
            seg += 1
            self._segment[key] = seg
        self._last[key] = (episode, step)
        return seg

    def add(self, records: Iterable[Record]) -> Replay:
        """Verify and join the next batch of the run's records (each chain in offset order,
        continuing where the last batch left it)."""
        recs = [r for r in records if r.topic in self.topics and r.key.startswith(self._prefix)]
        cps = [r for r in recs if r.topic == CHECKPOINT_TOPIC]
        data = [r for r in recs if r.topic != CHECKPOINT_TOPIC]
        report = self._verify(cps, data)
        breaks = [b for b in report.breaks if b.chain_id.startswith(self._prefix)]
        if breaks:
            if not self.allow_unverified:
                first = breaks[0].describe()
                raise UnverifiedStream(
                    f"run {self.run_id}: {len(breaks)} chain(s) failed verification; first: {first}. Run "
                    f"`marlgrc verify` to inspect, or pass --allow-unverified to train anyway (the policy.update "
                    f"lineage will then say verified=false)")
            self.verified = False

        lineage: dict[tuple[str, int, str], list] = {}
        for r in data:
            if r.topic == POLICY_TOPIC:
                continue
            try:
                name, rec = self.codec.decode(r.value)
            except DecodeError as exc:
                if self.allow_unverified:
                    continue
                raise ReplayError(f"{r.topic} partition {r.partition} offset {r.offset}: event does not decode "
                                  f"({exc})") from None
            seq = rec["seq"]
            k = (r.topic, r.partition, r.key)
            if k not in lineage:
                lineage[k] = [r.offset, r.offset, seq, seq, bytes(r.value[-32:])]
            else:
                row = lineage[k]
                row[1], row[3], row[4] = r.offset, seq, bytes(r.value[-32:])
            self._ingest(r, name, rec)
        ranges = [LineageRange(t, p, a, b, c, s0, s1, h) for (t, p, c), (a, b, s0, s1, h) in sorted(lineage.items())]
        if self.spec is None:
            raise ReplayError(f"run {self.run_id}: no run.started event among the records read; read "
                              f"marl.run.lifecycle from its beginning (or check the run id)")
        episodes, credited = self._complete_episodes()
        return Replay(self.spec, episodes, ranges, self.verified, report, credited)

    def _verify(self, cps: list[Record], data: list[Record]) -> Report:
        """One batch verified on its own, each chain continued from the hash and seq the last batch
        ended it with, against the checkpoints read in this batch. A writer that is read batch after
        batch (the online loop's harness) signs each batch before it is read, on a checkpoint chain
        that starts in that batch; a checkpoint chain continued from an earlier batch would start
        here past seq 0 and be reported as missing its start."""
        verifier = Verifier(self.public_key, topics=self.topics)
        verifier.add_checkpoints(cps)
        for key in {(r.topic, r.key) for r in data}:
            head = self._heads.get(key)
            if head is not None:
                verifier.resume(*key, *head)
        verifier.feed(data)
        report = verifier.finish()
        for c in report.chains:
            next_seq, last_hash, _ = verifier.expects(c.topic, c.chain_id)
            self._heads[(c.topic, c.chain_id)] = (next_seq, last_hash)
        return report

    def _ingest(self, r: Record, name: str, rec: dict) -> None:
        if name == "run_started":
            spec = RunSpec.from_run_started(self.run_id, rec)
            if self.spec is None:
                self.spec = spec
            elif spec.agents != self.spec.agents or spec.action_spaces != self.spec.action_spaces:
                raise ReplayError(f"run {self.run_id}: a later run.started (offset {r.offset}) changes the agents "
                                  f"or action spaces; one run must keep them")
        elif name == "env_state":
            seg = self._segment_of(r, rec["episode"], rec["step"])
            self._steps.setdefault((seg, rec["episode"], rec["step"]), _Step()).state = rec["state"]
        elif name == "agent_observation":
            seg = self._segment_of(r, rec["episode"], rec["step"])
            self._steps.setdefault((seg, rec["episode"], rec["step"]), _Step()).obs[rec["agent_id"]] = rec["observation"]
        elif name == "joint_action":
            seg = self._segment_of(r, rec["episode"], rec["step"])
            st = self._steps.setdefault((seg, rec["episode"], rec["step"]), _Step())
            st.action, st.action_hash = rec, bytes(r.value[-32:])
        elif name == "credit_assignment":
            self._credit[bytes(rec["joint_action_hash"])] = rec

    def _complete_episodes(self) -> tuple[list[Episode], int]:
        by_ep: dict[tuple[int, int], list[int]] = {}
        for (seg, ep, step), st in self._steps.items():
            if st.action is not None:
                by_ep.setdefault((seg, ep), []).append(step)
        out, credited = [], 0
        for (seg, ep), steps in sorted(by_ep.items()):
            steps.sort()
            last = self._steps[(seg, ep, steps[-1])].action
            if not all(a["terminated"] or a["truncated"] for a in last["actions"]):
                continue  # not finished yet: wait for the next batch
            if steps != list(range(steps[0], steps[0] + len(steps))):
                raise ReplayError(f"run {self.run_id} episode {ep}: joint actions for steps {steps[0]}..{steps[-1]} "
                                  f"have gaps; read the topics from the episode's start")
            ep_obj, c = self._build(seg, ep, steps)
            credited += c
            out.append(ep_obj)
            for s in steps:
                st = self._steps.pop((seg, ep, s))
                self._credit.pop(st.action_hash, None)
        return out, credited

    def _build(self, seg: int, ep: int, steps: list[int]) -> tuple[Episode, int]:
        spec = self.spec
        T, N, D = len(steps), len(spec.agents), spec.obs_dim
        index = {a: i for i, a in enumerate(spec.agents)}
        obs = np.zeros((T, N, D), np.float32)
        state = np.zeros((T, spec.state_dim), np.float32)
        if spec.discrete:
            actions = np.zeros((T, N), np.int64)
        else:
            actions = np.zeros((T, N, spec.action_dim), np.float32)
        rewards = np.zeros((T, N), np.float32)
        alive = np.zeros((T, N), np.float32)
        credited = 0
        terminated = False
        start = spec.action_space.start if spec.discrete else 0
        for t, s in enumerate(steps):
            st = self._steps[(seg, ep, s)]
            credit = self._credit.get(st.action_hash)
            shares = {x["agent_id"]: x["credit"] for x in credit["shares"]} if credit else {}
            credited += bool(credit)
            for a in st.action["actions"]:
                i = index.get(a["agent_id"])
                if i is None:
                    raise ReplayError(f"run {self.run_id} episode {ep} step {s}: agent {a['agent_id']!r} is not in "
                                      f"run.started's agents {list(spec.agents)}")
                o = st.obs.get(a["agent_id"])
                if o is None:
                    raise ReplayError(f"run {self.run_id} episode {ep} step {s}: joint.action has agent "
                                      f"{a['agent_id']!r} but no agent.observation was read for it; read "
                                      f"marl.agent.observation over the same range")
                obs[t, i, :len(o)] = o
                if spec.discrete:
                    actions[t, i] = a["discrete"] - start
                else:
                    actions[t, i] = a["continuous"]
                rewards[t, i] = shares.get(a["agent_id"], a["reward"]) if credit else a["reward"]
                alive[t, i] = 1.0
                if t == T - 1:
                    terminated = terminated or a["terminated"]
            if st.state:
                state[t, :len(st.state)] = st.state[:spec.state_dim]
            else:
                state[t] = obs[t].reshape(-1)[:spec.state_dim]
        return Episode(seg, ep, obs, state, actions, rewards, alive, terminated), credited


def read_records_of_run(records: Iterable[Record], run_id: str, *, public_key=None,
                        allow_unverified: bool = False) -> Replay:
    """One-shot replay of a run from any records (Kafka, a bundle, a MemorySink turned into Records)."""
    return RunReader(run_id, public_key=public_key, allow_unverified=allow_unverified).add(records)


def records_from_memory(sent: list[tuple[str, str, bytes]]) -> list[Record]:
    """MemorySink's (topic, key, value) list as Records: partition 0, offset = position per topic."""
    offsets: dict[str, int] = {}
    out = []
    for topic, key, value in sent:
        o = offsets.get(topic, 0)
        offsets[topic] = o + 1
        out.append(Record(topic, 0, o, key, value, 0))
    return out


def run_ids_in(records: Iterable[Record]) -> list[str]:
    """The run ids of every run.started among the records."""
    codec = default_codec()
    out = []
    for r in records:
        if r.topic == "marl.run.lifecycle":
            name, rec = codec.decode(r.value)
            if name == "run_started" and rec["run_id"] not in out:
                out.append(rec["run_id"])
    return out


def read_kafka(bootstrap: str, run_id: str, *, prefix: str = "", public_key=None, allow_unverified: bool = False,
               start_offsets: dict[tuple[str, int], int] | None = None,
               end_offsets: dict[tuple[str, int], int] | None = None) -> Replay:
    """Replay a run from Kafka: from the beginning of its topics, or over the given offset ranges."""
    from eventlog.kafka import read_records

    return read_records_of_run(read_records(bootstrap, VERIFY_TOPICS, prefix=prefix, start_offsets=start_offsets,
                                            end_offsets=end_offsets), run_id,
                               public_key=public_key, allow_unverified=allow_unverified)


def read_bundle_run(bundle_dir: Path, run_id: str | None = None, *, public_key=None,
                    allow_unverified: bool = False) -> Replay:
    """Replay a run from an auditor's bundle. Without ``public_key`` the bundle's own key is used
    (pin yours to not trust the bundle's); without ``run_id`` the bundle must hold exactly one run."""
    from eventlog.bundle import bundle_public_key, read_bundle
    from eventlog.checkpoint import load_public_key

    recs = list(read_bundle(Path(bundle_dir)))
    if run_id is None:
        runs = run_ids_in(recs)
        if len(runs) != 1:
            raise ReplayError(f"bundle {bundle_dir} holds runs {runs}; name one with --run")
        run_id = runs[0]
    if public_key is None:
        pem = bundle_public_key(Path(bundle_dir))
        public_key = load_public_key(pem) if pem else None
    return read_records_of_run(recs, run_id, public_key=public_key, allow_unverified=allow_unverified)


def watermarks(bootstrap: str, topics: Iterable[str] = RUN_TOPICS, prefix: str = "") -> dict[tuple[str, int], int]:
    """High watermark (next offset) of every partition of ``topics``: where a batch starts or ends."""
    from confluent_kafka import Consumer

    from eventlog.kafka import partitions_of
    from eventlog.topics import logical

    import time

    from confluent_kafka import KafkaException

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "marlgrc-watermarks", "enable.auto.commit": False})
    try:
        out = {}
        for tp in partitions_of(bootstrap, topics, prefix):
            for attempt in range(20):
                try:
                    out[(logical(prefix, tp.topic), tp.partition)] = c.get_watermark_offsets(tp, timeout=10)[1]
                    break
                except KafkaException:
                    if attempt == 19:
                        raise
                    time.sleep(0.25)  # a just-created topic may have no leader yet
        return out
    finally:
        c.close()


def chain_seq(value: bytes) -> int:
    return seq_and_chain(value)[0]

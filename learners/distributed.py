"""Many producers, one learner (seed 002): N producer processes collect each round's episodes with
the policy the learner published, each writing a run of its own through Kafka; the learner reads
the union through a consumer group, verifies each producer's batch, trains on all of it and names
every producer's ranges in its ``policy.update`` lineage.

Runs and chains. Producer ``k`` of the learner's run ``G`` writes the run ``G.p{k}``
(``producer_run_id``), with the harness's ordinary chain ids (``G.p0:env``, ``G.p0:obs:agent_0``,
``G.p0:actions``, ``G.p0:lifecycle``): distinct per producer, one writer each, and nothing in the
hash contract, the harness or ``RunReader`` changes (each producer's run is read by a ``RunReader``
of its own, so episode numbers of different producers never meet). The learner's run ``G`` holds
its ``run.started`` (whose config names the producer runs, the split and the learner's config),
``G:policy:{algo}``, its checkpoints and ``run.finished``.

Rounds are synchronous, so the return curve per env step is the one of ``learners.online``::

    learner     publish policy r (a signed checkpoint file, PolicyBoard)
    producer k  wait for policy r -> collect its share of round r -> close the batch's log: signed on
                the checkpoint chain G.p{k}:checkpoints:harness-{r}, flushed (collect_batch)
    learner     consume (consumer group) until every producer's round r is readable (RoundBook)
                -> RunReader_k.add(batch k) for each k -> the union -> learner.update
                -> policy.update naming every producer's ranges -> publish r+1 (or stop)

A producer's round ``r`` is readable when its checkpoint chain ``harness-{r}`` holds a checkpoint of
itself (the last event ``EventLog.close`` writes) and every chain its checkpoints name has arrived up
to the seq they sign. Round ``r``'s ``E`` episodes are split ``E // N`` each (one more for the first
``E % N`` producers) and producer ``k`` resets them with the seeds ``seed * 1_000_003 + r * E + (the
episodes of the producers before it) + i``: the union of a round has the seeds of ``train_online``'s
iteration ``r``. Each producer samples actions with a generator of its own, seeded by ``(seed, r, k)``.
Credit shares from the decision interpreter are not waited for (a round cannot know when a worker's
credits are complete): the learner trains on the env's rewards.

Lag (``lag=L``, default 0: the synchronous rounds above). Round ``r`` is collected with policy
``max(0, r - L)`` (the learner after that many updates): the learner publishes policy 0 for rounds
``0..L``, and after its update on round ``r`` publishes policy ``r + 1`` for round ``r + 1 + L``. So
with ``L = 1`` the producers collect round ``r + 1`` with policy ``r`` while the learner updates on
round ``r``: the update is off the producers' time, and every round from ``L`` on is collected by
a policy ``L`` updates behind the one that trains on it (round ``r < L`` by policy 0). PPO's ratio
must then compare with the policy that acted, not the learner's current one: the learner keeps the
actors of the policies still collecting (``BehaviourActors``) and gives each round's update the actor
that collected it (``MAPPO.update(replay, behaviour=...)``; off-policy learners need none). When the
time budget runs out, the rounds already published are still trained on. ``run.started``'s config
records ``lag`` (absent at 0, so a synchronous session's config and hash are what they were).

Every update is a function of the producers' batches in producer order (and of the lag), so
``retrain`` computes each update's weights again from the topics alone, bit for bit (``reproduce``
compares them with the ``weights_sha256`` each ``policy.update`` recorded).

The policy reaches the producers as a signed learner checkpoint (``learners.checkpoint``) in a
directory they share (a local one here; across hosts, a shared file system), announced by an
atomically written ``round-{r}.ready``; only the training data travels through Kafka.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from eventlog.codec import DecodeError, default_codec
from eventlog.hashing import seq_and_chain
from eventlog.kafka import Record
from eventlog.log import EventLog, Sink
from eventlog.verify import CHECKPOINT_TOPIC, Report

from . import algorithm, config_from_record
from .checkpoint import CheckpointError, learner_from_checkpoint, load_checkpoint, save_checkpoint
from .lineage import emit_policy_update, policy_chain
from .online import Collect, OnlineResult, _close_after
from .replay import POLICY_TOPIC, Replay, ReplayError, RunReader, RunSpec

# what producers write and the learner waits for (di.credit is written by a worker, at its own pace)
ROUND_TOPICS = ("marl.run.lifecycle", "marl.env.state", "marl.agent.observation", "marl.joint.action",
                CHECKPOINT_TOPIC)


class DistributedError(RuntimeError):
    """A round cannot complete: a producer failed, stopped writing, or never got its policy."""


# --- names and seeds ---------------------------------------------------------------------------
def producer_run_id(group_run: str, producer: int) -> str:
    """The run producer ``producer`` of learner run ``group_run`` writes (no ``:``: chain ids are
    ``{run}:{stream}`` and a run id is what comes before the first ``:``)."""
    return f"{group_run}.p{producer}"


def batch_producer_id(round_: int) -> str:
    """Producer id of a round's log: its checkpoint chain is ``{run}:checkpoints:harness-{r}``, as
    the batches of ``learners.online``."""
    return f"harness-{round_}"


def round_checkpoint_chain(run_id: str, round_: int) -> str:
    return f"{run_id}:checkpoints:{batch_producer_id(round_)}"


def split_episodes(episodes: int, producers: int) -> list[int]:
    """Episodes per producer in one round: ``episodes // producers`` each, one more for the first
    ``episodes % producers``."""
    if producers < 1:
        raise ValueError(f"producers must be >= 1, got {producers}")
    q, extra = divmod(episodes, producers)
    return [q + (k < extra) for k in range(producers)]


def round_seed(seed: int, round_: int, episodes: int, producer: int, producers: int) -> int:
    """Reset seed of producer ``producer``'s first episode of round ``round_`` (``episodes`` per round
    in all): the round's seeds are those of ``train_online``'s iteration ``round_``."""
    return seed * 1_000_003 + round_ * episodes + sum(split_episodes(episodes, producers)[:producer])


def acting_seed(seed: int, round_: int, producer: int) -> int:
    """Seed of the action sampler of producer ``producer`` in round ``round_``: every producer samples
    its own random numbers, and a session is deterministic given ``seed``."""
    digest = hashlib.sha256(f"marlgrc.acting/{seed}/{round_}/{producer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def reseed_acting(policy: Any, seed: int) -> None:
    """Reseed the generator a learner acts with (``sampler``: MAPPO, IPPO; ``explorer``: DQN, QMIX);
    a loaded checkpoint carries the learner's own, which would be the same in every producer."""
    sampler = getattr(policy, "sampler", None)
    if isinstance(sampler, torch.Generator):
        sampler.manual_seed(seed)
        return
    explorer = getattr(policy, "explorer", None)
    if isinstance(explorer, np.random.Generator):
        explorer.bit_generator.state = np.random.PCG64(seed).state
        return
    raise TypeError(f"{type(policy).__name__} has no action sampler (.sampler or .explorer) to reseed; every "
                    f"producer would act with the same random numbers")


# --- rounds in flight (lag) --------------------------------------------------------------------------------
def acting_policy(round_: int, lag: int) -> int:
    """The policy that collects round ``round_`` (the learner after that many updates): ``round_`` itself
    with synchronous rounds (``lag`` 0), else ``max(0, round_ - lag)``."""
    if lag < 0:
        raise ValueError(f"lag must be >= 0, got {lag}")
    return max(0, round_ - lag)


class BehaviourActors:
    """The actors of the policies still collecting rounds (``lag`` > 0, on-policy learners), so that each
    round's update scores PPO's old log-probabilities with the policy that acted in it.

    ``keep(p, learner)`` after the learner's ``p``-th update (0: before any), with the learner's actor as
    published; ``behaviour(r, updates)``: the actor that collected round ``r``, or None where it is the
    learner's own (``updates`` updates so far) or the learner is off-policy; older actors are dropped."""

    def __init__(self, lag: int, learner: Any):
        acting_policy(0, lag)  # checks lag
        self.lag = lag
        self.on_policy = bool(getattr(learner, "on_policy", False)) and lag > 0
        self._actors: dict[int, torch.nn.Module] = {}

    def keep(self, policy: int, learner: Any) -> None:
        if self.on_policy:
            self._actors[policy] = copy.deepcopy(learner.actor)

    def behaviour(self, round_: int, updates: int) -> torch.nn.Module | None:
        p = acting_policy(round_, self.lag)
        for old in [q for q in self._actors if q < p]:
            del self._actors[old]
        if not self.on_policy or p == updates:
            return None
        if p not in self._actors:
            raise ValueError(f"round {round_} was collected by policy {p}, whose actor was not kept")
        return self._actors[p]

    def held(self) -> list[int]:
        """The policies whose actors are kept (for tests)."""
        return sorted(self._actors)


def _update(learner: Any, replay: Replay, behaviour: torch.nn.Module | None) -> dict:
    return learner.update(replay) if behaviour is None else learner.update(replay, behaviour=behaviour)


# --- round bookkeeping (pure) ----------------------------------------------------------------------
@dataclass
class _Producer:
    pending: list[tuple[Record, int]] = field(default_factory=list)   # (record, seq) in arrival order


class RoundBook:
    """Which records belong to which producer's round, from records arriving in any interleaving of
    partitions (a live consumer's polls, or whole topics read afterwards).

    ``add`` keeps the records of the producer runs (``runs``, in producer order) on ``ROUND_TOPICS``
    and drops everything else. Producer ``k``'s round ``r`` is ``ready`` when the checkpoint chain
    ``{run_k}:checkpoints:harness-{r}`` holds a checkpoint of itself and every chain its checkpoints
    name has arrived up to the seq they sign; ``take`` then returns that round's records: those
    chains up to those seqs, and the checkpoint chain, in arrival order (per chain, offset order).
    """

    def __init__(self, runs: Sequence[str]):
        self.runs = tuple(runs)
        self._of = {run: k for k, run in enumerate(self.runs)}
        self._producers = [_Producer() for _ in self.runs]
        self._high: dict[tuple[str, str], int] = {}                    # chain -> highest seq arrived
        self._signed: dict[str, dict[tuple[str, str], int]] = {}       # checkpoint chain -> chain -> last seq
        self._closed: set[str] = set()                                 # checkpoint chains that signed themselves
        self._codec = default_codec()

    def add(self, records: Iterable[Record]) -> int:
        """Keep the producers' records; returns how many were kept."""
        kept = 0
        of, high, topics = self._of, self._high, ROUND_TOPICS
        for r in records:
            if r.topic not in topics:
                continue
            run, sep, _ = r.key.partition(":")
            k = of.get(run) if sep else None
            if k is None:
                continue
            try:
                seq = seq_and_chain(r.value)[0]
            except (ValueError, IndexError, UnicodeDecodeError):
                seq = -1  # unreadable: it goes with its chain's round, where the verifier reports it
            self._producers[k].pending.append((r, seq))
            kept += 1
            key = (r.topic, r.key)
            if seq > high.get(key, -1):
                high[key] = seq
            if r.topic == CHECKPOINT_TOPIC:
                self._note_checkpoint(r)
        return kept

    def _note_checkpoint(self, r: Record) -> None:
        try:
            name, rec = self._codec.decode(r.value)
        except DecodeError:
            return
        if name != "audit_checkpoint":
            return
        checked = (rec["checked_topic"], rec["checked_chain_id"])
        if checked == (CHECKPOINT_TOPIC, r.key):
            self._closed.add(r.key)
        else:
            signed = self._signed.setdefault(r.key, {})
            signed[checked] = max(signed.get(checked, -1), int(rec["last_seq"]))

    def ready(self, producer: int, round_: int) -> bool:
        chain = round_checkpoint_chain(self.runs[producer], round_)
        if chain not in self._closed:
            return False
        high = self._high
        return all(high.get(c, -1) >= last for c, last in self._signed.get(chain, {}).items())

    def take(self, producer: int, round_: int) -> list[Record]:
        """Producer ``producer``'s round ``round_`` (``ready`` must be true), removed from the book."""
        if not self.ready(producer, round_):
            raise ValueError(f"round {round_} of {self.runs[producer]} is not complete: {self.missing(round_)}")
        chain = round_checkpoint_chain(self.runs[producer], round_)
        limits = dict(self._signed.pop(chain, {}))
        limits[(CHECKPOINT_TOPIC, chain)] = 1 << 62
        self._closed.discard(chain)
        p = self._producers[producer]
        out, keep = [], []
        for r, seq in p.pending:
            lim = limits.get((r.topic, r.key))
            if lim is not None and seq <= lim:
                out.append(r)
            else:
                keep.append((r, seq))
        p.pending = keep
        return out

    def missing(self, round_: int) -> str:
        """What round ``round_`` still waits for, per producer, in words (for errors)."""
        parts = []
        for k, run in enumerate(self.runs):
            if self.ready(k, round_):
                continue
            chain = round_checkpoint_chain(run, round_)
            if chain not in self._closed:
                parts.append(f"{run}: its batch is not signed yet (no self-checkpoint on {chain})")
                continue
            behind = [f"{c[1]} at seq {self._high.get(c, -1)} of {last}"
                      for c, last in sorted(self._signed.get(chain, {}).items()) if self._high.get(c, -1) < last]
            parts.append(f"{run}: {', '.join(behind)}")
        return "; ".join(parts) or "nothing"

    def pending_low(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): lowest offset still held}: a consumer group may commit up to there."""
        low: dict[tuple[str, int], int] = {}
        for p in self._producers:
            for r, _ in p.pending:
                k = (r.topic, r.partition)
                if r.offset < low.get(k, 1 << 62):
                    low[k] = r.offset
        return low


def union_replay(spec: RunSpec, replays: Sequence[Replay]) -> Replay:
    """One round's replays (one per producer, in producer order) as the learner's batch: episodes in
    producer order, every producer's lineage ranges, verified only if all were."""
    lineage = sorted((r for rp in replays for r in rp.lineage), key=lambda x: (x.topic, x.partition, x.chain_id))
    report = Report([c for rp in replays for c in rp.report.chains], [n for rp in replays for n in rp.report.notes])
    return Replay(spec, [e for rp in replays for e in rp.episodes], lineage, all(rp.verified for rp in replays),
                  report, sum(rp.credited_steps for rp in replays))


def _check_spec(learner: Any, replay: Replay, run: str) -> None:
    got = replay.spec
    if got.agents != learner.spec.agents or got.action_spaces != learner.spec.action_spaces:
        raise ReplayError(f"run {run}: run.started's agents/spaces differ from the spec the policy was built for")


# --- the policy, from the learner to its producers -----------------------------------------------------
class PolicyBoard:
    """A directory where the learner publishes each round's policy: the signed checkpoint
    ``round-{r}`` (``.pt``, ``.json``, ``.sig.json``), then ``round-{r}.ready``, written atomically; or
    ``stop`` when there is no next round. Producers ``wait`` for either. Only the last ``keep``
    rounds' files are kept."""

    def __init__(self, directory: Path, *, keep: int = 3):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def base(self, round_: int) -> Path:
        return self.directory / f"round-{round_:06d}"

    def _write(self, path: Path, data: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none

    def publish(self, round_: int, learner: Any, key) -> Path:
        base = self.base(round_)
        save_checkpoint(base, learner, key)
        self._write(base.with_suffix(".ready"), {"round": round_, "policy_version": learner.version,
                                                 "weights_sha256": learner.weights_sha256().hex()})
        old = self.base(round_ - self.keep)
        for suffix in (".ready", ".pt", ".json", ".sig.json"):
            Path(str(old) + suffix).unlink(missing_ok=True)
        return base

    def stopped(self) -> bool:
        """Whether the learner wrote ``stop`` (no round after those published will come)."""
        return (self.directory / "stop").exists()

    def stop(self, rounds: int, reason: str = "") -> None:
        if not (self.directory / "stop").exists():
            self._write(self.directory / "stop", {"rounds": rounds, "reason": reason})

    def wait(self, round_: int, *, timeout: float, poll: float = 0.001) -> Path | None:
        """The checkpoint of round ``round_`` once published, or None once the learner stopped."""
        ready, stop = self.base(round_).with_suffix(".ready"), self.directory / "stop"
        deadline = time.monotonic() + timeout
        while True:
            if ready.exists():
                return self.base(round_)
            if stop.exists():
                return None
            if time.monotonic() > deadline:
                raise DistributedError(f"no policy for round {round_} in {self.directory} after {timeout:.0f}s; "
                                       f"is the learner running?")
            time.sleep(poll)


def load_policy(base: Path, public_key, into: Any = None) -> Any:
    """The learner of a signed checkpoint (its signature checked first); ``into`` a learner of the same
    algorithm and spec, its state is replaced instead of building a new one."""
    if into is None:
        return learner_from_checkpoint(base, public_key)
    state, meta = load_checkpoint(base, public_key)
    into.load_state_dict(state)
    if into.weights_sha256().hex() != meta["weights_sha256"]:
        raise CheckpointError(f"checkpoint {base}: restored weights hash to {into.weights_sha256().hex()[:16]}…, "
                              f"the metadata says {meta['weights_sha256'][:16]}…")
    return into


# --- the producer's side ---------------------------------------------------------------------------------
def collect_batch(collect: Collect, policy: Any, sink: Sink, *, run_id: str, round_: int,
                  heads: dict, signer, episodes: int, seed: int, config: dict) -> dict:
    """One signed batch: a log of its own (producer id ``harness-{r}``) continuing the run's chains from
    ``heads``, ``collect`` into it, then close it (every event signed, the sink flushed). Returns the
    data chains' heads after it. The producer half of one ``train_online`` iteration."""
    if signer is None:
        raise ValueError("collect_batch needs a signer: a round ends with its signed checkpoint")
    log = EventLog(sink, run_id=run_id, producer_id=batch_producer_id(round_), signer=signer)
    for (topic, chain_id), head in heads.items():
        log.writer(topic, chain_id, head=head)
    try:
        collect(policy, log, episodes=episodes, seed=seed, config=config)
    except BaseException as exc:
        _close_after(log, exc)
        raise
    log.close()
    return {**heads, **{k: h for k, h in log.heads().items() if k[0] != CHECKPOINT_TOPIC}}


def produce_rounds(group_run: str, producer: int, producers: int, *, collect: Collect, sink: Sink,
                   board: PolicyBoard, public_key, signer, episodes_per_round: int, seed: int, algo: str,
                   wait_timeout_s: float = 600.0) -> int:
    """Producer ``producer`` of ``producers``: for each round the learner publishes, load its policy,
    collect this producer's share into run ``producer_run_id(group_run, producer)`` and sign it;
    returns the rounds collected when the learner stops."""
    run_id = producer_run_id(group_run, producer)
    share = split_episodes(episodes_per_round, producers)[producer]
    heads: dict = {}
    policy = None
    r = 0
    while True:
        base = board.wait(r, timeout=wait_timeout_s)
        if base is None:
            return r
        policy = load_policy(base, public_key, into=policy)
        reseed_acting(policy, acting_seed(seed, r, producer))
        heads = collect_batch(collect, policy, sink, run_id=run_id, round_=r, heads=heads, signer=signer,
                              episodes=share, seed=round_seed(seed, r, episodes_per_round, producer, producers),
                              config={"algorithm": algo, "iteration": r, "group_run": group_run,
                                      "producer": producer, "producers": producers})
        r += 1


# --- the learner's side ----------------------------------------------------------------------------------
def group_config(algo: str, config: Any, runs: Sequence[str], episodes_per_round: int, seed: int,
                 lag: int = 0) -> dict:
    """The learner run's config (its ``run.started``): enough to retrain it from the topics. ``lag`` is
    recorded where it is not 0 (a synchronous session's config is what it was before lags existed)."""
    from dataclasses import asdict

    acting_policy(0, lag)  # checks lag
    return {"algorithm": algo, "learner_config": asdict(config), "producer_runs": list(runs),
            "episodes_per_round": episodes_per_round, "seed": seed, "round_topics": list(ROUND_TOPICS),
            **({"lag": int(lag)} if lag else {})}


class RecordSource:
    """Where the learner's records come from: ``poll(timeout)`` returns the records that arrived (an
    empty list after ``timeout`` seconds without any); ``commit(low)`` may record progress."""

    def poll(self, timeout: float) -> list[Record]:
        raise NotImplementedError

    def commit(self, low: dict[tuple[str, int], int]) -> None:
        pass


class GroupSource(RecordSource):
    """The learner's Kafka consumer: a consumer group (``group_id``) subscribed to ``topics``, each
    partition assigned from its offset in ``start`` (the end offsets taken before the producers
    started; a partition not in it from the group's committed offset, else the beginning),
    ``read_committed``; after a rebalance a partition continues after the last record polled, so
    nothing is delivered twice. ``commit`` commits, per partition, the offset below which every
    record the learner kept has been trained on."""

    def __init__(self, bootstrap: str, prefix: str, group_id: str, start: dict[tuple[str, int], int],
                 topics: Sequence[str] = ROUND_TOPICS):
        from eventlog.kafka import _consumer, probe

        probe(bootstrap)
        self.prefix, self.start = prefix, dict(start)
        self._last_commit: list = []
        self._next: dict[tuple[str, int], int] = {}   # (topic, partition) -> offset after the last polled
        self._consumer = _consumer(bootstrap, **{"group.id": group_id})
        self._consumer.subscribe([prefix + t for t in topics], on_assign=self._on_assign)

    def _on_assign(self, consumer, partitions) -> None:
        n = len(self.prefix)
        for tp in partitions:
            key = (tp.topic[n:], tp.partition)
            offset = self._next.get(key, self.start.get(key))
            if offset is not None:
                tp.offset = offset
        consumer.assign(partitions)

    def poll(self, timeout: float) -> list[Record]:
        from confluent_kafka import KafkaError, KafkaException

        c = self._consumer
        first = c.poll(timeout)  # blocks until a message (or a rebalance is served), then drain the queue
        if first is None:
            return []
        n, out = len(self.prefix), []
        for m in [first, *c.consume(10000, 0)]:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            key = m.key()
            rec = Record(m.topic()[n:], m.partition(), m.offset(),
                         key.decode("utf-8", "backslashreplace") if key is not None else "", m.value(),
                         m.timestamp()[1])
            self._next[(rec.topic, rec.partition)] = rec.offset + 1
            out.append(rec)
        return out

    def commit(self, low: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import TopicPartition

        c, n = self._consumer, len(self.prefix)
        offsets = [TopicPartition(tp.topic, tp.partition,
                                  min(tp.offset, low.get((tp.topic[n:], tp.partition), tp.offset)))
                   for tp in c.position(c.assignment()) if tp.offset >= 0]
        if offsets:
            c.commit(offsets=offsets, asynchronous=True)
            self._last_commit = offsets

    def close(self) -> None:
        from confluent_kafka import KafkaException

        try:
            if self._last_commit:  # the last progress committed for sure before the group is left
                self._consumer.commit(offsets=self._last_commit, asynchronous=False)
        except KafkaException:
            pass  # progress is information here: the session's result does not depend on it
        finally:
            self._consumer.close()


def train_distributed(spec: RunSpec, algo: str, *, runs: Sequence[str], source: RecordSource, sink: Sink,
                      board: PolicyBoard, signing_key, signer, public_key, iterations: int, seed: int = 1,
                      config: Any = None, learner: Any = None, run_started: dict | None = None,
                      time_budget_s: float | None = None, on_update: Callable[[dict], None] | None = None,
                      alive: Callable[[], None] | None = None, round_timeout_s: float = 120.0,
                      keep_replays: bool = False, lag: int = 0) -> OnlineResult:
    """The learner of ``runs`` (producer runs, in producer order) on run ``spec.run_id``: publish policy
    0, then per round wait for every producer's signed batch (``RoundBook`` over ``source``), read and
    verify each with its own ``RunReader`` as soon as it is complete, update on the union, write
    ``policy.update`` (signed) and publish the next policy, for ``iterations`` rounds or until
    ``time_budget_s`` runs out (checked after each update); then ``stop``.

    ``signing_key`` signs the published checkpoints, ``signer`` the learner's chains; ``run_started``
    (a run.started payload) is written on ``{G}:lifecycle`` first and ``run.finished`` at the end.
    ``alive()`` raises when a producer died; ``round_timeout_s``: how long a round may go without a
    record before it fails. ``lag``: round ``r`` is collected with policy ``max(0, r - lag)`` (see the
    module's doc; ``run_started`` should record it: ``group_config(..., lag=lag)``); with the time budget
    spent, the rounds already published are still trained on. Returns the learning curve as
    ``train_online`` does."""
    a = algorithm(algo)
    if learner is None:
        learner = a.learner_cls(spec, config or a.config_cls(seed=seed))
    group = spec.run_id
    log = EventLog(sink, run_id=group, producer_id=f"learner-{algo}", signer=signer)
    readers = [RunReader(run, public_key=public_key) for run in runs]
    book = RoundBook(runs)
    result = OnlineResult(learner, group)
    started = log.append(f"{group}:lifecycle", "run.started", run_started) if run_started is not None else None
    returns: list[float] = []
    rounds, status, reason = 0, "completed", ""
    behaviours = BehaviourActors(lag, learner)
    board.keep = max(board.keep, lag + 2)  # a round's policy stays until every producer has loaded it
    end = iterations  # rounds to train on
    t0 = time.monotonic()
    try:
        for q in range(max(0, min(lag, iterations - 1)) + 1):  # policy 0 collects rounds 0..lag
            board.publish(q, learner, signing_key)
        behaviours.keep(0, learner)
        for r in range(iterations):
            replays = _wait_round(r, book, readers, source, learner, alive, round_timeout_s)
            union = union_replay(spec, replays)
            parent = learner.version
            out = _update(learner, union, behaviours.behaviour(r, r))
            ev = emit_policy_update(log, learner, out, union, parent_version=parent)
            rounds = r + 1
            if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
                end = min(end, rounds + lag)  # the rounds already published are trained on
            last = rounds >= end
            if rounds + lag >= end:
                board.stop(end, "done")
            else:  # policy `rounds` collects round `rounds + lag`
                board.publish(rounds + lag, learner, signing_key)  # the producers start while the learner signs
                behaviours.keep(rounds, learner)
            if signer is not None:
                log.checkpoint()
            sink_flush = getattr(sink, "flush", None)
            if sink_flush is not None:
                sink_flush()
            source.commit(book.pending_low())
            result.update_hashes.append(ev.event_hash)
            if keep_replays:
                result.replays.append(union)
            returns.extend(e.team_return for e in union.episodes)
            row = {"iteration": r, "env_steps": learner.env_steps, "episodes": learner.episodes,
                   "charts/episodic_return": out["charts/episodic_return"],
                   "optimizer_steps": learner.optimizer_steps, "producers": len(runs),
                   "seconds": round(time.monotonic() - t0, 2), **out["losses"]}
            result.curve.append(row)
            if on_update:
                on_update(row)
            if last:
                break
    except BaseException as exc:
        status, reason = ("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"), type(exc).__name__
        board.stop(rounds, reason)
        _finish(log, group, started, status, reason, learner, returns)
        _close_after(log, exc)
        raise
    _finish(log, group, started, status, reason, learner, returns)
    log.close()
    return result


def _finish(log: EventLog, group: str, started, status: str, reason: str, learner: Any, returns: list[float]) -> None:
    """``run.finished`` of the learner's run (where it wrote a ``run.started``), naming its chains' heads."""
    if started is None:
        return
    heads = [{"topic": t, "chain_id": c, "seq": h.seq, "event_hash": h.event_hash}
             for (t, c), h in sorted(log.heads().items()) if c.startswith(f"{group}:") and h.seq >= 0]
    try:
        log.append(f"{group}:lifecycle", "run.finished", {
            "status": status, "reason": reason, "episodes": learner.episodes, "steps": learner.env_steps,
            "mean_return": float(np.mean(returns)) if returns else 0.0, "chain_heads": heads},
            source_event_hashes=[started.event_hash])
    except Exception:  # noqa: BLE001 - the sink failed too; the first error is the one raised
        pass


def _wait_round(r: int, book: RoundBook, readers: list[RunReader], source: RecordSource, learner: Any,
                alive: Callable[[], None] | None, timeout: float) -> list[Replay]:
    """Every producer's replay of round ``r``; each batch is read (verified, joined) as soon as it is
    complete, while the others are still being written."""
    n = len(readers)
    done: list[Replay | None] = [None] * n
    quiet_since = time.monotonic()
    while True:
        for k in range(n):
            if done[k] is None and book.ready(k, r):
                rp = readers[k].add(book.take(k, r))
                _check_spec(learner, rp, book.runs[k])
                done[k] = rp
        if all(d is not None for d in done):
            return done  # type: ignore[return-value]
        if alive is not None:
            alive()
        if book.add(source.poll(0.05)):
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > timeout:
            raise DistributedError(f"round {r}: no producer record for {timeout:.0f}s; still waiting for "
                                   f"{book.missing(r)}")


# --- reproduction from the topics -------------------------------------------------------------------------
@dataclass
class GroupRun:
    """A learner run of many producers, as its ``run.started`` and ``policy.update`` events state it."""

    spec: RunSpec
    algo: str
    config: Any
    runs: list[str]
    updates: list[dict]   # the policy.update records of {G}:policy:{algo}, in seq order
    lag: int = 0          # round r was collected by policy max(0, r - lag)


def read_group_run(records: Iterable[Record], group_run: str) -> GroupRun:
    """The learner run ``group_run``'s setup and updates, from its own records (``marl.run.lifecycle``
    and ``marl.policy.update``; others are skipped). The records are not verified here: ``reproduce``
    verifies every producer batch it trains on; verify the learner's chains with ``marlgrc verify``."""
    codec = default_codec()
    prefix = f"{group_run}:"
    started, updates = None, []
    for r in records:
        if not r.key.startswith(prefix) or r.topic not in ("marl.run.lifecycle", POLICY_TOPIC):
            continue
        name, rec = codec.decode(r.value)
        if name == "run_started" and started is None:
            started = rec
        elif name == "policy_update":
            updates.append(rec)
    if started is None:
        raise ReplayError(f"run {group_run}: no run.started among the records; read marl.run.lifecycle from its start")
    cfg = json.loads(started["config_json"])
    if "producer_runs" not in cfg:
        raise ReplayError(f"run {group_run} is not a many-producer learner run (its config names no producer_runs)")
    a = algorithm(cfg["algorithm"])
    chain = policy_chain(group_run, a.name)
    updates = sorted((u for u in updates if u["chain_id"] == chain), key=lambda u: u["seq"])
    return GroupRun(RunSpec.from_run_started(group_run, started), a.name,
                    config_from_record(a.name, cfg["learner_config"]), cfg["producer_runs"], updates,
                    int(cfg.get("lag", 0)))


def retrain(records: Iterable[Record], group: GroupRun, *, public_key=None,
            rounds: int | None = None) -> tuple[Any, list[bytes]]:
    """Train ``group``'s learner again from the producers' records (any order of partitions; whole
    topics are fine): the same batches, rounds and order as online, each round's update given the
    actor of the policy that collected it (``group.lag``). Returns the learner and the weights hash
    after each round."""
    a = algorithm(group.algo)
    learner = a.learner_cls(group.spec, group.config)
    behaviours = BehaviourActors(group.lag, learner)
    behaviours.keep(0, learner)
    book = RoundBook(group.runs)
    book.add(records)
    readers = [RunReader(run, public_key=public_key) for run in group.runs]
    hashes = []
    for r in range(len(group.updates) if rounds is None else rounds):
        if not all(book.ready(k, r) for k in range(len(readers))):
            raise ReplayError(f"run {group.spec.run_id} round {r}: the producers' records are incomplete: "
                              f"{book.missing(r)}")
        replays = []
        for k, reader in enumerate(readers):
            rp = reader.add(book.take(k, r))
            _check_spec(learner, rp, group.runs[k])
            replays.append(rp)
        _update(learner, union_replay(group.spec, replays), behaviours.behaviour(r, r))
        behaviours.keep(r + 1, learner)
        hashes.append(learner.weights_sha256())
    return learner, hashes


def reproduce(records: Sequence[Record], group_run: str, *, public_key=None) -> list[tuple[str, bool]]:
    """Retrain learner run ``group_run`` from ``records`` (its own and its producers') and compare each
    update's weights with the ``weights_sha256`` its ``policy.update`` recorded: [(policy_version,
    equal)] in update order."""
    group = read_group_run(records, group_run)
    _, hashes = retrain(records, group, public_key=public_key)
    return [(u["policy_version"], bytes(u["weights_sha256"]) == h) for u, h in zip(group.updates, hashes)]


__all__ = ["ROUND_TOPICS", "BehaviourActors", "DistributedError", "GroupRun", "GroupSource", "PolicyBoard",
           "RecordSource", "RoundBook", "acting_policy", "acting_seed", "batch_producer_id", "collect_batch",
           "group_config", "load_policy", "produce_rounds",
           "producer_run_id", "read_group_run", "reproduce", "reseed_acting", "retrain", "round_checkpoint_chain",
           "round_seed", "split_episodes", "train_distributed", "union_replay"]

"""The training loop, on-policy through the event log: the producers act with the current policy,
every transition is written as events, the learner reads exactly those offsets back, verifies and
trains on them, and writes ``policy.update``. The training data is the audited stream and nothing else.

    loop:  mark offsets -> collect(policy, the batch's log, ...) -> close it (signed) -> mark offsets
           -> RunReader.add(records in [start, end)) -> learner.update -> policy.update event (signed)

``collect`` is what runs the env and writes its steps to ``log`` (``marlgrc`` hands in
``producers.harness.run_episodes`` bound to an env: learners never import producers); the first
policy is built from the ``RunSpec`` the run's ``run.started`` will carry.

A ``Transport`` is where the sealed events go and how a batch is read back: ``KafkaTransport`` (the
real thing) and ``MemoryTransport`` (the same sealed event bytes kept in process; for tests and for
CPU-only learning curves when no broker runs).

Online learning with a safety gate (seed 001, ``learners.safety``) is this loop with two options:
``decisions_per_update=K`` (update once at least K agent decisions were read back, instead of every
``episodes_per_update`` episodes) and ``gate`` (a signed checkpoint before each update; after it,
the updated policy is judged on the recent window and a refused one is rolled back, recorded as
``policy.rollback`` on the policy chain). Without them the loop is what it always was.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import torch

from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink, Sink
from eventlog.verify import CHECKPOINT_TOPIC

from . import algorithm
from .lineage import BufferLineage, emit_policy_update
from .replay import ONLINE_TOPICS, Replay, ReplayError, RunReader, RunSpec

Collect = Callable[..., Any]
"""``collect(policy, log, *, episodes, seed, config)``: run ``episodes`` episodes (episode ``i``
reset with ``seed + i``) acting with ``policy`` and write every step to ``log``; ``config`` goes into
the run's ``run.started``."""


class Transport(Protocol):
    """Where a training session's events go (``sink``) and how a batch of them is read back."""

    sink: Sink

    def mark(self) -> Any:
        """A position: everything sent before it (and flushed) is before it."""

    def flush(self) -> None:
        """Wait until everything sent is readable."""

    def read(self, start: Any, end: Any) -> list[Record]:
        """The records between two marks, with their offsets."""

    def close(self) -> None:
        """Release what the transport holds."""


class MemoryTransport:
    """The same sealed events kept in memory; offsets are positions per topic (partition 0).

    Reads must move forward (each ``start`` at or after the previous ``end``), as the loop's do.
    ``keep=False`` drops the bytes of what was read (and of everything before it): a long run then
    holds one batch, not the whole stream; the offsets keep counting.
    """

    def __init__(self, *, keep: bool = True):
        self.sink = MemorySink()
        self.keep = keep
        self._dropped = 0           # events removed from the front of sink.sent
        self._counted = 0           # position up to which _offsets counts every topic's events
        self._offsets: dict[str, int] = {}

    def mark(self) -> int:
        return self._dropped + len(self.sink.sent)

    def flush(self) -> None:
        pass

    def _count(self, until: int) -> None:
        base, offsets = self._dropped, self._offsets
        for topic, _, _ in self.sink.sent[self._counted - base:until - base]:
            offsets[topic] = offsets.get(topic, 0) + 1
        self._counted = until

    def read(self, start: int, end: int) -> list[Record]:
        if start < self._counted:
            raise ValueError(f"MemoryTransport reads move forward: start {start} is before {self._counted}, "
                             f"the end of the last read")
        self._count(start)
        offsets, out = self._offsets, []
        for topic, key, value in self.sink.sent[start - self._dropped:end - self._dropped]:
            o = offsets.get(topic, 0)
            offsets[topic] = o + 1
            out.append(Record(topic, 0, o, key, value, 0))
        self._counted = end
        if not self.keep:
            del self.sink.sent[:end - self._dropped]
            self._dropped = end
        return out

    def close(self) -> None:
        pass


LINGER_MS = 50


class KafkaTransport:
    """Events through the broker; batches are read back by offsets [start, end) per partition with
    one long-lived reader (``eventlog.kafka.OffsetReader``). What the learner writes between batches
    (its ``policy.update`` and checkpoints) is before the next batch's start, so it is never read back.
    """

    def __init__(self, bootstrap: str, prefix: str = "", *, timeout: float = 30.0):
        from eventlog.kafka import EventProducer, OffsetReader

        self.bootstrap, self.prefix, self.timeout = bootstrap, prefix, timeout
        # the loop flushes after every batch, so nothing waits on linger: fewer, larger produce
        # requests cost the client and the broker less CPU per event (linger 5 ms -> 50 ms: about
        # 8% more env steps per CPU-second in bench/bench_training.py)
        self.sink = EventProducer(bootstrap, prefix=prefix, client_id="marlgrc-train", **{"linger.ms": LINGER_MS})
        self._reader = OffsetReader(bootstrap, ONLINE_TOPICS, prefix, timeout=timeout)

    def mark(self) -> dict[tuple[str, int], int]:
        return self._reader.end_offsets()

    def flush(self) -> None:
        self.sink.flush()

    def read(self, start, end) -> list[Record]:
        return self._reader.read(start, end)

    def close(self) -> None:
        try:
            self.sink.close()
        finally:
            self._reader.close()

    def __enter__(self) -> KafkaTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class OnlineResult:
    learner: Any
    run_id: str
    curve: list[dict] = field(default_factory=list)   # per update: env_steps, episodic_return, losses, ...
    update_hashes: list[bytes] = field(default_factory=list)
    replays: list[Replay] = field(default_factory=list)
    rollback_hashes: list[bytes] = field(default_factory=list)   # policy.rollback events (with a gate)


def train_online(spec: RunSpec, algo: str, *, collect: Collect, transport: Transport, iterations: int,
                 seed: int = 1, config: Any = None, signer=None, public_key=None, learner: Any = None,
                 episodes_per_update: int | None = None, keep_replays: bool = False,
                 time_budget_s: float | None = None, on_update: Callable[[dict], None] | None = None,
                 producer_id: str = "harness", decisions_per_update: int | None = None,
                 gate: Any = None) -> OnlineResult:
    """Run ``iterations`` of {act with the current policy -> events -> read back -> update} on run
    ``spec.run_id``, or fewer when ``time_budget_s`` runs out (checked after each update).

    ``signer`` signs every chain the session writes: each batch is signed before it is read back
    (the harness's log of batch ``b`` is ``{producer_id}-{b}``), and the learner's policy chain
    after each update; ``public_key`` pins the signer the reader checks them with. ``collect`` is
    called with keyword arguments ``episodes``, ``seed`` (a batch starts at ``seed * 1_000_003 +`` the
    episodes collected before it, so iteration ``it`` at ``it * episodes``) and ``config``.

    ``decisions_per_update=K``: an update learns from as many batches as it takes to read back at
    least K agent decisions (experiences). Batches are whole episodes: the session's first batch is
    one episode (to measure decisions per episode), each next one ``ceil(missing / mean decisions per
    episode so far)``, so an update sees K rounded up to whole episodes. Without it, one batch of
    ``episodes_per_update`` episodes per update (batch ``b`` = iteration ``it``).

    ``gate`` (a ``learners.safety.SafetyGate``): ``gate.before_update(learner)`` before each update
    (the signed checkpoint), ``gate.judge(learner, records of the update's batches)`` after its
    ``policy.update``; a refused update has been rolled back by ``judge`` and is recorded here as
    ``policy.rollback`` on the policy chain, before the chain's signed checkpoint.
    """
    from .safety import emit_policy_rollback

    a = algorithm(algo)
    if learner is None:
        learner = a.learner_cls(spec, config or a.config_cls(seed=seed))
    E = episodes_per_update or learner.config.episodes_per_update
    K = decisions_per_update
    if K is not None and K < 1:
        raise ValueError(f"decisions_per_update must be at least 1, got {K}")
    run_id = spec.run_id
    learner_log = EventLog(transport.sink, run_id=run_id, producer_id=f"learner-{algo}", signer=signer)
    reader = RunReader(run_id, public_key=public_key, topics=ONLINE_TOPICS)
    result = OnlineResult(learner, run_id)
    heads: dict = {}  # the run's data chains: where the next batch's log continues them
    batch = collected = 0          # batches and episodes collected so far (seeds continue from there)
    seen_episodes = seen_decisions = 0
    t0 = time.monotonic()
    try:
        for it in range(iterations):
            replays: list[Replay] = []
            kept: list[Record] = []    # the update's records, for the gate's window
            decisions = 0
            while True:
                if K is None:
                    episodes = E
                elif seen_decisions == 0:
                    episodes = 1      # measure decisions per episode first
                else:                 # ceil(missing decisions / mean decisions per episode so far)
                    episodes = max(1, -(-(K - decisions) * seen_episodes // seen_decisions))
                start = transport.mark()
                # a log per batch, continuing the run's chains: closing it signs everything the batch
                # wrote, on a checkpoint chain that starts and ends in the batch, before it is read back
                log = EventLog(transport.sink, run_id=run_id, producer_id=f"{producer_id}-{batch}", signer=signer)
                for (topic, chain_id), head in heads.items():
                    log.writer(topic, chain_id, head=head)
                cfg = {"algorithm": algo, "iteration": it}
                if K is not None:
                    cfg["batch"] = batch
                if batch == 0:  # what `learners.reproduce` builds the learner from (the batch records its version)
                    cfg |= {"learner_config": asdict(learner.config), "torch_threads": torch.get_num_threads()}
                try:
                    collect(learner, log, episodes=episodes, seed=seed * 1_000_003 + collected, config=cfg)
                except BaseException as exc:
                    _close_after(log, exc)
                    raise
                log.close()
                heads.update((k, h) for k, h in log.heads().items() if k[0] != CHECKPOINT_TOPIC)
                transport.flush()
                end = transport.mark()
                # the batch's own checkpoint chain only: a processor signing the run's credits writes
                # checkpoint chains of its own under the run, read in part between two batches
                own = f"{run_id}:checkpoints:{producer_id}-{batch}"
                records = [r for r in transport.read(start, end) if r.topic != CHECKPOINT_TOPIC or r.key == own]
                replay = reader.add(records)
                if replay.spec.agents != learner.spec.agents or replay.spec.action_spaces != learner.spec.action_spaces:
                    raise ReplayError(f"run {run_id}: run.started's agents/spaces differ from the spec the policy "
                                      f"was built for")
                batch += 1
                collected += episodes
                replays.append(replay)
                if gate is not None:
                    kept.extend(records)
                if K is None:
                    break
                n = sum(int(ep.alive.sum()) for ep in replay.episodes)
                if n == 0:
                    raise ReplayError(f"run {run_id}: batch {batch - 1} ({episodes} episodes) read back no agent "
                                      f"decisions; an update every {K} decisions would never come")
                decisions += n
                seen_decisions += n
                seen_episodes += len(replay.episodes)
                if decisions >= K:
                    break
            replay = _merged(replays)
            parent = learner.version
            if gate is not None:
                gate.before_update(learner)
            out = learner.update(replay)
            ev = emit_policy_update(learner_log, learner, out, replay, parent_version=parent)
            verdict = gate.judge(learner, kept) if gate is not None else None
            if verdict is not None and not verdict.accepted:
                result.rollback_hashes.append(emit_policy_rollback(learner_log, learner, verdict, ev).event_hash)
            if signer is not None:
                learner_log.checkpoint()
            transport.flush()
            result.update_hashes.append(ev.event_hash)
            if keep_replays:
                result.replays.append(replay)
            row = {"iteration": it, "env_steps": learner.env_steps, "episodes": learner.episodes,
                   "charts/episodic_return": out["charts/episodic_return"],
                   "optimizer_steps": learner.optimizer_steps,
                   "seconds": round(time.monotonic() - t0, 2), **out["losses"]}
            if K is not None:
                row["decisions"] = decisions
            if verdict is not None:
                row.update(verdict.row())
            result.curve.append(row)
            if on_update:
                on_update(row)
            if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
                break
    except BaseException as exc:
        _close_after(learner_log, exc)
        raise
    learner_log.close()
    return result


def _merged(replays: list[Replay]) -> Replay:
    """One update's batches as one Replay: their episodes in order, lineage merged per chain (the first
    batch's first offset and seq, the last batch's last offset, seq and head hash)."""
    if len(replays) == 1:
        return replays[0]
    held = BufferLineage(capacity=1 << 62)  # nothing is evicted: it only merges the ranges
    for r in replays:
        held.add(r.lineage, 1)
    last = replays[-1]
    return Replay(last.spec, [e for r in replays for e in r.episodes], held.ranges(),
                  all(r.verified for r in replays), last.report, sum(r.credited_steps for r in replays))


def _close_after(log: EventLog, exc: BaseException) -> None:
    """Close (sign) ``log`` after ``exc``, where the sink still takes it; a second failure is noted on
    the first, which is the one to report."""
    try:
        log.close()
    except Exception as second:  # noqa: BLE001
        exc.add_note(f"closing {log.producer_id}'s chains also failed: {type(second).__name__}: {second}")

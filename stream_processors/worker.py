"""The live processor: a transactional consume -> transform -> produce loop (confluent-kafka).

Per batch, in ONE Kafka transaction: the sealed output events (di.credit, fairness.metrics,
dead letters) and, with a signing key, the checkpoints that sign them and the checkpoint chains
(``Processor.checkpoint``), the processor's rolling state for every run the batch touched (chain heads,
normalizer, fairness tallies) and one entry per record waiting for a join (its original bytes;
a tombstone once joined, so no state message grows with the backlog) on the compacted
``marl.processor.state`` topic,
the input offsets (in the state and, for lag monitoring, as the group's committed offsets).
A crash or SIGKILL aborts the open transaction (the restarted worker's ``init_transactions``
fences and aborts it); the restarted worker restores state and offsets from the state topic,
read_committed, and redoes the batch: no hole, no fork, no duplicate (DESIGN.md "hash contract").

Scaling out (``WorkerConfig.group``, ``marlgrc process --group``): the marl.* topics are co-partitioned
by run, so a partition number holds whole runs; group members share the partition numbers (range
assignor: the same numbers of every input topic), each number a unit with its own transactional id
``marlgrc-{name}-p{n}``, state keys ``{name}:p{n}:…`` and dead-letter chain ``dlq:{name}:p{n}``; a new
owner's ``init_transactions`` fences the previous one and aborts its open transaction, then restores.

Why not faust's ``exactly_once`` (docs/PROCESSORS.md, with a reproduction): even on co-partitioned
topics, faust-streaming 0.15.3's public publish-on-commit route publishes a record's several sends in
no fixed order (its attachments share one heap key), across input topics per source partition rather
than in processing order, and ``table[k] = v`` outside the commit; a hash chain needs all three.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from eventlog.checkpoint import Signer
from eventlog.kafka import RunPartitioner, ensure_topics, partitions_of, read_records
from eventlog.topics import TopicSpec, run_of, run_partition

from .processor import INPUT_TOPICS, Processor

log = logging.getLogger("marlgrc.processor")

STATE_TOPIC = "marl.processor.state"
MAX_STATE_VALUE = 900_000
"""A state value larger than this is refused before it reaches the producer (the broker's default
message limit is 1 MiB; librdkafka's ``message.max.bytes`` 1,000,000)."""


@dataclass(frozen=True)
class WorkerConfig:
    bootstrap: str
    prefix: str = ""
    name: str = "di"
    """Worker identity: transactional id(s), consumer group, dlq chain(s) and state keys derive from it."""
    batch: int = 2000
    """At most this many input records per transaction."""
    backlog: int = 200
    """Pause the topic that runs ahead once this many of its records wait for a join."""
    poll_timeout: float = 0.1
    default_env: str = "passthrough"
    metrics_port: int | None = None
    """Prometheus HTTP port; None for no endpoint."""
    signing_key: str | None = None
    """Ed25519 key file (PEM, the producers' ``keys/signing.pem``): sign every chain the worker writes
    (credit, fairness, dead letters, and the checkpoint chains themselves) in each transaction; None
    leaves them unsigned."""
    group: bool = False
    """Scale out: subscribe as a member of the consumer group ``group_id`` instead of reading every
    partition alone. Every marl.* topic is co-partitioned by run, so a *partition number* holds whole
    runs: it is the unit of work, with its own state keys (``{name}:p{n}:…``), dead-letter chain
    (``dlq:{name}:p{n}``) and transactional id (``transactional_id_for(n)``). Any number of processes
    with the same name share the partitions; a rebalance moves a partition number with its state, and
    the new owner's ``init_transactions`` fences the old one and aborts its open transaction."""
    session_timeout_ms: int = 10000
    """Group mode: how long a silent (killed) member keeps its partitions before the group moves them."""

    @property
    def transactional_id(self) -> str:
        return f"marlgrc-{self.prefix}{self.name}"

    def transactional_id_for(self, part: int | None) -> str:
        return self.transactional_id if part is None else f"{self.transactional_id}-p{part}"

    def tag(self, part: int | None) -> str:
        """The unit's name: state key prefix and the processor's consumer name (``dlq:{tag}``)."""
        return self.name if part is None else f"{self.name}:p{part}"

    @property
    def group_id(self) -> str:
        return f"{self.prefix}marlgrc-{self.name}"


class Metrics:
    """Prometheus metrics of one worker, in a registry of its own."""

    def __init__(self, port: int | None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.events_in = Counter("marlgrc_processor_events_in", "input records", ["topic"], registry=self.registry)
        self.events_out = Counter("marlgrc_processor_events_out", "events produced", ["topic"], registry=self.registry)
        self.dead = Counter("marlgrc_processor_dead_letters", "dead letters", ["error_kind"], registry=self.registry)
        self.lag = Gauge("marlgrc_processor_consumer_lag", "high watermark - position", ["topic", "partition"],
                         registry=self.registry)
        self.latency = Histogram("marlgrc_processor_latency_seconds", "per-record processing time within a batch",
                                 registry=self.registry, buckets=(1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 1))
        self.commit = Histogram("marlgrc_processor_commit_seconds", "transaction commit time",
                                registry=self.registry)
        self.age = Histogram("marlgrc_processor_event_age_seconds", "now - input record timestamp at output",
                             registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300))
        if port is not None:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)


def ensure_state_topic(bootstrap: str, prefix: str) -> None:
    """The compacted topic of committed worker state; waits until it has a leader, so a restore
    right after creating it does not find it missing."""
    ensure_topics(bootstrap, prefix, [TopicSpec(STATE_TOPIC, 1, "internal", compacted=True)])


class StateTooLarge(RuntimeError):
    """A run's rolling state cannot fit one state message; retrying would never succeed."""


class StateCorrupt(RuntimeError):
    """An entry of the worker's committed state cannot be read back: the worker refuses to resume."""


class MixedModes(RuntimeError):
    """A worker name's committed state was written in the other mode (single vs group)."""


class _Unit:
    """What one transactional writer owns: all partitions (single mode, ``part`` None) or one partition
    number of every input topic (group mode): a processor, its input offsets, its producer."""

    def __init__(self, worker: "Worker", part: int | None, processor: Processor):
        self.part = part
        self.processor = processor
        self.offsets: dict[tuple[str, int], int] = {}  # (logical topic, partition) -> next offset
        self.producer: Producer | None = None
        self.placer: RunPartitioner | None = None  # the producer's co-partitioning (metadata read once)
        self.paused: dict[tuple[str, int], bool] = {}  # (logical topic, partition number) -> paused
        self.key_prefix = f"{worker.config.tag(part)}:"
        # single mode: run id -> the partition numbers its records came from (one when co-partitioned)
        self.run_parts: dict[str, set[int]] = {}
        self._key_runs: dict[bytes, str] = {}
        processor.reload = lambda run_id: worker.committed_state(self, f"run:{run_id}")

    def saw(self, key: bytes | None, partition: int) -> None:
        if not key:
            return
        run = self._key_runs.get(key)
        if run is None:
            run = run_of(key.decode("utf-8", "replace"))
            if len(self._key_runs) < 100_000:
                self._key_runs[key] = run
        parts = self.run_parts.get(run)
        if parts is None:
            self.run_parts[run] = {partition}
        elif partition not in parts:
            parts.add(partition)

    def forget(self, runs: list[str]) -> None:
        """Runs the processor released (complete): nothing more to pause for."""
        if runs:
            gone = set(runs)
            for run in gone:
                self.run_parts.pop(run, None)
            self._key_runs = {k: r for k, r in self._key_runs.items() if r not in gone}


class Worker:
    """One processor instance. Single mode: the one writer of its output chains (a second one with
    the same name fences the first). Group mode (``config.group``): one member of the group
    ``config.group_id``; it owns the partition numbers the group assigns it, one writer per
    partition number."""

    def __init__(self, config: WorkerConfig, processor: Processor | None = None, metrics: Metrics | None = None):
        self.config = config
        if processor is not None and config.group:
            raise ValueError("a group worker builds one processor per partition number; pass no processor")
        # flow control acts between batches, so one batch can bring up to ``batch`` records on top of
        # ``backlog``: the join limits must hold that much, or a state is evicted before its action
        # arrives (and the action then waits for ever)
        self._limit = max(1000, 2 * (config.backlog + config.batch))
        self._signer = Signer.load(Path(config.signing_key)) if config.signing_key and processor is None else None
        self.units: dict[int | None, _Unit] = {}
        if not config.group:
            p = processor or self._new_processor(None)
            p.track_joins = True
            self.units[None] = _Unit(self, None, p)
        self.metrics = metrics or Metrics(config.metrics_port)
        self._stop = False
        self.committed_batches = 0
        self.produced = 0
        self.rebalances = 0
        self._partitions: dict[str, int] = {}  # logical input topic -> partition count (group mode)
        self._consumer: Consumer | None = None
        self._tps: list[TopicPartition] = []

    def _new_processor(self, part: int | None) -> Processor:
        c = self.config
        p = Processor(consumer=c.tag(part), producer_id=f"marlgrc-{c.name}", default_env=c.default_env,
                      track_joins=True, max_pending=self._limit, max_states=self._limit, signer=self._signer)
        if part is not None:  # a run read from another partition number would have two writers
            p.placement = self._placement
        return p

    def _placement(self, topic: str, chain_id: str) -> int | None:
        n = self._partitions.get(topic)
        return None if n is None else run_partition(chain_id, n)

    # single mode's view (tests, benchmarks)
    @property
    def processor(self) -> Processor:
        return self.units[None].processor

    @property
    def offsets(self) -> dict[tuple[str, int], int]:
        return self.units[None].offsets

    def stop(self, *_: object) -> None:
        self._stop = True

    # -- state ------------------------------------------------------------------------------

    def _key(self, what: str, unit: _Unit | None = None) -> str:
        return (unit or self.units[None]).key_prefix + what

    def restore(self, units: list[_Unit] | None = None) -> None:
        """Rebuild the processor state and input offsets of ``units`` (default: all) from the
        committed state topic."""
        c = self.config
        units = list(self.units.values()) if units is None else units
        ensure_state_topic(c.bootstrap, c.prefix)
        latest: dict[str, bytes | None] = {}
        name = f"{c.name}:"
        for r in read_records(c.bootstrap, [STATE_TOPIC], prefix=c.prefix):
            if r.key.startswith(name):
                latest[r.key] = r.value
        if c.group and f"{c.name}:offsets" in latest:
            raise MixedModes(f"worker name {c.name!r} has single-worker state on {STATE_TOPIC}; a group of that "
                             f"name would process its runs again and fork their chains: run the group under a "
                             f"new --name, or keep this name single")
        if not c.group and any(k.startswith(name + "p") and k.endswith(":offsets") and
                               k[len(name) + 1:-len(":offsets")].isdigit() for k in latest):
            raise MixedModes(f"worker name {c.name!r} has group state on {STATE_TOPIC} (written by a scaled-out "
                             f"group); run it as a group (--group), or a single worker under a new --name")
        for u in units:
            self._restore_unit(u, latest)

    def committed_state(self, u: _Unit, what: str) -> bytes | None:
        """The last committed value of the unit's state entry ``what`` (e.g. ``run:R``), read from the
        state topic: for a run released from memory that has a record after all (rare; the topic
        stays small: it is compacted often, see ``TopicSpec.config``)."""
        key, value = u.key_prefix + what, None
        for r in read_records(self.config.bootstrap, [STATE_TOPIC], prefix=self.config.prefix):
            if r.key == key:
                value = r.value
        return value

    def _restore_unit(self, u: _Unit, latest: dict[str, bytes | None]) -> None:
        joins = []
        k = ""
        try:
            for k, v in latest.items():
                if not k.startswith(u.key_prefix) or v is None:
                    continue  # another unit's, or a deleted join entry
                what = k[len(u.key_prefix):]
                if what.startswith("join:"):
                    run_id, kind, h = what[5:].rsplit(":", 2)
                    joins.append((run_id, kind, h, v))
                elif what == "offsets":
                    u.offsets = {(t, int(p)): int(o) for t, p, o in json.loads(v)}
                elif what == "dlq":
                    u.processor.restore_dlq(v)
                elif what.startswith("run:"):
                    u.processor.restore(what[4:], v)
            k = f"{u.key_prefix}join:*"
            u.processor.restore_joins(joins)
            u.forget(u.processor.release_complete())  # complete runs stay out of memory after a restart
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise StateCorrupt(
                f"{STATE_TOPIC} entry {k!r} of worker {self.config.name!r} cannot be read back "
                f"({type(exc).__name__}: {exc}); the worker does not resume from a state it cannot read (it "
                f"would fork its runs' chains). Restore {STATE_TOPIC} from a backup, or reprocess the runs "
                f"into a fresh prefix (`marlgrc reprocess`)") from None
        log.info("%s: restored %d runs, %d waiting records and %d offsets", u.key_prefix[:-1],
                 len(u.processor.runs), len(joins), len(u.offsets))

    def _new_producer(self, part: int | None) -> Producer:
        c = self.config
        producer = Producer({
            "bootstrap.servers": c.bootstrap, "transactional.id": c.transactional_id_for(part),
            "enable.idempotence": True, "acks": "all", "linger.ms": 5, "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000, "transaction.timeout.ms": 60000,
        })
        producer.init_transactions(60)  # fences a previous owner and aborts its open transaction
        return producer

    # -- loop -------------------------------------------------------------------------------

    def run(self, *, until: Callable[["Worker"], bool] | None = None) -> None:
        c = self.config
        consumer = self._consumer = Consumer({
            "bootstrap.servers": c.bootstrap, "group.id": c.group_id, "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest",
            "fetch.max.bytes": 52428800, "queued.min.messages": 100000,
            # range: the same partition numbers of every input topic to one member (co-partitioning)
            "partition.assignment.strategy": "range", "session.timeout.ms": c.session_timeout_ms,
            "heartbeat.interval.ms": max(100, min(1000, c.session_timeout_ms // 5)),
        })
        plen = len(c.prefix)
        tps = partitions_of(c.bootstrap, INPUT_TOPICS, c.prefix)
        self._partitions = {}
        for tp in tps:
            self._partitions[tp.topic[plen:]] = self._partitions.get(tp.topic[plen:], 0) + 1
        if c.group:
            ensure_state_topic(c.bootstrap, c.prefix)
            self._tps = []
            consumer.subscribe([c.prefix + t for t in INPUT_TOPICS], on_assign=self._on_assign,
                               on_revoke=self._on_revoke, on_lost=self._on_lost)
        else:
            u = self.units[None]
            self.restore([u])
            u.producer = self._new_producer(None)
            u.placer = RunPartitioner(u.producer)
            self._tps = tps
            consumer.assign([TopicPartition(tp.topic, tp.partition,
                                            u.offsets.get((tp.topic[plen:], tp.partition), OFFSET_BEGINNING))
                             for tp in self._tps])
        m = self.metrics
        last_lag = 0.0
        try:
            while not self._stop and not (until and until(self)):
                msgs = consumer.consume(c.batch, c.poll_timeout)
                now = time.monotonic()
                if now - last_lag > 5:
                    self._update_lag(consumer)
                    last_lag = now
                msgs = [x for x in msgs if x.error() is None or self._check(x)]
                by_unit: dict[int | None, list] = {}
                for x in msgs:
                    part = x.partition() if c.group else None
                    if part in self.units:  # a record of a partition revoked meanwhile is not ours
                        by_unit.setdefault(part, []).append(x)
                for part, batch in sorted(by_unit.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
                    self._transaction(self.units[part], consumer, batch)
                for u in list(self.units.values()):
                    self._flow_control(consumer, u)
        finally:
            consumer.close()
            for u in self.units.values():
                if u.producer is not None:
                    u.producer.flush(10)
            m.lag.clear()

    # -- group membership (called from inside consumer.consume; no transaction is open then) ----

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        c = self.config
        plen = len(c.prefix)
        parts = sorted({tp.partition for tp in partitions})
        for gone in [p for p in self.units if p not in parts]:
            self._drop(gone)
        new = [p for p in parts if p not in self.units]
        self.rebalances += 1
        fresh = []
        for p in new:
            u = _Unit(self, p, self._new_processor(p))
            u.producer = self._new_producer(p)  # fences the previous owner first: its open transaction aborts
            u.placer = RunPartitioner(u.producer)
            fresh.append(u)
        if fresh:
            self.restore(fresh)
        for u in fresh:
            self.units[u.part] = u
        for tp in partitions:
            u = self.units[tp.partition]
            tp.offset = u.offsets.get((tp.topic[plen:], tp.partition), OFFSET_BEGINNING)
        self._tps = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        consumer.assign(partitions)
        # librdkafka keeps a partition paused across unassign/assign: a partition this consumer paused
        # before (under this unit or an earlier one) would stay paused while flow control thinks not
        consumer.resume(partitions)
        for u in self.units.values():
            u.paused = {}
        log.info("%s: assigned partition numbers %s (new %s)", c.group_id, parts, new)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Eager rebalancing revokes everything before each new assignment; ``_on_assign`` drops the
        units whose partition number does not come back. A unit that comes back is kept: nobody else
        processed it in between (every member revokes before the group assigns again), and if another
        member did take it in a generation this one missed, that member's ``init_transactions`` fenced
        this unit's producer, so its next commit fails and ``serve`` restores from the committed state."""
        log.info("%s: partitions revoked %s", self.config.group_id, sorted({tp.partition for tp in partitions}))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Thrown out of the group (missed heartbeats): the partitions may be someone else's already."""
        log.warning("%s: partitions lost %s; dropping their state", self.config.group_id,
                    sorted({tp.partition for tp in partitions}))
        for part in list(self.units):
            self._drop(part)

    def _drop(self, part: int | None) -> None:
        """Forget a unit (no transaction of it is open: callbacks run between batches)."""
        self.units.pop(part)

    # -- one transaction per unit ---------------------------------------------------------------

    def _unit_tps(self, u: _Unit) -> list[TopicPartition]:
        return self._tps if u.part is None else [tp for tp in self._tps if tp.partition == u.part]

    def _flow_control(self, consumer: Consumer, u: _Unit) -> None:
        """Joint actions wait for their states and states for their actions: pause whichever input
        runs ahead (the broker keeps the rest), so the state committed per transaction stays small.
        When both are behind, the head action's state is missing: resume both and let the
        processor dead-letter it. Decided per partition number over the runs it holds (co-partitioned:
        a run's actions and states are in one partition number), so that one run's states running
        ahead in one partition and another's actions in another do not cancel each other's pause
        (a single worker deciding over all runs at once resumed both, and states were evicted)."""
        p = u.processor
        limit = self.config.backlog
        plen = len(self.config.prefix)
        by_part: dict[int, list[TopicPartition]] = {}
        for tp in self._unit_tps(u):
            by_part.setdefault(tp.partition, []).append(tp)
        runs: dict[int, list[str]] = {}
        if len(by_part) > 1:  # a single worker: a run counts in each partition number it was read from
            for run_id, parts in u.run_parts.items():
                for part in parts:
                    runs.setdefault(part, []).append(run_id)
        for part, tps in by_part.items():
            pending, states = p.backlog(runs.get(part, ()) if len(by_part) > 1 else None)
            pause = {"marl.joint.action": pending > limit and states <= limit,
                     "marl.env.state": states > limit and pending <= limit}
            for topic, want in pause.items():
                if want == u.paused.get((topic, part), False):
                    continue
                these = [tp for tp in tps if tp.topic[plen:] == topic]
                (consumer.pause if want else consumer.resume)(these)
                u.paused[(topic, part)] = want

    @staticmethod
    def _check(msg) -> bool:
        if msg.error().code() == KafkaError._PARTITION_EOF:
            return False
        raise KafkaException(msg.error())

    def _transaction(self, u: _Unit, consumer: Consumer, msgs: list) -> None:
        c, p, m = self.config, u.processor, self.metrics
        producer = u.producer
        plen, prefix = len(c.prefix), c.prefix
        producer.begin_transaction()
        t0 = time.perf_counter()
        n_out = 0
        for msg in msgs:
            topic = msg.topic()[plen:]
            outs = p.feed(topic, msg.partition(), msg.offset(), msg.key(), msg.value())
            if u.part is None:
                u.saw(msg.key(), msg.partition())
            u.offsets[(topic, msg.partition())] = msg.offset() + 1
            m.events_in.labels(topic).inc()
            for ev in outs:
                self._produce(u, prefix + ev.topic, ev.chain_id, ev.value)
                m.events_out.labels(ev.topic).inc()
                if ev.topic == "marl.dlq":
                    m.dead.labels(p.codec.decode(ev.value)[1]["error_kind"]).inc()
            n_out += len(outs)
        for ev in p.checkpoint():  # signed with the events they cover, in this transaction
            self._produce(u, prefix + ev.topic, ev.chain_id, ev.value)
            m.events_out.labels(ev.topic).inc()
            n_out += 1
        state_topic = prefix + STATE_TOPIC
        for (run_id, kind, h), entry in p.take_join_changes().items():
            self._produce(u, state_topic, self._key(f"join:{run_id}:{kind}:{h}", u), entry)
        for run_id in p.take_dirty():
            if run_id == "":
                self._produce(u, state_topic, self._key("dlq", u), p.snapshot_dlq())
            else:
                snap = p.snapshot(run_id)
                if len(snap) > MAX_STATE_VALUE:
                    raise StateTooLarge(f"the rolling state of run {run_id} is {len(snap)} bytes, over the "
                                        f"{MAX_STATE_VALUE}-byte state message limit (window of {p.window} credits "
                                        f"x {len(snap) // max(p.window, 1)} bytes); run this worker with a smaller "
                                        f"window or fewer agents per run")
                self._produce(u, state_topic, self._key(f"run:{run_id}", u), snap)
        self._produce(u, state_topic, self._key("offsets", u),
                      json.dumps([[t, pt, o] for (t, pt), o in sorted(u.offsets.items())]).encode())
        elapsed = time.perf_counter() - t0
        m.latency.observe(elapsed / len(msgs))
        t1 = time.perf_counter()
        producer.send_offsets_to_transaction(
            [TopicPartition(prefix + t, pt, o) for (t, pt), o in u.offsets.items()],
            consumer.consumer_group_metadata(), 30)
        producer.commit_transaction(60)
        m.commit.observe(time.perf_counter() - t1)
        u.forget(p.release_complete())  # complete runs leave memory: their state went out with this commit
        now_ms = time.time() * 1000
        m.age.observe(max(0.0, (now_ms - msgs[-1].timestamp()[1]) / 1000))
        self.committed_batches += 1
        self.produced += n_out

    @staticmethod
    def _produce(u: _Unit, topic: str, key: str, value: bytes | None) -> None:
        """Send in the key's run partition (co-partitioned, like every marl.* writer: docs/HASHING.md)."""
        producer = u.producer
        partition = u.placer(topic, key)
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                producer.produce(topic, value, key, **extra)
                return
            except BufferError:
                producer.poll(0.05)

    def _update_lag(self, consumer: Consumer) -> None:
        plen = len(self.config.prefix)
        try:
            for tp in self._tps:
                # cached: the high watermark that came with the last fetch, no broker round trip
                # (an uncached call costs one per partition and stalled the loop for seconds)
                _, hi = consumer.get_watermark_offsets(tp, cached=True)
                if hi < 0:
                    continue
                u = self.units.get(None if not self.config.group else tp.partition)
                if u is None:
                    continue
                pos = u.offsets.get((tp.topic[plen:], tp.partition), 0)
                self.metrics.lag.labels(tp.topic[plen:], str(tp.partition)).set(max(0, hi - pos))
        except KafkaException as exc:  # lag is advisory; the loop goes on
            log.warning("could not read watermarks for lag: %s", exc)


class WorkerStuck(RuntimeError):
    """The same failure repeated without any committed batch in between."""


def serve(config: WorkerConfig, *, max_failures: int = 5) -> None:
    """Run a worker until SIGTERM/SIGINT; after a failed transaction, restore from the committed
    state and go on (the failed batch is redone, never half-applied). ``max_failures`` failures in a
    row with no committed batch between them stop it with ``WorkerStuck`` instead of retrying forever
    (a record the broker refuses fails the same way every time)."""
    metrics = Metrics(config.metrics_port)
    failures = 0
    while True:
        w = Worker(config, metrics=metrics)
        signal.signal(signal.SIGTERM, w.stop)
        signal.signal(signal.SIGINT, w.stop)
        try:
            w.run()
            return
        except KafkaException as exc:
            failures = 1 if w.committed_batches else failures + 1
            if failures >= max_failures:
                raise WorkerStuck(f"worker {config.name!r}: {failures} failed transactions in a row without "
                                  f"progress, last: {exc}; the committed state and offsets are intact, fix the "
                                  f"cause and restart") from exc
            log.error("transaction failed (%s); restoring from committed state and retrying (%d/%d)",
                      exc, failures, max_failures)
            time.sleep(1)

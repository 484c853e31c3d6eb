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

Why not faust's ``exactly_once`` (docs/PROCESSORS.md): faust-streaming 0.15.3 puts each output
into the transaction of its *destination* partition (``TransactionManager.send``) but commits
offsets in the transaction of their *source* partition (``TransactionManager.commit``), and
commits between an agent's sends; a join of two topics keyed differently (``{run}:actions`` and
``{run}:env``) therefore cannot be atomic there.
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
from eventlog.topics import TopicSpec

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
    """Worker identity: transactional id, consumer group, dlq chain and state keys derive from it."""
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

    @property
    def transactional_id(self) -> str:
        return f"marlgrc-{self.prefix}{self.name}"

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


class Worker:
    """One processor instance; one writer for its output chains (a second one with the same name
    fences the first)."""

    def __init__(self, config: WorkerConfig, processor: Processor | None = None, metrics: Metrics | None = None):
        self.config = config
        # flow control acts between batches, so one batch can bring up to ``batch`` records on top of
        # ``backlog``: the join limits must hold that much, or a state is evicted before its action
        # arrives (and the action then waits for ever)
        limit = max(1000, 2 * (config.backlog + config.batch))
        signer = Signer.load(Path(config.signing_key)) if config.signing_key and processor is None else None
        self.processor = processor or Processor(consumer=config.name, producer_id=f"marlgrc-{config.name}",
                                                default_env=config.default_env, track_joins=True,
                                                max_pending=limit, max_states=limit, signer=signer)
        self.processor.track_joins = True
        self.metrics = metrics or Metrics(config.metrics_port)
        self.offsets: dict[tuple[str, int], int] = {}  # (logical topic, partition) -> next offset
        self._stop = False
        self._paused: dict[str, bool] = {}
        self.committed_batches = 0
        self.produced = 0
        self._partition: RunPartitioner | None = None

    def stop(self, *_: object) -> None:
        self._stop = True

    # -- state ------------------------------------------------------------------------------

    def _key(self, what: str) -> str:
        return f"{self.config.name}:{what}"

    def restore(self) -> None:
        """Rebuild the processor state and input offsets from the committed state topic."""
        c = self.config
        ensure_state_topic(c.bootstrap, c.prefix)
        latest: dict[str, bytes | None] = {}
        for r in read_records(c.bootstrap, [STATE_TOPIC], prefix=c.prefix):
            if r.key.startswith(self._key("")):
                latest[r.key] = r.value
        joins = []
        for k, v in latest.items():
            what = k[len(self._key("")):]
            if v is None:
                continue  # a deleted join entry
            if what.startswith("join:"):
                run_id, kind, h = what[5:].rsplit(":", 2)
                joins.append((run_id, kind, h, v))
            elif what == "offsets":
                self.offsets = {(t, int(p)): o for t, p, o in json.loads(v)}
            elif what == "dlq":
                self.processor.restore_dlq(v)
            elif what.startswith("run:"):
                self.processor.restore(what[4:], v)
        self.processor.restore_joins(joins)
        log.info("restored %d runs, %d waiting records and %d offsets", len(self.processor.runs), len(joins),
                 len(self.offsets))

    # -- loop -------------------------------------------------------------------------------

    def run(self, *, until: Callable[["Worker"], bool] | None = None) -> None:
        c = self.config
        self.restore()
        producer = Producer({
            "bootstrap.servers": c.bootstrap, "transactional.id": c.transactional_id, "enable.idempotence": True,
            "acks": "all", "linger.ms": 5, "batch.num.messages": 10000, "queue.buffering.max.messages": 1_000_000,
            "transaction.timeout.ms": 60000,
        })
        producer.init_transactions(60)  # fences a previous instance and aborts its open transaction
        consumer = Consumer({
            "bootstrap.servers": c.bootstrap, "group.id": c.group_id, "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest",
            "fetch.max.bytes": 52428800, "queued.min.messages": 100000,
        })
        tps = partitions_of(c.bootstrap, INPUT_TOPICS, c.prefix)
        plen = len(c.prefix)
        consumer.assign([TopicPartition(tp.topic, tp.partition,
                                        self.offsets.get((tp.topic[plen:], tp.partition), OFFSET_BEGINNING))
                         for tp in tps])
        m = self.metrics
        last_lag = 0.0
        try:
            while not self._stop and not (until and until(self)):
                msgs = consumer.consume(c.batch, c.poll_timeout)
                now = time.monotonic()
                if now - last_lag > 5:
                    self._update_lag(consumer, tps)
                    last_lag = now
                msgs = [x for x in msgs if x.error() is None or self._check(x)]
                if msgs:
                    self._transaction(producer, consumer, msgs)
                self._flow_control(consumer, tps)
        finally:
            consumer.close()
            producer.flush(10)

    def _flow_control(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        """Joint actions wait for their states and states for their actions: pause whichever input
        runs ahead (the broker keeps the rest), so the state committed per transaction stays small.
        When both are behind, the head action's state is missing: resume both and let the
        processor dead-letter it."""
        pending, states = self.processor.backlog()
        limit = self.config.backlog
        pause = {"marl.joint.action": pending > limit and states <= limit,
                 "marl.env.state": states > limit and pending <= limit}
        plen = len(self.config.prefix)
        for topic, want in pause.items():
            if want == self._paused.get(topic, False):
                continue
            these = [tp for tp in tps if tp.topic[plen:] == topic]
            (consumer.pause if want else consumer.resume)(these)
            self._paused[topic] = want

    @staticmethod
    def _check(msg) -> bool:
        if msg.error().code() == KafkaError._PARTITION_EOF:
            return False
        raise KafkaException(msg.error())

    def _transaction(self, producer: Producer, consumer: Consumer, msgs: list) -> None:
        c, p, m = self.config, self.processor, self.metrics
        plen, prefix = len(c.prefix), c.prefix
        producer.begin_transaction()
        t0 = time.perf_counter()
        n_out = 0
        for msg in msgs:
            topic = msg.topic()[plen:]
            outs = p.feed(topic, msg.partition(), msg.offset(), msg.key(), msg.value())
            self.offsets[(topic, msg.partition())] = msg.offset() + 1
            m.events_in.labels(topic).inc()
            for ev in outs:
                self._produce(producer, prefix + ev.topic, ev.chain_id, ev.value)
                m.events_out.labels(ev.topic).inc()
                if ev.topic == "marl.dlq":
                    m.dead.labels(p.codec.decode(ev.value)[1]["error_kind"]).inc()
            n_out += len(outs)
        for ev in p.checkpoint():  # signed with the events they cover, in this transaction
            self._produce(producer, prefix + ev.topic, ev.chain_id, ev.value)
            m.events_out.labels(ev.topic).inc()
            n_out += 1
        state_topic = prefix + STATE_TOPIC
        for (run_id, kind, h), entry in p.take_join_changes().items():
            self._produce(producer, state_topic, self._key(f"join:{run_id}:{kind}:{h}"), entry)
        for run_id in p.take_dirty():
            if run_id == "":
                self._produce(producer, state_topic, self._key("dlq"), p.snapshot_dlq())
            else:
                snap = p.snapshot(run_id)
                if len(snap) > MAX_STATE_VALUE:
                    raise StateTooLarge(f"the rolling state of run {run_id} is {len(snap)} bytes, over the "
                                        f"{MAX_STATE_VALUE}-byte state message limit (window of {p.window} credits "
                                        f"x {len(snap) // max(p.window, 1)} bytes); run this worker with a smaller "
                                        f"window or fewer agents per run")
                self._produce(producer, state_topic, self._key(f"run:{run_id}"), snap)
        self._produce(producer, state_topic, self._key("offsets"),
                      json.dumps([[t, pt, o] for (t, pt), o in sorted(self.offsets.items())]).encode())
        elapsed = time.perf_counter() - t0
        m.latency.observe(elapsed / len(msgs))
        t1 = time.perf_counter()
        producer.send_offsets_to_transaction(
            [TopicPartition(prefix + t, pt, o) for (t, pt), o in self.offsets.items()],
            consumer.consumer_group_metadata(), 30)
        producer.commit_transaction(60)
        m.commit.observe(time.perf_counter() - t1)
        now_ms = time.time() * 1000
        m.age.observe(max(0.0, (now_ms - msgs[-1].timestamp()[1]) / 1000))
        self.committed_batches += 1
        self.produced += n_out

    def _produce(self, producer: Producer, topic: str, key: str, value: bytes | None) -> None:
        """Send in the key's run partition (co-partitioned, like every marl.* writer: docs/HASHING.md)."""
        if self._partition is None or self._partition.client is not producer:
            self._partition = RunPartitioner(producer)
        partition = self._partition(topic, key)
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                producer.produce(topic, value, key, **extra)
                return
            except BufferError:
                producer.poll(0.05)

    def _update_lag(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        plen = len(self.config.prefix)
        try:
            for tp in tps:
                # cached: the high watermark that came with the last fetch, no broker round trip
                # (an uncached call costs one per partition and stalled the loop for seconds)
                _, hi = consumer.get_watermark_offsets(tp, cached=True)
                if hi < 0:
                    continue
                pos = self.offsets.get((tp.topic[plen:], tp.partition), 0)
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

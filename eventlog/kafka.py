"""Thin Kafka adapters (confluent-kafka): idempotent producer, read-committed reader, topic admin."""
from __future__ import annotations

import socket
import time
import uuid
from typing import Iterable, Iterator, NamedTuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from .topics import TopicSpec, logical, physical, replication_for, run_partition, topic_specs


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the given bootstrap address."""


class DeliveryError(RuntimeError):
    """Kafka did not acknowledge some events. A chain with an unacknowledged event has a gap."""


class Record(NamedTuple):
    """One Kafka message as read: logical topic, partition, offset, key (chain id), value, ms time."""

    topic: str
    partition: int
    offset: int
    key: str
    value: bytes
    timestamp: int


def _unavailable(bootstrap: str, what: str, exc: object) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"Kafka at {bootstrap} did not answer while {what} ({exc}). Start one with `marlgrc up` "
        f"(or `docker compose -f compose/docker-compose.yml up -d`) and pass its address with --bootstrap.")


def probe(bootstrap: str, timeout: float = 3.0) -> None:
    """Raise BrokerUnavailable at once when nothing accepts a TCP connection at any bootstrap address
    (a closed port is refused in microseconds; librdkafka would retry until its timeout)."""
    refused = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
                return
        except (OSError, ValueError) as exc:
            refused.append(f"{server.strip()}: {exc}")
    raise _unavailable(bootstrap, "connecting", "; ".join(refused))


# Readers and admin clients log only librdkafka's critical lines: a broker that does not answer is
# reported once, by the BrokerUnavailable the caller gets, not by a line per connection attempt.
_QUIET = {"log_level": 2}


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, **_QUIET})


def check_broker(bootstrap: str, timeout: float = 10.0) -> None:
    probe(bootstrap)
    try:
        _admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise _unavailable(bootstrap, "listing topics", exc) from None


def ensure_topics(bootstrap: str, prefix: str = "", specs: Iterable[TopicSpec] | None = None,
                  timeout: float = 30.0) -> list[str]:
    """Create the marl.* topics with explicit configs where missing; return the ones created.

    The replication factor follows the cluster's broker count (``topics.replication_for``): three
    replicas with ``min.insync.replicas=2`` on three or more brokers, one per broker below that."""
    probe(bootstrap)
    admin = _admin(bootstrap)
    try:
        md = admin.list_topics(timeout=timeout)
        existing = set(md.topics)
    except KafkaException as exc:
        raise _unavailable(bootstrap, "listing topics", exc) from None
    rf, min_isr = replication_for(len(md.brokers))
    new = [NewTopic(physical(prefix, s.name), num_partitions=s.partitions, replication_factor=rf,
                    config={**s.config, "min.insync.replicas": str(min(min_isr, rf))})
           for s in (specs or topic_specs()) if physical(prefix, s.name) not in existing]
    created = []
    for name, fut in (admin.create_topics(new, operation_timeout=timeout).items() if new else []):
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create topic {name}: {exc}") from None
    _wait_for_leaders(admin, created, timeout)
    return created


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    """New topics answer 'not leader' until every partition has a leader; wait for that."""
    deadline = time.monotonic() + timeout
    while names:
        md = admin.list_topics(timeout=timeout)
        names = [n for n in names if n not in md.topics or md.topics[n].error is not None
                 or not md.topics[n].partitions
                 or any(p.leader < 0 for p in md.topics[n].partitions.values())]
        if names and time.monotonic() > deadline:
            raise RuntimeError(f"topics {names} have no leader after {timeout:.0f}s; check the broker log")
        if names:
            time.sleep(0.05)


class RunPartitioner:
    """Co-partitioning for a client: the partition of a chain on a topic is ``topics.run_partition``
    of its key over the topic's partition count, read once per topic from the client's metadata.

    A topic the metadata does not show yet (just created, and the broker answering has not learned of
    it: a cluster's nodes learn of a new topic one after another) is asked again for up to ``timeout``
    seconds, so an event is never placed by the client's own partitioner instead. A topic still
    unknown after that gets ``None`` (the client then fails its delivery: topics are never created by
    a write) and is not asked again for ``retry_after`` seconds."""

    def __init__(self, client, timeout: float = 10.0, retry_after: float = 30.0):
        self.client = client
        self._timeout = timeout
        self._retry_after = retry_after
        self._counts: dict[str, int] = {}
        self._missing: dict[str, float] = {}  # topic -> monotonic time before which it is not asked again

    def count(self, topic: str) -> int | None:
        n = self._counts.get(topic)
        if n is not None:
            return n
        if time.monotonic() < self._missing.get(topic, 0.0):
            return None
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                md = self.client.list_topics(topic, timeout=max(0.1, deadline - time.monotonic())).topics.get(topic)
            except KafkaException:
                md = None
            if md is not None and md.error is None and md.partitions:
                n = self._counts[topic] = len(md.partitions)
                return n
            if time.monotonic() >= deadline:
                self._missing[topic] = time.monotonic() + self._retry_after
                return None
            time.sleep(0.1)

    def __call__(self, topic: str, key: str) -> int | None:
        n = self._counts.get(topic) or self.count(topic)
        return None if n is None else run_partition(key, n)


class EventProducer:
    """Idempotent producer (``acks=all``), keyed by chain id, so a chain stays in one partition in order;
    co-partitioned: every chain of a run goes to the run's partition number on every topic
    (``RunPartitioner``, docs/HASHING.md "Partitions").

    Delivery reports are requested for errors only; ``flush()`` raises DeliveryError naming the first
    failures. Topic names are logical (``marl.joint.action``); ``prefix`` is prepended.
    """

    def __init__(self, bootstrap: str, *, prefix: str = "", client_id: str = "marlgrc", **config):
        conf = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
            "delivery.report.only.error": True,
            "error_cb": self._on_error,
            "log_level": 3,  # errors only; transient warnings (e.g. during a broker restart) are retried
        }
        conf.update(config)
        self.bootstrap = bootstrap
        self.prefix = prefix
        self._producer = Producer(conf)
        self._partition = RunPartitioner(self._producer)
        self._failures: list[str] = []
        self._failed_chains: dict[tuple[str, str], int] = {}  # (topic, chain id) -> events not delivered
        self._fatal: str | None = None
        self._closed = False
        self.sent = 0

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = str(err)

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            chain = (msg.topic()[len(self.prefix):], (msg.key() or b"").decode("utf-8", "backslashreplace"))
            self._failed_chains[chain] = self._failed_chains.get(chain, 0) + 1
            if len(self._failures) < 3:
                self._failures.append(f"{chain[0]} {chain[1]}: {err.str()}")

    def send(self, topic: str, key: str, value: bytes, partition: int | None = None) -> None:
        """Queue one event in its run's partition; ``partition`` only to reproduce a recorded layout
        (tests, imports)."""
        name = self.prefix + topic
        if partition is None:
            partition = self._partition(name, key)
        extra = {} if partition is None else {"partition": partition}
        if self.sent and self.sent % 10000 == 0:  # before queueing: raising means this event was not queued
            self._producer.poll(0)
            self._raise_if_failed()
        while True:
            try:
                self._producer.produce(name, value, key, on_delivery=self._on_delivery, **extra)
                break
            except BufferError:
                self._producer.poll(0.05)  # queue full: let librdkafka drain
        self.sent += 1

    def flush(self, timeout: float = 120.0) -> None:
        remaining = self._producer.flush(timeout)
        if remaining:
            # give up on what is still queued or in flight: each purged event comes back through its
            # delivery report, so the error names every chain that now has a gap
            self._producer.purge()
            self._producer.flush(5.0)
            self._raise_if_failed(f"not acknowledged by Kafka at {self.bootstrap} after {timeout:.0f}s "
                                  f"(check the broker with `marlgrc status`)")
        self._raise_if_failed()

    def _raise_if_failed(self, why: str = "not delivered") -> None:
        if self._fatal:
            raise DeliveryError(f"fatal producer error: {self._fatal}; the producer must be recreated")
        if self._failed_chains:
            n = sum(self._failed_chains.values())
            chains = ", ".join(f"{t} {c} ({k})" for (t, c), k in sorted(self._failed_chains.items())[:10])
            more = len(self._failed_chains) - 10
            raise DeliveryError(
                f"{n} events {why}, on chains {chains}{f' and {more} more' if more > 0 else ''}; first errors: "
                f"{'; '.join(self._failures)}. These chains now have gaps: run `marlgrc verify` and resume "
                f"them from their last good head before writing more")

    def close(self) -> None:
        """Flush (raising DeliveryError as ``flush`` does), then close the client: its connections and
        threads end now rather than when the object is collected (a client that outlives its broker
        logs "Connection refused" every second). Idempotent; a closed producer refuses ``send``."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._producer.close()


def _consumer(bootstrap: str, **extra) -> Consumer:
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": f"marlgrc-reader-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # set explicitly: clients differ in their default (docs/ARCHITECTURE.md, "Topics and delivery")
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": 52428800,
        "max.partition.fetch.bytes": 10485760,
        "queued.min.messages": 200000,
        # connect to the brokers as soon as they are known: with sparse connections, the handle's
        # first metadata request waits ~50 ms (librdkafka's connection suppression) after the
        # bootstrap connection is replaced by the broker's own
        "enable.sparse.connections": False,
        **_QUIET,
    }
    conf.update(extra)
    return Consumer(conf)


def partitions_of(bootstrap: str, topics: Iterable[str], prefix: str = "", timeout: float = 10.0,
                  client: Consumer | AdminClient | None = None) -> list[TopicPartition]:
    """Every partition of ``topics``, in order; the metadata comes from ``client`` (a consumer
    about to read them saves a connection) or from a new AdminClient."""
    if client is None:
        probe(bootstrap)
        client = _admin(bootstrap)
    names = [physical(prefix, t) for t in topics]
    deadline = time.monotonic() + min(timeout, 10.0)
    while True:
        try:
            md = client.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise _unavailable(bootstrap, "reading metadata", exc) from None
        missing = [n for n in names if n not in md.topics or not md.topics[n].partitions]
        # one broker's metadata is the truth; in a cluster, the node asked may learn of a topic just
        # created by another a moment later: ask again (each ask may reach another node)
        if not missing or len(md.brokers) <= 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if missing:
        raise KeyError(f"topic {missing[0]} does not exist on {bootstrap}; create topics with `marlgrc up`")
    return [TopicPartition(n, p) for n in names for p in sorted(md.topics[n].partitions)]


# errors of a partition that has no leader yet (a topic just created, a broker just restarted)
_NO_LEADER_YET = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                  KafkaError.UNKNOWN_TOPIC_OR_PART)


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """(low, high) offsets of a partition, waiting (up to ``timeout``) for a leader it does not have yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() not in _NO_LEADER_YET or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _plan(consumer: Consumer, bootstrap: str, topics: Iterable[str], prefix: str,
          start_offsets: dict[tuple[str, int], int] | None, start_timestamp_ms: int | None,
          end_offsets: dict[tuple[str, int], int] | None,
          timeout: float) -> tuple[list[TopicPartition], dict[tuple[str, int], int], int]:
    """(partitions to assign at their start offsets, {(physical topic, partition): end offset}, messages
    between start and end) for a read from the start (beginning, offsets or a timestamp) to the end."""
    tps = partitions_of(bootstrap, topics, prefix, client=consumer)
    if start_timestamp_ms is not None:
        tps = consumer.offsets_for_times([TopicPartition(tp.topic, tp.partition, start_timestamp_ms)
                                          for tp in tps], timeout=timeout)
    ends: dict[tuple[str, int], int] = {}
    assign = []
    remaining = 0
    for tp in tps:
        lo, hi = _watermarks(consumer, tp, timeout)
        key = (logical(prefix, tp.topic), tp.partition)
        end = hi if end_offsets is None else min(hi, end_offsets.get(key, hi))
        if start_offsets is not None and key in start_offsets:
            off = start_offsets[key]
        elif start_timestamp_ms is not None:
            off = tp.offset if tp.offset >= 0 else end
        else:
            off = OFFSET_BEGINNING
        start = lo if off == OFFSET_BEGINNING else off
        if start < end:
            ends[(tp.topic, tp.partition)] = end
            assign.append(TopicPartition(tp.topic, tp.partition, off))
            remaining += end - start
    return assign, ends, remaining


def message_batches(bootstrap: str, topics: Iterable[str], *, prefix: str = "",
                    start_offsets: dict[tuple[str, int], int] | None = None,
                    start_timestamp_ms: int | None = None,
                    end_offsets: dict[tuple[str, int], int] | None = None,
                    batch: int = 10000, timeout: float = 30.0,
                    ends_out: dict | None = None) -> Iterator[list]:
    """Batches of confluent-kafka Messages from the start (beginning, offsets or a timestamp) until
    every partition's position reaches the end offset seen at the start (or ``end_offsets``).
    A batch may hold messages past a partition's end (written since); ``read_records`` drops them.
    ``ends_out``, if given, receives {(physical topic, partition): end offset}."""
    probe(bootstrap)
    consumer = _consumer(bootstrap)
    try:
        assign, ends, remaining = _plan(consumer, bootstrap, topics, prefix, start_offsets, start_timestamp_ms,
                                        end_offsets, timeout)
        if ends_out is not None:
            ends_out.update(ends)
        if not assign:
            return
        consumer.assign(assign)
        yield from _consume(consumer, dict(ends), remaining, batch, timeout, bootstrap)
    finally:
        consumer.close()


def _consume(consumer: Consumer, open_parts: dict[tuple[str, int], int], remaining: int, batch: int,
             timeout: float, bootstrap: str, poll: float = 0.5) -> Iterator[list]:
    """Batches of Messages from an assigned consumer until each partition's position reaches its end
    offset in ``open_parts`` ({(physical topic, partition): end}); ``remaining``: how many are expected."""
    idle_since = time.monotonic()
    while open_parts:
        # consume(n, timeout) waits until n messages or the timeout: never ask for more than remain
        msgs = consumer.consume(max(1, min(batch, remaining)), poll)
        remaining -= len(msgs)
        if msgs:
            idle_since = time.monotonic()
            yield msgs
        elif time.monotonic() - idle_since > timeout:
            raise BrokerUnavailable(f"no data from {bootstrap} for {timeout:.0f}s while reading "
                                    f"{sorted(open_parts)}; is the broker up (`marlgrc status`)?")
        # read_committed: control markers and aborted records take offsets we never see, so the
        # consumer's position, not the last offset received, says when a partition is done
        for tp in consumer.position([TopicPartition(t, p) for (t, p) in open_parts]):
            if tp.offset >= open_parts[(tp.topic, tp.partition)]:
                del open_parts[(tp.topic, tp.partition)]


def read_records(bootstrap: str, topics: Iterable[str], *, prefix: str = "",
                 start_offsets: dict[tuple[str, int], int] | None = None,
                 start_timestamp_ms: int | None = None,
                 end_offsets: dict[tuple[str, int], int] | None = None,
                 batch: int = 10000, timeout: float = 30.0) -> Iterator[Record]:
    """Replay topics from the beginning (default), from given offsets, or from a timestamp, up to
    the end offsets seen when reading starts (or the given ``end_offsets``, exclusive).

    Records come per partition in offset order; partitions are interleaved. Keys are chain ids.
    """
    for batch_ in record_batches(bootstrap, topics, prefix=prefix, start_offsets=start_offsets,
                                 start_timestamp_ms=start_timestamp_ms, end_offsets=end_offsets, batch=batch,
                                 timeout=timeout, timestamps=True):
        for r in batch_:
            yield Record(*r)


def record_batches(bootstrap: str, topics: Iterable[str], *, prefix: str = "",
                   start_offsets: dict[tuple[str, int], int] | None = None,
                   start_timestamp_ms: int | None = None,
                   end_offsets: dict[tuple[str, int], int] | None = None,
                   batch: int = 10000, timeout: float = 30.0,
                   timestamps: bool = False) -> Iterator[list[tuple]]:
    """What ``read_records`` reads, as lists of plain ``(topic, partition, offset, key, value)``
    tuples (logical topic, key decoded; ``+ (timestamp,)`` with ``timestamps``): the bulk readers'
    path, with no per-record object. A key that is not UTF-8 is kept with backslash escapes."""
    ends: dict[tuple[str, int], int] = {}
    rows = _Rows(prefix, timestamps)
    for msgs in message_batches(bootstrap, topics, prefix=prefix, start_offsets=start_offsets,
                                start_timestamp_ms=start_timestamp_ms, end_offsets=end_offsets, batch=batch,
                                timeout=timeout, ends_out=ends):
        out = rows(msgs, ends)
        if out:
            yield out


class _Rows:
    """Messages to ``(logical topic, partition, offset, key, value[, timestamp])`` tuples, dropping
    those at or past their partition's end offset; topic names and keys decoded once each."""

    def __init__(self, prefix: str, timestamps: bool):
        self.plen, self.timestamps = len(prefix), timestamps
        self.names: dict[str, str] = {}
        self.keys: dict[bytes | None, str] = {None: ""}

    def __call__(self, msgs: list, ends: dict[tuple[str, int], int]) -> list[tuple]:
        out: list[tuple] = []
        append, keys, names, timestamps = out.append, self.keys, self.names, self.timestamps
        for m in msgs:
            if m.error() is not None:
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(m.error())
            t, p, o = m.topic(), m.partition(), m.offset()
            if o >= ends.get((t, p), -1):
                continue
            k = m.key()
            key = keys.get(k)
            if key is None:
                key = k.decode("utf-8", "backslashreplace")  # a garbage key is a finding, not a crash
                if len(keys) < 100_000:
                    keys[k] = key
            name = names.get(t)
            if name is None:
                name = names[t] = t[self.plen:]
            append((name, p, o, key, m.value(), m.timestamp()[1]) if timestamps else (name, p, o, key, m.value()))
        return out


class OffsetReader:
    """Reads offset ranges of some topics again and again with one consumer: the on-policy
    learner's read-back of each batch it just wrote. The topics' partitions are looked up once, the
    end offsets of all of them come from one ListOffsets request, and each read assigns the ranges'
    partitions at their start and consumes exactly up to their ends (no poll timeout is waited for)."""

    def __init__(self, bootstrap: str, topics: Iterable[str], prefix: str = "", *, timeout: float = 30.0):
        probe(bootstrap)
        self.bootstrap, self.prefix, self.timeout = bootstrap, prefix, timeout
        self._consumer = _consumer(bootstrap)
        self._admin = _admin(bootstrap)
        self._tps = partitions_of(bootstrap, topics, prefix, client=self._consumer)
        self._rows = _Rows(prefix, timestamps=True)

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """{(logical topic, partition): offset after its last message} for every partition."""
        from confluent_kafka.admin import OffsetSpec

        request = {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in self._tps}
        for attempt in range(40):
            try:
                futures = self._admin.list_offsets(request, request_timeout=self.timeout)
                return {(logical(self.prefix, tp.topic), tp.partition): fut.result().offset
                        for tp, fut in futures.items()}
            except KafkaException as exc:
                err = exc.args[0]
                if attempt == 39 or not (err.retriable() or err.code() in _NO_LEADER_YET):
                    raise _unavailable(self.bootstrap, "listing end offsets", exc) from None
                time.sleep(0.25)
        raise AssertionError("unreachable")

    def read(self, start: dict[tuple[str, int], int], end: dict[tuple[str, int], int]) -> list[Record]:
        """The records of every partition in ``end`` from its offset in ``start`` (default: nothing)
        up to its offset in ``end``, exclusive, per partition in offset order."""
        pre = self.prefix
        ends = {(pre + t, p): e for (t, p), e in end.items() if start.get((t, p), e) < e}
        if not ends:
            return []
        c = self._consumer
        c.assign([TopicPartition(t, p, start[(t[len(pre):], p)]) for (t, p) in ends])
        expected = sum(e - start[(t[len(pre):], p)] for (t, p), e in ends.items())
        out: list[Record] = []
        try:
            for msgs in _consume(c, dict(ends), expected, 10000, self.timeout, self.bootstrap, poll=0.2):
                out.extend(Record(*row) for row in self._rows(msgs, ends))
        finally:
            c.unassign()
        return out

    def close(self) -> None:
        self._consumer.close()


def chain_head_from_topic(bootstrap: str, topic: str, chain_id: str, prefix: str = "") -> tuple[int, bytes]:
    """(seq, event_hash) of the last event of a chain, read back from Kafka, for a restarting writer.

    Returns (-1, zeros) when the chain has no events."""
    from .hashing import seq_and_chain

    seq, head = -1, bytes(32)
    for r in read_records(bootstrap, [topic], prefix=prefix):
        if r.key == chain_id:
            seq, head = seq_and_chain(r.value)[0], bytes(r.value[-32:])
    return seq, head

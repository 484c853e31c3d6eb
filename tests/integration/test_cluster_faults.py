"""Faults on a 3-broker KRaft cluster (issue 19), and co-partitioning on a real broker.

``test_one_broker_of_three_killed_mid_run_loses_nothing`` starts its OWN cluster with the launcher
(``start_kafka(home, brokers=3)``) in a temporary home - the shared test broker is a single node - and
writes a stream of several runs through one ``EventProducer`` (``acks=all``, idempotent) onto topics
created by ``ensure_topics`` (replication factor 3, ``min.insync.replicas=2``). A third of the way
in, the broker leading most of the partitions is SIGKILLed while events are in flight; the next
third is written and flushed on the two survivors alone; the node is started again while the last
third is written, and must catch up (every replica back in the ISR). Then every topic is read back:
each chain's seqs are 0..n-1 exactly once, every chain verifies against its signed checkpoints,
and each run sits in one partition number on every topic.

Size: 50,000 events (as the issue asks), written at ~4,000 events/s so the kill and the restart
fall mid-run: ~45 s on an idle 2-core machine, ~105 s under a load of 4-5 (most of it the three
JVMs starting and stopping). Memory: three JVMs of 384 MiB heap each.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from compose import KafkaCluster, kafka_status, kill_kafka, start_kafka, stop_kafka
from compose.services import port_free
from eventlog.audit import verify_kafka
from eventlog.checkpoint import Signer
from eventlog.hashing import seq_and_chain
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from eventlog.topics import run_partition
from tests.conftest import _unavailable as service_unavailable
from tests.synthetic import synthetic_run

pytestmark = pytest.mark.integration
SIGNER = Signer.from_seed(b"cluster-faults")
TOPICS = ["marl.env.state", "marl.agent.observation", "marl.joint.action", "marl.audit.checkpoints"]
RUNS = 6
EVENTS_PER_STEP = 4  # per run: env.state, two observations, joint.action
TOTAL_STEPS = 50_000 // (RUNS * EVENTS_PER_STEP)


@pytest.fixture
def cluster():
    """A 3-node cluster of the launcher in a private home, always stopped and removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="marlgrc-cluster-"))
    try:
        try:
            c = start_kafka(home, brokers=3)
        except Exception as exc:  # noqa: BLE001 - a failure under CI (CI=true), a skip elsewhere
            service_unavailable("Kafka cluster", exc)
        yield home, c
    finally:
        stop_kafka(home, remove_data=True, timeout=20)
        shutil.rmtree(home, ignore_errors=True)


class Stream:
    """RUNS runs written step by step, interleaved, through one producer (one EventLog per run)."""

    def __init__(self, producer: EventProducer, prefix: str):
        self.producer = producer
        self.runs = [f"cf{uuid.uuid4().hex[:6]}r{i}" for i in range(RUNS)]
        self.logs = [EventLog(producer, run_id=r, producer_id="p", signer=SIGNER, checkpoint_every=2000)
                     for r in self.runs]
        self.step = 0

    def write(self, steps: int, rate: float) -> None:
        """``steps`` more steps of every run, at about ``rate`` events/s (the run goes on while
        the test kills and restarts a broker, rather than being queued in an instant)."""
        t0, sent0 = time.monotonic(), self.producer.sent
        for _ in range(steps):
            s = self.step
            for run, log in zip(self.runs, self.logs):
                st = log.append(f"{run}:env", "env.state", {"episode": 0, "step": s, "state": [0.1 * s, 1.0],
                                                             "collapsed_state": [0.1 * s]})
                obs = [log.append(f"{run}:obs:{a}", "agent.observation",
                                  {"episode": 0, "step": s, "agent_id": a, "observation": [float(s), 0.5]},
                                  source_event_hashes=[st.event_hash]).event_hash for a in ("a0", "a1")]
                log.append(f"{run}:actions", "joint.action", {
                    "episode": 0, "step": s, "joint_vector": [1.0, 0.0],
                    "actions": [{"agent_id": a, "discrete": 1, "continuous": [], "log_prob": -0.7, "reward": 0.5,
                                 "terminated": False, "truncated": False} for a in ("a0", "a1")]},
                    source_event_hashes=[st.event_hash, *obs])
            self.step += 1
            ahead = (self.producer.sent - sent0) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        for log in self.logs:
            log.close()

    def heads(self) -> dict[tuple[str, str], int]:
        """{(topic, chain id): events written}, checkpoint chains included."""
        return {k: h.seq + 1 for log in self.logs for k, h in log.heads().items()}


def _partitions(admin: AdminClient, prefix: str) -> dict[tuple[str, int], object]:
    md = admin.list_topics(timeout=10)
    return {(t, p): pm for t, tm in md.topics.items() if t.startswith(prefix) for p, pm in tm.partitions.items()}


def _wait(what: str, check, timeout: float) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_one_broker_of_three_killed_mid_run_loses_nothing(cluster):
    home, c = cluster
    assert isinstance(c, KafkaCluster) and len(c.nodes) == 3 and len(c.bootstrap.split(",")) == 3
    assert {n.node_id for n in c.nodes} == {1, 2, 3}
    assert len({n.port for n in c.nodes} | {n.controller_port for n in c.nodes}) == 6
    assert len({n.data_dir for n in c.nodes}) == 3
    prefix = f"t{uuid.uuid4().hex[:8]}."
    admin = AdminClient({"bootstrap.servers": c.bootstrap, "log_level": 2})

    # topics learn the broker count from the metadata: three replicas, two in sync for acks=all
    ensure_topics(c.bootstrap, prefix)
    # the node this admin asks may learn of the new topics a moment after the one that created them
    _wait("every new partition in the metadata", lambda: len(_partitions(admin, prefix)) == 10 * 3, 30)
    parts = _partitions(admin, prefix)
    assert len(parts) == 10 * 3 and all(len(pm.replicas) == 3 for pm in parts.values())
    min_isr: dict[str, str] = {}

    def described() -> bool:  # a node may learn of a new topic a moment after the one that created it
        for res, fut in admin.describe_configs([ConfigResource(ResourceType.TOPIC, prefix + t) for t in TOPICS
                                                if prefix + t not in min_isr]).items():
            try:
                min_isr[res.name] = fut.result(timeout=30)["min.insync.replicas"].value
            except KafkaException:
                pass
        return len(min_isr) == len(TOPICS)

    _wait("topic configs", described, 30)
    assert set(min_isr.values()) == {"2"}

    producer = EventProducer(c.bootstrap, prefix=prefix, client_id="cluster-faults")  # acks=all, idempotent
    stream = Stream(producer, prefix)
    third = TOTAL_STEPS // 3
    rate = 4000.0

    stream.write(third, rate)
    leaders = Counter(pm.leader for pm in _partitions(admin, prefix).values())
    victim = leaders.most_common(1)[0][0]
    producer._producer.poll(0)  # serve delivery reports, so the count below is what is not acknowledged yet
    in_flight = len(producer._producer)
    assert kill_kafka(home, node=victim)  # SIGKILL, with events still queued or in flight
    st = kafka_status(home)
    assert isinstance(st, KafkaCluster) and st.down == (victim,)

    # the run goes on: the next third is acknowledged (acks=all) by the two survivors alone
    t0 = time.monotonic()
    stream.write(third, rate)
    producer.flush(timeout=120)
    survivors_s = time.monotonic() - t0
    _wait("partitions led by the survivors, the dead node out of every ISR", lambda: all(
        pm.leader != victim and victim not in pm.isrs and len(pm.isrs) == 2
        for pm in _partitions(admin, prefix).values()), 30)

    # the node comes back while the last third is written, and catches up
    restarted: dict[str, object] = {}

    def restart() -> None:
        try:
            restarted["cluster"] = start_kafka(home, brokers=3)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            restarted["error"] = exc

    t = threading.Thread(target=restart)
    t.start()
    stream.write(TOTAL_STEPS - 2 * third, rate)
    t.join(timeout=180)
    assert not t.is_alive() and "error" not in restarted, restarted.get("error")
    assert restarted["cluster"].node(victim) is not None
    stream.close()
    producer.flush(timeout=120)
    catch_up_s = _wait("every replica back in sync", lambda: all(
        len(pm.isrs) == 3 for pm in _partitions(admin, prefix).values()), 90)

    # read back every topic: each chain's seqs exactly 0..n-1, nothing lost, nothing twice
    heads = stream.heads()
    total = sum(heads.values())
    assert total == producer.sent >= 50_000 - RUNS * EVENTS_PER_STEP
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    places: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for r in read_records(c.bootstrap, TOPICS, prefix=prefix):
        seqs[(r.topic, r.key)].append(seq_and_chain(r.value)[0])
        places[r.key.partition(":")[0]].add((r.topic, r.partition))
    assert set(seqs) == set(heads)
    for chain, got in seqs.items():
        assert len(got) == heads[chain], f"{chain}: {len(got)} events read, {heads[chain]} written"
        assert sorted(got) == list(range(heads[chain])), f"{chain}: a seq missing or twice"
        assert got == sorted(got), f"{chain}: out of order in its partition"

    # co-partitioning: each run in one partition number, the same on every topic
    for run in stream.runs:
        assert {p for _, p in places[run]} == {run_partition(run, 3)}, places[run]
        assert {t for t, _ in places[run]} == set(TOPICS)

    # every chain verifies and is signed to its end
    report, _ = verify_kafka(c.bootstrap, prefix=prefix, topics=TOPICS[:-1], public_key=SIGNER.public_key,
                             require_signed=True)
    assert report.ok, [b.describe() for b in report.breaks]
    data = {(ch.topic, ch.chain_id): ch for ch in report.chains if ch.topic != "marl.audit.checkpoints"}
    assert set(data) == {k for k in heads if k[0] != "marl.audit.checkpoints"}
    assert all(ch.events == heads[k] and ch.signed_through_seq == heads[k] - 1 for k, ch in data.items())

    # `down`: every node stops, its ports free again
    assert stop_kafka(home, timeout=20)
    assert kafka_status(home) is None
    assert all(port_free(p) for pair in c.ports.values() for p in pair)
    print(f"\n{total} events, {RUNS} runs; node {victim} killed with {in_flight} events queued or in flight; "
          f"a third written and flushed on 2 nodes in {survivors_s:.1f} s; replicas back in sync "
          f"{catch_up_s:.1f} s after the last flush")


def test_a_run_lands_in_one_partition_number_on_every_topic(kafka, topics):
    """On the shared broker: EventProducer places every chain of a run in the run's partition on
    every topic, and that partition is where librdkafka's murmur2 partitioner (Kafka's default)
    puts a message keyed by the run id."""
    producer = EventProducer(kafka.bootstrap, prefix=topics)
    runs = [f"cp{uuid.uuid4().hex[:6]}x{i}" for i in range(6)]
    for run in runs:
        log = EventLog(producer, run_id=run, producer_id="p", signer=SIGNER, checkpoint_every=50)
        synthetic_run(log, episodes=1, steps=5, agents=2)
        log.close()
    producer.flush()
    all_topics = ["marl.run.lifecycle", *TOPICS]
    seen: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for r in read_records(kafka.bootstrap, all_topics, prefix=topics):
        seen[r.key.partition(":")[0]].add((r.topic, r.partition))
    assert set(seen) == set(runs)
    for run in runs:
        assert {t for t, _ in seen[run]} == set(all_topics)
        assert {p for _, p in seen[run]} == {run_partition(run, 3)}

    # librdkafka's murmur2 partitioner agrees with eventlog.topics.run_partition on 7 partitions
    name = f"{topics}murmur2-check"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=7, replication_factor=1)])[name].result(timeout=30)
    placed: dict[str, int] = {}
    raw = Producer({"bootstrap.servers": kafka.bootstrap, "partitioner": "murmur2"})
    keys = [f"run-{i}" for i in range(200)]
    deadline = time.monotonic() + 30
    while len(placed) < len(keys) and time.monotonic() < deadline:  # the new topic may need a moment
        for k in keys:
            if k not in placed:
                raw.produce(name, b"x", k, on_delivery=lambda err, m: err is None and placed.__setitem__(
                    m.key().decode(), m.partition()))
        raw.flush(10)
    admin.delete_topics([name])
    assert placed == {k: run_partition(k, 7) for k in keys}
    assert len(set(placed.values())) == 7

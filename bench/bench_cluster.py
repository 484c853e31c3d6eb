"""Produce throughput on 1 broker (replication factor 1) vs a 3-broker cluster (replication factor 3,
``min.insync.replicas=2``), both ``acks=all`` with an idempotent producer, one run each.

Both are started by the launcher in temporary homes, one after the other (never both at once: three
JVMs are enough for a small machine), so the shared test broker is never used or disturbed. On each:
the marl.* topics are created by ``ensure_topics`` (which picks the replication factor from the
broker count), then

- ``full``: the whole write path, ``EventLog.append`` (header, Avro, hash chain, signed checkpoints)
  into ``EventProducer``, RUNS runs interleaved (co-partitioning puts a run in one partition, so
  several runs are needed to use all three partitions);
- ``send``: the same number of pre-encoded events through ``EventProducer.send`` alone: what the
  client and the brokers take, with little Python work in front.

No target: the figures are information (issue 19 asks for them). Prints one JSON line per
(cluster, path).

    ./dev python bench/bench_cluster.py [N]       (default 100,000 events per path)
"""
from __future__ import annotations

import gc
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import timed

from compose import start_kafka, stop_kafka
from eventlog.checkpoint import Signer
from eventlog.kafka import EventProducer, ensure_topics
from eventlog.log import EventLog, MemorySink

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
RUNS = 6


def payload(step: int) -> dict:
    return {"episode": step // 25, "step": step % 25, "joint_vector": [1.0, 2.0, 0.0],
            "actions": [{"agent_id": f"agent_{a}", "discrete": (step + a) % 5, "continuous": [], "log_prob": -1.6,
                         "reward": 0.5, "terminated": False, "truncated": False} for a in range(3)]}


def full_path(boot: str, prefix: str, n: int) -> int:
    producer = EventProducer(boot, prefix=prefix, client_id="bench-cluster-full")
    signer = Signer.from_seed(b"bench-cluster")
    logs = [EventLog(producer, run_id=f"run{r}", producer_id="bench", signer=signer, checkpoint_every=10_000)
            for r in range(RUNS)]
    for i in range(n):
        r = i % RUNS
        logs[r].append(f"run{r}:actions", "joint.action", payload(i // RUNS))
    for log in logs:
        log.close()
    producer.flush()
    return producer.sent


def encoded(n: int) -> list[tuple[str, str, bytes]]:
    """n sealed joint.action events of RUNS runs, kept in memory: (topic, chain id, bytes)."""
    sink = MemorySink()
    logs = [EventLog(sink, run_id=f"run{r}", producer_id="bench") for r in range(RUNS)]
    for i in range(n):
        r = i % RUNS
        logs[r].append(f"run{r}:actions", "joint.action", payload(i // RUNS))
    return sink.sent


def send_path(boot: str, prefix: str, events: list[tuple[str, str, bytes]]) -> int:
    producer = EventProducer(boot, prefix=prefix, client_id="bench-cluster-send")
    for topic, key, value in events:
        producer.send(topic, key, value)
    producer.flush()
    return producer.sent


def measure(brokers: int, events: list[tuple[str, str, bytes]]) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="marlgrc-bench-cluster-"))
    try:
        t_start, kafka = timed(start_kafka, home, brokers=brokers)
        boot = kafka.bootstrap
        warm, pa, pb = (f"b{uuid.uuid4().hex[:6]}." for _ in range(3))
        for p in (warm, pa, pb):
            ensure_topics(boot, p)
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": boot}).list_topics(timeout=10)
        rf = {len(pm.replicas) for t, tm in md.topics.items() if t.startswith(pa) for pm in tm.partitions.values()}
        send_path(boot, warm, events[:20_000])  # warm up the brokers and the client
        t_send, sent_send = timed(send_path, boot, pb, events)
        t_full, sent_full = timed(full_path, boot, pa, len(events))
        gc.collect()  # the producers' librdkafka handles (kept by a callback cycle) close before the brokers stop
        t0 = time.perf_counter()
    finally:
        stop_kafka(home, remove_data=True)
        shutil.rmtree(home, ignore_errors=True)
    t_stop = time.perf_counter() - t0
    common = {"brokers": brokers, "replication_factor": sorted(rf), "acks": "all", "runs": RUNS,
              "start_s": round(t_start, 1), "stop_s": round(t_stop, 1)}
    return [{"bench": "cluster_produce", "path": "full", "events": sent_full, "seconds": round(t_full, 3),
             "events_per_s": round(sent_full / t_full), **common},
            {"bench": "cluster_produce", "path": "send", "events": sent_send, "seconds": round(t_send, 3),
             "events_per_s": round(sent_send / t_send), **common}]


def main() -> int:
    events = encoded(N)
    rows = measure(1, events) + measure(3, events)
    for row in rows:
        print(json.dumps(row))
    by = {(r["brokers"], r["path"]): r["events_per_s"] for r in rows}
    for path in ("full", "send"):
        print(json.dumps({"bench": "cluster_produce", "path": path,
                          "ratio_3_brokers_to_1": round(by[(3, path)] / by[(1, path)], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

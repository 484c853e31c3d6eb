"""Verification speed, two benchmarks in one run (pure Python):

1. verify from Kafka, beside a raw consume of the same topic: target >= 250,000 events/s;
2. offline verify of a bundle, end to end from its file: target >= 250,000 events/s; and on its
   entries in memory (the verifier's own cost). Both beside hashlib.sha256 over the same bytes.
The ratios to the raw consume and to bare hashing are information, not targets.

    ./dev python bench/bench_verify.py [N]        (PYTHONPATH=. python bench/bench_verify.py)
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from _common import best_of, broker, report, timed
from confluent_kafka import Consumer, TopicPartition

from eventlog.audit import verify_bundle, verify_kafka
from eventlog.bundle import read_bundle, write_bundle
from eventlog.checkpoint import Signer
from eventlog.kafka import EventProducer, ensure_topics, partitions_of, read_records
from eventlog.log import EventLog
from eventlog.verify import CHECKPOINT_TOPIC, Verifier

N = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
CHAINS = 12
TOPICS = ["marl.joint.action"]


def write(boot: str, prefix: str, signer: Signer) -> None:
    producer = EventProducer(boot, prefix=prefix, client_id="bench-verify")
    log = EventLog(producer, run_id="bench", producer_id="bench", signer=signer, checkpoint_every=10_000)
    p = {"episode": 0, "step": 0, "joint_vector": [1.0, 2.0, 0.0],
         "actions": [{"agent_id": f"agent_{a}", "discrete": a, "continuous": [], "log_prob": -1.6, "reward": 0.5,
                      "terminated": False, "truncated": False} for a in range(3)]}
    for i in range(N):
        p["step"] = i
        log.append(f"bench:c{i % CHAINS}", "joint.action", p)
    log.close()


def raw_consume(boot: str, prefix: str, expected: int) -> int:
    c = Consumer({"bootstrap.servers": boot, "group.id": f"raw-{uuid.uuid4()}", "enable.auto.commit": False,
                  "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                  "fetch.max.bytes": 52428800, "max.partition.fetch.bytes": 10485760, "queued.min.messages": 200000})
    c.assign([TopicPartition(tp.topic, tp.partition, 0) for tp in partitions_of(boot, TOPICS, prefix)])
    n = 0
    while n < expected:
        for m in c.consume(min(10000, expected - n), 1.0):  # never wait for messages that do not exist
            if m.error() is None:
                m.value()
                n += 1
    c.close()
    return n


def main() -> int:
    signer = Signer.generate()
    ok = True
    with broker() as boot:
        prefix = f"v{uuid.uuid4().hex[:6]}."
        ensure_topics(boot, prefix)
        write(boot, prefix, signer)
        raw_consume(boot, prefix, N)  # warm the page cache and the broker
        # best of 3 on both sides: a single read of 300k events takes well under a second, and one
        # fetch that waits on the broker moves either time by half
        t_raw, n = best_of(3, raw_consume, boot, prefix, N)
        t_ver, (rep, _) = best_of(3, verify_kafka, boot, prefix=prefix, topics=TOPICS, public_key=signer.public_key)
        assert rep.ok and sum(c.events for c in rep.chains if c.topic == "marl.joint.action") == N
        ok &= report("verify_kafka", events=N, seconds=t_ver, limit_name="raw confluent-kafka consume of the same topic",
                     limit_seconds=t_raw, min_rate=250_000)
        records = list(read_records(boot, [CHECKPOINT_TOPIC, *TOPICS], prefix=prefix))
    folder = Path(tempfile.mkdtemp(prefix="marlgrc-bundle-"))
    try:
        write_bundle(folder, records, public_key_pem=None)
        entries = list(read_bundle(folder))
        data = [r for r in entries if r.topic != CHECKPOINT_TOPIC]
        cps = [r for r in entries if r.topic == CHECKPOINT_TOPIC]
        values = [r.value for r in data]

        def sha_all():
            for v in values:
                hashlib.sha256(v).digest()

        def verify_in_memory():  # what verify_bundle does once the entries are read
            v = Verifier(signer.public_key)
            v.add_checkpoints(cps)
            v.feed_runs(data)
            return v.finish()

        t_sha, _ = timed(sha_all)
        t_mem, rep = timed(verify_in_memory)
        assert rep.ok
        ok &= report("verify_bundle_in_memory", events=len(data), seconds=t_mem,
                     limit_name="hashlib.sha256 over the same event bytes", limit_seconds=t_sha)
        t_file, (rep, _) = best_of(3, verify_bundle, folder, public_key=signer.public_key)
        assert rep.ok
        ok &= report("verify_bundle_from_file", events=len(data), seconds=t_file,
                     limit_name="hashlib.sha256 over the same event bytes", limit_seconds=t_sha, min_rate=250_000)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Produce: events/s of the full path (build header + encode + chain + hash + produce, acks=all,
with signed checkpoints) beside fastavro encode + raw produce of the same records on the same broker.
Target: >= 60,000 events/s (pure Python); the ratio is information.

    ./dev python bench/bench_produce.py [N]       (PYTHONPATH=. python bench/bench_produce.py)
"""
from __future__ import annotations

import sys
import uuid

from _common import broker, report, timed

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, ensure_topics
from eventlog.log import EventLog

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
CHAINS = 8


def payload(step: int) -> dict:
    return {"episode": step // 25, "step": step % 25, "joint_vector": [1.0, 2.0, 0.0],
            "actions": [{"agent_id": f"agent_{a}", "discrete": (step + a) % 5, "continuous": [], "log_prob": -1.6,
                         "reward": 0.5, "terminated": False, "truncated": False} for a in range(3)]}


def full_path(boot: str, prefix: str, payloads: list[dict]) -> int:
    producer = EventProducer(boot, prefix=prefix, client_id="bench-full")
    log = EventLog(producer, run_id="bench", producer_id="bench", signer=Signer.generate(), checkpoint_every=10_000)
    chains = [f"bench:c{c}" for c in range(CHAINS)]
    for i, p in enumerate(payloads):
        log.append(chains[i % CHAINS], "joint.action", p)
    log.close()
    return producer.sent


def raw_path(boot: str, prefix: str, records: list[dict]) -> int:
    codec = default_codec()
    producer = EventProducer(boot, prefix=prefix, client_id="bench-raw")
    for r in records:
        producer.send("marl.joint.action", r["chain_id"], codec.encode("joint_action", r))
    producer.flush()
    return producer.sent


def main() -> int:
    payloads = [payload(i) for i in range(N)]
    header = {"prev_event_hash": bytes(32), "seq": 0, "event_id": str(uuid.uuid4()), "event_type": "joint.action",
              "run_id": "bench", "produced_at": 1_795_000_000_000_000, "producer_id": "bench",
              "data_classification": "internal", "retention_expiry": 1_826_000_000_000_000,
              "feature_schema_version": "1", "policy_version": "", "rule_version": "", "source_event_hashes": [],
              "event_hash": bytes(32)}
    records = [{**header, **p, "seq": i // CHAINS, "chain_id": f"bench:c{i % CHAINS}"} for i, p in enumerate(payloads)]
    with broker() as boot:
        pa, pb = f"b{uuid.uuid4().hex[:6]}.", f"b{uuid.uuid4().hex[:6]}."
        ensure_topics(boot, pa)
        ensure_topics(boot, pb)
        raw_path(boot, pb, records[:20_000])  # warm up the broker and client
        t_raw, _ = timed(raw_path, boot, pb, records)
        t_full, sent = timed(full_path, boot, pa, payloads)
    ok = report("produce", events=N, seconds=t_full, limit_name="encode + raw produce (acks=all)",
                limit_seconds=t_raw, min_rate=60_000, extra={"sent_incl_checkpoints": sent})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

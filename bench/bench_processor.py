"""Credit events/s: one faust worker (and the exactly-once transactional worker) against a bare
confluent-kafka consume -> compute -> produce loop running the same Processor, in the same run.

    PYTHONPATH=. python bench/bench_processor.py [--bootstrap HOST:PORT] [--actions 20000]

Targets (issue 4): faust / bare >= 0.5 and >= 5,000 credit events/s per worker. Rates are measured
between a consumer's first and last committed credit event, so worker start-up is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eventlog.kafka import EventProducer, ensure_topics, read_records  # noqa: E402
from eventlog.log import EventLog  # noqa: E402
from marlgrc.demo import synthetic_run  # noqa: E402
from stream_processors.processor import INPUT_TOPICS, Processor  # noqa: E402


def write_inputs(bootstrap: str, prefix: str, actions: int) -> None:
    sink = EventProducer(bootstrap, prefix=prefix)
    log = EventLog(sink, run_id=f"bench-{uuid.uuid4().hex[:6]}", producer_id="bench")
    synthetic_run(log, episodes=max(1, actions // 1000), steps=min(actions, 1000), agents=3)
    sink.flush()


def count_credits(bootstrap: str, prefix: str, expected: int, timeout: float) -> tuple[int, float]:
    """(credits seen, seconds between the first and the last credit's produce timestamps), read_committed.
    Produce (CreateTime) timestamps make the measure the same for every contender, whenever it is read."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}", "isolation.level": "read_committed",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([prefix + "marl.di.credit"])
    n, first, last = 0, None, None
    deadline = time.monotonic() + timeout
    try:
        while n < expected and time.monotonic() < deadline:
            for m in c.consume(10000, 0.2):
                if m.error() is None:
                    n += 1
                    ts = m.timestamp()[1] / 1000
                    first = ts if first is None else min(first, ts)
                    last = ts if last is None else max(last, ts)
    finally:
        c.close()
    return n, (last - first) if first and last and last > first else float("nan")


def bare_loop(bootstrap: str, src: str, dst: str, expected: int) -> None:
    """consume -> Processor.feed -> produce (idempotent, not transactional), in this process."""
    p = Processor(consumer="bench-bare", producer_id="bench-bare", max_pending=None, max_states=None)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-bare-{uuid.uuid4()}",
                  "isolation.level": "read_committed", "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([src + t for t in INPUT_TOPICS])
    prod = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                     "queue.buffering.max.messages": 1_000_000})
    made, plen = 0, len(src)
    deadline = time.monotonic() + 300
    while made < expected and time.monotonic() < deadline:
        for m in c.consume(1000, 0.2):
            if m.error() is not None:
                continue
            for ev in p.feed(m.topic()[plen:], m.partition(), m.offset(), m.key(), m.value()):
                prod.produce(dst + ev.topic, ev.value, ev.chain_id)
                made += ev.topic == "marl.di.credit"
        prod.poll(0)
    prod.flush(60)
    c.close()


def copy_inputs(bootstrap: str, src: str, dst: str) -> None:
    """The same input records under another prefix, so each contender starts from offset 0."""
    sink = EventProducer(bootstrap, prefix=dst)
    for r in read_records(bootstrap, INPUT_TOPICS, prefix=src):
        sink.send(r.topic, r.key, r.value)
    sink.flush()


def subprocess_worker(cmd: list[str], env: dict, bootstrap: str, prefix: str, expected: int) -> tuple[int, float, str]:
    log = Path(f"/tmp/bench-{uuid.uuid4().hex[:6]}.log")
    w = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                         stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        n, dt = count_credits(bootstrap, prefix, expected, timeout=300)
    finally:
        os.killpg(w.pid, signal.SIGTERM)
        try:
            w.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)
    return n, dt, log.read_text()[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default=os.environ.get("MARLGRC_BOOTSTRAP"))
    ap.add_argument("--actions", type=int, default=20000)
    ap.add_argument("--skip-faust", action="store_true")
    a = ap.parse_args()
    boot = a.bootstrap
    if not boot:
        from compose import default_home, start_kafka

        boot = start_kafka(default_home()).bootstrap
    base = f"b{uuid.uuid4().hex[:8]}."
    ensure_topics(boot, base)
    write_inputs(boot, base, a.actions)
    n = (a.actions // 1000) * 1000 if a.actions >= 1000 else a.actions
    results: dict[str, dict] = {}

    # 1. bare loop, in this process
    pre = f"{base[:-1]}-bare."
    ensure_topics(boot, pre)
    import threading

    t = threading.Thread(target=bare_loop, args=(boot, base, pre, n))
    t.start()
    got, dt = count_credits(boot, pre, n, 300)
    t.join()
    results["bare_confluent_loop"] = {"credits": got, "seconds": dt, "per_s": got / dt}

    # 2. the exactly-once transactional worker (a real worker process)
    pre = f"{base[:-1]}-eos."
    ensure_topics(boot, pre)
    copy_inputs(boot, base, pre)
    got, dt, tail = subprocess_worker([sys.executable, "-m", "stream_processors", "--bootstrap", boot, "--prefix", pre],
                                      {}, boot, pre, n)
    results["transactional_worker"] = {"credits": got, "seconds": dt, "per_s": got / dt}
    if got < n:
        results["transactional_worker"]["log_tail"] = tail

    # 3. faust worker, exactly_once
    if not a.skip_faust:
        pre = f"{base[:-1]}-faust."
        ensure_topics(boot, pre)
        copy_inputs(boot, base, pre)
        got, dt, tail = subprocess_worker(
            [sys.executable, "-m", "stream_processors.faust_app", "worker", "-l", "warning"],
            {"MARLGRC_BOOTSTRAP": boot, "MARLGRC_TOPIC_PREFIX": pre,
             "MARLGRC_FAUST_DATADIR": f"/tmp/marlgrc-faust-{uuid.uuid4().hex[:6]}"}, boot, pre, n)
        results["faust_worker"] = {"credits": got, "seconds": dt, "per_s": got / dt if dt == dt else 0.0}
        if got < n:
            results["faust_worker"]["log_tail"] = tail

    bare = results["bare_confluent_loop"]["per_s"]
    for k, v in results.items():
        v["ratio_vs_bare"] = v["per_s"] / bare if bare else 0.0
    results["targets"] = {"ratio": 0.5, "per_s": 5000}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

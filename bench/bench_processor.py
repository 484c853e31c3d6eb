"""Credit events/s through the exactly-once DI worker against a bare confluent-kafka consume ->
compute -> produce loop running the same Processor, in the same run; and the faust-streaming
fairness app (credit -> fairness, exactly once) against a bare loop running the same pure function.

    PYTHONPATH=. python bench/bench_processor.py [--bootstrap HOST:PORT] [--actions 20000]

Targets (issue 4): worker / bare >= 0.5 and >= 5,000 credit events/s per worker. Rates are measured
between the first and last output's produce timestamps (read_committed), so start-up is not counted.
The worker and the faust app sign every chain they write, as `marlgrc process` does (a fresh key per
bench run); the bare loops do not.
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
from tests.synthetic import synthetic_run  # noqa: E402
from eventlog.chain import ChainWriter  # noqa: E402
from eventlog.checkpoint import Signer  # noqa: E402
from eventlog.codec import default_codec  # noqa: E402
from stream_processors import fairness as fair  # noqa: E402
from stream_processors import faust_fairness as ff  # noqa: E402
from stream_processors.processor import INPUT_TOPICS, Processor  # noqa: E402


def write_inputs(bootstrap: str, prefix: str, actions: int) -> None:
    sink = EventProducer(bootstrap, prefix=prefix)
    log = EventLog(sink, run_id=f"bench-{uuid.uuid4().hex[:6]}", producer_id="bench")
    synthetic_run(log, episodes=max(1, actions // 1000), steps=min(actions, 1000), agents=3)
    sink.flush()


def count_credits(bootstrap: str, prefix: str, expected: int, timeout: float,
                  topic: str = "marl.di.credit") -> tuple[int, float]:
    """(credits seen, seconds between the first and the last credit's produce timestamps), read_committed.
    Produce (CreateTime) timestamps make the measure the same for every contender, whenever it is read."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}", "isolation.level": "read_committed",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([prefix + topic])
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


def bare_fairness_loop(bootstrap: str, src: str, dst: str, expected: int) -> None:
    """consume di.credit -> faust_fairness.step (the faust app's pure step) + seal -> produce (idempotent),
    in this process."""
    codec = default_codec()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-bf-{uuid.uuid4()}",
                  "isolation.level": "read_committed", "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([src + "marl.di.credit"])
    prod = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                     "queue.buffering.max.messages": 1_000_000})
    states: dict[str, ff.ChainState] = {}
    made = 0
    deadline = time.monotonic() + 300
    while made < expected and time.monotonic() < deadline:
        for m in c.consume(1000, 0.2):
            if m.error() is not None:
                continue
            _, rec = codec.decode(m.value())
            st = states.setdefault(rec["chain_id"], ff.ChainState())
            for win in ff.step(st, m.offset(), rec, m.value()[-32:]):
                chain = ff.output_chain(rec["chain_id"], win.kind)
                head = st.episode_head if win.kind == "episode" else st.sliding_head
                w = ChainWriter("marl.fairness.metrics", chain, rec["run_id"], "bench", head=head, codec=codec)
                ev = w.append("fairness.metrics", win.payload, rule_version=win.rule_version,
                              source_event_hashes=win.sources)
                if win.kind == "episode":
                    st.episode_head = w.head
                else:
                    st.sliding_head = w.head
                prod.produce(dst + "marl.fairness.metrics", ev.value, chain, partition=m.partition())
                made += 1
            st.to_bytes()  # the faust app serializes its table row per record; so does this loop
        prod.poll(0)
    prod.flush(60)
    c.close()


def copy_inputs(bootstrap: str, src: str, dst: str) -> None:
    """The same input records under another prefix, so each contender starts from offset 0."""
    sink = EventProducer(bootstrap, prefix=dst)
    for r in read_records(bootstrap, INPUT_TOPICS, prefix=src):
        sink.send(r.topic, r.key, r.value)
    sink.flush()


def copy_topic(bootstrap: str, src: str, dst: str, topic: str) -> None:
    """One topic's records under another prefix, keeping each record's partition."""
    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "queue.buffering.max.messages": 1_000_000})
    for r in read_records(bootstrap, [topic], prefix=src):
        prod.produce(dst + topic, r.value, r.key, partition=r.partition)
        prod.poll(0)
    prod.flush(60)


def subprocess_worker(cmd: list[str], env: dict, bootstrap: str, prefix: str, expected: int,
                      topic: str = "marl.di.credit") -> tuple[int, float, str]:
    log = Path(f"/tmp/bench-{uuid.uuid4().hex[:6]}.log")
    w = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                         stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        n, dt = count_credits(bootstrap, prefix, expected, timeout=300, topic=topic)
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
    key = Path(f"/tmp/bench-signing-{base[:-1]}.pem")
    Signer.generate().save(key)     # the processors sign what they write, as `marlgrc process` does
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
    got, dt, tail = subprocess_worker([sys.executable, "-m", "stream_processors", "--bootstrap", boot, "--prefix", pre,
                                       "--signing-key", str(key)], {}, boot, pre, n)
    results["transactional_worker"] = {"credits": got, "seconds": dt, "per_s": got / dt}
    if got < n:
        results["transactional_worker"]["log_tail"] = tail

    # 3. faust fairness app (exactly_once) vs a bare loop with the same pure function, over the credit
    # events the transactional worker just wrote (rates in credit events/s: outputs x hop)
    if not a.skip_faust:
        credits_src = pre
        episodes = max(1, a.actions // 1000)
        n_out = (n - fair.WINDOW) // fair.HOP + 1 + episodes - 1  # one run: sliding windows + closed episodes
        pre_bf = f"{base[:-1]}-bfair."
        ensure_topics(boot, pre_bf)
        t = threading.Thread(target=bare_fairness_loop, args=(boot, credits_src, pre_bf, n_out))
        t.start()
        got, dt = count_credits(boot, pre_bf, n_out, 300, topic="marl.fairness.metrics")
        t.join()
        results["bare_fairness_loop"] = {"outputs": got, "seconds": dt, "credits_per_s": (got - 1) * fair.HOP / dt}
        pre_f = f"{base[:-1]}-faust."
        ensure_topics(boot, pre_f)
        copy_topic(boot, credits_src, pre_f, "marl.di.credit")
        got, dt, tail = subprocess_worker(
            [sys.executable, "-m", "stream_processors.faust_fairness", "worker", "-l", "warn"],
            {"MARLGRC_BOOTSTRAP": boot, "MARLGRC_TOPIC_PREFIX": pre_f, "MARLGRC_SIGNING_KEY": str(key),
             "MARLGRC_FAUST_DATADIR": f"/tmp/marlgrc-faust-{uuid.uuid4().hex[:6]}",
             "MARLGRC_FAUST_COMMIT_INTERVAL": "1.0"}, boot, pre_f, n_out,
            topic="marl.fairness.metrics")
        results["faust_fairness_app"] = {"outputs": got, "seconds": dt,
                                         "credits_per_s": (got - 1) * fair.HOP / dt if dt == dt else 0.0}
        if got < n_out:
            results["faust_fairness_app"]["log_tail"] = tail
        bf = results["bare_fairness_loop"]["credits_per_s"]
        results["faust_fairness_app"]["ratio_vs_bare_fairness"] = \
            results["faust_fairness_app"]["credits_per_s"] / bf if bf else 0.0

    bare = results["bare_confluent_loop"]["per_s"]
    for k in ("bare_confluent_loop", "transactional_worker"):
        results[k]["ratio_vs_bare"] = results[k]["per_s"] / bare if bare else 0.0
    results["targets"] = {"ratio": 0.5, "per_s": 5000}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

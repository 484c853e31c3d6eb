"""Soak: the decision interpreter fed at half the measured maximum ingest rate for 10 minutes.

    ./dev python bench/bench_soak.py [--minutes 10] [--rate EVENTS_PER_S] [--bootstrap HOST:PORT]

1. Calibrate (unless ``--rate``): sealed, signed synthetic runs (3 agents: env.state, 3 observations,
   joint.action per step) are written as fast as one ``EventProducer`` goes for 20 s, and a real DI
   worker (``python -m stream_processors``, exactly once, signing) is started on that backlog; the
   maximum ingest rate is the smaller of the two rates (events/s written; events/s the worker keeps up
   with, i.e. the records it reads per second scaled by written events per record read: it reads
   env.state, joint.action and lifecycle records, not the observations).
2. Soak: a new prefix, a new worker, and a writer paced at half that rate (in 100 ms slices) for
   ``--minutes``. Every 10 s: the worker's consumer lag (its own ``marlgrc_processor_consumer_lag``,
   summed over partitions), its resident memory (``/proc/PID/status`` VmRSS) and this process's.
3. Drain and check: the writer stops, the worker catches up; then every joint action has exactly one
   credit (read_committed, by the joint action's hash), no dead letter, and the credit chains are
   gap-free (seq 0..n-1 once each).

Prints one JSON object: rates, lag (max, mean of the first and last minute), memory (first and last
sample after the first minute, and the least-squares slope in MiB/min), counts, and ``pass`` =
nothing lost or duplicated, lag bounded (last minute's mean lag below 2 s of input and not above
twice the first minute's + 2,000 records), memory flat (worker slope below 2 MiB/min). A bench, not a
test: its figures depend on the machine (the load average is printed with them).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from _common import ROOT, broker

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from tests.synthetic import synthetic_run

AGENTS = 3
EVENTS_PER_STEP = 2 + AGENTS


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    """Sum of each metric family over its labels, from the worker's Prometheus exporter."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] += float(value)
    return dict(out)


class Writer:
    """Synthetic runs of 200-step episodes, one after another, sealed and signed, at ``rate`` events/s
    (None: as fast as the producer goes) until ``stop`` is set."""

    def __init__(self, bootstrap: str, prefix: str, signer: Signer, rate: float | None):
        self.producer = EventProducer(bootstrap, prefix=prefix, client_id="soak-writer")
        self.signer, self.rate = signer, rate
        self.stop = threading.Event()
        self.events = self.actions = self.runs = 0
        self.started = time.monotonic()

    def _pace(self, steps: int) -> None:
        self.events += steps * EVENTS_PER_STEP
        self.actions += steps
        if self.stop.is_set():
            raise StopIteration
        if self.rate:
            ahead = self.events / self.rate - (time.monotonic() - self.started)
            if ahead > 0.1:
                time.sleep(ahead)

    def run(self) -> None:
        self.started = time.monotonic()
        while not self.stop.is_set():
            log = EventLog(self.producer, run_id=f"soak{uuid.uuid4().hex[:8]}", producer_id="soak",
                           signer=self.signer, checkpoint_every=1000)
            try:
                synthetic_run(log, episodes=5, steps=200, agents=AGENTS, seed=self.runs, progress=self._pace)
            except StopIteration:
                pass
            log.close()  # closes the run's chains with a signed checkpoint (a stopped run stays verifiable)
            self.runs += 1
        self.producer.flush()


def start_worker(bootstrap: str, prefix: str, key: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_processors", "--bootstrap", bootstrap, "--prefix", prefix,
         "--name", f"soak{uuid.uuid4().hex[:6]}", "--signing-key", str(key), "--metrics-port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(w: subprocess.Popen) -> None:
    os.killpg(w.pid, signal.SIGTERM)
    try:
        w.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(w.pid, signal.SIGKILL)


def wait_exporter(port: int, w: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while not scrape(port):
        if w.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def calibrate(bootstrap: str, key: Path, signer: Signer, tmp: Path) -> dict:
    prefix = f"soakcal{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    writer = Writer(bootstrap, prefix, signer, None)
    t = threading.Thread(target=writer.run)
    t.start()
    time.sleep(20)
    writer.stop.set()
    t.join()
    write_rate = writer.events / (time.monotonic() - writer.started)
    port = free_port()
    w = start_worker(bootstrap, prefix, key, port, tmp / "calibrate-worker.log")
    try:
        wait_exporter(port, w, tmp / "calibrate-worker.log")
        # the worker reads env.state, joint.action and lifecycle, not observations: in events written,
        # it keeps up with read_rate x (events written / records it reads)
        inputs = 2 * writer.actions + 2 * writer.runs
        first = None
        while True:
            m = scrape(port)
            n = m.get("marlgrc_processor_events_in_total", 0)
            if n > 0 and first is None:
                first = (time.monotonic(), n)
            if first and (n >= 0.95 * inputs or time.monotonic() - first[0] > 60):
                break
            time.sleep(0.5)
        read_rate = (n - first[1]) / max(1e-9, time.monotonic() - first[0])
    finally:
        stop_worker(w)
    worker_rate = read_rate * writer.events / inputs
    return {"write_events_per_s": round(write_rate), "worker_input_records_per_s": round(read_rate),
            "worker_events_per_s": round(worker_rate), "max_ingest_events_per_s": round(min(write_rate, worker_rate))}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), in MiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points) or 1e-9
    return 60 * sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def check(bootstrap: str, prefix: str, actions: int) -> dict:
    codec = default_codec()
    credits: Counter[bytes] = Counter()
    seqs: dict[str, list[int]] = {}
    for r in read_records(bootstrap, ["marl.di.credit"], prefix=prefix):
        env, rec = codec.decode(r.value)
        credits[bytes(rec["source_event_hashes"][0])] += 1
        seqs.setdefault(r.key, []).append(rec["seq"])
    dead = sum(1 for _ in read_records(bootstrap, ["marl.dlq"], prefix=prefix))
    gaps = sum(1 for s in seqs.values() if sorted(s) != list(range(len(s))))
    return {"joint_actions": actions, "credits": sum(credits.values()), "distinct_credited": len(credits),
            "duplicates": sum(c - 1 for c in credits.values() if c > 1), "dead_letters": dead,
            "credit_chains": len(seqs), "chains_with_gaps": gaps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=None, help="events/s to write (default: half the calibrated max)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="marlgrc-soak-"))
    signer = Signer.generate()
    key = tmp / "signing.pem"
    signer.save(key)
    with broker() as bootstrap:
        cal = calibrate(bootstrap, key, signer, tmp) if a.rate is None else {}
        rate = a.rate or cal["max_ingest_events_per_s"] / 2
        prefix = f"soak{uuid.uuid4().hex[:6]}."
        ensure_topics(bootstrap, prefix)
        port = free_port()
        wlog = tmp / "soak-worker.log"
        w = start_worker(bootstrap, prefix, key, port, wlog)
        wait_exporter(port, w, wlog)
        writer = Writer(bootstrap, prefix, signer, rate)
        t = threading.Thread(target=writer.run)
        t.start()
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < a.minutes * 60:
            time.sleep(10)
            m = scrape(port)
            samples.append({"s": round(time.monotonic() - t0, 1), "lag": m.get("marlgrc_processor_consumer_lag", -1),
                            "worker_rss_mib": round(rss_mib(w.pid), 1), "bench_rss_mib": round(rss_mib(os.getpid()), 1),
                            "events_written": writer.events, "events_in": m.get("marlgrc_processor_events_in_total", 0)})
            print(json.dumps(samples[-1]), file=sys.stderr)
            if w.poll() is not None:
                raise SystemExit(f"the worker died:\n{wlog.read_text()[-2000:]}")
        writer.stop.set()
        t.join()
        soak_s = time.monotonic() - t0
        drain_t = time.monotonic()
        zero = 0  # the worker reads its lag every 5 s: drained once it reads 0 twice in a row
        while zero < 2 and time.monotonic() - drain_t < 300:
            time.sleep(5.5)
            zero = zero + 1 if scrape(port).get("marlgrc_processor_consumer_lag", -1) == 0 else 0
        drain_s = time.monotonic() - drain_t
        stop_worker(w)
        counts = check(bootstrap, prefix, writer.actions)
        del writer.producer  # closed before the broker stops (no reconnect noise)
    after = [s for s in samples if s["s"] >= 60] or samples
    first_min = [s["lag"] for s in samples if s["s"] <= 60]
    last_min = [s["lag"] for s in samples if s["s"] >= samples[-1]["s"] - 60]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    worker_slope = slope([(s["s"], s["worker_rss_mib"]) for s in after])
    lost = counts["distinct_credited"] != counts["joint_actions"] or counts["duplicates"] or counts["dead_letters"] \
        or counts["chains_with_gaps"]
    lag_ok = mean(last_min) < 2 * rate and mean(last_min) <= 2 * mean(first_min) + 2000
    out = {
        "bench": "soak", "minutes": round(soak_s / 60, 2), "calibration": cal, "rate_events_per_s": round(rate),
        "written_events_per_s": round(writer.events / soak_s), "drain_s": round(drain_s, 1),
        "lag": {"max": max(s["lag"] for s in samples), "first_minute_mean": round(mean(first_min)),
                "last_minute_mean": round(mean(last_min))},
        "memory_mib": {"worker_first": after[0]["worker_rss_mib"], "worker_last": after[-1]["worker_rss_mib"],
                       "worker_slope_per_min": round(worker_slope, 2), "bench_first": after[0]["bench_rss_mib"],
                       "bench_last": after[-1]["bench_rss_mib"]},
        "counts": counts, "load_average": os.getloadavg(),
        "pass": bool(not lost and lag_ok and worker_slope < 2.0),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

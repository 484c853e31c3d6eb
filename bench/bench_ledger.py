"""Ledger sync throughput, Kafka -> SQLCipher, in pure Python, with where the time goes, in one run.

    ./dev python bench/bench_ledger.py [--events 200000] [--batch 5000] [--repeats 3] [--bootstrap HOST:PORT]

Writes a synthetic run to Kafka (a broker from --bootstrap / $MARLGRC_BOOTSTRAP, else one started by
the launcher in a temporary home), then measures, each into a fresh ledger, in alternating rounds:

  A  ledger sync: read from Kafka, decode, check chains, insert with executemany into SQLCipher,
     COMMIT on a second thread while the next batch is read and checked (the real path)
  B  plain sqlite3 (the standard library, no encryption) inserting the same rows, decoded
     beforehand, with executemany and the same commit size: what inserting alone costs
  C  ledger.ingest.check_batch alone over the same records held in memory: decoding, row building
     and chain checks, without Kafka or a database
  D  SQLCipher, executemany, the same rows as B: what encryption adds to inserting

Each row is the best of ``--repeats`` rounds (the round least disturbed by other processes on a
shared machine); A also gives its median and the process's CPU time per event (all threads), which
moves less with the machine's load. Target (issue 13): A >= 25,000 events/s. Exit status 1 when it
is missed; the numbers are printed either way, with the load average before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path

from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from ledger import SqliteLedger, StaticKey, sync
from ledger.ingest import check_batch
from schemas import TOPICS
from tests.synthetic import synthetic_run

RATE_TARGET = 25_000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000, help="events per transaction (every row)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each row is the best of them")
    ap.add_argument("--bootstrap", default=os.environ.get("MARLGRC_BOOTSTRAP"))
    args = ap.parse_args()
    if args.bootstrap:
        os.environ["MARLGRC_BOOTSTRAP"] = args.bootstrap
    with _common.broker() as boot:
        return run(boot, args.events, args.batch, args.repeats, Path(tempfile.mkdtemp(prefix="bench-ledger-")))


def run(boot: str, events: int, batch: int, repeats: int, home: Path) -> int:
    load_before = os.getloadavg()
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    ensure_topics(boot, prefix)
    agents, steps = 3, 50
    episodes = max(1, events // (steps * (2 + agents)))
    log = EventLog(EventProducer(boot, prefix=prefix), run_id="bench", producer_id="bench")
    n = synthetic_run(log, episodes=episodes, steps=steps, agents=agents, obs_dim=6)["events"]
    log.close()
    print(f"{n} events in Kafka (prefix {prefix}); commit size {batch}; {os.cpu_count()} CPUs")

    # B, C and D work on the same records, read once outside the timings
    records = [tuple(r[:5]) for r in read_records(boot, list(TOPICS), prefix=prefix)]
    assert len(records) == n
    heads: dict = {}
    checked = [check_batch(records[i:i + batch], heads) for i in range(0, n, batch)]
    assert not any(f for c in checked for f in c.findings)
    rows_batches = [c.rows for c in checked]

    key = StaticKey(os.urandom(32))
    a_times, a_cpu, b_times, c_times, d_times = [], [], [], [], []
    for i in range(repeats):
        led = SqliteLedger(home / f"a{i}.db", key)
        t0, c0 = time.perf_counter(), time.process_time()
        a = sync(led, boot, prefix=prefix, commit_every=batch)
        a_times.append(time.perf_counter() - t0)
        a_cpu.append(time.process_time() - c0)
        assert a.records == n and not a.findings, (a.records, a.findings[:3])
        led.close()
        b_times.append(executemany_inserts(SqliteLedger(home / f"b{i}.db", None, encrypted=False), rows_batches))
        t0 = time.perf_counter()
        heads = {}
        for j in range(0, n, batch):
            check_batch(records[j:j + batch], heads)
        c_times.append(time.perf_counter() - t0)
        d_times.append(executemany_inserts(SqliteLedger(home / f"d{i}.db", key), rows_batches))

    a_s, b_s, c_s, d_s = min(a_times), min(b_times), min(c_times), min(d_times)
    a_rate = n / a_s
    print(f"A runs {', '.join(f'{t:.2f}' for t in a_times)} s (median {statistics.median(a_times):.2f} s)")
    print(f"A  Kafka -> SQLCipher ledger sync           : {a_rate:10,.0f} events/s ({a_s:.2f} s; median "
          f"{n / statistics.median(a_times):,.0f}/s; CPU {min(a_cpu) / n * 1e6:.1f} us/event, all threads)")
    print(f"B  plain sqlite3 executemany, same rows     : {n / b_s:10,.0f} events/s ({b_s:.2f} s)")
    print(f"C  check_batch alone (decode, rows, checks) : {n / c_s:10,.0f} events/s ({c_s:.2f} s)")
    print(f"D  SQLCipher executemany, same rows         : {n / d_s:10,.0f} events/s ({d_s:.2f} s)")
    print(f"per event: A {a_s / n * 1e6:.1f} us = C {c_s / n * 1e6:.1f} (decode, rows, checks) + "
          f"D {d_s / n * 1e6:.1f} (encrypted inserts and commits) + the rest (Kafka, overlap) "
          f"{(a_s - c_s - d_s) / n * 1e6:+.1f}; A/B = {b_s / a_s:.3f} (information)")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    ok = a_rate >= RATE_TARGET
    print(f"A = {a_rate:,.0f} events/s: {'PASS' if ok else 'MISS'} (target >= {RATE_TARGET:,}; docs/LEDGER.md)")
    return 0 if ok else 1


def executemany_inserts(led: SqliteLedger, rows_batches: list[dict[str, list[tuple]]]) -> float:
    """Seconds for ``led`` to insert the batches, one transaction each, through the ledger's own
    ``write`` (executemany per table, offsets and findings none)."""
    t0 = time.perf_counter()
    for rows in rows_batches:
        led.write(rows, {})
    seconds = time.perf_counter() - t0
    led.close()
    return seconds


if __name__ == "__main__":
    sys.exit(main())

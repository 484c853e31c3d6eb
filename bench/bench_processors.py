"""Decision interpreter + fairness throughput with 1 vs 2 scaled-out workers (issue 19).

The same input is written to one topic prefix per contender before any worker starts (runs spread over
all three partition numbers, co-partitioned); then ``marlgrc process --group`` runs with 1 worker
process on the first prefix and 2 on the second, one measurement each (and, for reference, a single
worker without ``--group`` on a third copy). Done = the group's committed
offsets reached the end of every input partition (they are committed in the transactions, with the
outputs). Prints JSON: input records/s and credits/s, from the first worker's start (startup, group
join and rebalances included) and from the first committed credit.

    ./dev python bench/bench_processors.py [--bootstrap HOST:PORT] [--runs 6] [--steps 3000]

Without --bootstrap it starts a broker of its own in a temporary home and stops it afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from eventlog.kafka import EventProducer, ensure_topics, partitions_of, read_records  # noqa: E402
from eventlog.log import EventLog  # noqa: E402
from eventlog.topics import run_partition  # noqa: E402
from stream_processors.processor import INPUT_TOPICS  # noqa: E402


def run_ids(n: int, seed: int, partitions: int = 3) -> list[str]:
    """``n`` run ids, as evenly over the partition numbers as ``n`` allows, the same for a seed."""
    rng, ids, per = random.Random(seed), [], {p: 0 for p in range(partitions)}
    while len(ids) < n:
        rid = f"bench{rng.getrandbits(32):08x}"
        p = run_partition(rid, partitions)
        if per[p] < -(-n // partitions):
            per[p] += 1
            ids.append(rid)
    return ids


def write_input(bootstrap: str, prefix: str, runs: list[str], steps: int, agents: int) -> int:
    """run.started, then per step an env.state and the joint action naming it; returns records written."""
    sink = EventProducer(bootstrap, prefix=prefix)
    n = 0
    for i, rid in enumerate(runs):
        rng = random.Random(i)
        log = EventLog(sink, run_id=rid, producer_id="bench")
        ids = [f"agent_{a}" for a in range(agents)]
        log.append(f"{rid}:lifecycle", "run.started", {
            "env_id": "synthetic_v0", "env_version": "0", "seed": i, "config_hash": "0" * 64, "config_json": "{}",
            "agents": [], "state_space": {"kind": "Box", "shape": [6], "dtype": "float32", "n": 0, "start": 0,
                                          "nvec": [], "low": [], "high": []}, "episodes_planned": 1})
        n += 1
        for step in range(steps):
            st = log.append(f"{rid}:env", "env.state", {
                "episode": 0, "step": step, "state": [rng.uniform(-1, 1) for _ in range(6)], "collapsed_state": []})
            acts = [{"agent_id": a, "discrete": rng.randrange(5), "continuous": [], "log_prob": -1.6,
                     "reward": rng.uniform(-1, 1), "terminated": False, "truncated": step == steps - 1} for a in ids]
            log.append(f"{rid}:actions", "joint.action", {
                "episode": 0, "step": step, "actions": acts, "joint_vector": [float(a["discrete"]) for a in acts]},
                policy_version="random", source_event_hashes=[st.event_hash])
            n += 2
        sink.flush()
    sink.flush()
    return n


def ends(bootstrap: str, prefix: str) -> dict[tuple[str, int], int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}"})
    try:
        return {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=10)[1]
                for tp in partitions_of(bootstrap, INPUT_TOPICS, prefix, client=c)}
    finally:
        c.close()


def committed(bootstrap: str, group: str, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return {(tp.topic, tp.partition): tp.offset for tp in c.committed([TopicPartition(t, p) for t, p in tps],
                                                                          timeout=10)}
    finally:
        c.close()


def first_credit(bootstrap: str, prefix: str) -> bool:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}"})
    try:
        topic = prefix + "marl.di.credit"
        return any(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] > 0
                   for p in c.list_topics(topic, timeout=10).topics[topic].partitions)
    finally:
        c.close()


def measure(bootstrap: str, prefix: str, workers: int, home: Path, batch: int, records: int, credits: int,
            timeout: float, group: bool = True) -> dict:
    name = f"bench{workers}{'g' if group else 's'}"
    end = ends(bootstrap, prefix)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = [open(home / f"{name}-{i}.log", "wb") for i in range(workers)]
    t0 = time.monotonic()
    mode = ["--group"] if group else []
    procs = [subprocess.Popen([sys.executable, "-m", "marlgrc", "process", *mode, "--name", name,
                               "--batch", str(batch), "--metrics-port", "0", "--session-timeout", "6",
                               "--home", str(home), "--bootstrap", bootstrap, "--prefix", prefix],
                              cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True)
             for i in range(workers)]
    t_first = None
    try:
        while True:
            now = time.monotonic()
            if now - t0 > timeout:
                raise SystemExit(f"{workers} worker(s) did not finish in {timeout:.0f} s; logs in {home}")
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"a worker exited ({p.returncode}); logs in {home}")
            if t_first is None and first_credit(bootstrap, prefix):
                t_first = time.monotonic()
            got = committed(bootstrap, f"{prefix}marlgrc-{name}", list(end))
            if all(got.get(k, -1) >= v for k, v in end.items()):
                t_done = time.monotonic()
                break
            time.sleep(0.25)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    wall, active = t_done - t0, t_done - (t_first or t0)
    shares = []
    for i in range(workers):
        found = re.findall(r"assigned partition numbers \[([\d, ]*)\]", (home / f"{name}-{i}.log").read_text())
        shares.append([[int(x) for x in f.split(",") if x.strip()] for f in found])
    # what came out: the rate counts only if every joint action got its credit and nothing was dead-lettered
    out_credits = sum(1 for _ in read_records(bootstrap, ["marl.di.credit"], prefix=prefix))
    dead = sum(1 for _ in read_records(bootstrap, ["marl.dlq"], prefix=prefix))
    return {"workers": workers, "mode": "group" if group else "single", "assignments": shares,
            "credits_out": out_credits, "dead_letters": dead,
            "input_records": records, "credits": credits, "wall_s": round(wall, 2),
            "from_first_credit_s": round(active, 2),
            "input_records_per_s": round(records / wall), "credits_per_s": round(credits / wall),
            "input_records_per_s_from_first_credit": round(records / active),
            "credits_per_s_from_first_credit": round(credits / active)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-processors-"))
    own = a.bootstrap is None
    if own:
        from compose import start_kafka

        bootstrap = start_kafka(home).bootstrap
    else:
        bootstrap = a.bootstrap
    try:
        runs = run_ids(a.runs, seed=19)
        # (workers, group mode): 1 and 2 members of a group; a single worker (one transaction per batch
        # for all partitions, where a group member runs one per owned partition number) for reference
        tag = uuid.uuid4().hex[:6]
        prefixes = {c: f"bp{tag}w{c[0]}{'g' if c[1] else 's'}." for c in ((1, True), (2, True), (1, False))}
        records = 0
        t = time.monotonic()
        for p in prefixes.values():
            ensure_topics(bootstrap, p)
            records = write_input(bootstrap, p, runs, a.steps, a.agents)
        write_s = time.monotonic() - t
        credits = a.runs * a.steps
        out = {"bootstrap_own": own, "runs": a.runs, "steps_per_run": a.steps, "agents": a.agents,
               "batch": a.batch, "partitions_used": sorted({run_partition(r, 3) for r in runs}),
               "input_written_s": round(write_s, 1), "cpus": os.cpu_count(),
               "loadavg_before": [round(x, 2) for x in os.getloadavg()], "results": []}
        for (w, g), p in prefixes.items():
            out["results"].append(measure(bootstrap, p, w, home, a.batch, records, credits, a.timeout, group=g))
        r1, r2 = out["results"][:2]
        out["speedup_wall"] = round(r1["wall_s"] / r2["wall_s"], 2)
        out["speedup_from_first_credit"] = round(r1["from_first_credit_s"] / r2["from_first_credit_s"], 2)
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(out, indent=1))
    finally:
        if own:
            from compose import stop_kafka

            stop_kafka(home, remove_data=True)


if __name__ == "__main__":
    main()

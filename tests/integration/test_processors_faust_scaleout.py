"""Issue 19, "one of two processor workers killed": the decision interpreter + fairness scaled out.

Two real ``marlgrc process --group`` processes of one name form one consumer group over several runs
spread over all three partition numbers (co-partitioned by run). One is SIGKILLed mid-stream; the
group moves its partition numbers to the other, whose ``init_transactions`` (transactional id per
partition number) fences it and aborts its open transaction before the state is restored. At the end:
exactly one credit per joint action, no duplicate, none missing; every fairness window exactly once;
every chain verifies, signed through its head; a record written to the wrong partition is a
``misplaced`` dead letter, not a second writer of its run's chains.

(The file name follows the issue's plan of a faust app; faust-streaming 0.15.3 cannot do this soundly
through its public API, docs/PROCESSORS.md "Why not faust", so the scaled-out processor is the
transactional confluent-kafka worker.)
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from hashlib import sha256
from pathlib import Path

import pytest
from confluent_kafka import Producer

from eventlog.audit import verify_kafka
from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from eventlog.topics import run_partition
from tests.synthetic import synthetic_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
RUNS, EPISODES, STEPS, AGENTS = 6, 2, 400, 3
PARTITIONS = 3
codec = default_codec()


def _run_ids() -> list[str]:
    """RUNS run ids, two in each partition number."""
    ids, per = [], Counter()
    while len(ids) < RUNS:
        rid = f"so{uuid.uuid4().hex[:8]}"
        p = run_partition(rid, PARTITIONS)
        if per[p] < RUNS // PARTITIONS:
            per[p] += 1
            ids.append(rid)
    return ids


def _write(bootstrap: str, prefix: str, runs: list[str], killed: threading.Event) -> None:
    """Episode 0 of every run (synthetic_run: lifecycle, states, observations, joint actions), then,
    once ``killed`` is set, episode 1 on the same chains (states and joint actions)."""
    sink = EventProducer(bootstrap, prefix=prefix)
    logs = []
    for i, rid in enumerate(runs):
        log = EventLog(sink, run_id=rid, producer_id="test")
        synthetic_run(log, episodes=1, steps=STEPS, agents=AGENTS, seed=i)
        sink.flush()
        logs.append(log)
    killed.wait(120)
    rng = random.Random(1)
    ids = [f"agent_{i}" for i in range(AGENTS)]
    for log in logs:
        rid = log.run_id
        for ep in range(1, EPISODES):
            for step in range(STEPS):
                st = log.append(f"{rid}:env", "env.state", {
                    "episode": ep, "step": step, "state": [rng.uniform(-1, 1) for _ in range(6)],
                    "collapsed_state": []})
                acts = [{"agent_id": a, "discrete": rng.randrange(5), "continuous": [], "log_prob": -1.6,
                         "reward": rng.uniform(-1, 1), "terminated": False, "truncated": step == STEPS - 1}
                        for a in ids]
                log.append(f"{rid}:actions", "joint.action", {
                    "episode": ep, "step": step, "actions": acts,
                    "joint_vector": [float(a["discrete"]) for a in acts]},
                    policy_version="random", source_event_hashes=[st.event_hash])
        sink.flush()


def _worker(home: Path, bootstrap: str, prefix: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "marlgrc", "process", "--group", "--name", "di",
                             "--session-timeout", "6", "--batch", "200", "--metrics-port", "0",
                             "--home", str(home), "--bootstrap", bootstrap, "--prefix", prefix],
                            cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _assigned(log_path: Path) -> list[int] | None:
    """The partition numbers of the worker's latest assignment (from its log), None before any."""
    found = re.findall(r"assigned partition numbers \[([\d, ]*)\]", log_path.read_text(errors="replace"))
    return None if not found else [int(x) for x in found[-1].split(",") if x.strip()]


def _by_run(records) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(r.key.partition(":")[0], []).append(r)
    return out


def _chain_seqs(records: list) -> list[int]:
    """Seqs of one chain's records in offset order; asserts each links to the one before."""
    seqs, prev = [], bytes(32)
    for r in sorted(records, key=lambda r: r.offset):
        rec = codec.decode(r.value)[1]
        assert rec["prev_event_hash"] == prev, f"chain {rec['chain_id']} forks or has a hole at seq {rec['seq']}"
        assert sha256(r.value[:-32]).digest() == r.value[-32:]
        prev = r.value[-32:]
        seqs.append(rec["seq"])
    return seqs


def _stop(*procs: subprocess.Popen) -> None:
    for w in procs:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGTERM)
    for w in procs:
        try:
            w.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)
            w.wait(5)


def test_two_workers_one_killed_exactly_one_credit_per_joint_action(kafka, tmp_path):
    t_start = time.monotonic()
    bootstrap, prefix = kafka.bootstrap, f"so{uuid.uuid4().hex[:8]}."
    ensure_topics(bootstrap, prefix)
    home = tmp_path / "home"
    key = Signer.load_or_create(home / "keys" / "signing.pem").public_key
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [_worker(home, bootstrap, prefix, logs[0])]
    try:
        # the first member takes every partition; the second joins, and the group splits them
        deadline = time.monotonic() + 60
        while _assigned(logs[0]) != [0, 1, 2]:
            assert workers[0].poll() is None, logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, f"no assignment in 60 s:\n{logs[0].read_text()[-3000:]}"
            time.sleep(0.1)
        workers.append(_worker(home, bootstrap, prefix, logs[1]))
        while not (_assigned(logs[1]) and _assigned(logs[0]) != [0, 1, 2]):
            for w, lp in zip(workers, logs):
                assert w.poll() is None, lp.read_text()[-3000:]
            assert time.monotonic() < deadline, "the second member never got partitions:\n" + "\n".join(
                lp.read_text()[-2000:] for lp in logs)
            time.sleep(0.1)
        shares = [_assigned(lp) for lp in logs]
        assert sorted(shares[0] + shares[1]) == [0, 1, 2], shares

        # the input, written while the group works: RUNS co-partitioned runs, two per partition number;
        # every run's second episode only after the kill, so the killed member's share has work left
        runs = _run_ids()
        killed = threading.Event()
        writer = threading.Thread(target=_write, args=(bootstrap, prefix, runs, killed), daemon=True)
        writer.start()
        total = RUNS * EPISODES * STEPS
        victim = 1  # whichever got partitions second; the group gave it a share (asserted above)
        doomed = set(shares[victim])
        while True:
            done = _by_run(read_records(bootstrap, ["marl.di.credit"], prefix=prefix))
            if sum(len(v) for rid, v in done.items() if run_partition(rid, PARTITIONS) in doomed) >= 150:
                break
            for w, lp in zip(workers, logs):
                assert w.poll() is None, lp.read_text()[-3000:]
            assert time.monotonic() < deadline, "no credits from the member to kill:\n" + logs[victim].read_text()
            time.sleep(0.05)
        os.killpg(workers[victim].pid, signal.SIGKILL)
        workers[victim].wait(10)
        killed_at = time.monotonic()
        killed.set()
        writer.join(60)
        assert not writer.is_alive(), "the input writer did not finish in 60 s"
        # a record in the wrong partition: a producer that does not co-partition
        first_state = next(r for r in read_records(bootstrap, ["marl.env.state"], prefix=prefix)
                           if r.key == f"{runs[0]}:env")
        wrong = (run_partition(runs[0], PARTITIONS) + 1) % PARTITIONS
        raw = Producer({"bootstrap.servers": bootstrap})
        raw.produce(prefix + "marl.env.state", first_state.value, first_state.key.encode(), partition=wrong)
        raw.flush(10)
        victim_chain = first_state.key

        # the survivor takes its partitions over and finishes
        survivor = workers[1 - victim]
        deadline = time.monotonic() + 60
        while True:
            credits = list(read_records(bootstrap, ["marl.di.credit"], prefix=prefix))
            if len(credits) >= total:
                break
            assert survivor.poll() is None, logs[1 - victim].read_text()[-3000:]
            assert time.monotonic() < deadline, (f"{len(credits)}/{total} credits 60 s after the kill:\n"
                                                 + logs[1 - victim].read_text()[-3000:])
            time.sleep(0.5)
        takeover = time.monotonic() - killed_at
        assert _assigned(logs[1 - victim]) == [0, 1, 2]
        time.sleep(1.0)  # anything still to come would be a duplicate
        credits = list(read_records(bootstrap, ["marl.di.credit"], prefix=prefix))
        fairness = list(read_records(bootstrap, ["marl.fairness.metrics"], prefix=prefix))
        dlq = list(read_records(bootstrap, ["marl.dlq"], prefix=prefix))
        actions = list(read_records(bootstrap, ["marl.joint.action"], prefix=prefix))
    finally:
        _stop(*workers)

    # exactly one credit per joint action: by joint-action hash, per run, none missing, none twice
    assert len(credits) == total
    by_run = _by_run(credits)
    acts = _by_run(actions)
    assert set(by_run) == set(runs)
    expected_sliding = (EPISODES * STEPS - 100) // 25 + 1
    fair_by_run = _by_run(fairness)
    for rid in runs:
        scored = [codec.decode(r.value)[1]["source_event_hashes"][0] for r in by_run[rid]]
        assert len(scored) == len(set(scored)) == EPISODES * STEPS
        assert set(scored) == {r.value[-32:] for r in acts[rid]}
        assert {r.key for r in by_run[rid]} == {f"{rid}:credit"}
        assert {r.partition for r in by_run[rid]} == {run_partition(rid, PARTITIONS)}
        assert _chain_seqs(by_run[rid]) == list(range(EPISODES * STEPS))
        steps = [(d["episode"], d["step"]) for d in (codec.decode(r.value)[1] for r in
                                                     sorted(by_run[rid], key=lambda r: r.offset))]
        assert steps == [(e, s) for e in range(EPISODES) for s in range(STEPS)]
        # fairness exactly once: one unbroken chain, each window once
        f = fair_by_run[rid]
        assert _chain_seqs(f) == list(range(len(f)))
        kinds = Counter(codec.decode(r.value)[1]["window"] for r in f)
        assert kinds == {"episode": EPISODES, "sliding": expected_sliding}, kinds
        windows = [(d["window"], d["window_start"], d["window_end"]) for d in (codec.decode(r.value)[1] for r in f)]
        assert len(windows) == len(set(windows))

    # the misplaced record: one dead letter on the dead-letter chain of the partition it was read from
    letters = [codec.decode(r.value)[1] for r in dlq]
    assert [(d["error_kind"], d["source_partition"], d["source_key"]) for d in letters] == [
        ("misplaced", wrong, victim_chain.encode())]
    assert {r.key for r in dlq} == {f"dlq:di:p{wrong}"}

    # every chain of every run verifies, signed through its head, checkpoint chains included
    for rid in runs:
        report, _ = verify_kafka(bootstrap, prefix=prefix, run_id=rid, public_key=key,
                                 topics=["marl.di.credit", "marl.fairness.metrics"])
        assert report.ok, (rid, report.breaks)
        chains = {c.chain_id: c for c in report.chains}
        for chain in (f"{rid}:credit", f"{rid}:fairness", f"{rid}:checkpoints:marlgrc-di"):
            assert chains[chain].signed_through_seq == chains[chain].last_seq, (chain, chains[chain])
    report, _ = verify_kafka(bootstrap, prefix=prefix, run_id="dlq", public_key=key, topics=["marl.dlq"])
    assert report.ok, report.breaks
    assert {c.chain_id for c in report.chains} == {f"dlq:di:p{wrong}", f"dlq:di:p{wrong}:checkpoints:marlgrc-di"}
    print(f"takeover to the last credit: {takeover:.1f} s; whole test {time.monotonic() - t_start:.1f} s")

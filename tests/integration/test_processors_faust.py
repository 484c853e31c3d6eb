"""The faust-streaming fairness app as a REAL faust worker process on the real broker: credit events
in, SIGKILL mid-stream, restart; every expected fairness event exists exactly once, with the payload
and rule_version the DI worker's processor gave the same window, its chains verify (eventlog.verify)
and, with every chain it writes (fairness, dead letters, their checkpoint chains), are signed
through their heads by the key it was given; a poison record is dead-lettered once with its reason
and the stream goes on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from hashlib import sha256
from pathlib import Path

import pytest
from confluent_kafka import Producer

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog, MemorySink
from eventlog.verify import Verifier, split_checkpoints, verify_records
from stream_processors.faust_fairness import output_chain
from stream_processors.processor import INPUT_TOPICS, Processor
from stream_processors.replay import payload_fields
from tests.synthetic import synthetic_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
RUNS, EPISODES, STEPS = 6, 2, 600
POISON = b"\x00not an avro event\xff"


def _di_outputs(run_id: str, seed: int) -> tuple[list, dict[str, list]]:
    """The run's credit events as the DI worker's processor seals them, and its fairness windows by kind
    as (payload, rule_version): what the faust app must compute from those credits alone."""
    mem = MemorySink()
    synthetic_run(EventLog(mem, run_id=run_id, producer_id="t"), episodes=EPISODES, steps=STEPS, agents=3, seed=seed)
    p = Processor()
    credits, windows = [], defaultdict(list)
    for j, (t, k, v) in enumerate(mem.sent):
        if t in INPUT_TOPICS:
            for ev in p.feed(t, 0, j, k, v):
                if ev.topic == "marl.di.credit":
                    credits.append(ev)
                else:
                    rec = default_codec().decode(ev.value)[1]
                    windows[rec["window"]].append((payload_fields(ev.value), rec["rule_version"]))
    return credits, windows


def _worker(bootstrap: str, prefix: str, datadir: Path, log_path: Path, key: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARLGRC_BOOTSTRAP": bootstrap, "MARLGRC_TOPIC_PREFIX": prefix,
           "MARLGRC_SIGNING_KEY": str(key),
           "MARLGRC_FAUST_DATADIR": str(datadir), "MARLGRC_FAUST_COMMIT_INTERVAL": "0.3",
           "MARLGRC_FAUST_COMMIT_EVERY": "300", "MARLGRC_FAUST_SESSION_TIMEOUT": "6"}
    return subprocess.Popen([sys.executable, "-m", "stream_processors.faust_fairness", "worker", "-l", "warn"],
                            cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _committed(bootstrap: str, prefix: str, topic: str) -> list:
    return list(read_records(bootstrap, [topic], prefix=prefix))


def test_faust_fairness_exactly_once_across_sigkill(kafka, tmp_path):
    bootstrap, prefix = kafka.bootstrap, f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(bootstrap, prefix)
    ids = [f"run{i}-{uuid.uuid4().hex[:6]}" for i in range(RUNS)]
    runs = {run_id: _di_outputs(run_id, i) for i, run_id in enumerate(ids)}
    # the credit events as the DI worker would have written them, one chain per run (chain id = key)
    sink = EventProducer(bootstrap, prefix=prefix)
    expected: dict[str, list] = {}
    for i, (run_id, (evs, windows)) in enumerate(runs.items()):
        for ev in evs:
            sink.send(ev.topic, ev.chain_id, ev.value)
        # the same windows as the DI worker's, but the run's last episode: its end is not in a credit event
        expected[output_chain(f"{run_id}:credit", "sliding")] = windows["sliding"]
        expected[output_chain(f"{run_id}:credit", "episode")] = windows["episode"][:-1]
        if i == RUNS // 2:
            sink.flush()
            raw = Producer({"bootstrap.servers": bootstrap})
            raw.produce(prefix + "marl.di.credit", POISON, b"poison")
            raw.flush(10)
    sink.flush()
    n_expected = sum(len(v) for v in expected.values())
    assert n_expected == RUNS * ((EPISODES * STEPS - 100) // 25 + 1 + EPISODES - 1)

    log_path, datadir, key = tmp_path / "faust.log", tmp_path / "faust-data", tmp_path / "signing.pem"
    signer = Signer.load_or_create(key)
    t0 = time.monotonic()
    w = _worker(bootstrap, prefix, datadir, log_path, key)
    try:
        deadline = time.monotonic() + 90
        while len(_committed(bootstrap, prefix, "marl.fairness.metrics")) < 20:
            assert w.poll() is None, f"faust worker exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no committed output in 90 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.05)
        os.killpg(w.pid, signal.SIGKILL)
        w.wait(10)
        print(f"killed at {time.monotonic() - t0:.1f}s", file=sys.stderr)
        before = len(_committed(bootstrap, prefix, "marl.fairness.metrics"))
        assert before < n_expected, "the worker finished before it was killed; the test proves nothing"
        w = _worker(bootstrap, prefix, datadir, log_path, key)
        deadline = time.monotonic() + 120
        while len(_committed(bootstrap, prefix, "marl.fairness.metrics")) < n_expected:
            assert w.poll() is None, f"restarted faust worker exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"outputs incomplete after 120 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        print(f"complete at {time.monotonic() - t0:.1f}s", file=sys.stderr)
        time.sleep(2.0)  # anything still to come would be a duplicate
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGTERM)
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)

    codec = default_codec()
    out = _committed(bootstrap, prefix, "marl.fairness.metrics")
    assert len(out) == n_expected  # exactly once: nothing lost, nothing twice
    got: dict[str, list] = defaultdict(list)
    for r in out:
        got[r.key].append(r)
    assert set(got) == set(expected)
    credit_partition = {f"{run}:credit": None for run in runs}
    for r in _committed(bootstrap, prefix, "marl.di.credit"):
        if r.key in credit_partition:
            credit_partition[r.key] = r.partition
    for chain, recs in got.items():
        decoded = [codec.decode(r.value)[1] for r in recs]
        assert [d["seq"] for d in decoded] == list(range(len(recs))), f"{chain}: out of order, hole or duplicate"
        assert [(payload_fields(r.value), d["rule_version"]) for r, d in zip(recs, decoded)] == expected[chain]
        # the output went to its input's partition: one chain, one partition
        run_credit = chain.rsplit(":fairness:", 1)[0] + ":credit"
        assert {r.partition for r in recs} == {credit_partition[run_credit]}
    report = verify_records(out)
    assert report.ok, report.breaks
    assert report.events == n_expected

    # signed: every chain the app wrote, its checkpoint chains included, through its head, with the key
    dlq = _committed(bootstrap, prefix, "marl.dlq")
    cps = _committed(bootstrap, prefix, "marl.audit.checkpoints")
    v = Verifier(signer.public_key, require_signed=True)
    v.add_checkpoints(cps)
    v.feed(split_checkpoints(out + dlq)[1])
    signed = v.finish()
    assert signed.ok, signed.breaks
    chains = {c.chain_id: c for c in signed.chains}
    dlq_chain = next(r.key for r in dlq)
    assert set(chains) == set(expected) | {f"{run}:checkpoints:marlgrc-fairness-faust" for run in runs} | {
        dlq_chain, f"{dlq_chain}:checkpoints:marlgrc-fairness-faust"}
    for chain, c in chains.items():
        assert c.last_seq >= 0 and c.signed_through_seq == c.last_seq, (chain, c)
        assert c.checkpoints_verified >= 1, (chain, c)
    for run in runs:   # a run's checkpoint chain goes to its credit chain's partition, like its outputs
        assert {r.partition for r in cps if r.key.startswith(f"{run}:")} == {credit_partition[f"{run}:credit"]}

    letters = [codec.decode(r.value)[1] for r in _committed(bootstrap, prefix, "marl.dlq")]
    assert len(letters) == 1, letters
    d = letters[0]
    assert (d["payload"], d["source_key"], d["error_kind"]) == (POISON, b"poison", "not_single_object")
    assert d["payload_sha256"] == sha256(POISON).digest() and d["reason"]

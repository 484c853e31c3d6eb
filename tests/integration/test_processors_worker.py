"""The live processor as a real worker process on the real broker: exactly one credit event per joint
action across a SIGKILL and restart, poison input to the dead-letter topic, and batch reprocessing
that matches the live output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from hashlib import sha256
from pathlib import Path

import pytest
from confluent_kafka import Producer, TopicPartition

from eventlog.audit import verify_kafka
from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from tests.chains import chain_seqs
from tests.synthetic import synthetic_run
from stream_processors.replay import comparable, payload_fields, reprocess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
EPISODES, STEPS, AGENTS = 4, 750, 3
ACTIONS = EPISODES * STEPS
POISON = b"\x00not an avro event\xff"


def _worker(bootstrap: str, prefix: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "stream_processors", "--bootstrap", bootstrap, "--prefix", prefix,
                             "--batch", "100", "--signing-key", str(log_path.parent / "signing.pem")],
                            cwd=ROOT, env=env, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _high_watermark(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"hw-{uuid.uuid4()}"})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions)
    finally:
        c.close()


def _committed(bootstrap: str, prefix: str, topic: str, run_id: str | None = None) -> list:
    return [r for r in read_records(bootstrap, [topic], prefix=prefix) if run_id is None or r.key.startswith(run_id)]


@pytest.fixture(scope="module")
def live(kafka, tmp_path_factory):
    """One run written to Kafka with a poison record in the middle, processed by a worker that is
    SIGKILLed mid-stream and restarted. Returns (bootstrap, prefix, run_id, credits, fairness, dlq, log)."""
    bootstrap, prefix = kafka.bootstrap, f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(bootstrap, prefix)
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    sink = EventProducer(bootstrap, prefix=prefix)
    log = EventLog(sink, run_id=run_id, producer_id="test")
    synthetic_run(log, episodes=EPISODES // 2, steps=STEPS, agents=AGENTS, seed=7)
    sink.flush()
    raw = Producer({"bootstrap.servers": bootstrap})
    raw.produce(prefix + "marl.joint.action", POISON, b"poison")
    raw.flush(10)
    # the second half of the run continues the same chains
    synthetic_run_second_half(log, run_id)
    sink.flush()

    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    Signer.load_or_create(log_path.parent / "signing.pem")
    credit_topic = prefix + "marl.di.credit"
    w = _worker(bootstrap, prefix, log_path)
    try:
        deadline = time.monotonic() + 60
        while _high_watermark(bootstrap, credit_topic) < 300:
            assert w.poll() is None, f"worker exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"worker produced nothing in 60 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.02)
        os.killpg(w.pid, signal.SIGKILL)
        w.wait(10)
        before = len(_committed(bootstrap, prefix, "marl.di.credit"))
        assert before < ACTIONS, "the worker finished before it was killed; the test proves nothing"
        w = _worker(bootstrap, prefix, log_path)
        deadline = time.monotonic() + 120
        while True:
            credits = _committed(bootstrap, prefix, "marl.di.credit")
            if len(credits) >= ACTIONS or time.monotonic() > deadline:
                break
            assert w.poll() is None, f"restarted worker exited:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        time.sleep(1.0)  # anything still to come would be a duplicate
        credits = _committed(bootstrap, prefix, "marl.di.credit")
        fairness = _committed(bootstrap, prefix, "marl.fairness.metrics")
        dlq = _committed(bootstrap, prefix, "marl.dlq")
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGTERM)
            try:
                w.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
    return bootstrap, prefix, run_id, credits, fairness, dlq, before, log_path


def synthetic_run_second_half(log: EventLog, run_id: str) -> None:
    """Episodes 2..3 appended to the same env/obs/actions chains (the demo writes a whole run; we
    write its per-step part again with the chain writers already positioned)."""
    import random

    rng = random.Random(8)
    ids = [f"agent_{i}" for i in range(AGENTS)]
    for ep in range(EPISODES // 2, EPISODES):
        for step in range(STEPS):
            st = log.append(f"{run_id}:env", "env.state", {
                "episode": ep, "step": step, "state": [rng.uniform(-1, 1) for _ in range(6)], "collapsed_state": []})
            acts = [{"agent_id": a, "discrete": rng.randrange(5), "continuous": [], "log_prob": -1.6,
                     "reward": rng.uniform(-1, 1), "terminated": False, "truncated": step == STEPS - 1} for a in ids]
            log.append(f"{run_id}:actions", "joint.action", {
                "episode": ep, "step": step, "actions": acts, "joint_vector": [float(a["discrete"]) for a in acts]},
                policy_version="random", source_event_hashes=[st.event_hash])




def test_exactly_one_credit_per_joint_action_across_sigkill(live):
    bootstrap, prefix, run_id, credits, fairness, dlq, before, _ = live
    assert 0 < before < ACTIONS
    assert len(credits) == ACTIONS
    assert chain_seqs(credits) == list(range(ACTIONS))
    assert {r.key for r in credits} == {f"{run_id}:credit"}
    assert len({r.partition for r in credits}) == 1
    actions = [r for r in read_records(bootstrap, ["marl.joint.action"], prefix=prefix) if r.key == f"{run_id}:actions"]
    codec = default_codec()
    scored = [codec.decode(r.value)[1]["source_event_hashes"][0] for r in credits]
    assert sorted(scored) == sorted(r.value[-32:] for r in actions)
    assert all(codec.decode(r.value)[1]["rule_version"] == "passthrough/di-1" for r in credits)
    # fairness: one per episode plus the sliding windows, on one unbroken chain
    fseqs = chain_seqs(fairness)
    assert fseqs == list(range(len(fairness)))
    kinds = [codec.decode(r.value)[1]["window"] for r in sorted(fairness, key=lambda r: codec.decode(r.value)[1]["seq"])]
    assert kinds.count("episode") == EPISODES
    assert kinds.count("sliding") == (EPISODES * STEPS - 100) // 25 + 1


def test_every_chain_the_worker_writes_is_signed_through_its_head_across_the_sigkill(live):
    """One checkpoint per chain per transaction, then one of the checkpoint chain itself, committed
    with the events they cover: after the SIGKILL and restart, the auditor verifies every credit,
    fairness and dead-letter event, and every checkpoint, under a checkpoint signed by the worker's
    key, and each checkpoint chain links up and is signed through its head."""
    bootstrap, prefix, run_id, credits, fairness, dlq, _, log_path = live
    key = Signer.load(log_path.parent / "signing.pem").public_key
    report, _ = verify_kafka(bootstrap, prefix=prefix, run_id=run_id, public_key=key,
                             topics=["marl.di.credit", "marl.fairness.metrics"])
    assert report.ok, report.breaks
    chains = {c.chain_id: c for c in report.chains}
    assert chains[f"{run_id}:credit"].events == len(credits)
    cps = _committed(bootstrap, prefix, "marl.audit.checkpoints", run_id)
    assert {r.key for r in cps} == {f"{run_id}:checkpoints:marlgrc-di"}
    assert chain_seqs(cps) == list(range(len(cps)))
    for chain, n in ((f"{run_id}:credit", len(credits)), (f"{run_id}:fairness", len(fairness)),
                     (f"{run_id}:checkpoints:marlgrc-di", len(cps))):
        c = chains[chain]
        assert c.signed_through_seq == n - 1 and c.checkpoints_verified >= 10, (chain, c)
    # the dead-letter chain belongs to no run: verified with signatures required
    report, _ = verify_kafka(bootstrap, prefix=prefix, run_id="dlq", public_key=key, topics=["marl.dlq"])
    assert report.ok, report.breaks
    chains = {c.chain_id: c for c in report.chains}
    assert set(chains) == {"dlq:di", "dlq:di:checkpoints:marlgrc-di"}
    assert chains["dlq:di"].events == len(dlq) and chains["dlq:di"].signed_through_seq == len(dlq) - 1
    own = chains["dlq:di:checkpoints:marlgrc-di"]
    assert own.last_seq >= 1 and own.signed_through_seq == own.last_seq


def test_poison_goes_to_dead_letters_and_the_stream_goes_on(live):
    _, _, _, credits, _, dlq, _, _ = live
    codec = default_codec()
    letters = [codec.decode(r.value)[1] for r in dlq]
    assert len(letters) == 1, letters
    d = letters[0]
    assert d["payload"] == POISON and d["source_key"] == b"poison"
    assert d["error_kind"] == "not_single_object" and "C3 01" in d["reason"]
    assert d["source_topic"] == "marl.joint.action"
    assert d["payload_sha256"] == sha256(POISON).digest()
    # joint actions after the poison record (the second half) were scored
    assert max(codec.decode(r.value)[1]["episode"] for r in credits) == EPISODES - 1


def test_reprocess_gives_the_live_outputs(live):
    bootstrap, prefix, run_id, credits, fairness, _, _, _ = live
    codec = default_codec()
    batch = reprocess(bootstrap, run_id, prefix=prefix)
    b_credit = [e.value for e in batch if e.topic == "marl.di.credit"]
    b_fair = [e.value for e in batch if e.topic == "marl.fairness.metrics"]
    by_seq = lambda vs: sorted(vs, key=lambda v: codec.decode(v)[1]["seq"])  # noqa: E731
    live_credit = by_seq([r.value for r in credits])
    assert len(b_credit) == len(live_credit) == ACTIONS
    assert [comparable(v) for v in b_credit] == [comparable(v) for v in live_credit]
    live_fair = by_seq([r.value for r in fairness])
    assert [payload_fields(v) for v in b_fair] == [payload_fields(v) for v in live_fair]

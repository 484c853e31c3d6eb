"""The MSG_SIZE_TOO_LARGE regression on the real broker: a run whose joint actions (20 agents each)
all arrive before any of their states. The first worker version kept every waiting joint action in
the run's state message (> 1 MB here) and retried the refused transaction forever; now each waiting
record is its own state entry, the worker scores every action, and no state message is large."""
from __future__ import annotations

import time
import uuid

import pytest

from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog, MemorySink
from tests.synthetic import synthetic_run
from stream_processors.worker import STATE_TOPIC, Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STEPS, AGENTS = 1500, 20


def test_backlog_of_wide_joint_actions_commits_and_scores_everything(kafka):
    bootstrap, prefix = kafka.bootstrap, f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(bootstrap, prefix)
    run_id = f"wide-{uuid.uuid4().hex[:6]}"
    mem = MemorySink()
    synthetic_run(EventLog(mem, run_id=run_id, producer_id="test"), episodes=1, steps=STEPS, agents=AGENTS, seed=3)
    # every joint action first, then the lifecycle and the states: the worst backlog for the join
    order = {"marl.joint.action": 0, "marl.run.lifecycle": 1, "marl.env.state": 2}
    recs = sorted((r for r in mem.sent if r[0] in order), key=lambda r: order[r[0]])
    assert sum(len(v) for t, _, v in recs if t == "marl.joint.action") > 2_000_000
    sink = EventProducer(bootstrap, prefix=prefix)
    for t, k, v in recs:
        sink.send(t, k, v)
    sink.flush()

    w = Worker(WorkerConfig(bootstrap, prefix, "wide", batch=500))
    deadline = time.monotonic() + 80
    w.run(until=lambda w: time.monotonic() > deadline
          or sum(r.credit_head.seq + 1 for r in w.processor.runs.values()) >= STEPS and not any(
              r.pending for r in w.processor.runs.values()))

    codec = default_codec()
    credits = [codec.decode(r.value)[1] for r in read_records(bootstrap, ["marl.di.credit"], prefix=prefix)]
    assert [c["step"] for c in sorted(credits, key=lambda c: c["seq"])] == list(range(STEPS))
    assert not list(read_records(bootstrap, ["marl.dlq"], prefix=prefix))
    state = list(read_records(bootstrap, [STATE_TOPIC], prefix=prefix))
    assert max(len(r.value or b"") for r in state) < 1_000_000
    latest = {}
    for r in state:
        latest[r.key] = r.value
    joins = [k for k in latest if k.startswith("wide:join:")]
    assert len(joins) >= 200  # the backlog really was held as entries ...
    assert all(latest[k] is None for k in joins)  # ... and every one was deleted once joined

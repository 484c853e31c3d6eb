"""A long-running decision interpreter releases complete runs from memory (found by bench/bench_soak.py:
the worker's memory grew 2.4 MiB/min, about 100 kB per finished run, for ever). Complete = run.finished
read, every joint action it names read, none waiting; then only the run id stays, its next snapshot is
a ``finished`` marker, and a later record of it is dead-lettered ``after_finish`` (never scored from
an empty state, which would fork its chains). Pure: the Processor fed a synthetic run's records."""
import json

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from stream_processors.processor import INPUT_TOPICS, Processor
from tests.synthetic import synthetic_run


def records(run_id="r1", episodes=2, steps=5):
    sink = MemorySink()
    log = EventLog(sink, run_id=run_id, producer_id="p")
    synthetic_run(log, episodes=episodes, steps=steps, agents=2)
    return [(t, k, v) for t, k, v in sink.sent if t in INPUT_TOPICS]


def feed(p, recs, start=0):
    out = []
    for i, (t, k, v) in enumerate(recs):
        out += p.feed(t, 0, start + i, k, v)
    return out


def kinds(events):
    codec = default_codec()
    return [codec.decode(e.value)[1].get("error_kind") for e in events if e.topic == "marl.dlq"]


def test_a_complete_run_is_released_and_a_late_record_without_its_state_is_dead_lettered():
    recs = records()
    p = Processor(track_joins=True)
    out = feed(p, recs)
    assert sum(e.topic == "marl.di.credit" for e in out) == 10 and not kinds(out)
    assert p.release_complete() == ["r1"]
    assert "r1" not in p.runs and p.finished == {"r1"}
    assert p.release_complete() == []
    late = feed(p, recs[-3:], start=1000)   # no reload: nothing to score it from
    assert kinds(late) == ["after_finish"] * 3 and not any(e.topic == "marl.di.credit" for e in late)
    p.reload = lambda run_id: None          # a reload that finds nothing: the same
    assert kinds(feed(p, recs[:1], start=2000)) == ["after_finish"]


def test_a_run_that_goes_on_after_release_continues_from_its_committed_state():
    """The same records as a processor that never released: same credits, same chain."""
    first = records("r1", episodes=2)
    # records of the run after its run.finished: here a copy of its last 4 state/action records
    # (tests/integration/test_processors_worker.py appends whole episodes through a real worker)
    tail = [r for r in first if r[0] != "marl.run.lifecycle"][-4:]
    keep = Processor(track_joins=True, clock=lambda: 1)
    kept = feed(keep, first) + feed(keep, tail, start=100)
    rel = Processor(track_joins=True, clock=lambda: 1)
    out = feed(rel, first)
    committed = {"r1": rel.snapshot("r1")}
    assert rel.release_complete() == ["r1"]
    rel.reload = committed.get
    out += feed(rel, tail, start=100)
    assert "r1" in rel.runs and "r1" not in rel.finished
    assert rel.runs["r1"].finished_action_seq is None  # it went on: only a new run.finished completes it
    codec = default_codec()

    def content(events):  # all but the per-event random id and the hashes that cover it
        return [(e.topic, {k: v for k, v in codec.decode(e.value)[1].items()
                           if k not in ("event_id", "event_hash", "prev_event_hash", "source_event_hashes")}) for e in events]

    assert content(out) == content(kept)
    assert any(e.topic == "marl.di.credit" for e in out[-4:])  # the tail was scored, as if never released


def test_a_run_is_kept_until_every_joint_action_run_finished_names_is_read():
    recs = records()
    codec = default_codec()
    actions = [r for r in recs if r[0] == "marl.joint.action"]
    others = [r for r in recs if r[0] != "marl.joint.action"]
    p = Processor(track_joins=True)
    # run.finished (on the lifecycle topic) is read before the run's last two joint actions
    feed(p, others + actions[:-2])
    assert p.runs["r1"].finished_action_seq == codec.decode(actions[-1][2])[1]["seq"]
    assert p.release_complete() == [] and "r1" in p.runs
    out = feed(p, actions[-2:], start=500)
    assert sum(e.topic == "marl.di.credit" for e in out) == 2
    assert p.release_complete() == ["r1"]


def test_a_run_without_run_finished_is_never_released_and_old_snapshots_restore():
    recs = records()
    p = Processor(track_joins=True)
    feed(p, [r for r in recs if not (r[0] == "marl.run.lifecycle" and b"run.finished" in r[2])][:-1])
    assert p.runs["r1"].finished_action_seq is None
    assert p.release_complete() == []
    snap = json.loads(p.snapshot("r1"))
    for k in ("last_action_seq", "finished_action_seq"):  # a state saved before these fields existed
        snap.pop(k)
    q = Processor(track_joins=True)
    q.restore("r1", json.dumps(snap).encode())
    assert q.runs["r1"].last_action_seq == -1 and q.runs["r1"].finished_action_seq is None

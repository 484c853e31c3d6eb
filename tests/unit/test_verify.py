"""The verifier on in-memory streams: clean streams pass; every corruption is caught with its kind
and location; trusted state catches a forked history."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog.checkpoint import Signer
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.verify import BreakKind, TrustedState, Verifier, verify_records
from tests import corruptions
from tests.synthetic import synthetic_run

SIGNER = Signer.from_seed(b"test-signer")
ACTIONS = "marl.joint.action"


def make_stream(run="r1", episodes=2, steps=20, checkpoint_every=16, partitions=3):
    sink = MemorySink()
    log = EventLog(sink, run_id=run, producer_id="p", signer=SIGNER, checkpoint_every=checkpoint_every)
    synthetic_run(log, episodes=episodes, steps=steps, agents=2)
    log.close()
    return corruptions.renumber([Record(t, hash(k) % partitions, 0, k, v, 0) for t, k, v in sink.sent])


STREAM = make_stream()


def test_clean_stream_verifies():
    report = verify_records(STREAM, SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    assert report.events == len(STREAM)
    actions = next(c for c in report.chains if c.chain_id == "r1:actions")
    assert actions.events == 40 and actions.last_seq == 39
    assert actions.checkpoints_verified == 3 and actions.signed_through_seq == 39


CASES = corruptions.standard_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_corruption_is_caught_with_kind_and_location(name):
    records, kind, marker = CASES[name](STREAM)
    report = verify_records(records, SIGNER.public_key)
    assert not report.ok
    assert len(report.breaks) == 1, [b.describe() for b in report.breaks]
    brk = report.breaks[0]
    assert brk.kind == kind, brk.describe()
    assert (brk.topic, brk.chain_id) == (marker.topic, marker.key)
    assert (brk.partition, brk.offset) == (marker.partition, marker.offset), brk.describe()


def test_rewritten_chain_passes_without_checkpoints_but_not_with_them():
    records, _, _ = corruptions.rewritten(STREAM, ACTIONS, "r1:actions")
    data = [r for r in records if r.topic != "marl.audit.checkpoints"]
    assert verify_records(data).ok  # links alone cannot catch a consistent rewrite
    assert not verify_records(records, SIGNER.public_key).ok


def test_checkpoint_from_another_key_is_a_bad_signature():
    other = Signer.from_seed(b"someone-else")
    report = verify_records(STREAM, other.public_key)
    assert {b.kind for b in report.breaks if b.topic == "marl.audit.checkpoints"} == {BreakKind.BAD_SIGNATURE}
    # no checkpoint is accepted, so no event of the finished run is signed
    assert {b.kind for b in report.breaks if b.topic != "marl.audit.checkpoints"} == {BreakKind.UNSIGNED}


def test_trusted_state_catches_a_forked_history():
    v = Verifier(SIGNER.public_key)
    v.add_checkpoints([r for r in STREAM if r.topic == "marl.audit.checkpoints"])
    v.feed(r for r in STREAM if r.topic != "marl.audit.checkpoints")
    assert v.finish().ok
    trusted = v.trusted_after()
    assert trusted.heads[(ACTIONS, "r1:actions")][0] == 39
    # someone with the signing key rewrites history and signs it anew
    forged = make_stream(steps=20)  # same run id, different random event ids -> different hashes
    report = verify_records(forged, SIGNER.public_key, trusted)
    assert BreakKind.INCONSISTENT in {b.kind for b in report.breaks}
    assert verify_records(STREAM, SIGNER.public_key, trusted).ok


def test_trusted_state_round_trips(tmp_path):
    t = TrustedState({(ACTIONS, "c"): (7, b"\x01" * 32)})
    t.save(tmp_path / "trusted.json")
    assert TrustedState.load(tmp_path / "trusted.json").heads == t.heads


def test_every_chain_of_a_closed_log_is_signed_through_its_head():
    report = verify_records(STREAM, SIGNER.public_key)
    assert report.ok and not report.notes
    assert all(c.unsigned == 0 and c.signed_through_seq == c.last_seq >= 0 for c in report.chains)
    cps = [c for c in report.chains if c.topic == "marl.audit.checkpoints"]
    assert len(cps) == 1 and cps[0].checkpoints_verified >= 1  # the checkpoint chain signs itself


@pytest.mark.parametrize("drop", [1, 2, 3])
def test_dropping_the_newest_checkpoints_of_a_finished_run_leaves_events_unsigned(drop):
    newest = sorted((i for i, r in enumerate(STREAM) if r.topic == "marl.audit.checkpoints"))[-drop:]
    recs = corruptions.renumber([r for i, r in enumerate(STREAM) if i not in newest])
    report = verify_records(recs, SIGNER.public_key)
    assert not report.ok
    assert {b.kind for b in report.breaks} == {BreakKind.UNSIGNED}
    assert any(b.topic == "marl.audit.checkpoints" for b in report.breaks)
    # without a key nothing can count as signed: the same gap is a note, not a break
    unkeyed = verify_records(recs)
    assert unkeyed.ok and any("not covered by any signed checkpoint" in n for n in unkeyed.notes)


def test_an_unfinished_run_may_have_an_unsigned_tail_unless_signatures_are_required():
    sink = MemorySink()
    log = EventLog(sink, run_id="r2", producer_id="p", signer=SIGNER, checkpoint_every=5)
    for step in range(7):  # a checkpoint after 5 events, two more not yet covered
        log.append("r2:actions", "joint.action", {"episode": 0, "step": step, "actions": [], "joint_vector": []})
    recs = [Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)]
    report = verify_records(recs, SIGNER.public_key)
    assert report.ok and any("seq 5..6 are not covered" in n for n in report.notes)
    v = Verifier(SIGNER.public_key, require_signed=True)
    v.add_checkpoints([r for r in recs if r.topic == "marl.audit.checkpoints"])
    v.feed([r for r in recs if r.topic != "marl.audit.checkpoints"])
    strict = v.finish()
    assert {(b.kind, b.chain_id, b.seq) for b in strict.breaks} == {
        (BreakKind.UNSIGNED, "r2:actions", 5),
        (BreakKind.UNSIGNED, "r2:checkpoints:p", 0)}  # the open log has not signed its checkpoint chain yet


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_byte_flip_or_drop_is_detected(data):
    i = data.draw(st.sampled_from(range(len(STREAM))))
    recs = list(STREAM)
    op = data.draw(st.sampled_from(["flip", "drop", "swap"]))
    if op == "flip":
        v = bytearray(recs[i].value)
        j = data.draw(st.integers(0, len(v) - 1))
        v[j] ^= data.draw(st.integers(1, 255))
        recs[i] = recs[i]._replace(value=bytes(v))
    elif op == "drop":
        del recs[i]
    else:
        same = [k for k, r in enumerate(recs) if r.key == recs[i].key and r.topic == recs[i].topic and k != i]
        k = data.draw(st.sampled_from(same))
        recs[i], recs[k] = recs[k], recs[i]
    assert not verify_records(corruptions.renumber(recs), SIGNER.public_key).ok


class FakeMessage:
    """Stands in for a confluent-kafka Message (which cannot be constructed): the same methods."""

    def __init__(self, topic, key, value, partition=0, offset=0, err=None):
        self._t, self._k, self._v, self._p, self._o, self._e = topic, key, value, partition, offset, err

    def error(self):
        return self._e

    def topic(self):
        return self._t

    def key(self):
        return self._k

    def value(self):
        return self._v

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return (1, 0)


def _as_messages(records, prefix):
    return [FakeMessage(prefix + r.topic, r.key.encode(), r.value, r.partition, r.offset) for r in records]


def _verify_messages(records, batch, prefix="x."):
    """What verify_kafka does with Kafka batches, on records given as stand-in Messages."""
    cps = [r for r in records if r.topic == "marl.audit.checkpoints"]
    msgs = _as_messages([r for r in records if r.topic != "marl.audit.checkpoints"], prefix)
    v = Verifier(SIGNER.public_key)
    v.add_checkpoints(cps)
    for i in range(0, len(msgs), batch):
        v.feed_messages(msgs[i:i + batch], prefix)
    v.flush_messages(prefix)
    return v.finish()


@pytest.mark.parametrize("name", ["clean"] + sorted(CASES))
def test_messages_path_reports_what_the_records_path_reports(name, monkeypatch):
    from eventlog import verify

    monkeypatch.setattr(verify, "_CHUNK", 7)  # many flushes per chain, breaks across chunk edges
    records = STREAM if name == "clean" else CASES[name](STREAM)[0]
    want = verify_records(records, SIGNER.public_key)
    for batch in (5, 64, len(records)):
        got = _verify_messages(records, batch)
        assert got.to_json() == want.to_json(), (name, batch)


def test_a_kafka_error_in_a_batch_is_raised():
    v = Verifier(SIGNER.public_key)
    with pytest.raises(RuntimeError, match="Kafka error while reading: boom"):
        v.feed_messages([FakeMessage("x.t", b"k", b"v", err="boom")], "x.")


def test_a_key_that_is_not_utf8_is_a_wrong_key_break_not_a_crash():
    good = [r for r in STREAM if r.topic != "marl.audit.checkpoints"]
    stray = FakeMessage("x." + good[0].topic, b"\xff\xfe", good[0].value, 0, 10_000)
    v = Verifier(SIGNER.public_key)
    v.feed_messages(_as_messages(good, "x.") + [stray], "x.")
    v.flush_messages("x.")
    report = v.finish()
    assert not report.ok
    stray_chain = [c for c in report.chains if "\\xff" in c.chain_id]
    assert len(stray_chain) == 1 and stray_chain[0].first_break.kind == BreakKind.WRONG_KEY
    assert stray_chain[0].first_break.offset == 10_000


def test_a_valid_event_copied_under_another_key_is_a_wrong_key_break():
    good = list(STREAM)
    victim = next(r for r in good if r.topic == "marl.joint.action")
    copy = victim._replace(key="someone-else", offset=99_999)
    report = verify_records(good + [copy], SIGNER.public_key)
    assert not report.ok
    (chain,) = [c for c in report.chains if c.chain_id == "someone-else"]
    assert chain.first_break.kind == BreakKind.WRONG_KEY and chain.first_break.offset == 99_999
    assert all(c.first_break is None for c in report.chains if c.chain_id != "someone-else")


def _chain_with_seqs(seqs, topic="marl.joint.action", chain="r9:actions"):
    """A chain whose hash links are all correct but whose events carry ``seqs`` (a writer whose head's
    seq was moved between events): what a careless or hostile writer could publish."""
    from eventlog.chain import ChainHead, ChainWriter

    w = ChainWriter(topic, chain, "r9", "p")
    records = []
    for i, s in enumerate(seqs):
        w.head = ChainHead(s - 1, w.head.event_hash)
        e = w.append("joint.action", {"episode": 0, "step": i, "actions": [], "joint_vector": []})
        records.append(Record(topic, 0, i, chain, e.value, 0))
    return records


@pytest.mark.parametrize("seqs,kind,at_offset,at_seq", [
    ([0, 2, 4], BreakKind.MISSING, 1, 1),
    ([3, 4, 5], BreakKind.MISSING, 0, 0),
    ([0, 0, 1], BreakKind.DUPLICATED, 1, 0),
    ([0, 2, 1], BreakKind.REORDERED, 1, 2),
    ([0, 1, 2, 3, 3], BreakKind.DUPLICATED, 4, 3),
])
def test_seq_must_start_at_0_and_grow_by_1_even_when_links_hold(seqs, kind, at_offset, at_seq):
    records = _chain_with_seqs(seqs)
    report = verify_records(records)
    (chain,) = report.chains
    assert not report.ok
    b = chain.first_break
    assert (b.kind, b.offset, b.seq) == (kind, at_offset, at_seq), b.describe()
    assert chain.last_seq == at_offset - 1 and chain.events == at_offset  # only the good prefix is accepted
    # the Kafka reader's path says the same
    assert _verify_messages(records, 2).to_json() == report.to_json()


def test_a_long_chain_with_correct_seqs_verifies_across_varint_sizes():
    seqs = list(range(16380, 16390))  # seq varints grow from 2 to 3 bytes
    report = verify_records(_chain_with_seqs(seqs))
    assert report.chains[0].first_break.kind == BreakKind.MISSING  # it must start at 0
    v = Verifier()
    v.resume("marl.joint.action", "r9:actions", 16380, bytes(32))
    v.feed(_chain_with_seqs(seqs))
    report = v.finish()
    assert report.ok and report.chains[0].last_seq == 16389


def test_checkpoints_of_chains_on_topics_not_read_are_noted_not_held_against_them():
    """A reader of some topics (a learner) and `marlgrc verify` of all give one answer: a chain the
    reader did not read is not 'truncated' because its checkpoints were read."""
    cps = [r for r in STREAM if r.topic == "marl.audit.checkpoints"]
    obs = [r for r in STREAM if r.topic == "marl.agent.observation"]
    v = Verifier(SIGNER.public_key, topics=["marl.agent.observation"])
    v.add_checkpoints(cps)
    v.feed(obs)
    report = v.finish()
    assert report.ok, [b.describe() for b in report.breaks]
    assert any("not read were not checked" in n and "marl.joint.action" in n for n in report.notes)
    assert {c.topic for c in report.chains} == {"marl.agent.observation", "marl.audit.checkpoints"}
    # without the scope, the unread chains are missing events that checkpoints cover
    unscoped = Verifier(SIGNER.public_key)
    unscoped.add_checkpoints(cps)
    unscoped.feed(obs)
    assert BreakKind.TRUNCATED in {b.kind for b in unscoped.finish().breaks}


def test_finish_can_be_asked_again_as_more_arrives():
    data = [r for r in STREAM if r.topic != "marl.audit.checkpoints"]
    v = Verifier(SIGNER.public_key)
    v.add_checkpoints([r for r in STREAM if r.topic == "marl.audit.checkpoints"])
    v.feed(data[: len(data) // 2])
    v.finish()
    v.feed(data[len(data) // 2:])
    first, again = v.finish(), v.finish()
    assert first.ok and first.to_json() == again.to_json()


def test_a_garbage_public_key_names_the_command_that_prints_the_right_one(tmp_path):
    from typer.main import get_command

    from eventlog.checkpoint import KeyFileError, load_public_key
    from marlgrc.cli import app

    bad = tmp_path / "key.pem"
    bad.write_text("not a key\n")
    with pytest.raises(KeyFileError) as info:
        load_public_key(bad)
    assert str(bad) in str(info.value) and "`marlgrc public-key`" in str(info.value)
    assert "public-key" in get_command(app).commands  # the command the message names exists


def test_events_before_a_chains_first_checkpoint_are_unsigned():
    """Signed means signed from seq 0: a chain whose first checkpoint covers seq 5..9 is not signed
    through 9, and with signatures required its events 0..9 are an unsigned break."""
    from eventlog.checkpoint import checkpoint_payload, statement_for
    from eventlog.log import CHECKPOINT_TOPIC

    sink = MemorySink()
    log = EventLog(sink, run_id="r3", producer_id="p")  # no signer: we sign one range by hand
    events = [log.append("r3:actions", "joint.action", {"episode": 0, "step": i, "actions": [], "joint_vector": []})
              for i in range(10)]
    stmt = statement_for("marl.joint.action", "r3:actions", 5, events[4].event_hash, [e.event_hash for e in events[5:]])
    log.append("r3:checkpoints:p", "audit.checkpoint", checkpoint_payload(stmt, SIGNER),
               source_event_hashes=[stmt.head_event_hash])
    recs = [Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)]
    v = Verifier(SIGNER.public_key, require_signed=True)
    v.add_checkpoints([r for r in recs if r.topic == CHECKPOINT_TOPIC])
    v.feed([r for r in recs if r.topic != CHECKPOINT_TOPIC])
    report = v.finish()
    actions = next(c for c in report.chains if c.chain_id == "r3:actions")
    assert actions.checkpoints_verified == 1 and actions.signed_through_seq == -1
    assert actions.first_break.kind == BreakKind.UNSIGNED and actions.first_break.seq == 0
    assert "first checkpoint of the chain starts at seq 5" in actions.first_break.detail

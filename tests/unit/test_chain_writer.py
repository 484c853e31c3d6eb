"""The chain writer: a sealer's bytes are plain Avro (Apache avro writes the same), its header
varints at every size, its refusals leave the head alone; appenders give the events and checkpoints
of ``append``."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog.chain import CLASSIFICATIONS, RETENTION_DAYS, ChainHead, ChainWriter, long_bytes
from eventlog.checkpoint import Signer
from eventlog.codec import HEADER_FIELDS, default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.verify import verify_records
from tests.unit.test_codec import apache_value, uvarint

CODEC = default_codec()
SIGNER = Signer.from_seed(b"fast-sealing")
PREFIX = "01234567-89ab-8cde-8f01-"
DAY = 86_400_000_000

# 8-byte timestamp varints change their high part every 2**13 µs; values around those edges, the
# edges of other varint sizes, and small or negative clocks (tests use such)
edges = st.sampled_from([0, 1, 63, 64, 8191, 8192, (1 << 48) - 1, 1 << 48, (1 << 55) - 1 - 3650 * DAY])
timestamps = st.one_of(
    st.integers(1_700_000_000_000_000, 1_800_000_000_000_000),
    st.integers(1 << 48, (1 << 55) - 3650 * DAY - 1),
    st.builds(lambda base, off: base * 8192 + off, st.integers(1 << 35, 1 << 40), st.integers(-2, 2)),
    edges, st.integers(-(1 << 40), 1 << 40))
seqs = st.one_of(st.sampled_from([-1, 62, 63, 8190, 8191, 16382, 16383, 16384, (1 << 20) - 1, 1 << 20,
                                  (1 << 27) - 1, 1 << 27]), st.integers(-1, 1 << 34))
floats32 = st.floats(width=32, allow_nan=False)
texts = st.text(max_size=12)


def reference_value(name, header, payload, event_hash):
    """The event through Apache avro's writer (no code shared with the chain writer or fastavro)."""
    return apache_value(name, {**header, **payload, "event_hash": event_hash})


def header_of(value):
    return {k: v for k, v in CODEC.decode(value)[1].items() if k in HEADER_FIELDS}


@settings(max_examples=150, deadline=None)
@given(seq=seqs, times=st.lists(timestamps, min_size=3, max_size=3), cls=st.sampled_from(CLASSIFICATIONS),
       policy=texts, rule=texts, n_sources=st.integers(0, 5), state=st.lists(floats32, max_size=20),
       as_array=st.booleans(), flags=st.lists(texts, max_size=3),
       counters=st.tuples(st.integers(-(1 << 40), 1 << 40), st.integers(-(1 << 20), 1 << 34)))
def test_sealer_bytes_equal_reference_encoding(seq, times, cls, policy, rule, n_sources, state, as_array, flags,
                                              counters):
    clock = iter(times)
    head = ChainHead(seq, bytes(range(32)))
    fast = ChainWriter("marl.env.state", "run:env", "run", "prod", "internal", head=head, clock=lambda: next(clock),
                       id_prefix=PREFIX)
    slow = ChainWriter("marl.env.state", "run:env", "run", "prod", "internal", head=head, clock=lambda: times[0],
                       id_prefix=PREFIX)
    sources = [bytes([i]) * 32 for i in range(n_sources)]
    vec = np.asarray(state, dtype=np.float32) if as_array else state
    payload = {"episode": counters[0], "step": counters[1], "state": vec, "collapsed_state": vec[:3], "flags": flags}
    seal = fast.sealer("env.state", policy_version=policy, rule_version=rule, data_classification=cls)
    e1 = seal(payload, sources)
    e2 = slow.append("env.state", payload, policy_version=policy, rule_version=rule, source_event_hashes=iter(sources),
                     data_classification=cls)
    assert e1 == e2
    header = {"prev_event_hash": head.event_hash, "seq": seq + 1, "chain_id": "run:env",
              "event_id": f"{PREFIX}{seq + 1:012x}", "event_type": "env.state", "run_id": "run",
              "produced_at": times[0], "producer_id": "prod", "data_classification": cls,
              "retention_expiry": times[0] + RETENTION_DAYS[cls] * DAY, "feature_schema_version": "1",
              "policy_version": policy, "rule_version": rule, "source_event_hashes": sources}
    listed = {**payload, "state": list(map(float, vec)), "collapsed_state": list(map(float, vec[:3]))}
    assert e1.value == reference_value("env_state", header, listed, e1.event_hash)
    # the next events of the same writer: produced_at given, then from the clock; the head moved on
    e3 = seal(payload, (), produced_at=times[2])
    e4 = seal(payload)
    assert (e3.seq, e4.seq) == (seq + 2, seq + 3) and fast.head == ChainHead(e4.seq, e4.event_hash)
    for e, t in ((e3, times[2]), (e4, times[1])):
        h = header_of(e.value)
        assert (h["produced_at"], h["retention_expiry"]) == (t, t + RETENTION_DAYS[cls] * DAY)
    assert header_of(e4.value)["prev_event_hash"] == e3.event_hash


def test_timestamps_of_interleaved_writers_cross_cache_edges():
    """produced_at / retention_expiry of several writers, each crossing high-part edges."""
    ticks = itertools.count(1_763_700_000_000_000 - 20_000, 997)
    writers = [ChainWriter("marl.env.state", f"c{i}", "r", "p", c, clock=lambda: next(ticks))
               for i, c in enumerate(CLASSIFICATIONS)]
    seals = [w.sealer("env.state") for w in writers]
    for _ in range(60):
        for seal in seals:
            e = seal({"episode": 0, "step": 0, "state": [], "collapsed_state": []})
            h = header_of(e.value)
            assert apache_value("env_state", CODEC.decode(e.value)[1]) == e.value
            assert h["retention_expiry"] - h["produced_at"] == RETENTION_DAYS[h["data_classification"]] * DAY


@pytest.mark.parametrize("n", [0, 1, 8191, 8192, 16383, 16384, (1 << 20) + 3, (1 << 27) - 1, 1 << 27, (1 << 28) + 5,
                               (1 << 41) - 1, 1 << 41, 1 << 48, 1 << 54, (1 << 62) + 1])
def test_long_bytes_at_varint_size_edges(n):
    for v in (n, -n, -n - 1):
        z = ((v << 1) ^ (v >> 63)) & 0xFFFFFFFFFFFFFFFF
        assert long_bytes(v) == uvarint(z)


def test_sealer_rejects_bad_sources_and_keeps_head():
    w = ChainWriter("marl.joint.action", "c", "r", "p")
    seal = w.sealer("joint.action", policy_version="v")
    ok = {"episode": 0, "step": 0, "actions": [], "joint_vector": []}
    for bad in ([b"short"], [bytes(32), bytes(31)], (bytes(33),)):
        with pytest.raises(ValueError, match="32-byte"):
            seal(ok, bad)
    assert w.head.seq == -1 and w.next_seq == 0
    assert seal(ok, [bytes(32)] * 3).seq == 0


@settings(max_examples=100, deadline=None)
@given(actions=st.lists(st.fixed_dictionaries({
    "agent_id": texts, "discrete": st.integers(-(1 << 31), (1 << 31) - 1),
    "continuous": st.lists(floats32, max_size=4), "log_prob": st.floats(allow_nan=False),
    "reward": st.floats(allow_nan=False), "terminated": st.booleans(), "truncated": st.booleans()}), max_size=4),
    joint=st.lists(floats32, max_size=8), step=st.integers(0, 1 << 40))
def test_joint_action_events_are_what_apache_avro_writes(actions, joint, step):
    payload = {"episode": 1, "step": step, "actions": actions, "joint_vector": joint}
    value = ChainWriter("marl.joint.action", "c", "r", "p").sealer("joint.action")(payload).value
    name, rec = CODEC.decode(value)
    assert apache_value(name, rec) == value
    assert rec["step"] == step and [a["discrete"] for a in rec["actions"]] == [a["discrete"] for a in actions]


def test_float_arrays_any_layout_encode_as_their_float_list():
    base = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    for arr in (base.ravel(), base[:, 1], base.astype(np.float32).ravel(), base.astype(">f4").ravel(),
                base.astype(np.float32)[::2, ::2].ravel(), base.astype(">f8")[:, 0]):
        listed = [float(x) for x in arr]
        assert (CODEC.encode_payload("env_state", {"episode": 0, "step": 0, "state": arr, "collapsed_state": arr})
                == CODEC.encode_payload("env_state", {"episode": 0, "step": 0, "state": listed,
                                                      "collapsed_state": listed}))


def deterministic_log(sink, checkpoint_every):
    ticks = itertools.count(1_763_700_000_000_000, 1013)
    ids = itertools.count()
    return EventLog(sink, run_id="r", producer_id="p", signer=SIGNER, checkpoint_every=checkpoint_every,
                    clock=lambda: next(ticks), id_prefixes=lambda: f"{next(ids):08x}-0000-8000-8000-")


def test_appender_events_and_checkpoints_equal_append():
    a_sink, b_sink = MemorySink(), MemorySink()
    a_log, b_log = deterministic_log(a_sink, 3), deterministic_log(b_sink, 3)
    obs = a_log.appender("r:obs:x", "agent.observation")
    act = a_log.appender("r:actions", "joint.action", policy_version="v2")
    for step in range(8):
        payload = {"episode": 0, "step": step, "agent_id": "x", "observation": np.full(4, step, np.float32)}
        h = obs(payload, [bytes(32)]).event_hash
        assert h == b_log.append("r:obs:x", "agent.observation", {**payload, "observation": [float(step)] * 4},
                                 source_event_hashes=[bytes(32)]).event_hash
        p2 = {"episode": 0, "step": step, "actions": [], "joint_vector": []}
        act(p2, (h,))
        b_log.append("r:actions", "joint.action", p2, policy_version="v2", source_event_hashes=[h])
        # the generic path on the same chain moves the same head
        a_log.append("r:actions", "joint.action", p2, policy_version="v2", source_event_hashes=[h])
        b_log.append("r:actions", "joint.action", p2, policy_version="v2", source_event_hashes=[h])
    a_log.close()
    b_log.close()
    assert a_sink.sent == b_sink.sent
    report = verify_records([Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(a_sink.sent)],
                            SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    actions = next(c for c in report.chains if c.chain_id == "r:actions")
    assert actions.events == 16 and actions.signed_through_seq == 15

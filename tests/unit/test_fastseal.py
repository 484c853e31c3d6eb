"""The C sealer (eventlog/_seal.c) seals exactly what the Python sealer seals: the same event bytes,
the same head afterwards, the same error for input it cannot encode, and one clock reading per event
whichever path the event takes."""
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from eventlog import fastseal
from eventlog.chain import ChainHead, ChainWriter
from eventlog.codec import HEADER_FIELDS, default_codec
from tests.avro_strategies import records
from tests.native import require_built

CODEC = default_codec()
PREFIX = "01234567-89ab-8cde-8f01-"
EVENT_TYPES = sorted(schemas.EVENT_TYPES)


@pytest.fixture(autouse=True)
def _built():
    require_built(fastseal.NATIVE, "the C sealer", "eventlog/_seal.c")


def writers(event_type, head=ChainHead(), times=(1_700_000_000_000_000,), **kw):
    """(C sealer, its writer, Python sealer, its writer): two writers from the same head and clock readings."""
    topic = schemas.topic_of(event_type)
    out = []
    for native in (True, False):
        clock = iter(times)
        w = ChainWriter(topic, "run:chain", "run", "prod", head=head, clock=lambda c=clock: next(c), id_prefix=PREFIX)
        out += [w.sealer(event_type, native=native, **kw), w]
    return out


def outcome(seal, *args):
    try:
        return ("event", seal(*args))
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return ("error", type(exc), str(exc))


def payload_fields(event_type):
    return [f["name"] for f in schemas.load(schemas.schema_name(event_type))["fields"][len(HEADER_FIELDS):-1]]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), event_type=st.sampled_from(EVENT_TYPES),
       seq=st.one_of(st.integers(-1, 70_000), st.integers(-1, 1 << 40), st.integers(1 << 44, (1 << 62) - 2)),
       t=st.one_of(st.integers(1_600_000_000_000_000, 1_900_000_000_000_000), st.integers(-(1 << 45), 1 << 45)),
       n_sources=st.integers(0, 4), policy=st.text(max_size=8), given_time=st.booleans())
def test_same_events_as_the_python_sealer_on_every_schema(data, event_type, seq, t, n_sources, policy, given_time):
    full = data.draw(records(schemas.load(schemas.schema_name(event_type))))
    payload = {k: full[k] for k in payload_fields(event_type)}
    head = ChainHead(seq, bytes(range(32)))
    c_seal, c_writer, py_seal, py_writer = writers(event_type, head, (t,), policy_version=policy)
    sources = [bytes([i]) * 32 for i in range(n_sources)]
    args = (payload, sources, t) if given_time else (payload, sources)
    got, want = outcome(c_seal, *args), outcome(py_seal, *args)
    assert got == want
    assert c_writer.head == py_writer.head
    if got[0] == "event":
        assert CODEC.decode(got[1].value)[1]["seq"] == seq + 1


@pytest.mark.parametrize("name,change", [
    ("float64 array", lambda p: {**p, "observation": np.asarray(p["observation"], np.float64)}),
    ("2-d array", lambda p: {**p, "observation": np.zeros((2, 3), np.float32)}),
    ("strided array", lambda p: {**p, "observation": np.arange(12, dtype=np.float32)[::3]}),
    ("big-endian array", lambda p: {**p, "observation": np.arange(4, dtype=">f4")}),
    ("empty array", lambda p: {**p, "observation": np.zeros(0, np.float32)}),
    ("reversed array", lambda p: {**p, "observation": np.arange(6, dtype=np.float32)[::-1]}),
    ("one-element strided array", lambda p: {**p, "observation": np.arange(6, dtype=np.float32)[2:3:2]}),
    ("0-d array", lambda p: {**p, "observation": np.array(1.5, np.float32)}),
    ("float16 array", lambda p: {**p, "observation": np.arange(3, dtype=np.float16)}),
    ("int32 array", lambda p: {**p, "observation": np.arange(3, dtype=np.int32)}),
    ("empty 2-d array", lambda p: {**p, "observation": np.zeros((0, 3), np.float32)}),
    ("array view at an offset", lambda p: {**p, "observation": np.arange(9, dtype=np.float32)[4:]}),
    ("read-only array", lambda p: {**p, "observation": np.frombuffer(np.arange(4, dtype=np.float32).tobytes(),
                                                                         np.float32)}),
    ("array subclass", lambda p: {**p, "observation": np.arange(3, dtype=np.float32).view(np.recarray)}),
    ("numpy scalars in a list", lambda p: {**p, "observation": [np.float32(0.5), np.float32(2.0)]}),
    ("an int among floats", lambda p: {**p, "observation": [0.5, 1]}),
    ("a float too large for float32", lambda p: {**p, "observation": [1e300]}),
    ("numpy int for a long", lambda p: {**p, "episode": np.int64(7)}),
    ("bool for a long", lambda p: {**p, "step": True}),
    ("long out of range", lambda p: {**p, "episode": 1 << 63}),
    ("float for a long", lambda p: {**p, "episode": 1.0}),
    ("missing required field", lambda p: {k: v for k, v in p.items() if k != "step"}),
    ("missing field with default", lambda p: {k: v for k, v in p.items() if k != "action_mask"}),
    ("bytes for a string", lambda p: {**p, "agent_id": b"a0"}),
    ("lone surrogate", lambda p: {**p, "agent_id": "\ud800"}),
    ("str subclass", lambda p: {**p, "agent_id": type("S", (str,), {})("a0")}),
    ("mapping that is not a dict", lambda p: types.MappingProxyType(dict(p))),
    ("None for an array", lambda p: {**p, "action_mask": None}),
    ("numpy bools in a list", lambda p: {**p, "action_mask": [np.bool_(True), np.bool_(False)]}),
    ("tuple for an array", lambda p: {**p, "action_mask": (1, 0, "")}),
])
def test_off_path_input_gives_the_python_sealers_result(name, change):
    base = {"episode": 3, "step": 9, "agent_id": "a0", "observation": np.arange(5, dtype=np.float32),
            "action_mask": [True, False]}
    c_seal, c_writer, py_seal, py_writer = writers("agent.observation", ChainHead(4, bytes(32)), (10, 11))
    payload = change(base)
    got, want = outcome(c_seal, payload, [bytes(32)]), outcome(py_seal, payload, [bytes(32)])
    assert got == want, name
    assert c_writer.head == py_writer.head
    # the clock was read once, whichever path the event took: the next event reads the second value
    assert outcome(c_seal, base) == outcome(py_seal, base)


def test_float_arrays_are_read_through_numpys_fields_only_where_they_match_the_buffer_protocol():
    import numpy

    # numpy from requirements.lock: the direct read is on (a changed numpy layout turns it off)
    assert fastseal.ARRAYS_DIRECT
    try:
        assert fastseal._native.set_ndarray(numpy.ndarray, []) is False  # nothing checked, nothing trusted
        assert fastseal._native.set_ndarray(numpy.ndarray, [numpy.arange(3.0), object()]) is False
        # with the direct read off, the buffer protocol gives the same bytes
        c_seal, _, py_seal, _ = writers("agent.observation")
        payload = {"episode": 1, "step": 2, "agent_id": "a", "observation": numpy.arange(5, dtype=numpy.float32)}
        assert outcome(c_seal, payload) == outcome(py_seal, payload)
    finally:
        fastseal._configure(fastseal._native)
    assert fastseal.ARRAYS_DIRECT


@pytest.mark.parametrize("name,args", [
    ("bytearray sources", ({"episode": 1, "step": 2, "agent_id": "a", "observation": []}, (bytearray(32),))),
    ("short source", ({"episode": 1, "step": 2, "agent_id": "a", "observation": []}, [bytes(31)])),
    ("sources not a list", ({"episode": 1, "step": 2, "agent_id": "a", "observation": []}, iter([bytes(32)]))),
    ("produced_at float", ({"episode": 1, "step": 2, "agent_id": "a", "observation": []}, (), 1.5)),
    ("produced_at out of range", ({"episode": 1, "step": 2, "agent_id": "a", "observation": []}, (), 1 << 63)),
    ("expiry out of range", ({"episode": 1, "step": 2, "agent_id": "a", "observation": []}, (), (1 << 63) - 10)),
])
def test_header_input_off_the_fast_path_gives_the_python_sealers_result(name, args):
    c_seal, c_writer, py_seal, py_writer = writers("agent.observation")
    assert outcome(c_seal, *args) == outcome(py_seal, *args), name
    assert c_writer.head == py_writer.head


def test_sealers_of_one_writer_share_its_head_across_both_paths():
    w = ChainWriter("marl.joint.action", "run:actions", "run", "prod", id_prefix=PREFIX)
    c_seal, py_seal = w.sealer("joint.action", native=True), w.sealer("joint.action", native=False)
    payload = {"episode": 0, "step": 0, "actions": [], "joint_vector": [0.5]}
    events = [(c_seal if i % 3 else py_seal)(payload) for i in range(7)]
    assert [e.seq for e in events] == list(range(7))
    for prev, e in zip(events, events[1:]):
        assert e.value[10:42] == prev.event_hash
    assert w.head == ChainHead(6, events[-1].event_hash)
    w.head = ChainHead(99, bytes(32))  # the writer's head setter moves every sealer
    assert c_seal(payload).seq == 100 and py_seal(payload).seq == 101


def test_wall_clock_reading_is_in_microseconds_now():
    import time

    c_seal, _, _, _ = writers("agent.observation")
    w = ChainWriter("marl.agent.observation", "run:obs", "run", "prod")  # the default clock
    seal = w.sealer("agent.observation")
    before = time.time_ns() // 1000
    event = seal({"episode": 1, "step": 2, "agent_id": "a", "observation": []})
    after = time.time_ns() // 1000
    assert before <= CODEC.decode(event.value)[1]["produced_at"] <= after


def test_the_harness_payloads_take_the_c_path(monkeypatch):
    handed_back = []
    real = fastseal.Sealer

    def counting(head, python_seal, *rest):
        def reference(*args):
            handed_back.append(args)
            return python_seal(*args)
        return real(head, reference, *rest)

    monkeypatch.setattr(fastseal, "Sealer", counting)
    vec = np.arange(9, dtype=np.float32)
    cases = {
        "env.state": {"episode": 0, "step": 1, "state": vec, "collapsed_state": vec[:4].copy(),
                      "flags": ["label:malicious"],
                      "protected_fields": [{"namespace": "user", "field": "user_id", "subject_ref": bytes(32),
                                            "ciphertext": b"\x01" * 40}]},
        "agent.observation": {"episode": 0, "step": 1, "agent_id": "get", "observation": vec, "action_mask": [1, 0]},
        "joint.action": {"episode": 0, "step": 1, "joint_vector": [1.0, 2.0],
                         "actions": [{"agent_id": "get", "discrete": 1, "log_prob": -1.1, "reward": 0.5,
                                      "terminated": np.bool_(False), "truncated": False}]},
    }
    for event_type, payload in cases.items():
        seal, w, py_seal, _ = writers(event_type, times=(5, 6))
        assert seal(payload, [bytes(32)]) == py_seal(payload, [bytes(32)])
    assert handed_back == []
    seal, _, _, _ = writers("agent.observation")
    seal({"episode": 0, "step": 1, "agent_id": "a", "observation": vec.astype(np.float64)})
    assert len(handed_back) == 1  # and an array of another dtype is handed back


class FlakySink:
    """Refuses the third event it is given (as a full producer queue would), keeps the rest."""

    def __init__(self):
        self.sent, self.calls = [], 0

    def send(self, topic, key, value):
        self.calls += 1
        if self.calls == 3:
            raise BufferError("queue full")
        self.sent.append((topic, key, value))


def test_c_delivery_sends_and_checkpoints_as_the_python_appender():
    from eventlog.checkpoint import Signer
    from eventlog.kafka import Record
    from eventlog.log import EventLog
    from eventlog.verify import verify_records

    runs = []
    for native in (True, False):
        ticks = iter(range(1_000, 2_000))
        sink = FlakySink()
        log = EventLog(sink, run_id="r", producer_id="p", signer=Signer.from_seed(b"fastseal"), checkpoint_every=3,
                       clock=lambda: next(ticks), id_prefixes=lambda: PREFIX)
        w = log.writer("marl.joint.action", "r:actions")
        append = log._deliver(w, w.sealer("joint.action", native=native))
        assert (type(append).__name__ == "Sealer") == native
        outcomes = []
        for step in range(8):
            try:
                outcomes.append(append({"episode": 0, "step": step, "actions": [], "joint_vector": []}).seq)
            except BufferError:
                outcomes.append("refused")
        log.close()
        runs.append((outcomes, sink.sent))
    assert runs[0] == runs[1]
    outcomes, sent = runs[0]
    # the refused event never happened: the head went back, the next event took its seq, and every
    # checkpoint covers exactly the events sent
    assert outcomes == [0, 1, "refused", 2, 3, 4, 5, 6]
    checkpoints = [CODEC.decode(v)[1] for t, _, v in sent if t == "marl.audit.checkpoints"]
    assert [(c["first_seq"], c["last_seq"]) for c in checkpoints] == [(0, 2), (3, 5), (6, 6)]
    report = verify_records([Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sent)],
                            Signer.from_seed(b"fastseal").public_key)
    assert report.ok, [b.describe() for b in report.breaks]


def test_keyword_and_wrong_arity_calls_behave_as_the_python_sealer():
    c_seal, c_writer, py_seal, py_writer = writers("agent.observation", times=(7, 8))
    payload = {"episode": 1, "step": 2, "agent_id": "a", "observation": [0.5]}
    assert c_seal(payload=payload, source_event_hashes=[bytes(32)]) == \
        py_seal(payload=payload, source_event_hashes=[bytes(32)])
    assert c_seal(payload, produced_at=99) == py_seal(payload, produced_at=99)
    for args in ((), (payload, (), None, "extra")):
        with pytest.raises(TypeError):
            c_seal(*args)
        with pytest.raises(TypeError):
            py_seal(*args)
    assert c_writer.head == py_writer.head


def test_an_interrupted_send_leaves_the_head_moved_on_both_paths():
    """An interrupt may come after the sink queued the event: the head stays (a gap the verifier
    reports), never goes back (which would write the seq twice)."""
    from eventlog.log import EventLog

    class Interrupted:
        def send(self, topic, key, value):
            raise KeyboardInterrupt

    heads = []
    for native in (True, False):
        log = EventLog(Interrupted(), run_id="r", producer_id="p")
        w = log.writer("marl.joint.action", "r:actions")
        append = log._deliver(w, w.sealer("joint.action", native=native))
        with pytest.raises(KeyboardInterrupt):
            append({"episode": 0, "step": 0, "actions": [], "joint_vector": []})
        heads.append(w.head.seq)
    assert heads == [0, 0]


def test_a_chain_ends_where_the_event_id_cannot_hold_the_seq():
    """An event id's last 12 hex digits are its seq: seq 2**48 - 1 is the chain's last event, on both
    paths, and the next one is refused (the head stays) rather than written with a malformed id."""
    payload = {"episode": 1, "step": 2, "agent_id": "a", "observation": np.arange(3, dtype=np.float32)}
    c_seal, c_writer, py_seal, py_writer = writers("agent.observation", ChainHead((1 << 48) - 2, bytes(32)), (5, 6))
    got, want = outcome(c_seal, payload), outcome(py_seal, payload)
    assert got == want and got[0] == "event"
    decoded = CODEC.decode(got[1].value)[1]
    assert decoded["seq"] == (1 << 48) - 1 and decoded["event_id"].endswith("-ffffffffffff")
    last = c_writer.head
    for seal, writer in ((c_seal, c_writer), (py_seal, py_writer)):
        with pytest.raises(ValueError, match="is full: an event id holds 48 bits of seq"):
            seal(payload)
        assert writer.head == last

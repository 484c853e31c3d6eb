"""The producer's fast paths give the same bytes as the reference encodings: precomputed sealers and
appenders (eventlog/chain.py, eventlog/log.py), the compiled encoders' table varints, ``into`` form
and array packing (eventlog/avro_encoder.py), batched subject keys (eventlog/privacy.py) and the
harness's batched sealing (producers/harness.py)."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import producers.harness as harness
from eventlog.avro_encoder import _uvarint, compile_encoder, long_bytes
from eventlog.chain import CLASSIFICATIONS, RETENTION_DAYS, ChainHead, ChainWriter
from eventlog.checkpoint import Signer
from eventlog.codec import HEADER_FIELDS, default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.privacy import FieldProtector, LocalKeyStore, PrivacyError
from eventlog.verify import verify_records
from producers.envs import mailbox_v0
from producers.policies import RandomPolicy

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
    """The event through fastavro's generic writer (no code shared with the chain writer)."""
    return CODEC.encode_with_fastavro(name, {**header, **payload, "event_hash": event_hash})


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
            assert CODEC.encode_with_fastavro("env_state", CODEC.decode(e.value)[1]) == e.value
            assert h["retention_expiry"] - h["produced_at"] == RETENTION_DAYS[h["data_classification"]] * DAY


@pytest.mark.parametrize("n", [0, 1, 8191, 8192, 16383, 16384, (1 << 20) + 3, (1 << 27) - 1, 1 << 27, (1 << 28) + 5,
                               (1 << 41) - 1, 1 << 41, 1 << 48, 1 << 54, (1 << 62) + 1])
def test_long_bytes_at_varint_size_edges(n):
    for v in (n, -n, -n - 1):
        z = ((v << 1) ^ (v >> 63)) & 0xFFFFFFFFFFFFFFFF
        assert long_bytes(v) == _uvarint(z)


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
def test_compiled_encoder_and_its_into_form_match_fastavro(actions, joint, step):
    payload = {"episode": 1, "step": step, "actions": actions, "joint_vector": joint}
    enc = CODEC._payload_encoders["joint_action"]
    parts = [b"head"]
    enc.into(payload, parts)
    assert b"".join(parts) == b"head" + enc(payload)
    value = ChainWriter("marl.joint.action", "c", "r", "p").sealer("joint.action")(payload).value
    name, rec = CODEC.decode(value)
    assert CODEC.encode_with_fastavro(name, rec) == value
    assert rec["step"] == step and [a["discrete"] for a in rec["actions"]] == [a["discrete"] for a in actions]


def test_float_arrays_any_layout_encode_as_their_float_list():
    schema = {"type": "record", "name": "R", "fields": [{"name": "f", "type": {"type": "array", "items": "float"}},
                                                        {"name": "d", "type": {"type": "array", "items": "double"}}]}
    enc = compile_encoder(schema)
    base = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    for arr in (base.ravel(), base[:, 1], base.astype(np.float32).ravel(), base.astype(">f4").ravel(),
                base.astype(np.float32)[::2, ::2].ravel(), base.astype(">f8")[:, 0]):
        assert enc({"f": arr, "d": arr}) == enc({"f": [float(x) for x in arr], "d": [float(x) for x in arr]})


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


LAST_SINK: list[MemorySink] = []  # the sink of the last harness_run, also when it raised


def harness_run(env_factory, monkeypatch, batch, checkpoint_every=10_000, protector=None, episodes=2,
                micros=1 << 60):
    """A run with a deterministic clock (1013 µs a reading) sealing every ``batch`` steps or ``micros``."""
    monkeypatch.setattr(harness, "SEAL_BATCH_STEPS", batch)
    monkeypatch.setattr(harness, "SEAL_BATCH_MICROS", micros)
    sink = MemorySink()
    LAST_SINK[:] = [sink]
    log = deterministic_log(sink, checkpoint_every)
    env = env_factory()
    summary = harness.run_episodes(env, RandomPolicy(env, seed=4), log, episodes=episodes, seed=7, env_id="e",
                                   env_version="0", config={}, protector=protector)
    log.close()
    return sink, summary


class NamesNoSubject:
    """An env with ``subject_fields`` that names no one: the harness seals its steps in batches, as
    for any env with personal data, and writes ``protected_fields`` empty (the schema's default)."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def subject_fields(self, agent):
        return []


def test_harness_batches_give_the_bytes_of_sealing_each_step(monkeypatch, tmp_path):
    from mpe2 import simple_spread_v3

    def env():
        return simple_spread_v3.parallel_env(N=3, max_cycles=20, local_ratio=0.5)

    def deferred():
        return NamesNoSubject(env())
    keys = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    now, s0 = harness_run(env, monkeypatch, 7)  # no personal data: each event sealed as it happens
    one, s1 = harness_run(deferred, monkeypatch, 1, protector=FieldProtector(keys))
    many, s2 = harness_run(deferred, monkeypatch, 7, protector=FieldProtector(keys))
    timed, _ = harness_run(deferred, monkeypatch, 64, micros=12_000, protector=FieldProtector(keys))  # ~2 steps
    keys.close()
    assert s0.events == s1.events == s2.events == 1 + 2 * 20 * 5 + 1
    assert len(one.sent) == s1.events + 6  # a checkpoint per chain: lifecycle, env, 3 obs, actions
    assert now.sent == one.sent == many.sent == timed.sent
    for _, _, value in many.sent:  # each value is the canonical Avro of its record
        name, rec = CODEC.decode(value)
        assert CODEC.encode_with_fastavro(name, rec) == value


def test_harness_batches_protect_with_the_right_seq(tmp_path, monkeypatch):
    keys = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    protector = FieldProtector(keys)
    sink, summary = harness_run(mailbox_v0.parallel_env, monkeypatch, 6, checkpoint_every=5,
                                protector=protector, episodes=3)
    assert summary.steps == 60
    revealed = 0
    for _, chain, value in sink.sent:
        rec = CODEC.decode(value)[1]
        for field in rec.get("protected_fields", []):
            assert protector.reveal(chain, rec["seq"], field)  # AAD binds chain and seq: wrong seq fails
            revealed += 1
    assert revealed == 60 * 8
    report = verify_records([Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)], SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    keys.close()


def test_subject_keys_batch_matches_single_lookups_and_survives_reopen(tmp_path):
    store = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    known = store.subject_key("user", "u0")
    subjects = [("user", f"u{i}") for i in range(1200)] + [("sender", "u0"), ("user", "u5")]
    keys = store.subject_keys(subjects)
    assert keys[0] == known and keys[5] == keys[-1] and keys[1200] != known
    assert len(set(keys[:1201])) == 1201
    store.close()
    again = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    assert [again.subject_key(ns, raw, create=False) for ns, raw in subjects] == keys
    assert again.subjects() == 1201
    again.close()


def test_failed_step_still_seals_what_was_captured():
    from mpe2 import simple_spread_v3

    class BreaksAtStep3(RandomPolicy):
        calls = 0

        def act(self, observations, state=None):
            self.calls += 1
            return {} if self.calls == 4 else super().act(observations, state)

    env = simple_spread_v3.parallel_env(N=3, max_cycles=10, local_ratio=0.5)
    sink = MemorySink()
    log = EventLog(sink, run_id="r", producer_id="p")
    with pytest.raises(harness.HarnessError, match="gave no action"):
        harness.run_episodes(env, BreaksAtStep3(env, seed=0), log, episodes=1, seed=0, env_id="x", env_version="0",
                             config={})
    types = [CODEC.decode(v)[1]["event_type"] for _, _, v in sink.sent]
    step = ["env.state"] + ["agent.observation"] * 3
    assert types == ["run.started"] + (step + ["joint.action"]) * 3 + step + ["run.finished"]


class FailingKeys:
    """A key provider (no batch method) that cannot create more than ``limit`` subjects."""

    def __init__(self, store, limit):
        self.store, self.created, self.limit = store, 0, limit

    def subject_key(self, namespace, raw_id, *, create=True):
        key = self.store.subject_key(namespace, raw_id, create=False)
        if key is None:
            if self.created == self.limit:
                raise PrivacyError("key store unavailable")
            self.created += 1
            key = self.store.subject_key(namespace, raw_id)
        return key

    def key_for_ref(self, namespace, subject_ref):
        return self.store.key_for_ref(namespace, subject_ref)

    def shred(self, namespace, raw_id):
        return self.store.shred(namespace, raw_id)


@pytest.mark.parametrize("limit", [6, 7, 9])
def test_key_failure_in_a_batch_seals_what_came_before_it(tmp_path, monkeypatch, limit):
    """As when each step was sealed at once: the events before the failing one are written, then
    run.finished (failed); batches of 1 (each step at once) and of 8 steps write the same events."""
    runs = []
    for batch in (1, 8):
        store = LocalKeyStore(tmp_path / f"k{batch}.db", key=bytes(32))
        with pytest.raises(PrivacyError, match="unavailable"):
            harness_run(mailbox_v0.parallel_env, monkeypatch, batch,
                        protector=FieldProtector(FailingKeys(store, limit)))
        runs.append([(k, CODEC.decode(v)[1]["event_type"]) for _, k, v in LAST_SINK[0].sent])
        store.close()
    assert runs[0] == runs[1]
    assert runs[0][-1] == ("r:lifecycle", "run.finished") and ("r:actions", "joint.action") in runs[0]
    finished = CODEC.decode(LAST_SINK[0].sent[-1][2])[1]
    assert (finished["status"], finished["reason"]) == ("failed", "PrivacyError")

"""Fuzzing of every boundary that reads outside input (issue 19): topic bytes, bundle files,
telemetry JSON, signed checkpoints, manifests, model files, key files and config.

Each property feeds random bytes and structured mutations of VALID inputs (flipped and inserted
bytes, truncation, huge varints, another schema's fingerprint, wrong JSON types, huge numbers, NaN,
deep nesting) and asserts: the correct result, or the boundary's documented error type with a message
that names what failed (never a bare KeyError/IndexError/struct.error/UnicodeDecodeError/
RecursionError from deep inside), and no hang (a per-example deadline and a per-test timeout). Bytes
on a topic that a stream processor cannot use become a dead letter that says why.

Reproducible: derandomized, no example database (nothing is written under .hypothesis).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventlog.bundle import BundleError, read_bundle, read_manifest, write_bundle
from eventlog.checkpoint import (ONNX_POLICY_KIND, KeyFileError, SignedFileError, Signer, load_public_key,
                                 public_key_pem, sign_file, signature_path)
from eventlog.codec import MAGIC, PREFIX_LEN, DecodeError, default_codec
from eventlog.hashing import seal, seq_and_chain
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.verify import CHECKPOINT_TOPIC, TrustedState, TrustedStateError, verify_records
from tests.synthetic import synthetic_run

# MARLGRC_FUZZ_EXAMPLES=N runs N examples per property; MARLGRC_FUZZ_RANDOM=1 draws new ones each run
# (a longer hunt by hand); CI runs the fixed, derandomized set.
_EXAMPLES = int(os.environ.get("MARLGRC_FUZZ_EXAMPLES", "100"))
pytestmark = pytest.mark.timeout(max(120, 3 * _EXAMPLES))  # a hang fails the test, it never blocks the suite
FUZZ = settings(max_examples=_EXAMPLES, deadline=timedelta(seconds=10),
                derandomize=not os.environ.get("MARLGRC_FUZZ_RANDOM"), database=None,
                print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SLOW = settings(FUZZ, max_examples=max(1, _EXAMPLES * 2 // 5))

CODEC = default_codec()
SIGNER = Signer.from_seed(b"fuzz-signer")
DEEP = 50_000  # nesting depth past Python's recursion limit


def _stream(episodes: int = 1, steps: int = 6, checkpoint_every: int = 8) -> list[Record]:
    sink = MemorySink()
    log = EventLog(sink, run_id="fz", producer_id="p", signer=SIGNER, checkpoint_every=checkpoint_every)
    synthetic_run(log, episodes=episodes, steps=steps, agents=2, obs_dim=3)
    log.close()
    offsets: dict[str, int] = {}
    out = []
    for topic, key, value in sink.sent:
        offsets[topic] = offsets.get(topic, -1) + 1
        out.append(Record(topic, 0, offsets[topic], key, value, 0))
    return out


STREAM = _stream()
LONG_STREAM = _stream(episodes=2, steps=9, checkpoint_every=3)  # several checkpoints per chain
VALUES = [r.value for r in STREAM]
FINGERPRINTS = sorted({bytes(v[2:PREFIX_LEN]) for v in VALUES} | {CODEC.fingerprint(n) for n in CODEC.names})
BIG_VARINTS = [b"\xff" * 9 + b"\x01", b"\xfe\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
               b"\x01", b"\x7f", b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01"]


# --------------------------------------------------------------------------- strategies


@st.composite
def mutated(draw, valid: bytes, max_ops: int = 3) -> bytes:
    """``valid`` after 1..max_ops of: flip, truncate, insert, delete, overwrite, a huge varint
    (lengths and block counts), another schema's fingerprint."""
    b = bytearray(valid)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "varint", "fingerprint"]))
        i = draw(st.integers(0, len(b)))
        if op == "flip" and b:
            j = min(i, len(b) - 1)
            b[j] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del b[i:]
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[i:i + draw(st.integers(1, 16))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            b[i:i + len(chunk)] = chunk
        elif op == "varint":
            b[i:i + draw(st.integers(0, 2))] = draw(st.sampled_from(BIG_VARINTS))
        elif op == "fingerprint" and len(b) >= PREFIX_LEN:
            b[2:PREFIX_LEN] = draw(st.sampled_from(FINGERPRINTS))
    return bytes(b)


@st.composite
def event_values(draw) -> bytes:
    """Bytes as a topic may carry them: random, a valid marker and fingerprint before random bytes,
    a mutated valid event, one mutated and then re-sealed (its event_hash right again), or one with
    fields at the edges of their types, re-encoded and re-sealed."""
    kind = draw(st.sampled_from(["random", "prefixed", "mutated", "resealed", "fields"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "prefixed":
        return MAGIC + draw(st.sampled_from(FINGERPRINTS)) + draw(st.binary(max_size=200))
    if kind == "fields":
        return draw(field_mutated_events())
    valid = draw(st.sampled_from(VALUES))
    if kind == "mutated":
        return draw(mutated(valid))
    body = draw(mutated(valid[:-32]))
    return seal(body + bytes(32))


def _extreme(draw, v):
    """A value of ``v``'s type (as fastavro reads it) at an edge: NaN, infinities, the largest longs,
    empty or long strings and lists, or one element of a list or dict changed so."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return draw(st.sampled_from([-(1 << 63), (1 << 63) - 1, -1, 0, 1 << 31, v + 1]))
    if isinstance(v, float):
        return draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]))
    if isinstance(v, str):
        return draw(st.one_of(st.sampled_from(["", "x" * 300, "\u00e9\U0001f600", "a:b:c"]), st.text(max_size=20)))
    if isinstance(v, bytes):
        return draw(st.one_of(st.binary(min_size=len(v), max_size=len(v)), st.binary(max_size=40)))
    if isinstance(v, list):
        op = draw(st.sampled_from(["empty", "grow", "one"] if v else ["empty"]))
        if op == "empty":
            return []
        if op == "grow":
            return v * draw(st.integers(2, 50))
        i = draw(st.integers(0, len(v) - 1))
        return v[:i] + [_extreme(draw, v[i])] + v[i + 1:]
    if isinstance(v, dict) and v:
        k = draw(st.sampled_from(sorted(v)))
        return {**v, k: _extreme(draw, v[k])}
    return v


@st.composite
def field_mutated_events(draw, value: bytes | None = None) -> bytes:
    """A valid event (``value``, else one of the stream's) with 1..2 fields set to an edge of their
    type, re-encoded under its schema and re-sealed: well-formed, correctly hashed events that say
    odd things."""
    from hypothesis import assume

    from eventlog.codec import EncodeError

    value = draw(st.sampled_from(VALUES)) if value is None else value
    name, rec = CODEC.decode(value)
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.sampled_from(sorted(rec)))
        rec = {**rec, k: _extreme(draw, rec[k])}
    try:
        encoded = CODEC.encode(name, rec)
    except EncodeError:
        assume(False)
    return seal(encoded[:-32] + bytes(32))


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 64]),
                        st.floats(), st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda c: st.one_of(st.lists(c, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)
_DEEP_MARK = "\x00deep\x00"


@st.composite
def json_text(draw, valid: dict) -> str:
    """``valid`` as JSON text after 1..3 mutations: a field of the wrong type (huge numbers, NaN and
    infinities included), a field removed, an unknown field, a field nested past the reader's limit;
    or the text itself truncated, or not an object at all."""
    obj = dict(valid)
    keys = sorted(obj)
    deep = False
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["wrong_type", "remove", "extra", "deep", "not_object", "truncate"]))
        if op == "wrong_type" and keys:
            obj[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
        elif op == "remove" and keys:
            obj.pop(draw(st.sampled_from(keys)), None)
        elif op == "extra":
            obj[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        elif op == "deep" and keys:
            obj[draw(st.sampled_from(keys))] = _DEEP_MARK
            deep = True
        elif op == "not_object":
            return json.dumps(draw(JSON_VALUES))
        elif op == "truncate":
            text = json.dumps(obj)
            return text[:draw(st.integers(0, max(0, len(text) - 1)))]
    text = json.dumps(obj)
    if deep:
        text = text.replace(json.dumps(_DEEP_MARK), "[" * DEEP + "]" * DEEP)
    return text


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


# --------------------------------------------------------------------------- topic bytes


@FUZZ
@given(value=event_values())
def test_codec_decodes_or_names_why_not(value):
    try:
        name, rec = CODEC.decode(value)
    except DecodeError as exc:
        assert exc.kind in {"not_single_object", "unknown_fingerprint", "truncated", "malformed"}
        assert exc.reason and str(exc).startswith(exc.kind + ": ")
    else:
        assert name in CODEC.names and isinstance(rec, dict) and "event_type" in rec
    try:
        seq, chain = seq_and_chain(value)
    except ValueError as exc:  # UnicodeDecodeError is one
        assert str(exc)
    else:
        assert isinstance(seq, int) and isinstance(chain, str)


def _processor():
    from stream_processors.processor import Processor

    p = Processor(max_pending=None, max_states=None)
    started = next(r for r in STREAM if r.topic == "marl.run.lifecycle")
    assert p.feed(started.topic, 0, 0, started.key, started.value) == []
    return p


PROCESSOR_TOPICS = ["marl.run.lifecycle", "marl.env.state", "marl.joint.action", "marl.other"]


@FUZZ
@given(value=event_values(), topic=st.sampled_from(PROCESSOR_TOPICS), key=st.one_of(st.none(), st.binary(max_size=20)))
def test_processor_dead_letters_what_it_cannot_use_with_its_reason(value, topic, key):
    from hashlib import sha256

    p = _processor()
    out = p.feed(topic, 0, 7, key, value)
    assert isinstance(out, list)
    try:
        name = CODEC.decode(value)[0]
    except DecodeError:
        name = None
    usable = name is not None and sha256(value[:-32]).digest() == value[-32:]
    letters = [ev for ev in out if ev.event_type == "dead.letter"]
    if not usable:
        assert len(out) == 1 and len(letters) == 1, out
    for ev in letters:
        _, rec = CODEC.decode(ev.value)
        assert rec["error_kind"] and rec["reason"], rec
        assert rec["payload"] == value and rec["source_offset"] == 7 and rec["source_topic"] == topic
    p.finish()  # what waits for a join is dead-lettered, never a crash


RUN_TOPICS = ("marl.run.lifecycle", "marl.env.state", "marl.joint.action")


@FUZZ
@given(data=st.data())
def test_processor_over_a_run_with_odd_but_sealed_events(data):
    """A whole run through the decision interpreter with 1..3 of its events replaced by the same
    event with fields at the edges of their types (re-sealed): what it cannot score is a dead letter
    with its reason; nothing raises, at feed or at finish."""
    from stream_processors.processor import Processor

    recs = [r for r in STREAM if r.topic in RUN_TOPICS]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(recs) - 1))
        recs[i] = recs[i]._replace(value=data.draw(field_mutated_events(recs[i].value)))
    p = Processor(max_pending=None, max_states=None)
    out = []
    for r in recs:
        out += p.feed(r.topic, r.partition, r.offset, r.key, r.value)
    out += p.finish()
    for ev in out:
        _, rec = CODEC.decode(ev.value)
        if ev.event_type == "dead.letter":
            assert rec["error_kind"] and rec["reason"], rec
    if recs == [r for r in STREAM if r.topic in RUN_TOPICS]:
        assert not any(ev.event_type == "dead.letter" for ev in out)


@FUZZ
@given(data=st.data())
def test_ledger_batch_check_finds_instead_of_crashing(data):
    from ledger.ingest import check_batch

    recs = [(r.topic, r.partition, r.offset, r.key, r.value) for r in STREAM]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(recs) - 1))
        t, p, o, k, _ = recs[i]
        recs[i] = (t, p, o, k, data.draw(event_values()))
    batch = check_batch(recs, {})
    assert batch.records == len(recs)


@st.composite
def damaged_streams(draw, base: list[Record] | None = None) -> tuple[list[Record], bool]:
    """The signed stream (``base``, else ``STREAM``) after 1..3 of: a value mutated (or mutated and
    re-sealed), a record's key changed, a record dropped, duplicated or moved, random bytes on the
    checkpoint topic. Returns (records, whether anything changed)."""
    base = STREAM if base is None else base
    recs = list(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["value", "key", "drop", "duplicate", "move", "junk_checkpoint"]))
        i = draw(st.integers(0, len(recs) - 1))
        if op == "value":
            recs[i] = recs[i]._replace(value=draw(event_values()))
        elif op == "key":
            recs[i] = recs[i]._replace(key=draw(st.sampled_from(sorted({r.key for r in base}) + ["", "x:y"])))
        elif op == "drop" and len(recs) > 1:
            del recs[i]
        elif op == "duplicate":
            recs.insert(draw(st.integers(0, len(recs))), recs[i])
        elif op == "move":
            recs.insert(draw(st.integers(0, len(recs))), recs.pop(i))
        elif op == "junk_checkpoint":
            recs.insert(i, Record(CHECKPOINT_TOPIC, 0, 10_000 + i, draw(st.text(max_size=10)),
                                  draw(event_values()), 0))
    return recs, recs != base


@FUZZ
@given(data=st.data())
def test_verifier_reports_every_damage_and_never_crashes(data):
    """Through both ways of feeding: records as Kafka interleaves them (``feed``), and chain after
    chain as a bundle stores them (``feed_runs``)."""
    from eventlog.verify import Verifier

    base = data.draw(st.sampled_from([STREAM, LONG_STREAM]))
    recs, changed = data.draw(damaged_streams(base))
    same_per_chain = sorted((r.topic, r.key, r.value) for r in recs) == sorted((r.topic, r.key, r.value) for r in base)
    report = verify_records(recs, SIGNER.public_key)
    v = Verifier(SIGNER.public_key)
    v.add_checkpoints([r for r in recs if r.topic == CHECKPOINT_TOPIC])
    v.feed_runs(sorted((r for r in recs if r.topic != CHECKPOINT_TOPIC), key=lambda r: (r.topic, r.key)))
    by_chain = v.finish()
    for rep in (report, by_chain):
        json.loads(rep.to_json())
        for b in rep.breaks:
            assert b.describe()
        if changed and not same_per_chain:
            assert not rep.ok, "a damaged signed stream verified"


@pytest.mark.parametrize("first_seq", [-1, -(1 << 63)])
def test_a_checkpoint_whose_range_cannot_have_been_signed_is_a_bad_signature(first_seq):
    """A sealed checkpoint event with a seq below 0 (Avro longs are signed; the signed statement
    packs seqs as u64) was never signed: a bad_signature break, not a struct.error."""
    from eventlog.verify import BreakKind

    i = next(i for i, r in enumerate(STREAM) if r.topic == CHECKPOINT_TOPIC)
    name, rec = CODEC.decode(STREAM[i].value)
    forged = CODEC.encode(name, {**rec, "first_seq": first_seq})
    recs = list(STREAM)
    recs[i] = recs[i]._replace(value=seal(forged[:-32] + bytes(32)))
    report = verify_records(recs, SIGNER.public_key)
    assert not report.ok
    assert BreakKind.BAD_SIGNATURE in {b.kind for b in report.breaks}, [b.describe() for b in report.breaks]


def test_a_checkpoint_copied_under_another_key_is_a_break_not_a_key_error():
    """Found by the fuzzer: a second statement for the checkpoint chain, on a record under a key no
    record was read under yet, made ``_install_checkpoints`` look up a chain that did not exist."""
    from eventlog.checkpoint import CheckpointStatement

    cps = [r for r in STREAM if r.topic == CHECKPOINT_TOPIC]
    own = next(r for r in reversed(cps)
               if CheckpointStatement.from_record(CODEC.decode(r.value)[1]).topic == CHECKPOINT_TOPIC)
    report = verify_records(list(STREAM) + [own._replace(key="fz:elsewhere", offset=999)], SIGNER.public_key)
    assert not report.ok
    assert any(b.chain_id == "fz:elsewhere" for b in report.breaks), [b.describe() for b in report.breaks]


# --------------------------------------------------------------------------- trusted state, bundles, manifests


VALID_TRUSTED = {"chains": [{"topic": "marl.joint.action", "chain_id": "fz:actions", "last_seq": 3,
                             "head_event_hash": "ab" * 32}]}


@FUZZ
@given(text=st.one_of(json_text(VALID_TRUSTED), json_text(VALID_TRUSTED["chains"][0]).map(
    lambda t: '{"chains": [' + t + "]}"), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))))
def test_trusted_state_loads_or_says_what_is_wrong(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trusted.json"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            state = TrustedState.load(path)
        except TrustedStateError as exc:
            assert str(path) in str(exc) and "--trusted" in str(exc)
        else:
            assert all(len(h) == 32 and s >= 0 for s, h in state.heads.values())


@pytest.fixture(scope="module")
def sealed_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzbundle") / "b"
    write_bundle(folder, STREAM, public_key_pem=public_key_pem(SIGNER.public_key), signer=SIGNER, meta={"run_id": "fz"})
    return folder


@SLOW
@given(data=st.data())
def test_damaged_bundle_is_a_break_or_a_bundle_error(sealed_bundle, data):
    from eventlog.audit import verify_bundle

    part = data.draw(st.sampled_from(["events", "manifest", "public_key", "remove"]))
    with tempfile.TemporaryDirectory() as d:
        b = Path(d) / "b"
        shutil.copytree(sealed_bundle, b)
        if part == "events":
            raw = (b / "events.avro").read_bytes()
            (b / "events.avro").write_bytes(data.draw(st.one_of(mutated(raw, max_ops=2), st.binary(max_size=300))))
        elif part == "manifest":
            manifest = json.loads((b / "manifest.json").read_text())
            (b / "manifest.json").write_text(data.draw(json_text(manifest)))
        elif part == "public_key":
            pem = (b / "public_key.pem").read_bytes()
            (b / "public_key.pem").write_bytes(data.draw(st.one_of(mutated(pem), st.binary(max_size=100))))
        else:
            (b / data.draw(st.sampled_from(["events.avro", "manifest.json", "public_key.pem"]))).unlink()
        changed = any((b / f).exists() != (sealed_bundle / f).exists() or (
            (b / f).exists() and (b / f).read_bytes() != (sealed_bundle / f).read_bytes())
                      for f in ("events.avro", "manifest.json"))
        try:
            report, _ = verify_bundle(b, public_key=SIGNER.public_key, pinned=True)
        except BundleError as exc:
            assert str(b) in str(exc) or "manifest" in str(exc) or "events.avro" in str(exc), str(exc)
        else:
            if changed:
                assert not report.ok
            json.loads(report.to_json())
        try:
            manifest = read_manifest(b)
        except BundleError as exc:
            assert "manifest" in str(exc)
        else:
            assert isinstance(manifest, dict)
        try:
            assert all(isinstance(r.value, bytes) for r in read_bundle(b))
        except BundleError as exc:
            assert "events.avro" in str(exc)
        # a learner reads a bundle too, trusting the bundle's own key unless given one
        from learners.replay import ReplayError, read_bundle_run

        try:
            replay = read_bundle_run(b)
        except (BundleError, ReplayError, KeyFileError) as exc:
            assert str(exc)
        else:
            assert replay.spec.run_id == "fz"


# --------------------------------------------------------------------------- telemetry JSON


VALID_TELEMETRY = {"episode_id": 1, "step": 0, "is_malicious": False, "severity": 0.5, "syscall_count": 10,
                   "file_read_count": 3, "file_write_count": 1, "network_connections": 2, "bytes_sent": 100,
                   "bytes_received": 50, "child_processes": 1, "cpu_usage": 12.5, "memory_usage": 256.0,
                   "registry_modification": False, "privilege_escalation_attempt": False,
                   "code_injection_detected": False}


def _telemetry_lines():
    good = json.dumps(VALID_TELEMETRY)
    return st.lists(st.one_of(st.just(good.encode()), json_text(VALID_TELEMETRY).map(str.encode),
                              mutated(good.encode()), st.binary(max_size=80)), min_size=1, max_size=6)


@FUZZ
@given(lines=_telemetry_lines())
def test_recorded_telemetry_is_valid_or_a_dead_letter_with_its_line_and_reason(lines):
    from producers.telemetry import (DUPLICATE_STEP, FEATURE_DIM, INVALID_JSON, INVALID_TELEMETRY, LABEL_CHANGED,
                                     NOT_UTF8, dead_letter_payload, normalize, parse_telemetry_lines)

    parsed = parse_telemetry_lines(lines)
    assert parsed.lines == len(lines)
    for bad in parsed.bad:
        assert bad.kind in {NOT_UTF8, INVALID_JSON, INVALID_TELEMETRY, DUPLICATE_STEP, LABEL_CHANGED}
        assert bad.reason.startswith(f"line {bad.line}: ") and len(bad.reason) > len(f"line {bad.line}: ")
        assert dead_letter_payload(bad, "f.jsonl", "c")["reason"] == bad.reason
    for _, rec in parsed.records:
        t = normalize(rec.as_json())
        assert t.vector.shape == (FEATURE_DIM,) and np.isfinite(t.vector).all()


@FUZZ
@given(record=st.one_of(JSON_VALUES, json_text(VALID_TELEMETRY).map(_json_or_none)))
def test_live_telemetry_normalizes_any_json_value(record):
    from producers.telemetry import FEATURE_DIM, normalize

    try:
        t = normalize(record)
    except RecursionError:
        pytest.fail("normalize recursed")
    assert t.vector.shape == (FEATURE_DIM,) and np.isfinite(t.vector).all()
    assert ((t.vector >= 0) & (t.vector <= 1)).all()


@FUZZ
@given(text=st.one_of(json_text(VALID_TELEMETRY), st.lists(json_text(VALID_TELEMETRY), max_size=3).map("\n".join),
                      st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
def test_telemetry_file_loads_as_records(text):
    from producers.telemetry import load_records, normalize

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.json"
        path.write_text(text, encoding="utf-8")
        recs = load_records(path)
    assert isinstance(recs, list)
    for r in recs:
        assert np.isfinite(normalize(r).vector).all()
    from producers.telemetry import ingest_telemetry

    summary = ingest_telemetry(recs, EventLog(MemorySink(), run_id="tl", producer_id="p"), source="t.json")
    assert summary.events == len(recs) + 2


# --------------------------------------------------------------------------- keys and signed files


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), mutated(public_key_pem(SIGNER.public_key))))
def test_public_key_file_is_a_key_or_a_key_file_error(data):
    try:
        key = load_public_key(data)
    except KeyFileError as exc:
        assert "public key" in str(exc) or "Ed25519" in str(exc)
    else:
        assert key is not None


@FUZZ
@given(data=st.data())
def test_signing_key_file_is_a_key_or_a_key_file_error(data):
    from cryptography.hazmat.primitives import serialization

    pem = SIGNER._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "signing.pem"
        path.write_bytes(data.draw(st.one_of(st.binary(max_size=200), mutated(pem))))
        os.chmod(path, 0o600)
        try:
            Signer.load(path)
        except KeyFileError as exc:
            assert str(path) in str(exc)


@FUZZ
@given(data=st.data())
def test_ledger_key_file_is_a_key_or_a_ledger_key_error(data):
    from ledger.keys import KeyFile, LedgerKeyError

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ledger.key"
        path.write_bytes(data.draw(st.one_of(st.binary(max_size=80), mutated(b"ab" * 32 + b"\n"))))
        os.chmod(path, 0o600)
        try:
            key = KeyFile(path).ledger_key()
        except LedgerKeyError as exc:
            assert str(path) in str(exc)
        else:
            assert len(key) == 32


# found by the fuzzer: a mutated Ed25519 PEM that names X25519 with bytes OpenSSL refuses (InternalError)
X25519_BAD = (b"-----BEGIN PRIVATE KEY-----MC4CAQAwBQYDK2VvBCIEIE++678CCCEFGGILPQRSSVVYY000011fg444kloqtvvy"
              b"-----END PRIVATE KEY-----")


def test_a_key_openssl_refuses_is_a_key_file_error(tmp_path):
    path = tmp_path / "signing.pem"
    path.write_bytes(X25519_BAD)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        Signer.load(path)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(X25519_BAD.replace(b"PRIVATE", b"PUBLIC"))


def _tiny_learner(name: str = "mappo"):
    from learners import algorithm
    from learners.replay import RunSpec, SpaceSpec

    spec = RunSpec("fz", "fuzz_v0", "0", 0, ("a", "b"), {"a": SpaceSpec("Box", (3,)), "b": SpaceSpec("Box", (3,))},
                   {"a": SpaceSpec("Discrete", (), n=3), "b": SpaceSpec("Discrete", (), n=3)}, SpaceSpec("Box", (6,)))
    a = algorithm(name)
    return a.learner_cls(spec, a.config_cls(seed=1, hidden=8) if "hidden" in a.config_cls.__dataclass_fields__
                         else a.config_cls(seed=1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from learners.export import export_onnx

    path = tmp_path_factory.mktemp("fuzzonnx") / "p.onnx"
    return export_onnx(_tiny_learner(), path, SIGNER)


def _policy_or_refusal(path: Path):
    from producers.policies import OnnxPolicy, PolicyFileError

    try:
        pol = OnnxPolicy(path, SIGNER.public_key)
    except (SignedFileError, PolicyFileError) as exc:
        assert str(path) in str(exc), str(exc)
        return None
    return pol


@SLOW
@given(data=st.data())
def test_onnx_policy_file_loads_or_is_refused_with_a_reason(exported, data):
    """A model file or its signature file changed (unsigned: refused before ONNX Runtime), or other
    bytes signed with the trusted key (ONNX Runtime refuses them: PolicyFileError)."""
    part = data.draw(st.sampled_from(["model", "signature", "signed_model", "signed_context"]))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.onnx"
        shutil.copy(exported, path)
        shutil.copy(signature_path(exported), signature_path(path))
        model = exported.read_bytes()
        if part in ("model", "signed_model"):
            path.write_bytes(data.draw(st.one_of(mutated(model), st.binary(max_size=100))))
        if part == "signature":
            sig = json.loads(signature_path(path).read_text())
            signature_path(path).write_text(data.draw(json_text(sig)))
        if part in ("signed_model", "signed_context"):
            ctx = json.loads(json.loads(signature_path(exported).read_text())["statement"])["context"]
            if part == "signed_context":
                target = data.draw(st.sampled_from(["context", "io"]))
                text = data.draw(json_text(ctx if target == "context" else ctx["io"]))
                try:
                    new = json.loads(text)
                except (ValueError, RecursionError):
                    new = None
                ctx = new if target == "context" else {**ctx, "io": new}
            sign_file(path, SIGNER, ONNX_POLICY_KIND, "fuzzed", ctx)
        pol = _policy_or_refusal(path)
        if part in ("model", "signature") and pol is not None:
            assert path.read_bytes() == model  # an unsigned change is never accepted
        if pol is not None:  # a model that loads may still fail to run: an Exception, which HybridPolicy falls from
            try:
                pol.act({a: np.zeros(3, np.float32) for a in pol.agents})
            except Exception:  # noqa: BLE001 - any Exception; a crash of the process or a hang fails the test
                pass


# --------------------------------------------------------------------------- learner checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from learners.checkpoint import save_checkpoint

    base = tmp_path_factory.mktemp("fuzzckpt") / "ck"
    save_checkpoint(base, _tiny_learner("dqn"), SIGNER._key)  # DQN keeps numpy RNG state: weights_only must load it
    return base


def _resign(base: Path) -> None:
    """Sign whatever the .pt and .json hold now, with the trusted key (a signer's own bad file)."""
    import hashlib

    from learners.checkpoint import _signed_bytes

    pt_sha = hashlib.sha256(base.with_suffix(".pt").read_bytes()).hexdigest()
    meta_sha = hashlib.sha256(base.with_suffix(".json").read_bytes()).hexdigest()
    Path(str(base) + ".sig.json").write_text(json.dumps({
        "format": "marlgrc-learner-checkpoint/1", "pt_sha256": pt_sha, "metadata_sha256": meta_sha,
        "key_id": SIGNER.key_id.hex(), "signature": SIGNER._key.sign(_signed_bytes(pt_sha, meta_sha)).hex()}))


def test_signed_checkpoint_round_trips_with_weights_only(checkpoint):
    from learners.checkpoint import learner_from_checkpoint

    learner = learner_from_checkpoint(checkpoint, SIGNER.public_key)
    assert learner.algorithm == "dqn"


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_signed_pickle_that_runs_code_is_refused(checkpoint, tmp_path):
    from learners.checkpoint import CheckpointError, load_checkpoint

    base = tmp_path / "ck"
    for suffix in (".pt", ".json"):
        shutil.copy(checkpoint.with_suffix(suffix), base.with_suffix(suffix))
    base.with_suffix(".pt").write_bytes(pickle.dumps({"algorithm": "dqn", "x": _Boom()}))
    buf = io.BytesIO()
    import torch

    torch.save({"algorithm": "dqn", "x": _Boom()}, buf)
    for payload in (pickle.dumps({"x": _Boom()}), buf.getvalue()):
        base.with_suffix(".pt").write_bytes(payload)
        _resign(base)
        with pytest.raises(CheckpointError, match="not a learner state torch can load safely"):
            load_checkpoint(base, SIGNER.public_key)


@pytest.mark.parametrize("pt", [b"G", b"", b"PK\x03\x04", b"\x80\x02}q\x00."])
def test_signed_pt_bytes_torch_cannot_read_are_a_checkpoint_error(checkpoint, tmp_path, pt):
    """b"G" was found by the fuzzer: torch.load raised struct.error."""
    from learners.checkpoint import CheckpointError, load_checkpoint

    base = tmp_path / "ck"
    shutil.copy(checkpoint.with_suffix(".json"), base.with_suffix(".json"))
    base.with_suffix(".pt").write_bytes(pt)
    _resign(base)
    with pytest.raises(CheckpointError, match=r"ck.pt is not a learner state torch can load safely|holds a dict"):
        load_checkpoint(base, SIGNER.public_key)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@SLOW
@given(data=st.data())
def test_learner_checkpoint_loads_or_is_a_checkpoint_error(checkpoint, data):
    from learners.checkpoint import CheckpointError, learner_from_checkpoint

    part = data.draw(st.sampled_from(["pt", "meta", "sig", "signed_pt", "signed_meta"]))
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "ck"
        for suffix in (".pt", ".json"):
            shutil.copy(checkpoint.with_suffix(suffix), base.with_suffix(suffix))
        shutil.copy(str(checkpoint) + ".sig.json", str(base) + ".sig.json")
        if part in ("pt", "signed_pt"):
            raw = base.with_suffix(".pt").read_bytes()
            base.with_suffix(".pt").write_bytes(data.draw(st.one_of(mutated(raw), st.binary(max_size=200))))
        elif part in ("meta", "signed_meta"):
            meta = json.loads(base.with_suffix(".json").read_text())
            base.with_suffix(".json").write_text(data.draw(json_text(meta)))
        else:
            sig = json.loads(Path(str(base) + ".sig.json").read_text())
            Path(str(base) + ".sig.json").write_text(data.draw(json_text(sig)))
        if part.startswith("signed_"):
            _resign(base)
        try:
            learner = learner_from_checkpoint(base, SIGNER.public_key)
        except CheckpointError as exc:
            assert f"checkpoint {base}" in str(exc), str(exc)
        else:
            assert learner.algorithm == "dqn"


# --------------------------------------------------------------------------- config


@FUZZ
@given(pairs=st.lists(st.one_of(st.text(max_size=20), st.tuples(st.text(max_size=6), JSON_VALUES).map(
    lambda kv: f"{kv[0]}={json.dumps(kv[1])}")), max_size=4))
def test_env_args_parse_or_say_which_pair(pairs):
    from marlgrc.config import parse_env_args

    try:
        out = parse_env_args(pairs)
    except ValueError as exc:
        assert "--env-arg" in str(exc) and "name=value" in str(exc)
    else:
        assert set(out) <= {p.partition("=")[0] for p in pairs}


_CONFIG_VALUES = st.one_of(st.text(max_size=10), st.sampled_from(
    ["nan", "inf", "-inf", "1e999", "-1", "0", "1", "true", "3.5", "99999999999999999999999", "1,2", "", "[]", "a,b"]))


@FUZZ
@given(name=st.sampled_from(["mappo", "dqn", "qmix", "sac"]), items=st.lists(st.tuples(
    st.one_of(st.sampled_from(["learning_rate", "gamma", "seed", "hidden", "update_epochs", "device", "batch_size",
                               "hidden_layers", "clip_coef"]), st.text(max_size=8)), _CONFIG_VALUES), max_size=3))
def test_set_overrides_are_typed_or_a_value_error_naming_the_field(name, items):
    from learners import algorithm, config_overrides

    cls = algorithm(name).config_cls
    given_ = [f"{k}={v}" for k, v in items]
    try:
        out = config_overrides(cls, given_)
    except ValueError as exc:
        assert "--set" in str(exc)
    else:
        assert set(out) <= {k for k, _ in items}
        for v in out.values():
            assert not (isinstance(v, float) and not math.isfinite(v)), out
        cls(**out)


def test_a_home_under_an_unknown_user_is_a_settings_error(monkeypatch):
    from marlgrc.config import Settings, SettingsError

    monkeypatch.setenv("MARLGRC_HOME", "~no-such-user-here/state")  # found by the fuzzer (as ~0)
    with pytest.raises(SettingsError, match=r"\$MARLGRC_HOME '~no-such-user-here/state': cannot expand"):
        Settings.load()
    with pytest.raises(SettingsError, match="--home"):
        Settings.load(home=Path("~no-such-user-here"))


_HOMES = st.one_of(st.text(max_size=30), st.sampled_from(["~", "~/x", "~0", "~no-such-user-here/x", "~root", "."]))


@FUZZ
@given(home=_HOMES, option=st.one_of(st.none(), _HOMES), boot=st.text(max_size=20), prefix=st.text(max_size=10))
def test_settings_from_the_environment_and_options(home, option, boot, prefix, monkeypatch):
    from marlgrc.config import Settings, SettingsError

    for k, v in (("MARLGRC_HOME", home), ("MARLGRC_BOOTSTRAP", boot), ("MARLGRC_TOPIC_PREFIX", prefix)):
        if "\x00" in v:
            monkeypatch.delenv(k, raising=False)  # the environment cannot hold a NUL
        else:
            monkeypatch.setenv(k, v)
    try:
        s = Settings.load(home=Path(option) if option else None)
    except SettingsError as exc:
        assert ("--home" in str(exc) if option else "$MARLGRC_HOME" in str(exc)) and "absolute path" in str(exc)
    else:
        assert isinstance(s.home, Path) and s.signing_key.name == "signing.pem"

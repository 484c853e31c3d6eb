"""The telemetry normalizer (Hypothesis: any JSON value) and the replay producer."""
import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from producers.telemetry import BOOLEANS, FEATURE_DIM, FEATURES, RANGES, ingest_telemetry, load_records, normalize

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4),
                           max_leaves=12)
field_values = st.one_of(json_values, st.integers(-10**20, 10**20), st.floats(-1e9, 1e12), st.booleans())
records = st.dictionaries(st.sampled_from([*RANGES, *BOOLEANS, "is_malicious", "step", "episode_id", "extra"]),
                          field_values)


def expected_flag(record, name):
    if name not in record:
        return "defaulted"
    v = record[name]
    if name in BOOLEANS:
        return None if isinstance(v, bool) else "malformed"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "malformed"
    return "clipped" if v < 0 or v > RANGES[name][1] else None


def check(t):
    assert t.vector.shape == (FEATURE_DIM,) and t.vector.dtype.name == "float32"
    assert all(0.0 <= x <= 1.0 for x in t.vector.tolist())


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_gives_a_state_vector(value):
    t = normalize(value)
    check(t)
    if not isinstance(value, dict):
        assert "malformed:record" in t.flags
        assert t.vector[FEATURES.index("missing_fraction")] == 1.0


@settings(max_examples=300, deadline=None)
@given(records)
def test_flags_name_exactly_the_bad_fields(record):
    t = normalize(record)
    check(t)
    for name in [*RANGES, *BOOLEANS]:
        want = expected_flag(record, name)
        got = [f.split(":")[0] for f in t.flags if f.split(":", 1)[1] == name]
        assert got == ([want] if want else []), (name, record.get(name), t.flags)
    bad = sum(expected_flag(record, n) in ("defaulted", "malformed") for n in [*RANGES, *BOOLEANS])
    assert math.isclose(t.vector[FEATURES.index("missing_fraction")], bad / 13, rel_tol=1e-6)


def test_seed_example_record():
    rec = {"episode_id": 0, "step": 0, "is_malicious": True, "severity": 0.8, "syscall_count": 150,
           "file_read_count": 20, "file_write_count": 10, "network_connections": 5, "bytes_sent": 5000,
           "bytes_received": 2000, "child_processes": 2, "cpu_usage": 45.5, "memory_usage": 250.0,
           "registry_modification": True, "privilege_escalation_attempt": False, "code_injection_detected": True}
    t = normalize(rec)
    assert t.flags == [] and t.is_malicious
    assert math.isclose(t.vector[FEATURES.index("severity")], 0.8, rel_tol=1e-6)
    assert math.isclose(t.vector[FEATURES.index("file_io_ratio")], 10 / 30, rel_tol=1e-6)
    assert math.isclose(t.vector[FEATURES.index("behaviour_flag_count")], 2 / 3, rel_tol=1e-6)


def test_ingest_writes_flagged_events(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"severity": 0.5, "cpu_usage": 10}\nnot json\n[1, 2]\n')
    recs = load_records(path)
    assert len(recs) == 3 and recs[1] is None
    sink = MemorySink()
    summary = ingest_telemetry(recs, EventLog(sink, run_id="tel", producer_id="p"), source=str(path))
    assert summary.events == 5 and summary.flagged == 3
    codec = default_codec()
    states = [codec.decode(v)[1] for t, k, v in sink.sent if t == "marl.env.state"]
    assert [len(s["state"]) for s in states] == [30, 30, 30]
    assert "defaulted:bytes_sent" in states[0]["flags"] and "malformed:record" in states[1]["flags"]
    started = codec.decode(sink.sent[0][2])[1]
    assert json.loads(started["config_json"])["features"] == list(FEATURES)

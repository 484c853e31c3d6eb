"""The C row decoder (ledger/_rowdecode.c) gives exactly the reference's rows (codec decode, then
ledger.tables.row_tuples_for_event) or exactly its DecodeError, on every schema, on garbage, on
older writers; and the per-step event types really take the C path."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from eventlog.checkpoint import Signer
from eventlog.codec import MAGIC, DecodeError, default_codec
from eventlog.log import EventLog, MemorySink
from eventlog.native import build_extension
from ledger import fastrows
from ledger.fastrows import decode_rows, decode_rows_native, py_decode_rows, same_rows
from tests.synthetic import synthetic_run
from tests.avro_strategies import old_env_state_value
from tests.avro_strategies import records as avro_records

CODEC = default_codec()
NAMES = sorted(schemas.current())
PER_STEP = ("env_state", "agent_observation", "joint_action")


def outcome(fn, value, topic="marl.t", partition=3, offset=17):
    try:
        return "rows", fn(value, topic, partition, offset)
    except DecodeError as exc:
        return "error", exc.kind


def assert_same(value, topic="marl.t", partition=3, offset=17):
    got = outcome(decode_rows, value, topic, partition, offset)
    want = outcome(py_decode_rows, value, topic, partition, offset)
    assert got[0] == want[0] and same_rows(got[1], want[1]), (value.hex(), got, want)
    return got


# ---- records derived from the schemas, harder than tests/avro_strategies.py ----------------------

_text = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
    st.text(st.sampled_from(['"', "\\", "\n", "\r", "\t", "\b", "\f", "\x00", "\x1f", "\x7f", "\x80", "é", "\u2028",
                             "\ud7ff", "\ue000", "\uffff", "\U00010000", "\U0001f600", "\U0010ffff", "a", "/"]),
            max_size=8),
)
_LONG_EDGES = [0, 1, -1, 63, 64, -64, -65, 2**31 - 1, -2**31, 2**53 + 1, 2**63 - 1, -2**63]
_PRIMS = {  # over tests/avro_strategies.py's: edges, NaN, escapes
    "long": st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from(_LONG_EDGES)),
    "int": st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, -1, 2**31 - 1, -2**31])),
    "string": _text,
    "float": st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 3.4028234663852886e38,
                                                             1e-28, 1e17, 1e16, 0.1])),
    "double": st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 5e-324, 1.7976931348623157e308, 1e16, 1e-5])),
}
_SHARED_REFS = st.sampled_from([bytes(32), b"\xff" * 32, bytes(range(32))])  # repeated subject refs


def records(schema: dict):
    return avro_records(schema, prims=_PRIMS, float_list_size=20,
                        extra=lambda field, t: _SHARED_REFS if field == "subject_ref" and t["size"] == 32 else None)


# ---- the C build is there and covers what it should ----------------------------------------------

def test_native_build_covers_every_schema_but_policy_update():
    assert fastrows.NATIVE, "C row decoder failed to build: the ledger falls back to the pure-Python path"
    assert set(fastrows.native_schemas) == set(NAMES) - {"policy_update"}


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rows_equal_the_reference_on_every_schema(name, data):
    record = data.draw(records(schemas.load(name)))
    value = CODEC.encode(name, record)
    kind, got = assert_same(value, topic=data.draw(_text), partition=data.draw(st.integers(0, 99)),
                            offset=data.draw(st.integers(0, 2**62)))
    assert kind == "rows" and got[0] == name
    fast = decode_rows_native(value, "marl.t", 3, 17)
    if name in fastrows.native_schemas:
        assert fast is not None, f"{name}: a valid event left the C path"
        assert same_rows(fast, py_decode_rows(value, "marl.t", 3, 17))
    else:
        assert fast is None


def _one(event_type: str, payload: dict) -> bytes:
    sink = MemorySink()
    EventLog(sink, run_id="r", producer_id="p").append("r:x", event_type, payload)
    return sink.sent[0][2]


def test_edge_values_by_hand():
    inf, nan = float("inf"), float("nan")
    pf = [{"namespace": "n", "field": "f\u00e9", "subject_ref": ref, "ciphertext": b"\x00"}
          for ref in (b"\xff" * 32, bytes(32), b"\xff" * 32)]
    cases = {
        "nan in a float array is _json's text": ("env.state", {
            "episode": 0, "step": 1, "state": [1.0, nan, -inf], "collapsed_state": [-0.0, 1e-30],
            "protected_fields": pf, "flags": ["a\"b", "\U0001f600\x00"]}),
        "no actions: team reward is the int 0": ("joint.action", {
            "episode": 0, "step": 0, "actions": [], "joint_vector": []}),
        "rewards sum as Python's sum() does": ("joint.action", {
            "episode": 0, "step": 0, "joint_vector": [inf], "actions": [
                {"agent_id": "a", "discrete": -1, "continuous": [0.1, nan], "log_prob": -inf, "reward": r,
                 "terminated": True, "truncated": False} for r in (-0.0, 0.1, 0.2, 1e16)]}),
    }
    for label, (event_type, payload) in cases.items():
        value = _one(event_type, payload)
        fast = decode_rows_native(value, "t", 1, 2)
        assert fast is not None and same_rows(fast, py_decode_rows(value, "t", 1, 2)), label
    row = decode_rows(_one(*cases["nan in a float array is _json's text"]), "t", 1, 2)[1][0][1]
    assert row[21:23] == ("[1.0,NaN,-Infinity]", "[-0.0000000000000000,1.0000000031710769e-30]")
    assert row[25] == "0" * 64 + " " + "f" * 64
    assert decode_rows(_one(*cases["no actions: team reward is the int 0"]), "t", 1, 2)[1][0][1][-1] == 0


def _synthetic(obs_dim: int, signer: Signer | None = None) -> list[tuple[str, bytes]]:
    sink = MemorySink()
    log = EventLog(sink, run_id="r", producer_id="p", signer=signer, checkpoint_every=50)
    synthetic_run(log, episodes=1, steps=6, agents=3, obs_dim=obs_dim, seed=obs_dim)
    log.close()
    return [(topic, value) for topic, _key, value in sink.sent]


SIGNED = _synthetic(6, Signer.from_seed(b"fastrows"))


@pytest.mark.parametrize("obs_dim", [6, 18])
def test_a_synthetic_run_takes_the_c_path_for_every_event(obs_dim):
    stream = SIGNED if obs_dim == 6 else _synthetic(obs_dim)
    before = fastrows.native_counts()
    seen = set()
    for offset, (topic, value) in enumerate(stream):
        name = CODEC.schema_for(value)
        seen.add(name)
        fast = decode_rows_native(value, topic, 0, offset)
        assert fast is not None, f"{name} at offset {offset} left the C path"
        assert same_rows(fast, py_decode_rows(value, topic, 0, offset))
        assert same_rows(decode_rows(value, topic, 0, offset), fast)
    after = fastrows.native_counts()
    assert after[0] - before[0] == len(stream) and after[1] == before[1]
    assert set(PER_STEP) | {"run_started", "run_finished"} <= seen
    if obs_dim == 6:
        assert "audit_checkpoint" in seen


# ---- fallbacks --------------------------------------------------------------------------------------

def test_an_older_writer_goes_through_the_reference():
    value, _ = old_env_state_value([1.0, -0.5])
    assert decode_rows_native(value, "marl.env.state", 0, 5) is None
    before = fastrows.native_counts()
    name, rows = decode_rows(value, "marl.env.state", 0, 5)
    assert fastrows.native_counts()[1] == before[1] + 1
    assert (name, rows) == py_decode_rows(value, "marl.env.state", 0, 5)
    table, row = rows[0]
    assert table == "environment_states" and row[19:24] == (1, 2, "[1.0000000000000000,-0.50000000000000000]",
                                                              "[]", "[]")


def test_policy_update_with_lineage_rows_goes_through_the_reference():
    rec = {"algorithm": "ppo", "config_hash": "c", "seed": 1, "parent_policy_version": "", "policy_updated": True,
           "optimizer_steps": 2, "env_steps": 3, "losses": [{"name": "policy", "value": 0.5}],
           "weights_sha256": bytes(32), "verified": False,
           "lineage": [{"topic": "marl.joint.action", "partition": 0, "first_offset": 0, "last_offset": 9,
                        "chain_id": "r:actions", "first_seq": 0, "last_seq": 9, "head_event_hash": b"\x01" * 32}]}
    sink = MemorySink()
    EventLog(sink, run_id="r", producer_id="p").append("r:policy:ppo", "policy.update", rec)
    value = sink.sent[0][2]
    assert decode_rows_native(value, "marl.policy.update", 0, 0) is None
    name, rows = decode_rows(value, "marl.policy.update", 0, 0)
    assert name == "policy_update" and [t for t, _ in rows] == ["policy_updates", "policy_update_lineage"]
    assert rows == py_decode_rows(value, "marl.policy.update", 0, 0)[1]


def test_values_that_are_not_bytes_give_the_reference_result():
    value = SIGNED[3][1]
    for v in (bytearray(value), memoryview(value)):
        assert decode_rows_native(v, "t", 0, 0) is None
        assert same_rows(decode_rows(v, "t", 0, 0), py_decode_rows(v, "t", 0, 0))


@pytest.mark.parametrize("value,kind", [
    (b"", "not_single_object"), (b"\xc3", "not_single_object"), (b"{\"json\": true}", "not_single_object"),
    (MAGIC + bytes(8) + bytes(40), "unknown_fingerprint"),
    (CODEC.prefix("env_state"), "truncated"),
])
def test_bad_values_raise_the_reference_decode_error(value, kind):
    with pytest.raises(DecodeError) as info:
        decode_rows(value, "t", 0, 0)
    assert info.value.kind == kind


# ---- garbage: the same answer as the reference, and no crash -----------------------------------------

REAL = [v for _, v in SIGNED]


def test_every_truncation_and_trailing_byte_of_real_events():
    for value in {CODEC.schema_for(v): v for v in REAL}.values():  # one event per schema
        for n in range(len(value)):
            kind, _ = assert_same(value[:n])
            assert kind == "error"
        assert assert_same(value + b"\x00")[0] == "error"


@settings(max_examples=800, deadline=None)
@given(data=st.data())
def test_bit_flips_and_splices_of_real_events(data):
    value = bytearray(data.draw(st.sampled_from(REAL)))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = data.draw(st.integers(10, len(value) - 1))  # keep the marker and fingerprint: reach the walker
        if op == "flip":
            value[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            value[i] = data.draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            value[i:i] = data.draw(st.binary(min_size=1, max_size=3))
        else:
            del value[i]
    assert_same(bytes(value))


@settings(max_examples=600, deadline=None)
@given(name=st.sampled_from(NAMES), body=st.binary(max_size=300))
def test_random_bodies_behind_a_known_fingerprint(name, body):
    assert_same(CODEC.prefix(name) + body)


@settings(max_examples=100, deadline=None)
@given(value=st.binary(max_size=120))
def test_random_bytes(value):
    assert assert_same(value)[0] == "error"


# ---- pieces ---------------------------------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(x=st.floats(width=32))
def test_fast_float_text_matches_python_or_declines(x):
    text = fastrows._native._g17(x)
    assert text is None or text == "%#.17g" % x


def test_fast_float_text_rounds_ties_to_even():
    for k, m in ((14, 2**23 + 1), (20, 2**23 + 3), (17, 12345679)):
        x = m / 2.0**k
        text = fastrows._native._g17(x)
        assert text == "%#.17g" % x and text is not None


def test_a_program_that_disagrees_with_tables_is_caught():
    mod = fastrows._native
    good = list(fastrows.programs)
    prog = next(p for p in good if p[1] == "env_state")
    cols = list(prog[5])
    cols[19], cols[20] = cols[20], cols[19]  # episode <-> step
    try:
        mod.set_programs([p if p is not prog else prog[:5] + (tuple(cols),) + prog[6:] for p in good],
                         py_decode_rows)
        assert not fastrows._self_check(mod, "env_state")
        assert fastrows._self_check(mod, "joint_action")
    finally:
        mod.set_programs(good, py_decode_rows)
    assert fastrows._self_check(mod, "env_state")


def test_malformed_programs_are_refused():
    mod = fastrows._native
    good = list(fastrows.programs)
    prog = good[0]
    for bad in (prog[:3] + ((1, 9, 9),) + prog[4:],            # a type code that runs past its end
                prog[:5] + ((99,),) + prog[6:],                # a column naming a slot that does not exist
                prog[:6] + (prog[6] + 1,)):                    # wrong slot count
        with pytest.raises(ValueError, match="malformed"):
            mod.set_programs([bad], py_decode_rows)
    assert decode_rows_native(REAL[0], "t", 0, 0) is not None  # the good programs are still installed


# ---- eventlog.native ------------------------------------------------------------------------------------

def test_build_extension_caches_and_can_be_turned_off(tmp_path, monkeypatch):
    src = tmp_path / "_tiny.c"
    src.write_text('#include <Python.h>\n'
                   'static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, "_tiny", NULL, -1, NULL};\n'
                   'PyMODINIT_FUNC PyInit__tiny(void) { PyObject *m = PyModule_Create(&d);\n'
                   '  PyModule_AddIntConstant(m, "answer", 42); return m; }\n')
    monkeypatch.setenv("MARLGRC_CACHE", str(tmp_path / "cache"))
    mod = build_extension(src, "_tiny")
    assert mod.answer == 42
    built = list((tmp_path / "cache" / "native").glob("*/_tiny*"))
    assert len(built) == 1
    monkeypatch.setenv("CC", "/nonexistent/cc")  # a cached build needs no compiler
    assert build_extension(src, "_tiny").answer == 42
    src.write_text(src.read_text() + "\n/* edited */\n")  # a new source needs one
    assert build_extension(src, "_tiny") is None
    monkeypatch.setenv("MARLGRC_NO_NATIVE", "1")
    monkeypatch.delenv("CC")
    assert build_extension(src, "_tiny") is None

"""The materializer's chain checks in C (ledger.fastrows.check_rows, used by
ledger.materialize.check_batch) give exactly what the pure-Python loop gives: the same rows (in the same
order), findings, pending events, heads, changed heads and offsets, on clean streams and on streams with
every kind of deviation, within one batch and across batches; and they never crash on odd input."""
import io
import os
import re
from hashlib import sha256

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from eventlog.checkpoint import Signer
from eventlog.codec import MAGIC, Codec
from eventlog.log import EventLog, MemorySink
from ledger import fastrows
from ledger.fastrows import decode_rows, same_rows
from ledger.materialize import _TOPIC_OF_TYPE, check_batch
from tests.synthetic import synthetic_run

# outside CI a machine without a C compiler skips these (test_fastrows reports the missing build);
# under CI=true they run and fail on it
pytestmark = pytest.mark.skipif(fastrows.check_rows is None and os.environ.get("CI", "").lower() not in
                                ("1", "true", "yes"), reason="no C build of ledger/_rowdecode.c")


def py_decode(value, topic, partition, offset):
    """decode_rows, but not *the* decode_rows object: check_batch then keeps to its Python loop."""
    return decode_rows(value, topic, partition, offset)


POLICY = {"algorithm": "ppo", "config_hash": "c", "seed": 1, "parent_policy_version": "", "policy_updated": True,
          "optimizer_steps": 2, "env_steps": 3, "losses": [{"name": "policy", "value": 0.5}],
          "weights_sha256": bytes(32), "verified": False,
          "lineage": [{"topic": "marl.joint.action", "partition": 0, "first_offset": 0, "last_offset": 9,
                       "chain_id": "r:actions", "first_seq": 0, "last_seq": 9, "head_event_hash": b"\x01" * 32}]}


def _old_writer_chain(chain: str, n: int) -> list[tuple[str, str, bytes]]:
    """n well-linked env.state events written with the history schema env_state.v0 (no C program)."""
    old = schemas.history()["env_state.v0"]
    prefix = MAGIC + Codec({"env_state": old}).fingerprint("env_state")
    out, prev = [], bytes(32)
    for seq in range(n):
        record = {f["name"]: None for f in old["fields"]}
        record.update(prev_event_hash=prev, seq=seq, chain_id=chain, event_id=f"old-{seq}", event_type="env.state",
                      run_id="r", produced_at=1, producer_id="p", data_classification="internal",
                      retention_expiry=2, feature_schema_version="1", policy_version="", rule_version="",
                      source_event_hashes=[], episode=1, step=seq, state=[1.0, -0.5], collapsed_state=[],
                      protected_fields=[], event_hash=bytes(32))
        body = io.BytesIO()
        fastavro.schemaless_writer(body, fastavro.parse_schema(old), record)
        value = prefix + body.getvalue()
        prev = sha256(value[:-32]).digest()
        out.append(("marl.env.state", chain, value[:-32] + prev))
    return out


def _stream() -> list[tuple[str, int, int, str, bytes]]:
    sink = MemorySink()
    log = EventLog(sink, run_id="r", producer_id="p", signer=Signer.from_seed(b"checkrows"), checkpoint_every=15)
    synthetic_run(log, episodes=1, steps=4, agents=2, obs_dim=3, seed=5)
    log.append("r:policy:ppo", "policy.update", POLICY)
    log.append("r:policy:ppo", "policy.update", dict(POLICY, optimizer_steps=3))
    log.close()
    sent = list(sink.sent)
    old = _old_writer_chain("r:old", 3)
    sent[5:5] = old[:2]   # interleaved with the run
    sent.append(old[2])
    next_offset: dict = {}
    out = []
    for topic, key, value in sent:
        part = len(key) % 3
        off = next_offset.get((topic, part), 100)
        next_offset[(topic, part)] = off + 1
        out.append((topic, part, off, key, value))
    return out


STREAM = _stream()
NAMES = {fastrows.default_codec().schema_for(r[4]) for r in STREAM}


def test_the_stream_has_what_the_comparisons_need():
    assert {"policy_update", "env_state", "agent_observation", "joint_action", "run_started", "run_finished",
            "audit_checkpoint"} <= NAMES
    assert any(fastrows.decode_rows_native(r[4], *r[:3]) is None and r[3] == "r:old" for r in STREAM)
    result = check_batch(STREAM, {})
    assert result.findings == [] and result.pending == []


def test_a_clean_batch_is_handled_in_c_up_to_the_first_event_it_leaves_to_python():
    first_policy = next(i for i, r in enumerate(STREAM) if r[0] == "marl.policy.update")
    first_old = next(i for i, r in enumerate(STREAM) if r[3] == "r:old")
    stop = min(first_policy, first_old)
    heads, changed, offsets, rows = {}, {}, {}, {}
    assert fastrows.check_rows(STREAM, 0, heads, changed, offsets, rows, _TOPIC_OF_TYPE, None) == stop
    assert sum(map(len, rows.values())) == stop and heads == changed
    # the record it stopped at was not touched: offsets hold exactly the records before it
    want = {}
    for topic, part, off, _key, _value in STREAM[:stop]:
        want[(topic, part)] = off + 1
    assert offsets == want
    # per-step events only: all handled
    steps = [r for r in STREAM if r[0] in ("marl.env.state", "marl.agent.observation") and r[3] != "r:old"]
    assert fastrows.check_rows(steps, 0, {}, {}, {}, {}, _TOPIC_OF_TYPE, set()) == len(steps)


def _no_addresses(finding):
    """The codec's DecodeError text can name an object's address (``<_io.BytesIO object at 0x...>``)."""
    if finding is None:
        return None
    return finding[:-1] + (re.sub(r" at 0x[0-9a-f]+", " at 0x?", finding[-1]),)


def snapshot(result, heads):
    return (result.records, list(result.rows.items()), list(result.offsets.items()),
            [_no_addresses(f) for f in result.findings], result.pending, list(result.heads.items()),
            list(heads.items()))


def assert_same_checks(batches, heads=None):
    """Each batch checked in turn with shared heads, native vs pure Python: identical results."""
    heads_c, heads_py = dict(heads or {}), dict(heads or {})
    for batch in batches:
        got = _outcome(lambda: check_batch(list(batch), heads_c), heads_c)
        want = _outcome(lambda: check_batch(list(batch), heads_py, py_decode), heads_py)
        assert same_rows(got, want), (got, want)
    return heads_c


def _outcome(fn, heads):
    try:
        return "ok", snapshot(fn(), heads)
    except Exception as exc:  # noqa: BLE001 - both paths must raise the same
        return "raised", type(exc).__name__, str(exc), list(heads.items())


def test_a_clean_stream_in_several_batches():
    heads = assert_same_checks([STREAM[:7], STREAM[7:30], STREAM[30:]])
    assert heads == check_batch(STREAM, {}).heads


# ---- deviations by hand -----------------------------------------------------------------------------

def _flip(value: bytes, i: int) -> bytes:
    b = bytearray(value)
    b[i] ^= 0x01
    return bytes(b)


def _reseal(value: bytes) -> bytes:
    return value[:-32] + sha256(value[:-32]).digest()


def _with(i, **kw):
    topic, part, off, key, value = STREAM[i]
    r = dict(topic=topic, part=part, off=off, key=key, value=value)
    r.update(kw)
    return (r["topic"], r["part"], r["off"], r["key"], r["value"])


K = 9  # an event in the middle of the run, decoded in C
DEVIATIONS = {
    "edited body byte": lambda s: s[:K] + [_with(K, value=_flip(s[K][4], 60))] + s[K + 1:],
    "edited and resealed (breaks the next link)": lambda s: s[:K] + [_with(K, value=_reseal(_flip(s[K][4], 60)))]
    + s[K + 1:],
    "edited hash": lambda s: s[:K] + [_with(K, value=_flip(s[K][4], len(s[K][4]) - 1))] + s[K + 1:],
    "edited prev link": lambda s: s[:K] + [_with(K, value=_reseal(_flip(s[K][4], 12)))] + s[K + 1:],
    "wrong key": lambda s: s[:K] + [_with(K, key="r:somewhere")] + s[K + 1:],
    "key None": lambda s: s[:K] + [_with(K, key=None)] + s[K + 1:],
    "wrong topic": lambda s: s[:K] + [_with(K, topic="marl.di.credit")] + s[K + 1:],
    "gap": lambda s: s[:K] + s[K + 1:],
    "reorder": lambda s: s[:K] + [s[K + 6], s[K]] + s[K + 1:K + 6] + s[K + 7:],
    "duplicate later in the batch": lambda s: s[:K + 8] + [s[K]] + s[K + 8:],
    "duplicate right after": lambda s: s[:K + 1] + [s[K]] + s[K + 1:],
    "undecodable": lambda s: s[:K] + [_with(K, value=b"\xc3\x01garbage")] + s[K + 1:],
    "truncated": lambda s: s[:K] + [_with(K, value=s[K][4][:-40])] + s[K + 1:],
    "empty value": lambda s: s[:K] + [_with(K, value=b"")] + s[K + 1:],
    "value as bytearray": lambda s: s[:K] + [_with(K, value=bytearray(s[K][4]))] + s[K + 1:],
    "offset a bool": lambda s: s[:K] + [_with(K, off=True)] + s[K + 1:],
    "offset huge": lambda s: s[:K] + [_with(K, off=2**70)] + s[K + 1:],
    "record as a list": lambda s: s[:K] + [list(s[K])] + s[K + 1:],
    "topic a str subclass": lambda s: s[:K] + [_with(K, topic=type("S", (str,), {})(s[K][0]))] + s[K + 1:],
    "six-field record later": lambda s: s[:K] + [s[K] + (0,)] + s[K + 1:],
}


@pytest.mark.parametrize("name", sorted(DEVIATIONS))
def test_each_deviation_gives_the_python_result(name):
    records = DEVIATIONS[name](list(STREAM))
    assert_same_checks([records])
    assert_same_checks([records[:K + 3], records[K + 3:]])


def test_duplicates_across_batches_and_prefilled_heads():
    first = check_batch(STREAM[:20], {})
    heads = dict(first.heads)
    # the second batch starts with events the first held: duplicates (pending) by seq
    assert_same_checks([STREAM[12:]], heads)
    # heads ahead, behind, with wrong hashes, odd types
    odd = dict(heads)
    keys = list(odd)
    odd[keys[0]] = (odd[keys[0]][0] + 5, odd[keys[0]][1])
    odd[keys[1]] = (odd[keys[1]][0], b"\x07" * 32)
    odd[keys[2]] = (odd[keys[2]][0], bytearray(odd[keys[2]][1]))  # equal to bytes in Python
    odd[keys[3]] = None
    if len(keys) > 4:
        odd[keys[4]] = (True, odd[keys[4]][1]) if odd[keys[4]][0] == 0 else (odd[keys[4]][0], odd[keys[4]][1][:31])
    assert_same_checks([STREAM[20:]], odd)
    assert_same_checks([STREAM[20:]], {k: (2**80, v[1]) for k, v in heads.items()})


def test_a_custom_decode_keeps_to_python():
    seen = []

    def decode(value, topic, partition, offset):
        seen.append(offset)
        return decode_rows(value, topic, partition, offset)

    check_batch(STREAM, {}, decode)
    assert len(seen) == len(STREAM)


def test_check_rows_arguments():
    with pytest.raises(TypeError):
        fastrows.check_rows(STREAM, 0, {}, {}, {}, {}, _TOPIC_OF_TYPE)
    with pytest.raises(ValueError):
        fastrows.check_rows(STREAM, -1, {}, {}, {}, {}, _TOPIC_OF_TYPE, None)
    assert fastrows.check_rows(STREAM, len(STREAM) + 3, {}, {}, {}, {}, _TOPIC_OF_TYPE, None) == len(STREAM) + 3
    # containers of other types: nothing handled here
    assert fastrows.check_rows(tuple(STREAM), 0, {}, {}, {}, {}, _TOPIC_OF_TYPE, None) == 0
    assert fastrows.check_rows(STREAM, 0, {}, {}, {}, {}, _TOPIC_OF_TYPE, frozenset()) == 0
    rows = {"environment_states": ()}
    steps = [r for r in STREAM if r[0] == "marl.env.state" and r[3] != "r:old"]
    assert fastrows.check_rows(steps, 0, {}, {}, {}, rows, _TOPIC_OF_TYPE, None) == 0


# ---- generated mixes ----------------------------------------------------------------------------------

OPS = ("flip", "flip_reseal", "hash", "key", "topic", "drop", "swap", "dup", "garbage", "truncate", "type")
TOPICS = list(schemas.TOPICS)


def _apply(records: list, op: str, i: int, j: int, data) -> list:
    if not records:
        return records
    i %= len(records)
    j %= len(records)
    r = list(records[i])
    if op == "flip" and isinstance(r[4], bytes) and r[4]:
        r[4] = _flip(r[4], j % len(r[4]))
    elif op == "flip_reseal" and isinstance(r[4], bytes) and len(r[4]) > 32:
        r[4] = _reseal(_flip(r[4], j % (len(r[4]) - 32)))
    elif op == "hash" and isinstance(r[4], bytes) and r[4]:
        r[4] = _flip(r[4], len(r[4]) - 1 - j % min(32, len(r[4])))
    elif op == "key":
        r[3] = data.draw(st.sampled_from([None, "", "r:env", "r:actions", STREAM[j % len(STREAM)][3], b"r:env"]))
    elif op == "topic":
        r[0] = data.draw(st.sampled_from(TOPICS))
    elif op == "drop":
        return records[:i] + records[i + 1:]
    elif op == "swap":
        records = list(records)
        records[i], records[j] = records[j], records[i]
        return records
    elif op == "dup":
        return records[:j] + [records[i]] + records[j:]
    elif op == "garbage":
        r[4] = data.draw(st.binary(max_size=60))
    elif op == "truncate" and isinstance(r[4], bytes):
        r[4] = r[4][:j % (len(r[4]) + 1)]
    elif op == "type":
        k = data.draw(st.integers(0, 4))
        r[k] = data.draw(st.sampled_from([None, True, 1.5, "x", b"x", 2**64, -1, (), bytearray(b"y")]))
    return records[:i] + [tuple(r)] + records[i + 1:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_mixes_give_the_python_result(data):
    records = list(STREAM)
    for op, i, j in data.draw(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10**6), st.integers(0, 10**6)),
                                       max_size=6)):
        records = _apply(records, op, i, j, data)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(records)), max_size=3)))
    batches = [records[a:b] for a, b in zip([0] + cuts, cuts + [len(records)])]
    heads = {}
    if data.draw(st.booleans()):  # heads left by an earlier batch of (part of) the same stream
        heads = dict(check_batch(STREAM[:data.draw(st.integers(0, len(STREAM)))], {}).heads)
    assert_same_checks(batches, heads)


_ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.binary(max_size=50),
                 st.sampled_from([r[4] for r in STREAM[:6]] + [r[0] for r in STREAM[:6]] + [r[3] for r in STREAM[:6]]))


@settings(max_examples=300, deadline=None)
@given(records=st.lists(st.one_of(st.tuples(_ANY, _ANY, _ANY, _ANY, _ANY), st.sampled_from(STREAM[:6]),
                                  st.lists(_ANY, max_size=6).map(tuple)), max_size=8),
       start=st.integers(0, 9))
def test_odd_records_never_crash_check_rows(records, start):
    heads, changed, offsets, rows = {}, {}, {}, {}
    n = fastrows.check_rows(records, start, heads, changed, offsets, rows, _TOPIC_OF_TYPE, set())
    assert start <= n <= max(start, len(records))
    assert sum(map(len, rows.values())) == n - start if n > start else not rows

"""The event contract: every schema round-trips, bytes are standard Avro (fastavro and Apache avro
agree: fastavro writes what Apache avro writes), old writers are read by new readers."""
import io
import json

import avro.io
import avro.schema
import fastavro
from fastavro.schema import to_parsing_canonical_form
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from eventlog.codec import HEADER_FIELDS, MAGIC, Codec, DecodeError, EncodeError, default_codec
from eventlog.chain import ChainWriter, long_bytes
from eventlog.hashing import compute_hash, prev_hash, seq_and_chain, stored_hash
from tests.avro_strategies import old_env_state_value, records

CODEC = default_codec()
NAMES = sorted(schemas.current())


def apache_value(name: str, record: dict) -> bytes:
    """The event as the Apache ``avro`` package writes it (no code shared with fastavro); a field
    left out takes its schema default, as the chain writer's payloads may."""
    record = {**{f["name"]: f["default"] for f in schemas.load(name)["fields"] if "default" in f}, **record}
    buf = io.BytesIO()
    avro.io.DatumWriter(avro.schema.parse(json.dumps(schemas.load(name)))).write(record, avro.io.BinaryEncoder(buf))
    return MAGIC + CODEC.fingerprint(name) + buf.getvalue()


def uvarint(z: int) -> bytes:
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def test_every_event_type_has_a_schema_and_topic():
    for event_type, (name, topic) in schemas.EVENT_TYPES.items():
        assert name in NAMES
        assert topic in schemas.TOPICS
    assert {n for n, _ in schemas.EVENT_TYPES.values()} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_schema_follows_hash_contract(name):
    s = schemas.load(name)
    fields = [f["name"] for f in s["fields"]]
    assert tuple(fields[: len(HEADER_FIELDS)]) == HEADER_FIELDS
    assert fields[-1] == "event_hash"
    assert s["fields"][0]["type"]["size"] == 32
    assert "map" not in json.dumps(s).replace('"map', "")  # no maps anywhere
    for f in s["fields"]:
        assert not isinstance(f["type"], list), f"{name}.{f['name']} is a union"


def test_contract_violations_are_refused():
    bad = json.loads(json.dumps(schemas.load("env_state")))
    bad["fields"] = bad["fields"][1:]
    with pytest.raises(ValueError, match="must open with the header"):
        Codec({"env_state": bad})


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_trip_and_both_avro_implementations_agree(name, data):
    record = data.draw(records(schemas.load(name)))
    value = CODEC.encode(name, record)
    # fastavro writes exactly Apache avro's bytes
    assert value == apache_value(name, record)
    assert value[:2] == MAGIC
    got_name, decoded = CODEC.decode(value)
    assert got_name == name
    assert decoded == record
    # Apache avro: its CRC-64-AVRO over the Parsing Canonical Form gives the same fingerprint, and
    # it reads the same record from the same body. (Apache avro's Python canonical_form re-expands
    # named types at every use, unlike the specification and the Java library; docs/HASHING.md.)
    apache = avro.schema.parse(json.dumps(schemas.load(name)))
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schemas.load(name)))
    assert avro.schema._crc_64_fingerprint(canonical.encode()) == value[2:10]
    body = avro.io.BinaryDecoder(io.BytesIO(value[10:]))
    assert avro.io.DatumReader(apache).read(body) == record
    # the hash contract's byte positions
    assert prev_hash(value) == record["prev_event_hash"]
    assert stored_hash(value) == record["event_hash"]
    assert seq_and_chain(value) == (record["seq"], record["chain_id"])


def test_chain_writer_bytes_are_plain_avro():
    w = ChainWriter("marl.env.state", "r:env", "r", "p")
    e0 = w.append("env.state", {"episode": 0, "step": 0, "state": [0.5, 1.0], "collapsed_state": [0.25]})
    e1 = w.append("env.state", {"episode": 0, "step": 1, "state": [], "collapsed_state": []},
                  source_event_hashes=[e0.event_hash], policy_version="v1")
    for e in (e0, e1):
        name, rec = CODEC.decode(e.value)
        assert apache_value(name, rec) == e.value
        assert compute_hash(e.value) == e.event_hash == rec["event_hash"]
    assert prev_hash(e0.value) == bytes(32)
    assert prev_hash(e1.value) == e0.event_hash
    rec1 = CODEC.decode(e1.value)[1]
    assert rec1["seq"] == 1 and rec1["policy_version"] == "v1" and rec1["source_event_hashes"] == [e0.event_hash]
    assert rec1["retention_expiry"] > rec1["produced_at"]
    assert len(rec1["event_id"]) == 36 and rec1["event_id"][14] == "8"


def test_old_writer_schema_is_read_by_the_current_reader():
    value, old_codec_fp = old_env_state_value([1.0])
    assert old_codec_fp != CODEC.fingerprint("env_state")
    name, decoded = CODEC.decode(value)
    assert name == "env_state"
    assert decoded["flags"] == []  # the field added later takes its default
    assert decoded["seq"] == 3 and decoded["state"] == [1.0]


@pytest.mark.parametrize("value,kind", [
    (b"{\"json\": true}", "not_single_object"),
    (b"\xc3\x01" + b"\x00" * 8 + b"\x00" * 40, "unknown_fingerprint"),
    (b"\xc3", "not_single_object"),
])
def test_bad_values_raise_decode_errors_with_a_kind(value, kind):
    with pytest.raises(DecodeError) as info:
        CODEC.decode(value)
    assert info.value.kind == kind


def test_truncated_value_is_reported_as_truncated():
    w = ChainWriter("marl.env.state", "r:env", "r", "p")
    v = w.append("env.state", {"episode": 0, "step": 0, "state": [0.5] * 8, "collapsed_state": []}).value
    texts = set()
    for cut in range(40, len(v) - 1, 7):
        for _ in range(2):  # the same bytes give the same text (it goes into ledger findings)
            with pytest.raises(DecodeError) as info:
                CODEC.decode(v[:cut])
            assert info.value.kind in ("truncated", "malformed")
            assert " at 0x" not in str(info.value)
            texts.add((cut, str(info.value)))
    assert len(texts) == len(range(40, len(v) - 1, 7))


def test_encoder_rejects_records_that_do_not_fit():
    w = ChainWriter("marl.joint.action", "c", "r", "p")
    ok = {"episode": 0, "step": 0, "actions": [], "joint_vector": []}
    with pytest.raises(ValueError, match="32-byte"):
        w.append("joint.action", ok, source_event_hashes=[b"short"])
    with pytest.raises(EncodeError, match="joint_action"):
        w.append("joint.action", {"episode": 0})
    with pytest.raises(ValueError, match="belongs on marl.env.state"):
        w.append("env.state", {})
    assert w.head.seq == -1  # nothing was appended by the failed calls
    with pytest.raises(EncodeError, match="joint_action"):
        CODEC.encode_payload("joint_action", {**ok, "step": 1 << 64})
    with pytest.raises(ValueError, match="does not fit an Avro long"):
        long_bytes(1 << 63)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(1 << 48, (1 << 55) - 1), st.integers(-(1 << 55), -(1 << 48)),
                 st.integers(-(1 << 63), (1 << 63) - 1)))
def test_long_encoding_matches_the_avro_varint_in_every_range(n):
    """The chain writer's header varints are Avro's (checked against Apache avro's encoder too)."""
    z = ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF
    assert long_bytes(n) == uvarint(z)
    buf = io.BytesIO()
    avro.io.BinaryEncoder(buf).write_long(n)
    assert long_bytes(n) == buf.getvalue()

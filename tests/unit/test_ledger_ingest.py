"""Records on their way into the ledger (ledger/ingest.py): one decoder (the codec, then
ledger.tables.row_tuples_for_event) and the pure chain checks, with the verifier's vocabulary.

The storage side (what the store decides, both backends) is in test_ledger_storage.py."""
from __future__ import annotations

import math
from hashlib import sha256

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from eventlog.codec import MAGIC, DecodeError, default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.verify import BreakKind, verify_records
from ledger.ingest import IngestKind, check_batch, decode_rows
from ledger.tables import HEADER_COLUMNS, SCHEMA_TABLE, TABLES
from tests import corruptions
from tests.avro_strategies import old_env_state_value
from tests.avro_strategies import records as avro_records
from tests.unit.test_ledger_storage import RECORDS, SIGNER

CODEC = default_codec()
NAMES = sorted(schemas.current())
HEADER = [c for c, _ in HEADER_COLUMNS]


def _one(event_type: str, payload: dict) -> bytes:
    sink = MemorySink()
    EventLog(sink, run_id="r", producer_id="p").append("r:x", event_type, payload)
    return sink.sent[0][2]


def checked(records, heads=None):
    """check_batch, then its pending events judged against an empty store."""
    batch = check_batch(records, {} if heads is None else heads)
    return batch, batch.resolve({}, set())


# ---- the decoder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_schema_decodes_into_rows_that_fit_its_table(name, data):
    record = data.draw(avro_records(schemas.load(name)))
    value = CODEC.encode(name, record)
    got, rows = decode_rows(value, "marl.t", 3, 17)
    assert got == name and rows[0][0] == SCHEMA_TABLE[name]
    for table, row in rows:
        assert len(row) == len(TABLES[table].columns), table
    header = dict(zip(HEADER, rows[0][1]))
    for col in ("event_id", "chain_id", "seq", "run_id", "event_type", "produced_at", "retention_expiry",
                "prev_event_hash"):
        assert header[col] == record[col], col
    assert (header["topic"], header["kafka_partition"], header["kafka_offset"]) == ("marl.t", 3, 17)
    assert header["raw"] == value and header["event_hash"] == value[-32:]
    assert header["source_event_hashes"] == b"".join(record["source_event_hashes"])


def test_edge_values_in_the_row_text():
    inf, nan = float("inf"), float("nan")
    pf = [{"namespace": "n", "field": "f\u00e9", "subject_ref": ref, "ciphertext": b"\x00"}
          for ref in (b"\xff" * 32, bytes(32), b"\xff" * 32)]
    state = _one("env.state", {"episode": 0, "step": 1, "state": [1.0, nan, -inf], "collapsed_state": [-0.0, 1e-30],
                               "protected_fields": pf, "flags": ["a\"b", "\U0001f600\x00"]})
    row = dict(zip(TABLES["environment_states"].column_names, decode_rows(state, "t", 1, 2)[1][0][1]))
    assert (row["state"], row["collapsed_state"]) == ("[1.0,NaN,-Infinity]",
                                                      "[-0.0000000000000000,1.0000000031710769e-30]")
    assert row["subject_refs"] == "0" * 64 + " " + "f" * 64          # each subject once, sorted
    no_actions = _one("joint.action", {"episode": 0, "step": 0, "actions": [], "joint_vector": []})
    reward = decode_rows(no_actions, "t", 1, 2)[1][0][1][-1]
    assert reward == 0 and type(reward) is int
    actions = [{"agent_id": "a", "discrete": -1, "continuous": [0.1], "log_prob": -1.0, "reward": r,
                "terminated": True, "truncated": False} for r in (-0.0, 0.1, 0.2, 1e16)]
    summed = _one("joint.action", {"episode": 0, "step": 0, "actions": actions, "joint_vector": [inf]})
    assert decode_rows(summed, "t", 1, 2)[1][0][1][-1] == sum(a["reward"] for a in actions)


def test_float_text_round_trips_every_float32():
    import json
    import struct
    from ledger.tables import _floats

    values = [struct.unpack("<f", struct.pack("<f", x))[0] for x in (0.1, -2.5e-30, 3.4028234663852886e38, 1e-45)]
    assert json.loads(_floats(values)) == values
    assert math.isnan(json.loads(_floats([math.nan]))[0])


def test_an_older_writer_is_read_with_the_current_schema():
    value, _ = old_env_state_value([1.0, -0.5])
    name, rows = decode_rows(value, "marl.env.state", 0, 5)
    table, row = rows[0]
    assert (name, table) == ("env_state", "environment_states")
    assert row[19:24] == (1, 2, "[1.0000000000000000,-0.50000000000000000]", "[]", "[]")   # no flags: []


def test_a_policy_update_brings_its_lineage_rows():
    rec = {"algorithm": "ppo", "config_hash": "c", "seed": 1, "parent_policy_version": "", "policy_updated": True,
           "optimizer_steps": 2, "env_steps": 3, "losses": [{"name": "policy", "value": 0.5}],
           "weights_sha256": bytes(32), "verified": False,
           "lineage": [{"topic": "marl.joint.action", "partition": 0, "first_offset": 0, "last_offset": 9,
                        "chain_id": "r:actions", "first_seq": 0, "last_seq": 9, "head_event_hash": b"\x01" * 32}]}
    name, rows = decode_rows(_one("policy.update", rec), "marl.policy.update", 0, 0)
    assert name == "policy_update" and [t for t, _ in rows] == ["policy_updates", "policy_update_lineage"]
    assert rows[1][1][0] == rows[0][1][0] and rows[1][1][2:] == ("marl.joint.action", 0, 0, 9, "r:actions", 0, 9,
                                                                 b"\x01" * 32)


@pytest.mark.parametrize("value,kind", [
    (b"", "not_single_object"), (b"\xc3", "not_single_object"), (b"{\"json\": true}", "not_single_object"),
    (MAGIC + bytes(8) + bytes(40), "unknown_fingerprint"),
    (CODEC.prefix("env_state"), "truncated"),
])
def test_bad_values_raise_decode_error(value, kind):
    with pytest.raises(DecodeError) as info:
        decode_rows(value, "t", 0, 0)
    assert info.value.kind == kind


REAL = [r.value for r in RECORDS]


def test_every_truncation_and_a_trailing_byte_is_a_decode_error():
    for value in {CODEC.schema_for(v): v for v in REAL}.values():  # one event per schema
        for n in range(len(value)):
            with pytest.raises(DecodeError):
                decode_rows(value[:n], "t", 0, 0)
        with pytest.raises(DecodeError):
            decode_rows(value + b"\x00", "t", 0, 0)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_damaged_events_give_rows_or_a_decode_error_and_never_crash_the_check(data):
    value = bytearray(data.draw(st.sampled_from(REAL)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(10, len(value) - 1))  # keep the marker and fingerprint: reach the body
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            value[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            value[i:i] = data.draw(st.binary(min_size=1, max_size=3))
        else:
            del value[i]
    try:
        decode_rows(bytes(value), "t", 0, 0)
    except DecodeError:
        pass
    batch, findings = checked([("marl.env.state", 0, 0, "k", bytes(value))])
    assert findings, "a damaged event is always a finding"


# ---- the chain checks: the verifier's kinds -------------------------------------------------------

def test_a_clean_stream_has_no_findings_and_its_heads():
    batch, findings = checked(RECORDS)
    assert findings == [] and batch.pending == []
    assert sum(map(len, batch.rows.values())) == len(RECORDS) + 1   # one lineage row
    assert batch.heads[("marl.joint.action", "r1:actions")][0] == 23
    # in several batches, with the heads carried over: the same rows
    heads: dict = {}
    rows = [r for i in range(0, len(RECORDS), 7) for t in check_batch(RECORDS[i:i + 7], heads).rows.values()
            for r in t]
    assert sorted(rows, key=repr) == sorted((r for t in batch.rows.values() for r in t), key=repr)
    assert heads == batch.heads


@pytest.mark.parametrize("case", ["edited-payload", "missing-event", "reordered", "duplicated", "inserted"])
def test_each_tamper_case_is_a_finding_of_the_verifiers_kind(case):
    data = [r for r in RECORDS if r.topic != "marl.audit.checkpoints"]
    records, kind, marker = corruptions.standard_cases()[case](data)
    assert verify_records(records).breaks[0].kind == kind          # the auditor's verdict ...
    _, findings = checked(records)
    kinds = {f.kind for f in findings}
    assert kind.value in kinds and kinds <= {k.value for k in BreakKind}, (case, findings)  # ... is the ledger's
    assert {f.chain_id for f in findings} == {"r1:actions"}


def _action_chain(name: str, seqs: list[int]) -> list[Record]:
    """joint.action events with the given seqs, each linked to the one before it (valid hashes)."""
    out, prev = [], bytes(32)
    for i, seq in enumerate(seqs):
        v = CODEC.encode("joint_action", {
            "prev_event_hash": prev, "seq": seq, "chain_id": name, "event_id": f"{name}-{i}",
            "event_type": "joint.action", "run_id": "r", "produced_at": 1, "producer_id": "p",
            "data_classification": "internal", "retention_expiry": 2, "feature_schema_version": "1",
            "policy_version": "", "rule_version": "", "source_event_hashes": [], "episode": 0, "step": i,
            "actions": [], "joint_vector": [], "event_hash": bytes(32)})
        v = v[:-32] + sha256(v[:-32]).digest()
        out.append(Record("marl.joint.action", 0, i, name, v, 0))
        prev = v[-32:]
    return out


@pytest.mark.parametrize("seqs,want", [
    ([0, 1, 2], []),
    ([1, 2], [("missing", 1)]),                        # does not start at 0
    ([0, 2, 4], [("missing", 2), ("missing", 4)]),
    ([0, 0, 1], [("inserted", 0), ("edited", 1)]),     # a second seq 0; seq 1 links to it, not to the head
    ([0, 2, 1], [("missing", 2), ("reordered", 1)]),
])
def test_seq_starts_at_0_and_grows_by_1_even_when_every_link_is_right(seqs, want):
    records = _action_chain("c", seqs)
    batch, findings = checked(records)
    assert [(f.kind, f.seq) for f in findings] == want
    assert sum(map(len, batch.rows.values())) == len(seqs)     # every event is kept for `ledger verify`
    assert verify_records(records).ok == (not want)


def test_what_is_not_an_event_and_what_sits_in_the_wrong_place():
    good = RECORDS[5]
    records = [
        Record(good.topic, good.partition, 900, good.key, b"not an event", 0),
        Record(good.topic, good.partition, 901, good.key, None, 0),                     # a tombstone
        Record("marl.di.credit", 0, 902, good.key, good.value, 0),
        Record(good.topic, good.partition, 903, "not-the-chain", RECORDS[0].value if RECORDS[0].topic == good.topic
               else good.value, 0),
    ]
    batch, findings = checked(records)
    kinds = [(f.kind, f.offset) for f in findings]
    assert (IngestKind.UNDECODABLE.value, 900) in kinds and (IngestKind.UNDECODABLE.value, 901) in kinds
    assert (IngestKind.WRONG_TOPIC.value, 902) in kinds and (BreakKind.WRONG_KEY.value, 903) in kinds
    undecodable = next(f for f in findings if f.offset == 900)
    assert sha256(b"not an event").hexdigest() in undecodable.detail
    assert batch.offsets[(good.topic, good.partition)] == 904 and batch.offsets[("marl.di.credit", 0)] == 903


def test_a_copy_is_judged_by_its_bytes_and_its_place():
    first = RECORDS[3]
    same_place = first
    elsewhere = first._replace(offset=first.offset + 500)
    name, rec = CODEC.decode(first.value)
    forged = CODEC.encode(name, dict(rec, producer_id="someone else"))     # same event_id, re-sealed
    forged = forged[:-32] + sha256(forged[:-32]).digest()
    other_bytes = first._replace(offset=first.offset + 501, value=forged)
    _, findings = checked(RECORDS[:10] + [same_place, elsewhere, other_bytes])
    assert [(f.kind, f.offset) for f in findings] == [("duplicated", first.offset + 500),
                                                      ("edited", first.offset + 501)]
    assert "already in the ledger with other bytes" in findings[1].detail


def test_the_signed_stream_verifies_as_the_ledger_checks_it():
    assert verify_records(RECORDS, SIGNER.public_key).ok


# ---- erasure on ingest (ledger/erasure.py) -----------------------------------------------------------

def test_plan_erasures_takes_every_deletion_event_whole_and_the_late_rows_of_known_subjects():
    from ledger.erasure import Erasure, plan_erasures
    from tests.unit.test_ledger_storage import ERASING, SUBJECT_A, SUBJECT_B

    rows = check_batch(ERASING, {}).rows
    subject_ids = {ref: [r[0] for r in rows["agent_observations"] if ref.hex() in r[-1]]   # r[-1]: subject_refs
                   for ref in (SUBJECT_A, SUBJECT_B)}
    assert len(subject_ids[SUBJECT_A]) == len(subject_ids[SUBJECT_B]) == 2

    # nothing erased yet: the batch's deletion event, for every row of its subject
    planned, known = plan_erasures(rows, {})
    whole = Erasure(SUBJECT_A, "req-1", "dpo@example.org", "GDPR Art. 17(1)(a)")
    assert planned == [whole] and known == {SUBJECT_A: whole}

    # B erased before (by another request): its rows in this batch go under that request
    earlier = Erasure(SUBJECT_B, "req-0", "dpo", "consent withdrawn")
    planned, known = plan_erasures(rows, {SUBJECT_B: earlier})
    assert planned == [whole, Erasure(SUBJECT_B, "req-0", "dpo", "consent withdrawn",
                                      tuple(subject_ids[SUBJECT_B]))]
    assert known == {SUBJECT_A: whole, SUBJECT_B: earlier}

    # A known already and its deletion event in the batch: the whole erasure covers its rows, once
    planned, known = plan_erasures(rows, {SUBJECT_A: whole})
    assert planned == [whole] and known == {SUBJECT_A: whole}

    # a batch without deletion events or subjects' rows: nothing, and known is not touched in place
    plain = check_batch([r for r in ERASING if r.key not in ("r1:subjects", "compliance:deletions")], {}).rows
    before = {SUBJECT_A: whole}
    assert plan_erasures(plain, before) == ([], {SUBJECT_A: whole}) and before == {SUBJECT_A: whole}


def test_a_deletion_event_with_empty_fields_is_still_an_erasure_named_after_the_event():
    from ledger.erasure import deletion_erasures

    value = _one("compliance.deletion", {"request_id": "", "requester": "", "legal_basis": "", "namespace": "user",
                                         "subject_ref": bytes(range(32)), "actions": []})
    rows = check_batch([Record("marl.compliance.deletions", 0, 0, "r:x", value, 0)], {}).rows
    (e,) = deletion_erasures(rows)
    event_id = rows["compliance_deletions"][0][0]
    assert e.subject_ref == bytes(range(32)) and e.event_ids is None
    assert e.request_id == f"compliance.deletion {event_id}"
    assert event_id in e.requester and event_id in e.legal_basis

"""The published vectors (tests/vectors/, written by tools/make_vectors.py): the hash contract holds
under two independent Avro implementations, and every tamper bundle is caught as labelled."""
import io
import json
from hashlib import sha256
from pathlib import Path

import avro.io
import avro.schema
import fastavro
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastavro.schema import to_parsing_canonical_form

import schemas
from eventlog.audit import verify_bundle
from eventlog.checkpoint import CheckpointStatement, load_public_key
from eventlog.merkle import leaf_hash, merkle_root, verify_inclusion
from tools.make_vectors import hashing_vectors

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
HASHING = json.loads((VECTORS / "hashing.json").read_text())


def test_vectors_file_matches_the_code():
    assert hashing_vectors() == HASHING, "regenerate with tools/make_vectors.py and review the diff"


def writer_schema(name: str, fingerprint_hex: str) -> dict:
    """The published version of schema ``name`` whose fingerprint (by fastavro) is ``fingerprint_hex``:
    the current one or one kept in schemas/history/ (the joint.action vectors are joint_action.v0)."""
    versions = [schemas.load(name)] + [s for stem, s in schemas.history().items() if stem.split(".")[0] == name]
    for s in versions:
        if fastavro.schema.fingerprint(to_parsing_canonical_form(fastavro.parse_schema(s)),
                                       "CRC-64-AVRO") == fingerprint_hex:
            return s
    pytest.fail(f"no version of schema {name} has fingerprint {fingerprint_hex}: a published schema was changed "
                f"in place; keep the old one in schemas/history/")


@pytest.mark.parametrize("i", range(len(HASHING["events"])))
def test_event_vector_under_fastavro_and_apache_avro(i):
    ev = HASHING["events"][i]
    value = bytes.fromhex(ev["value_hex"])
    schema = writer_schema(ev["schema"], ev["fingerprint_hex"])
    # hash contract on raw bytes
    assert value[:2] == b"\xc3\x01"
    assert value[10:42].hex() == ev["prev_event_hash"]
    assert sha256(value[:-32]).hexdigest() == ev["event_hash"] == value[-32:].hex()
    # fingerprint: CRC-64-AVRO of the Parsing Canonical Form, by both libraries' CRC code
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schema))
    assert fastavro.schema.fingerprint(canonical, "CRC-64-AVRO") == ev["fingerprint_hex"]
    assert avro.schema._crc_64_fingerprint(canonical.encode()).hex() == ev["fingerprint_hex"]
    # body: both libraries decode the same record
    rec_fast = fastavro.schemaless_reader(io.BytesIO(value[10:]), fastavro.parse_schema(schema), None)
    rec_apache = avro.io.DatumReader(avro.schema.parse(json.dumps(schema))).read(
        avro.io.BinaryDecoder(io.BytesIO(value[10:])))
    assert rec_fast == rec_apache
    assert rec_fast["seq"] == ev["seq"] and rec_fast["event_hash"].hex() == ev["event_hash"]


def test_chain_links_and_checkpoint_signature():
    events = HASHING["events"]
    actions = [e for e in events if e["topic"] == "marl.joint.action"]
    prev = "00" * 32
    for e in actions:
        assert e["prev_event_hash"] == prev
        prev = e["event_hash"]
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(HASHING["public_key_raw_hex"]))
    assert load_public_key(HASHING["public_key_pem"].encode()).public_bytes_raw() == key.public_bytes_raw()
    cp_event = next(e for e in events if e["topic"] == "marl.audit.checkpoints")
    cp = fastavro.schemaless_reader(io.BytesIO(bytes.fromhex(cp_event["value_hex"])[10:]),
                                    fastavro.parse_schema(schemas.load("audit_checkpoint")), None)
    hashes = [bytes.fromhex(e["event_hash"]) for e in actions]
    assert cp["merkle_root"] == merkle_root(hashes) == bytes.fromhex(HASHING["merkle"]["root"])
    assert [leaf_hash(h).hex() for h in hashes] == HASHING["merkle"]["leaves"]
    key.verify(cp["signature"], CheckpointStatement.from_record(cp).to_bytes())  # raises if invalid


def test_inclusion_proof_vector():
    p = HASHING["inclusion_proof"]
    verify_inclusion(bytes.fromhex(p["event_hash"]), p["leaf_index"], p["tree_size"],
                     [bytes.fromhex(x) for x in p["path"]], bytes.fromhex(p["root"]))


TAMPER = sorted(d.name for d in (VECTORS / "tamper").iterdir())


@pytest.mark.parametrize("name", TAMPER)
def test_tamper_vector(name):
    folder = VECTORS / "tamper" / name
    expected = json.loads((folder / "expected.json").read_text())
    key = load_public_key(folder / "public_key.pem")
    report, _ = verify_bundle(folder, public_key=key)
    assert report.ok == expected["ok"]
    if not expected["ok"]:
        assert len(report.breaks) == 1
        b = report.breaks[0]
        assert (b.kind.value, b.topic, b.chain_id, b.partition, b.offset) == (
            expected["kind"], expected["topic"], expected["chain_id"], expected["partition"], expected["offset"])

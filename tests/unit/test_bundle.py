"""Bundles: a sealed (signed-manifest) bundle catches every mutation of its events, even the ones no
chain can reveal; damaged files give clear errors."""
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventlog.audit import verify_bundle
from eventlog.bundle import BundleError, read_bundle, write_bundle
from eventlog.checkpoint import Signer, public_key_pem
from tests import corruptions
from eventlog.verify import BreakKind
from tests.unit.test_verify import SIGNER, STREAM


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle") / "clean"
    write_bundle(folder, STREAM, public_key_pem=public_key_pem(SIGNER.public_key), signer=SIGNER)
    return folder


def test_sealed_bundle_verifies_and_round_trips(sealed):
    report, _ = verify_bundle(sealed, public_key=SIGNER.public_key)
    assert report.ok and report.notes == []
    assert sorted(r.value for r in read_bundle(sealed)) == sorted(r.value for r in STREAM)


def test_unsigned_bundle_says_so(tmp_path):
    write_bundle(tmp_path / "b", STREAM, public_key_pem=None)
    report, _ = verify_bundle(tmp_path / "b", public_key=SIGNER.public_key)
    assert report.ok and any("not signed" in n for n in report.notes)


def test_manifest_signed_by_another_key_is_a_break(tmp_path):
    write_bundle(tmp_path / "b", STREAM, public_key_pem=None, signer=Signer.from_seed(b"mallory"))
    report, _ = verify_bundle(tmp_path / "b", public_key=SIGNER.public_key)
    assert not report.ok and "not the trusted key" in report.breaks[0].detail


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutation_of_a_sealed_bundle_is_detected(sealed, tmp_path_factory, data):
    recs = list(STREAM)
    op = data.draw(st.sampled_from(["flip", "drop", "swap", "duplicate", "append"]))
    i = data.draw(st.integers(0, len(recs) - 1))
    if op == "flip":
        v = bytearray(recs[i].value)
        v[data.draw(st.integers(0, len(v) - 1))] ^= data.draw(st.integers(1, 255))
        recs[i] = recs[i]._replace(value=bytes(v))
    elif op == "drop":
        del recs[i]  # including the newest checkpoint, which only the manifest can miss
    elif op == "swap":
        j = data.draw(st.integers(0, len(recs) - 1).filter(lambda j: j != i))
        recs[i], recs[j] = recs[j], recs[i]
    elif op == "duplicate":
        recs.insert(data.draw(st.integers(0, len(recs))), recs[i])
    else:
        recs.append(recs[i]._replace(offset=10_000))
    folder = tmp_path_factory.mktemp("mut") / "b"
    shutil.copytree(sealed, folder)
    # the mutated events under the original, signed manifest
    write_bundle(folder / "new", corruptions.renumber(recs), public_key_pem=None)
    shutil.move(folder / "new" / "events.avro", folder / "events.avro")
    report, _ = verify_bundle(folder, public_key=SIGNER.public_key)
    assert not report.ok


def test_damaged_file_gives_a_clear_error(sealed, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(sealed, folder)
    data = bytearray((folder / "events.avro").read_bytes())
    del data[len(data) // 2:]
    (folder / "events.avro").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="damaged|fresh export"):
        verify_bundle(folder, public_key=SIGNER.public_key)


def _unsealed(tmp_path, recs, name="b", signer=None):
    """A bundle of ``recs`` whose manifest is unsigned (or signed by ``signer``): what an operator who
    rewrote history would hand over, having stripped or re-made the signature it cannot forge."""
    folder = tmp_path / name
    write_bundle(folder, corruptions.renumber(recs), public_key_pem=public_key_pem(SIGNER.public_key), signer=signer)
    return folder


def _rolled_back(n=40):
    """STREAM with the actions chain's last ``n`` events and every checkpoint after them removed."""
    actions = [r for r in STREAM if r.topic == "marl.joint.action"]
    gone = {id(r) for r in actions[-n:]}
    cps = [r for r in STREAM if r.topic == "marl.audit.checkpoints"]
    keep_cps = 1  # the first checkpoint of the run only
    gone |= {id(r) for r in cps[keep_cps:]}
    return [r for r in STREAM if id(r) not in gone]


@pytest.mark.parametrize("case", ["rolled_back", "forged_tail", "foreign_chain", "unchanged"])
def test_with_a_pinned_key_a_bundle_without_a_valid_manifest_signature_fails(tmp_path, case):
    from tests.synthetic import synthetic_run
    from eventlog.kafka import Record
    from eventlog.log import EventLog, MemorySink

    recs = list(STREAM)
    if case == "rolled_back":
        recs = _rolled_back()
    elif case == "forged_tail":  # the attacker extends a chain with events of its own, unsigned
        last = [r for r in STREAM if r.topic == "marl.joint.action"][-1]
        from eventlog.chain import ChainHead, ChainWriter
        from eventlog.hashing import seq_and_chain

        w = ChainWriter("marl.joint.action", last.key, "r1", "mallory", head=ChainHead(seq_and_chain(last.value)[0],
                                                                                      last.value[-32:]))
        e = w.append("joint.action", {"episode": 9, "step": 0, "actions": [], "joint_vector": []})
        recs.append(Record(e.topic, last.partition, last.offset + 1, e.chain_id, e.value, 0))
    elif case == "foreign_chain":  # a whole chain from another run, signed by another key
        sink = MemorySink()
        log = EventLog(sink, run_id="x9", producer_id="p", signer=Signer.from_seed(b"mallory"))
        synthetic_run(log, episodes=1, steps=3, agents=1)
        log.close()
        recs += [Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)]
    folder = _unsealed(tmp_path, recs)
    pinned, _ = verify_bundle(folder, public_key=SIGNER.public_key, pinned=True)
    assert not pinned.ok
    assert any(b.kind == BreakKind.BAD_SIGNATURE and "not signed" in b.detail for b in pinned.breaks)
    # re-signed by the attacker's key: refused as well
    resigned = _unsealed(tmp_path, recs, "resigned", signer=Signer.from_seed(b"mallory"))
    report, _ = verify_bundle(resigned, public_key=SIGNER.public_key, pinned=True)
    assert not report.ok and any("not the trusted key" in b.detail for b in report.breaks)


def test_without_a_pinned_key_a_missing_manifest_signature_is_a_note(tmp_path):
    folder = _unsealed(tmp_path, list(STREAM))
    report, _ = verify_bundle(folder, public_key=SIGNER.public_key)
    assert report.ok and any("not signed" in n for n in report.notes)


def test_a_rolled_back_bundle_of_a_finished_run_shows_unsigned_events_even_unpinned(tmp_path):
    # the rollback removed checkpoints that the run's remaining events needed: their tails are unsigned
    report, _ = verify_bundle(_unsealed(tmp_path, _rolled_back()), public_key=SIGNER.public_key)
    assert not report.ok and BreakKind.UNSIGNED in {b.kind for b in report.breaks}


def test_a_sealed_bundle_verifies_with_its_pinned_key(sealed):
    report, _ = verify_bundle(sealed, public_key=SIGNER.public_key, pinned=True)
    assert report.ok and not report.notes


@pytest.mark.parametrize("change,says", [
    (lambda m: m.pop("events_sha256"), "events_sha256: Field required"),
    (lambda m: m.update(events=-3), "events: Input should be greater than or equal to 0"),
    (lambda m: m.update(signature="zz"), "signature: String should match pattern"),
    (lambda m: m.update(topics=["marl.joint.action"]), "topics: Input should be a valid dictionary"),
])
def test_a_malformed_manifest_is_refused_with_what_is_wrong(sealed, tmp_path, change, says):
    import json

    folder = tmp_path / "b"
    shutil.copytree(sealed, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a valid bundle manifest") as info:
        verify_bundle(folder, public_key=SIGNER.public_key)
    assert says in str(info.value)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="is not JSON"):
        verify_bundle(folder, public_key=SIGNER.public_key)


@pytest.mark.parametrize("seqs,kind", [([0, 2, 4], BreakKind.MISSING), ([0, 0, 1], BreakKind.DUPLICATED),
                                       ([0, 2, 1], BreakKind.REORDERED), ([3, 4, 5], BreakKind.MISSING)])
def test_a_bundle_whose_links_hold_but_whose_seqs_do_not_is_broken(tmp_path, seqs, kind):
    from tests.unit.test_verify import _chain_with_seqs

    write_bundle(tmp_path / "b", _chain_with_seqs(seqs), public_key_pem=None)
    report, _ = verify_bundle(tmp_path / "b")
    assert not report.ok and report.breaks[0].kind == kind

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
    assert not report.ok and "signature" in report.breaks[0].detail


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

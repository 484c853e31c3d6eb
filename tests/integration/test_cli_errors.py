"""Every command against a missing broker, a wrong key and bad files: one clear line on stderr, the
right exit code (2: could not do its work; 1: did it and found something wrong), never a traceback,
nothing half-written (issue 14 item 9)."""
import json
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marlgrc.cli import app

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "tamper"


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res.exit_code, res.output


def one_error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.parametrize("args", [
    ["verify"], ["verify", "--run", "r1"], ["export", "--out", "{tmp}/bundle"], ["import", VECTORS / "clean"],
    ["run", "--env", "mailbox_v0", "--episodes", "1", "--no-progress"],
    ["run", "--env", "mailbox_v0", "--algo", "mappo", "--iterations", "1"],
    ["train", "--run", "r1", "--algo", "mappo"], ["reprocess", "--run", "r1"], ["ledger", "sync"],
    ["prove", "--topic", "marl.joint.action", "--chain", "r1:actions", "--seq", "0"], ["process"],
    ["train-online", "--env", "mailbox_v0", "--algo", "mappo", "--minutes", "0.01", "--out", "{tmp}/curve.json"],
], ids=lambda a: "-".join(str(x) for x in a[:2]))
def test_a_missing_broker_is_one_line_and_exit_2(tmp_path, args):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    code, out = invoke(*args, "--home", tmp_path, "--bootstrap", closed_port())
    line = one_error_line(out)
    assert code == 2 and "did not answer" in line and "marlgrc up" in line
    assert not (tmp_path / "bundle").exists()  # export leaves no empty or partial bundle behind


def test_bundle_files_bad_and_damaged(tmp_path):
    pem = VECTORS / "clean" / "public_key.pem"
    code, out = invoke("verify", "--bundle", tmp_path)  # not a bundle: could not do its work
    assert code == 2 and "no manifest.json" in one_error_line(out)
    damaged = tmp_path / "damaged"
    shutil.copytree(VECTORS / "clean", damaged)
    data = (damaged / "events.avro").read_bytes()
    (damaged / "events.avro").write_bytes(data[: len(data) // 2])
    code, out = invoke("verify", "--bundle", damaged, "--public-key", pem)  # damaged: does not verify
    assert code == 1 and "does not verify" in one_error_line(out)
    malformed = tmp_path / "malformed"
    shutil.copytree(VECTORS / "clean", malformed)
    manifest = json.loads((malformed / "manifest.json").read_text())
    manifest["events"] = "many"
    (malformed / "manifest.json").write_text(json.dumps(manifest))
    code, out = invoke("verify", "--bundle", malformed, "--public-key", pem)
    assert code == 1 and "not a valid bundle manifest" in one_error_line(out)
    code, out = invoke("import", malformed, "--home", tmp_path, "--bootstrap", closed_port())
    assert code == 2 and "not a valid bundle manifest" in one_error_line(out)


def test_keys_garbage_other_and_pinned(tmp_path):
    from eventlog.checkpoint import Signer, public_key_pem

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    code, out = invoke("verify", "--bundle", VECTORS / "clean", "--public-key", garbage)
    line = one_error_line(out)
    assert code == 2 and str(garbage) in line and "`marlgrc public-key`" in line
    other = tmp_path / "other.pem"
    other.write_bytes(public_key_pem(Signer.from_seed(b"someone else").public_key))
    code, out = invoke("verify", "--bundle", VECTORS / "clean", "--public-key", other)
    assert code == 1 and "bad_signature" in out
    # the vectors' bundles are signed; with the right key pinned the clean one verifies, signatures required
    code, out = invoke("verify", "--bundle", VECTORS / "clean", "--public-key", VECTORS / "clean" / "public_key.pem")
    assert code == 0, out
    unsigned = tmp_path / "unsigned"
    shutil.copytree(VECTORS / "clean", unsigned)
    manifest = json.loads((unsigned / "manifest.json").read_text())
    del manifest["signature"], manifest["signer_key_id"]
    (unsigned / "manifest.json").write_text(json.dumps(manifest))
    code, out = invoke("verify", "--bundle", unsigned, "--public-key", VECTORS / "clean" / "public_key.pem")
    assert code == 1 and "not signed" in out
    code, out = invoke("verify", "--bundle", unsigned)  # the bundle's own key: not pinned, a note
    assert code == 0 and "not signed" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: device=cuda is valid")
def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path):
    code, out = invoke("train-online", "--env", "simple_spread_v3", "--algo", "mappo", "--iterations", "1",
                       "--set", "device=cuda", "--bootstrap", "memory", "--home", tmp_path, "--out", tmp_path / "c.json")
    line = one_error_line(out)
    assert code == 2 and "device 'cuda'" in line and "use device=cpu" in line
    assert not (tmp_path / "c.json").exists()
    code, out = invoke("train-online", "--env", "simple_spread_v3", "--algo", "mappo", "--iterations", "1",
                       "--set", "device=tpu9", "--bootstrap", "memory", "--home", tmp_path)
    assert code == 2 and "device 'tpu9'" in one_error_line(out)

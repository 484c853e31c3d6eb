"""The auditor's CLI on the real broker: demo, verify (topics, run, bundle, trusted state), export,
import, prove, and errors a person can act on."""
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marlgrc.cli import app

pytestmark = pytest.mark.integration
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "tamper"


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def test_demo_export_verify_prove_import(kafka, topics, tmp_path):
    common = ["--home", tmp_path, "--bootstrap", kafka.bootstrap, "--prefix", topics]
    code, out = invoke("demo", "--episodes", 1, *common)
    assert code == 0, out
    assert "verdict: VERIFIED" in out
    run = out.split("verdict: VERIFIED (run ")[1].split(")")[0]

    code, out = invoke("verify", "--run", run, "--json", *common)
    assert code == 0, out
    report = json.loads(out[out.index("{"):])
    chains = {c["topic"]: c for c in report["chains"]}
    assert report["ok"]
    # one episode of 20 items: per step a state, an observation per agent, a joint action, a credit
    assert chains["marl.joint.action"]["events"] == chains["marl.di.credit"]["events"] == 20
    assert chains["marl.env.state"]["events"] == 20 and chains["marl.joint.action"]["signed_through_seq"] == 19
    assert chains["marl.di.credit"]["signed_through_seq"] == 19      # the DI worker signs its chains too

    code, out = invoke("public-key", "--home", tmp_path)
    assert code == 0 and out.startswith("-----BEGIN PUBLIC KEY-----")
    (tmp_path / "signer.pem").write_text(out)

    code, out = invoke("export", "--out", tmp_path / "bundle", "--run", run, *common)
    assert code == 0, out
    code, out = invoke("verify", "--bundle", tmp_path / "bundle", "--public-key", tmp_path / "signer.pem")
    assert code == 0, out

    code, out = invoke("prove", "--topic", "marl.joint.action", "--chain", f"{run}:actions", "--seq", 7,
                       "--bundle", tmp_path / "bundle", "--public-key", tmp_path / "signer.pem")
    assert code == 0, out
    proof = json.loads(out)
    assert proof["seq"] == 7 and proof["tree_size"] == 20 and proof["leaf_index"] == 7

    # trusted state: first run writes it, a second run checks history extends it
    state = tmp_path / "trusted.json"
    assert invoke("verify", "--run", run, "--trusted", state, *common)[0] == 0
    assert json.loads(state.read_text())["chains"]
    assert invoke("verify", "--run", run, "--trusted", state, *common)[0] == 0

    # import into a fresh prefix: byte-identical events verify there too
    other = topics[:-1] + "x."
    assert invoke("import", tmp_path / "bundle", "--home", tmp_path, "--bootstrap", kafka.bootstrap, "--prefix", other)[0] == 0
    code, out = invoke("verify", "--run", run, "--home", tmp_path, "--bootstrap", kafka.bootstrap, "--prefix", other)
    assert code == 0, out


@pytest.mark.parametrize("name", ["edited-payload", "rewritten-chain", "bad-signature"])
def test_verify_exits_nonzero_on_a_tampered_bundle(tmp_path, name):
    shutil.copytree(VECTORS / name, tmp_path / name)
    code, out = invoke("verify", "--bundle", tmp_path / name, "--public-key", VECTORS / "clean" / "public_key.pem")
    expected = json.loads((VECTORS / name / "expected.json").read_text())
    assert code == 1
    assert expected["kind"] in out


def test_errors_say_what_to_do(tmp_path):
    code, out = invoke("verify", "--bundle", tmp_path)
    assert code == 2 and "no manifest.json" in out and "marlgrc export" in out
    code, out = invoke("verify", "--home", tmp_path)  # no broker given, none started under this home
    assert code != 0 and "marlgrc up" in out
    code, out = invoke("verify", "--bootstrap", "127.0.0.1:1", "--home", tmp_path)
    assert code == 2 and "did not answer" in out and "marlgrc up" in out
    (tmp_path / "keys").mkdir()
    key = tmp_path / "keys" / "signing.pem"
    key.write_text("not a key")
    key.chmod(0o644)
    code, out = invoke("public-key", "--home", tmp_path)
    assert code != 0


def test_up_status_down_and_every_command_finds_the_broker_up_started(tmp_path, monkeypatch):
    """`up` starts a broker under a home; `run`, `verify` and `forget` given only that home (no
    --bootstrap, no $MARLGRC_BOOTSTRAP) find it as `status` does (issue 14 item 8: `run` and `forget`
    went to 127.0.0.1:9092)."""
    from producers.envs import mailbox_v0

    monkeypatch.delenv("MARLGRC_BOOTSTRAP", raising=False)
    monkeypatch.delenv("MARLGRC_TOPIC_PREFIX", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    try:
        code, out = invoke("up", "--home", home)
        assert code == 0, out
        assert "topics created: 10" in out
        code, out = invoke("status", "--home", home)
        assert code == 0 and "kafka: 127.0.0.1:" in out
        assert invoke("up", "--home", home)[0] == 0  # idempotent: the running broker, no new topics

        code, out = invoke("run", "--env", "mailbox_v0", "--policy", "heuristic", "--episodes", 1, "--seed", 11,
                           "--no-progress", "--home", home)
        assert code == 0, out
        run = out.strip().splitlines()[-1]
        assert run.startswith("mailbox_v0__heuristic__11__")
        code, out = invoke("verify", "--run", run, "--json", "--home", home)
        assert code == 0, out
        report = json.loads(out[out.index("{"):])
        assert report["ok"] and {c["topic"]: c["events"] for c in report["chains"]}["marl.joint.action"] == 20

        env = mailbox_v0.parallel_env()
        env.reset(seed=11)
        user = env._users[env._items["user"][0]]
        code, out = invoke("forget", "--subject", user, "--namespace", "user", "--request-id", "req-up",
                           "--legal-basis", "GDPR Art. 17(1)(a)", "--requester", "dpo@example.org", "--home", home)
        assert code == 0, out
        assert "compliance.deletion seq 0" in out and user not in out
        code, out = invoke("verify", "--json", "--home", home)
        assert code == 0, out
        chains = {c["chain_id"]: c for c in json.loads(out[out.index("{"):])["chains"]}
        assert chains["compliance:deletions"]["events"] == 1
    finally:
        code, out = invoke("down", "--home", home, "--purge")
    assert code == 0 and "kafka stopped" in out
    code, out = invoke("status", "--home", home)
    assert code == 1 and "kafka: not running" in out


def test_run_process_train_the_flow_of_a_user_who_retrains_from_topics(kafka, topics, tmp_path):
    """Issue 14 item 7: `marlgrc train` refused every run that had been through `marlgrc process`
    while `marlgrc verify` found no break. One verifier, one answer: both accept it, signed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from eventlog.kafka import read_records

    root = Path(__file__).resolve().parents[2]
    common = ["--home", tmp_path, "--bootstrap", kafka.bootstrap, "--prefix", topics]
    code, out = invoke("run", "--env", "mailbox_v0", "--policy", "heuristic", "--episodes", 2, "--seed", 3,
                       "--no-progress", *common)
    assert code == 0, out
    run = out.strip().splitlines()[-1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    worker = subprocess.Popen([sys.executable, "-m", "marlgrc", "process", "--name", "flow", "--metrics-port", "0",
                               *map(str, common)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the worker scores every joint action of the run
            credits = [r for r in read_records(kafka.bootstrap, ["marl.di.credit"], prefix=topics)
                       if r.key.startswith(f"{run}:")]
            if len(credits) >= 40:
                break
            assert worker.poll() is None, worker.stdout.read().decode()
            time.sleep(1)
        assert len(credits) == 40
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
    code, out = invoke("verify", "--run", run, "--require-signed", *common)
    assert code == 0, out  # every chain of the run, the processor's included, is signed through its head
    code, out = invoke("train", "--run", run, "--algo", "mappo", *common)
    assert code == 0, out
    assert "truncated" not in out

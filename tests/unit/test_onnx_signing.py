"""Exported ONNX policies are signed and checked before use (issue 14 item 3): `export_onnx` writes
PATH.sig.json with the home's key; `producers.policies.OnnxPolicy` is the only way to load one, and it
refuses a changed byte, a missing signature, another signer, an altered or swapped signature file
before ONNX Runtime sees the bytes; `marlgrc run --policy onnx:PATH` acts with it (real broker)."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from eventlog.checkpoint import (SIGNED_FILE_TAG, SignedFileError, Signer, key_id, public_key_pem,
                                 signature_path)
from eventlog.log import EventLog, MemorySink
from learners.evaluate import GreedyPolicy
from learners.export import export_onnx
from learners.mappo import MAPPOConfig
from learners.offline import train_offline
from producers.policies import OnnxPolicy, PolicyFileError, RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of

ENV = "tests.unit.test_learners_support:MatchTarget"


def _train(seed: int, updates: int):
    env = MatchTarget()
    replay = replay_of(harness_run(env, RandomPolicy(env, seed=seed), episodes=8, seed=seed))
    log = EventLog(MemorySink(), run_id="r1", producer_id="learner", signer=Signer.generate())
    learner, events = train_offline(replay, "mappo", log=log, updates=updates,
                                    config=MAPPOConfig(seed=seed, hidden=32, update_epochs=8))
    log.close()
    return learner, events


@pytest.fixture(scope="module")
def trained():
    """(learner, its policy.update events): MAPPO on MatchTarget, a few updates."""
    return _train(seed=1, updates=3)


@pytest.fixture
def signer():
    return Signer.generate()


@pytest.fixture
def exported(trained, signer, tmp_path):
    learner, events = trained
    return export_onnx(learner, tmp_path / "p.onnx", signer, policy_update=events[-1])


@pytest.fixture
def no_runtime(monkeypatch):
    """Fails the test if ONNX Runtime is asked to build a session: a refused file must never reach it."""
    import onnxruntime

    calls = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: calls.append(a) or pytest.fail(
        "ONNX Runtime was given a file that should have been refused"))
    return calls


def _observations(n: int, seed: int = 5) -> list[dict]:
    env = MatchTarget()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):  # the env's own one-hot targets and off-distribution vectors
        if rng.random() < 0.5:
            out.append({a: np.eye(3, dtype=np.float32)[rng.integers(3)] for a in env.possible_agents})
        else:
            out.append({a: rng.uniform(-2, 2, 3).astype(np.float32) for a in env.possible_agents})
    return out


def test_export_signs_the_file_its_origin_and_its_layout(trained, signer, exported):
    learner, events = trained
    sig = signature_path(exported)
    assert sig.name == "p.onnx.sig.json"
    record = json.loads(sig.read_text())
    assert record["format"] == "marlgrc-signed-file/1"
    # what is signed, exactly (docs/LEARNERS.md): the tag, then the statement's bytes as stored
    signer.public_key.verify(bytes.fromhex(record["signature"]),
                             SIGNED_FILE_TAG + record["statement"].encode())
    st = json.loads(record["statement"])
    data = exported.read_bytes()
    assert st["kind"] == "onnx-policy"
    assert st["file_sha256"] == hashlib.sha256(data).hexdigest() and st["file_size"] == len(data)
    assert st["key_id"] == key_id(signer.public_key).hex()
    ctx = st["context"]
    assert (ctx["run_id"], ctx["algorithm"], ctx["policy_version"]) == ("r1", "mappo", learner.version)
    assert ctx["weights_sha256"] == learner.weights_sha256().hex()
    update = events[-1]
    assert ctx["policy_update"] == {"topic": "marl.policy.update", "chain_id": update.chain_id, "seq": update.seq,
                                    "event_hash": update.event_hash.hex()}
    assert ctx["io"]["agents"] == list(learner.spec.agents) and ctx["io"]["obs_dim"] == 3
    assert ctx["io"]["discrete"] is True and ctx["io"]["n_actions"] == 3
    # the statement is canonical JSON: re-encoding it gives the same bytes a verifier checks
    assert json.dumps(st, sort_keys=True, separators=(",", ":")) == record["statement"]


def test_signed_export_acts_as_the_torch_policy_greedily(trained, signer, exported):
    learner, _ = trained
    pol = OnnxPolicy(exported, signer.public_key, MatchTarget())
    assert pol.version == learner.version
    torch_pol = GreedyPolicy(learner)
    seen = set()
    for obs in _observations(300):
        got, want = pol.act(obs), torch_pol.act(obs)
        assert got == want
        seen |= {a for a, _ in got.values()}
    assert len(seen) > 1  # a policy that always says the same thing would prove little
    one = pol.act({"agent_1": np.eye(3, dtype=np.float32)[2]})  # one live agent, batch of 1
    assert set(one) == {"agent_1"}


def test_a_flipped_byte_is_refused_before_onnx_runtime_sees_it(exported, signer, no_runtime):
    data = bytearray(exported.read_bytes())
    data[len(data) // 2] ^= 0x01
    exported.write_bytes(bytes(data))
    with pytest.raises(SignedFileError, match=r"p\.onnx: its bytes have SHA-256 .* the file was changed after it "
                                              r"was signed, or p\.onnx\.sig\.json belongs to another file"):
        OnnxPolicy(exported, signer.public_key)
    assert no_runtime == []


def test_a_missing_signature_is_refused(exported, signer, no_runtime):
    signature_path(exported).unlink()
    with pytest.raises(SignedFileError, match=r"p\.onnx has no signature \(p\.onnx\.sig\.json is missing beside it\)"
                                              r".*marlgrc train --run RUN --onnx PATH"):
        OnnxPolicy(exported, signer.public_key)
    assert no_runtime == []


def test_a_signature_by_another_key_is_refused(trained, tmp_path, signer, no_runtime):
    learner, _ = trained
    path = export_onnx(learner, tmp_path / "other.onnx", Signer.generate())  # intact, but not our signer
    with pytest.raises(SignedFileError, match=r"other\.onnx: signed by key [0-9a-f]{16}…, not the trusted key "
                                              rf"{key_id(signer.public_key).hex()[:16]}….*signer's public key"):
        OnnxPolicy(path, signer.public_key)
    assert no_runtime == []


def test_a_signature_file_swapped_in_from_another_export_is_refused(trained, exported, signer, tmp_path, no_runtime):
    other, _ = _train(seed=2, updates=1)
    assert other.version != trained[0].version
    export_onnx(other, tmp_path / "q.onnx", signer)  # same signer: the signature itself is genuine
    shutil.copy(signature_path(tmp_path / "q.onnx"), signature_path(exported))
    with pytest.raises(SignedFileError, match=rf"p\.onnx: its bytes have SHA-256 .*\(mappo policy {other.version} of "
                                              rf"run r1\).*belongs to another file"):
        OnnxPolicy(exported, signer.public_key)
    assert no_runtime == []


def test_a_signature_file_rewritten_without_the_key_is_refused(exported, signer, no_runtime):
    data = bytearray(exported.read_bytes())
    data[-1] ^= 0x01
    exported.write_bytes(bytes(data))
    sig = signature_path(exported)
    record = json.loads(sig.read_text())
    st = json.loads(record["statement"])
    st["file_sha256"] = hashlib.sha256(data).hexdigest()  # the forger's new digest, same signature
    record["statement"] = json.dumps(st, sort_keys=True, separators=(",", ":"))
    sig.write_text(json.dumps(record))
    with pytest.raises(SignedFileError, match=r"the Ed25519 signature in p\.onnx\.sig\.json does not verify"):
        OnnxPolicy(exported, signer.public_key)
    sig.write_text("{not json")
    with pytest.raises(SignedFileError, match=r"its signature file p\.onnx\.sig\.json is damaged"):
        OnnxPolicy(exported, signer.public_key)
    assert no_runtime == []


def test_an_export_for_other_agents_is_refused_with_the_env(exported, signer):
    with pytest.raises(PolicyFileError, match=r"agents \['agent_0', 'agent_1'\]; this env has .*agent_2"):
        OnnxPolicy(exported, signer.public_key, MatchTarget(n_agents=3))


def test_a_failed_export_leaves_no_old_signature(trained, signer, tmp_path, monkeypatch):
    learner, _ = trained
    path = export_onnx(learner, tmp_path / "p.onnx", signer)
    import torch

    def broken(*a, **k):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(learner, path, signer)
    assert not signature_path(path).exists()  # the old signature no longer vouches for whatever is there


# --- the CLI: `marlgrc train --onnx OUT`, then `marlgrc run --env E --policy onnx:PATH [--public-key PEM]`,
# on the real broker ---

def _cli():
    from marlgrc import commands_learners, commands_producers

    app = typer.Typer()
    commands_producers.register(app)
    commands_learners.register(app)
    return app


def _decoded(bootstrap, prefix, run_id):
    from eventlog.codec import default_codec
    from eventlog.kafka import read_records

    codec = default_codec()
    out = {}
    for r in read_records(bootstrap, ["marl.run.lifecycle", "marl.agent.observation", "marl.joint.action"],
                          prefix=prefix):
        name, rec = codec.decode(r.value)
        if rec["run_id"] == run_id:
            out.setdefault(r.topic, []).append(rec)
    return out


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_train_exports_signed_and_run_acts_with_it_and_refuses_a_tampered_one(kafka, topics, tmp_path):
    from eventlog.kafka import EventProducer
    from learners.checkpoint import learner_from_checkpoint
    from marlgrc.config import Settings
    from producers.harness import run_episodes

    home = tmp_path / "home"
    key = Signer.load_or_create(Settings.load(home=home).signing_key)  # the home's key
    env = MatchTarget()
    log = EventLog(EventProducer(kafka.bootstrap, prefix=topics), run_id="src", producer_id="harness", signer=key)
    run_episodes(env, RandomPolicy(env, seed=5), log, episodes=8, seed=9, env_id="match_target_v0",
                 env_version="0", config={})
    log.close()
    runner = CliRunner()
    home_opts = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(home)]
    path, ck = tmp_path / "p.onnx", tmp_path / "ck"
    res = runner.invoke(_cli(), ["train", "--run", "src", "--algo", "mappo", "--updates", "3", "--out", str(ck),
                                 "--onnx", str(path), *home_opts])
    assert res.exit_code == 0, res.output
    assert f"onnx {path} (signature {path}.sig.json)" in res.stdout
    learner = learner_from_checkpoint(ck, key.public_key)
    st = json.loads(json.loads(signature_path(path).read_text())["statement"])
    assert st["key_id"] == key_id(key.public_key).hex()  # signed with the home's key, as the checkpoint is
    assert st["context"]["run_id"] == "src" and st["context"]["policy_version"] == learner.version
    assert st["context"]["policy_update"]["chain_id"] == "src:policy:mappo"

    common = ["--env", ENV, "--episodes", "2", "--seed", "3", "--no-progress", *home_opts]
    res = runner.invoke(_cli(), ["run", "--policy", f"onnx:{path}", *common])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    assert "__onnx__3__" in run_id

    got = _decoded(kafka.bootstrap, topics, run_id)
    config = json.loads(got["marl.run.lifecycle"][0]["config_json"])
    assert config["policy"]["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert config["policy"]["policy_version"] == learner.version
    obs = {(o["episode"], o["step"], o["agent_id"]): np.asarray(o["observation"], np.float32)
           for o in got["marl.agent.observation"]}
    greedy = GreedyPolicy(learner)
    assert len(got["marl.joint.action"]) == 2 * 8
    for ja in got["marl.joint.action"]:
        assert ja["policy_version"] == learner.version
        step_obs = {a["agent_id"]: obs[(ja["episode"], ja["step"], a["agent_id"])] for a in ja["actions"]}
        want = greedy.act(step_obs)
        assert {a["agent_id"]: a["discrete"] for a in ja["actions"]} == {a: v for a, (v, _) in want.items()}

    # signed by a key this home does not trust: refused, unless its public key is pinned with --public-key
    other = Signer.generate()
    q = export_onnx(learner, tmp_path / "q.onnx", other)
    res = runner.invoke(_cli(), ["run", "--policy", f"onnx:{q}", *common])
    assert res.exit_code == 2 and "not the trusted key" in res.stderr, res.output
    pem = tmp_path / "other.pem"
    pem.write_bytes(public_key_pem(other.public_key))
    res = runner.invoke(_cli(), ["run", "--policy", f"onnx:{q}", "--public-key", str(pem), *common])
    assert res.exit_code == 0, res.output

    # one changed byte: exit 2, one line naming the file and what happened, no run
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    res = runner.invoke(_cli(), ["run", "--policy", f"onnx:{path}", *common])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], res.stderr
    assert "changed after it was signed" in lines[0] and res.stdout == ""

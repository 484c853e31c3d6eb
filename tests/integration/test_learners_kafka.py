"""Learners against a real broker: on-policy training through Kafka, lineage offsets that point at
the real records, determinism of a replay of the same offsets, and `marlgrc train` end to end."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, read_records
from eventlog.log import EventLog
from eventlog.verify import verify_records
from learners.mappo import MAPPOConfig
from learners.offline import train_offline
from learners.replay import RUN_TOPICS, VERIFY_TOPICS, read_kafka, watermarks
from learners.online import KafkaTransport
from marlgrc.training import train_on_env
from producers.harness import run_episodes
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget

pytestmark = pytest.mark.integration


def _write_run(bootstrap, prefix, run_id, signer, episodes=4):
    env = MatchTarget()
    log = EventLog(EventProducer(bootstrap, prefix=prefix), run_id=run_id, producer_id="harness", signer=signer)
    run_episodes(env, RandomPolicy(env, seed=5), log, episodes=episodes, seed=9, env_id="match_target_v0",
                 env_version="0", config={})
    log.close()


@pytest.mark.timeout(240)
def test_online_training_through_kafka_reads_back_exactly_its_batches(kafka, topics):
    signer = Signer.generate()
    env = MatchTarget()
    with KafkaTransport(kafka.bootstrap, topics) as transport:
        res = train_on_env(env, "match_target_v0", "0", "mappo", transport=transport, iterations=3, seed=1,
                           config=MAPPOConfig(seed=1, episodes_per_update=4), signer=signer,
                           public_key=signer.public_key, run_id="online1")
    assert [r["env_steps"] for r in res.curve] == [32, 64, 96]
    updates = [r for r in read_records(kafka.bootstrap, ["marl.policy.update"], prefix=topics)]
    assert len(updates) == 3
    codec = default_codec()
    recs = [codec.decode(r.value)[1] for r in updates]
    assert [r["event_hash"] for r in recs] == res.update_hashes
    assert all(r["policy_updated"] and r["verified"] for r in recs)
    # consecutive updates read consecutive, non-overlapping offset ranges of the actions chain
    ranges = [next(x for x in r["lineage"] if x["chain_id"] == "online1:actions") for r in recs]
    assert [(x["first_seq"], x["last_seq"]) for x in ranges] == [(0, 31), (32, 63), (64, 95)]
    assert all(b["first_offset"] == a["last_offset"] + 1 for a, b in zip(ranges, ranges[1:]))
    # each lineage range's head hash is the hash of the record at its last offset
    acts = {(r.partition, r.offset): r.value for r in read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics)}
    for x in ranges:
        assert acts[(x["partition"], x["last_offset"])][-32:] == x["head_event_hash"]
    # every chain written (data, policy updates, checkpoints) verifies with the signer's key
    report = verify_records(read_records(kafka.bootstrap, [*RUN_TOPICS, "marl.policy.update"], prefix=topics),
                            signer.public_key)
    assert report.ok and report.events > 0
    assert recs[-1]["policy_version"] == res.learner.version


@pytest.mark.timeout(240)
def test_same_offsets_same_seed_same_config_give_identical_weights(kafka, topics):
    signer = Signer.generate()
    _write_run(kafka.bootstrap, topics, "det1", signer)
    ends = watermarks(kafka.bootstrap, VERIFY_TOPICS, topics)  # every topic read, bounded: the same records
    shas = []
    for seed in (3, 3, 4):
        rp = read_kafka(kafka.bootstrap, "det1", prefix=topics, public_key=signer.public_key,
                        start_offsets={k: 0 for k in ends}, end_offsets=ends)
        assert rp.verified and len(rp.episodes) == 4
        log = EventLog(EventProducer(kafka.bootstrap, prefix=topics), run_id="det1", producer_id=f"l{len(shas)}",
                       signer=signer)  # every chain of a finished run is signed, or a reader refuses it
        learner, events = train_offline(rp, "mappo", log=log, seed=seed, updates=2)
        log.close()
        shas.append(learner.weights_sha256())
        assert codec_of(events[-1])["weights_sha256"] == shas[-1]
    assert shas[0] == shas[1] and shas[0] != shas[2]


def codec_of(event):
    return default_codec().decode(event.value)[1]


@pytest.mark.timeout(240)
def test_train_command_trains_checkpoints_resumes_and_refuses_tampering(kafka, topics, tmp_path):
    from marlgrc.commands_learners import register

    home = tmp_path / "home"
    signer = Signer.load_or_create(home / "keys" / "signing.pem")
    _write_run(kafka.bootstrap, topics, "cli1", signer)
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keep `train` a subcommand
        pass

    runner = CliRunner()
    common = ["--home", str(home), "--bootstrap", kafka.bootstrap, "--prefix", topics]
    r = runner.invoke(app, ["train", "--run", "cli1", "--algo", "ippo", "--out", str(tmp_path / "ck"),
                            "--onnx", str(tmp_path / "p.onnx"), *common])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ck.pt").exists() and (tmp_path / "p.onnx").exists()
    r = runner.invoke(app, ["train", "--run", "cli1", "--algo", "ippo", "--resume", str(tmp_path / "ck"),
                            "--out", str(tmp_path / "ck2"), *common])
    assert r.exit_code == 0, r.output
    codec = default_codec()
    ups = [codec.decode(x.value)[1] for x in read_records(kafka.bootstrap, ["marl.policy.update"], prefix=topics)]
    assert len(ups) == 2 and ups[1]["parent_policy_version"] == ups[0]["policy_version"]
    pt = tmp_path / "ck.pt"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    r = runner.invoke(app, ["train", "--run", "cli1", "--algo", "ippo", "--resume", str(tmp_path / "ck"), *common])
    assert r.exit_code == 2 and "modified after it was signed" in r.output
    r = runner.invoke(app, ["train", "--run", "nope", "--algo", "ippo", *common])
    assert r.exit_code == 2 and "no run.started" in r.output


@pytest.mark.timeout(240)
def test_every_way_to_train_signs_every_chain_with_the_home_key(kafka, topics, tmp_path):
    """`marlgrc run --algo` and `marlgrc train-online` through Kafka: every chain they write (the
    harness's, the learner's, their checkpoint chains) verifies against the home's key and is signed
    through its last event."""
    from marlgrc.cli import app

    home = tmp_path / "home"
    common = ["--home", str(home), "--bootstrap", kafka.bootstrap, "--prefix", topics]
    env = "tests.unit.test_learners_support:MatchTarget"
    runner = CliRunner()
    r = runner.invoke(app, ["run", "--env", env, "--algo", "ippo", "--iterations", "2", *common])
    assert r.exit_code == 0, r.output
    first = r.stdout.strip().splitlines()[-1]
    r = runner.invoke(app, ["train-online", "--env", env, "--algo", "mappo", "--iterations", "2",
                            "--set", "episodes_per_update=3", "--eval-episodes", "0", *common])
    assert r.exit_code == 0, r.output
    second = r.stdout.strip().splitlines()[-1]
    key = Signer.load(home / "keys" / "signing.pem").public_key
    records = list(read_records(kafka.bootstrap, [*RUN_TOPICS, "marl.policy.update"], prefix=topics))
    report = verify_records(records, key)
    assert report.ok, [b.describe() for b in report.breaks]
    for run in (first, second):
        chains = [c for c in report.chains if c.chain_id.startswith(f"{run}:")]
        assert {f"{run}:actions", f"{run}:lifecycle"} <= {c.chain_id for c in chains}
        assert any(c.topic == "marl.policy.update" for c in chains)
        assert all(c.signed_through_seq == c.last_seq >= 0 for c in chains), \
            [(c.chain_id, c.last_seq, c.signed_through_seq) for c in chains]
    assert not any("not covered" in n for n in report.notes), report.notes
    assert verify_records(records, Signer.generate().public_key).breaks  # another key: refused


@pytest.mark.timeout(240)
def test_reproduce_command_retrains_every_update_from_kafka_and_from_a_bundle(kafka, topics, tmp_path):
    """`marlgrc reproduce --run R` after `marlgrc run --algo` and `train-online` through the broker: every
    update's weights are retrained to the recorded hash, from the topics and from the run's exported
    bundle (an auditor's copy, read without a broker), and the retrained learner is checkpointed."""
    import json

    from marlgrc.cli import app

    home = tmp_path / "home"
    common = ["--home", str(home), "--bootstrap", kafka.bootstrap, "--prefix", topics]
    env = "tests.unit.test_learners_support:MatchTarget"
    runner = CliRunner()
    runs = []
    for cmd in (["run", "--env", env, "--algo", "dqn", "--iterations", "2"],
                ["train-online", "--env", env, "--algo", "mappo", "--iterations", "3", "--set", "episodes_per_update=3",
                 "--eval-episodes", "0"]):
        r = runner.invoke(app, [*cmd, *common])
        assert r.exit_code == 0, r.output
        runs.append(r.stdout.strip().splitlines()[-1])
    for run, algo, n in zip(runs, ("dqn", "mappo"), (2, 3)):
        r = runner.invoke(app, ["reproduce", "--run", run, "--no-progress", "--checkpoint", str(tmp_path / run),
                                *common])
        assert r.exit_code == 0, r.output
        assert f"(online, {algo}): {n} update(s) retrained" in r.output and "signatures checked" in r.output
        assert r.output.count(": equal") == n and "reproduced: every update" in r.output
        assert (tmp_path / f"{run}.pt").exists()
    bundle = tmp_path / "bundle"
    r = runner.invoke(app, ["export", "--run", runs[1], "--out", str(bundle), "--no-progress", *common])
    assert r.exit_code == 0, r.output
    pem = tmp_path / "auditor.pem"   # the key the auditor pinned, not the bundle's own copy
    pem.write_text(runner.invoke(app, ["public-key", "--home", str(home)]).stdout)
    r = runner.invoke(app, ["reproduce", "--run", runs[1], "--bundle", str(bundle), "--json", "--no-progress",
                            "--public-key", str(pem), "--home", str(home)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["signatures_checked"] and [u["equal"] for u in doc["updates"]] == [True] * 3
    r = runner.invoke(app, ["reproduce", "--run", "no-such-run", "--no-progress", *common])
    assert r.exit_code == 2 and "no run.started" in r.output


@pytest.mark.timeout(300)
def test_online_training_while_a_processor_worker_scores_the_same_run(kafka, topics, tmp_path):
    """A decision-interpreter worker writes credits (and signs them) while the run trains: the credits
    land between the loop's batches, so the loop reads back only the harness's topics and learns from
    the env's rewards; the run, the credits included, verifies, and every joint action gets a credit."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    key_path = tmp_path / "signing.pem"
    signer = Signer.load_or_create(key_path)
    worker = subprocess.Popen([sys.executable, "-m", "stream_processors", "--bootstrap", kafka.bootstrap, "--prefix",
                               topics, "--batch", "20", "--signing-key", str(key_path)],
                              cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                              stdout=open(tmp_path / "worker.log", "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        with KafkaTransport(kafka.bootstrap, topics) as transport:
            res = train_on_env(MatchTarget(), "match_target_v0", "0", "mappo", transport=transport, iterations=6,
                               seed=1, config=MAPPOConfig(seed=1, episodes_per_update=4), signer=signer,
                               public_key=signer.public_key, run_id="online-scored")
        assert [r["env_steps"] for r in res.curve] == [32 * k for k in range(1, 7)]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the worker catches up with the last batch
            credits = [r for r in read_records(kafka.bootstrap, ["marl.di.credit"], prefix=topics)
                       if r.key.startswith("online-scored:")]
            if len(credits) >= 6 * 32:
                break
            time.sleep(1)
    finally:
        worker.terminate()
        worker.wait(30)
    assert len(credits) == 6 * 32, (tmp_path / "worker.log").read_text()[-2000:]
    from eventlog.audit import DATA_TOPICS

    records = list(read_records(kafka.bootstrap, [*DATA_TOPICS, "marl.audit.checkpoints"], prefix=topics))
    report = verify_records([r for r in records if r.key.startswith("online-scored:")], signer.public_key)
    assert report.ok, [b.describe() for b in report.breaks]

"""`marlgrc ingest --telemetry` on the real broker: a recorded telemetry file with two bad lines
becomes a sandbox_v0 run that verifies (signatures required) and replays for training, and the two
bad lines are in marl.dlq with their line numbers and reasons, signed with the run."""
import hashlib
import json

import pytest
from typer.testing import CliRunner

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import read_records
from learners.replay import read_kafka
from marlgrc.cli import app

pytestmark = pytest.mark.integration

RECORD = {"severity": 0.2, "syscall_count": 150, "file_read_count": 20, "file_write_count": 10,
          "network_connections": 5, "bytes_sent": 5000, "bytes_received": 2000, "child_processes": 2,
          "cpu_usage": 45.5, "memory_usage": 250.0, "registry_modification": False,
          "privilege_escalation_attempt": False, "code_injection_detected": False}


def test_ingest_replays_the_good_lines_and_dead_letters_the_bad(kafka, topics, tmp_path):
    lines = [json.dumps({"episode_id": e, "step": t, "is_malicious": e % 2 == 0, **RECORD,
                         "severity": round(0.2 + 0.15 * t, 2)}) for e in range(6) for t in range(5)]
    bad_cpu = json.dumps({"episode_id": 9, "step": 0, "is_malicious": True, **RECORD, "cpu_usage": 140.5})
    lines.insert(3, bad_cpu)           # line 4
    lines.insert(9, '{"episode_id": 9, "step": 1,')  # line 10: cut off
    path = tmp_path / "recorded.jsonl"
    path.write_text("\n".join(lines) + "\n")
    common = ["--home", str(tmp_path), "--bootstrap", kafka.bootstrap, "--prefix", topics]

    res = CliRunner().invoke(app, ["ingest", "--telemetry", str(path), "--sandboxes", "2", *common])
    assert res.exit_code == 0, res.output
    run = res.stdout.strip().splitlines()[-1]
    assert "line 4: cpu_usage: input should be less than or equal to 100 (got 140.5)" in res.output
    assert "line 10: not JSON" in res.output
    assert "32 lines: 30 valid in 6 recorded episodes, 2 bad" in res.output

    # the good lines: a run that verifies with every event signed, and replays as 3 episodes
    res = CliRunner().invoke(app, ["verify", "--run", run, "--require-signed", "--json", *common])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    chains = {c["chain_id"]: c for c in report["chains"]}
    assert chains[f"{run}:dlq"]["events"] == 2 and chains[f"{run}:dlq"]["signed_through_seq"] == 1
    key = Signer.load(tmp_path / "keys" / "signing.pem").public_key
    replay = read_kafka(kafka.bootstrap, run, prefix=topics, public_key=key)
    assert replay.verified and len(replay.episodes) == 3
    assert replay.spec.agents == ("sandbox_0", "sandbox_1")

    # the bad lines: in marl.dlq, in file order, each with its reason and its exact bytes
    codec = default_codec()
    dead = [codec.decode(r.value)[1] for r in read_records(kafka.bootstrap, ["marl.dlq"], prefix=topics)
            if r.key == f"{run}:dlq"]
    assert [(d["source_offset"], d["error_kind"]) for d in dead] == [(4, "invalid_telemetry"), (10, "invalid_json")]
    assert all(d["source_topic"] == "telemetry:recorded.jsonl" and d["run_id"] == run for d in dead)
    assert dead[0]["reason"].startswith("line 4: cpu_usage") and dead[1]["reason"].startswith("line 10: not JSON")
    assert dead[0]["payload"] == bad_cpu.encode()
    assert dead[0]["payload_sha256"] == hashlib.sha256(bad_cpu.encode()).digest()


def test_ingest_of_only_bad_lines_fails_and_still_dead_letters_them(kafka, topics, tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text("nope\n{}\n")
    res = CliRunner().invoke(app, ["ingest", "--telemetry", str(path), "--home", str(tmp_path),
                                   "--bootstrap", kafka.bootstrap, "--prefix", topics])
    assert res.exit_code == 1
    assert "line 2: episode_id: missing" in res.output and "no valid telemetry line in junk.jsonl" in res.output
    dead = [r for r in read_records(kafka.bootstrap, ["marl.dlq"], prefix=topics) if r.key.endswith(":dlq")]
    assert len(dead) == 2

"""Hybrid decisions end to end on the real broker (seed 001 Innovation #5): `marlgrc run --env
banking_v0 --policy hybrid:onnx:PATH` with a signed export of a policy trained from an earlier run
(every decision the policy's), and with a model file that is missing (the heuristic, and random at
the explore rate); both runs verify with signatures required, and `marlgrc ledger sync` (SQLCipher
and PostgreSQL) counts each run's decisions per tier as its joint.action events record them;
`marlgrc report` lists them (as the analyst role on PostgreSQL)."""
from __future__ import annotations

import json
import uuid
from collections import Counter

import psycopg
import pytest
from typer.testing import CliRunner

from eventlog.codec import default_codec
from eventlog.kafka import read_records
from ledger import SqliteLedger
from ledger.keys import KeyFile
from ledger.postgres import ANALYST, PostgresLedger, drop
from marlgrc.cli import app as cli
from schemas import TOPICS

pytestmark = pytest.mark.integration


def tiers_on_the_topic(bootstrap, prefix, run_id) -> tuple[Counter, set]:
    """Decisions per tier of ``run_id``'s joint.action events, and their policy versions."""
    codec = default_codec()
    counts, versions = Counter(), set()
    for r in read_records(bootstrap, ["marl.joint.action"], prefix=prefix):
        if r.key == f"{run_id}:actions":
            rec = codec.decode(r.value)[1]
            versions.add(rec["policy_version"])
            counts.update(a["decision_tier"] for a in rec["actions"])
    return counts, versions


def ledger_tiers(store, run_id) -> Counter:
    return Counter({t: int(n) for t, n in store.query(
        f"SELECT decision_tier, SUM(decisions) FROM v_decision_tiers WHERE run_id = {store.ph} "
        f"GROUP BY decision_tier", (run_id,))})


def test_hybrid_runs_record_their_tiers_verify_and_are_counted_by_the_ledger(kafka, topics, tmp_path, postgres):
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    runner = CliRunner()

    def cli_ok(*args):
        res = runner.invoke(cli, list(args))
        assert res.exit_code == 0, res.output
        return res

    base = cli_ok("run", "--env", "banking_v0", "--policy", "heuristic", "--episodes", "2", "--seed", "3",
                  "--no-progress", *common).stdout.strip().splitlines()[-1]
    model = tmp_path / "router.onnx"
    cli_ok("train", "--run", base, "--algo", "mappo", "--updates", "1", "--onnx", str(model), *common)

    runs = {}
    res = cli_ok("run", "--env", "banking_v0", "--policy", f"hybrid:onnx:{model}", "--explore-rate", "0.3",
                 "--episodes", "2", "--seed", "4", "--no-progress", *common)
    runs["model"] = res.stdout.strip().splitlines()[-1]
    missing = tmp_path / "not-exported-yet.onnx"
    res = cli_ok("run", "--env", "banking_v0", "--policy", f"hybrid:onnx:{missing}", "--explore-rate", "0.3",
                 "--episodes", "2", "--seed", "5", "--no-progress", *common)
    runs["missing"] = res.stdout.strip().splitlines()[-1]
    assert "decisions that fell to a lower tier: no model" in res.output
    assert all(r.startswith("banking_v0__hybrid__") for r in runs.values())
    for run_id in runs.values():
        res = cli_ok("verify", "--run", run_id, "--require-signed", *common)
        assert "no break" in res.output, res.output

    on_topic = {k: tiers_on_the_topic(kafka.bootstrap, topics, r) for k, r in runs.items()}
    counts, versions = on_topic["model"]
    assert set(counts) == {"policy"} and counts["policy"] == 3 * 100  # 3 routers, 2 episodes of 50 steps
    (version,) = versions
    assert version.startswith("hybrid-v1:mappo-v1-")
    counts, versions = on_topic["missing"]
    assert versions == {"hybrid-v1:no-model"} and set(counts) == {"heuristic", "random"}
    assert abs(counts["random"] / 300 - 0.3) < 4.5 * (0.3 * 0.7 / 300) ** 0.5
    started = next(default_codec().decode(r.value)[1] for r in read_records(kafka.bootstrap, TOPICS, prefix=topics)
                   if r.key == f"{runs['model']}:lifecycle")
    config = json.loads(started["config_json"])["policy"]
    assert config["explore_rate"] == 0.3 and config["model"]["onnx"] == str(model)
    assert config["model"]["trained_on_run"] == base

    # SQLCipher ledger
    res = cli_ok("ledger", "sync", *common)
    assert "0 integrity findings" in res.output, res.output
    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        for key, run_id in runs.items():
            assert ledger_tiers(store, run_id) == on_topic[key][0]
        assert set(ledger_tiers(store, base)) == {"heuristic"}
    finally:
        store.close()
    out = tmp_path / "rep"
    cli_ok("report", "--run", runs["missing"], "--out", str(out), "--home", str(tmp_path))
    text = (out / "summary.txt").read_text()
    c = on_topic["missing"][0]
    assert f"decisions per tier (300 decisions): heuristic {c['heuristic']} " in text
    assert (out / "decision_tiers.png").exists()

    # PostgreSQL ledger: synced by a superuser, reported by the analyst role (views only)
    schema = f"ledger_{uuid.uuid4().hex[:10]}"
    try:
        res = cli_ok("ledger", "sync", *common, "--postgres", postgres.dsn, "--schema", schema)
        assert "0 integrity findings" in res.output, res.output
        led = PostgresLedger(postgres.dsn, schema)
        try:
            for key, run_id in runs.items():
                assert ledger_tiers(led, run_id) == on_topic[key][0]
        finally:
            led.close()
        analyst = psycopg.conninfo.make_conninfo(postgres.dsn, user=ANALYST)
        pg_out = tmp_path / "pg_rep"
        cli_ok("report", "--run", runs["missing"], "--out", str(pg_out), "--postgres", analyst, "--schema", schema,
               "--home", str(tmp_path))
        assert (pg_out / "summary.txt").read_text() == text
    finally:
        drop(postgres.dsn, schema)

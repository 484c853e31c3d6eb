"""Seed 004's supply chain and resource allocation envs through the audited pipeline (issue 16): `marlgrc
run` on the real broker, `marlgrc verify --require-signed`, `marlgrc ledger sync`, and the stage on every
env.state event and in every episode's summary."""
import json

import pytest
from typer.testing import CliRunner

from eventlog.codec import default_codec
from eventlog.kafka import read_records
from schemas import TOPICS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("env,stage", [("supply_chain_v0", "simple"), ("resource_allocation_v0", "contended")])
def test_seed004_envs_run_through_kafka_verify_signed_and_sync_to_the_ledger(kafka, topics, tmp_path, env, stage):
    from marlgrc.cli import app as cli

    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    res = CliRunner().invoke(cli, ["run", "--env", env, "--env-arg", f"stage={stage}", "--env-arg", "max_cycles=12",
                                   "--policy", "heuristic", "--episodes", "2", "--seed", "3", "--no-progress", *common])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    assert run_id.startswith(f"{env}__heuristic__3__")
    res = CliRunner().invoke(cli, ["verify", "--run", run_id, "--require-signed", *common])
    assert res.exit_code == 0 and "no break" in res.output, res.output

    codec = default_codec()
    records = [r for r in read_records(kafka.bootstrap, TOPICS, prefix=topics) if r.key.startswith(run_id)]
    states = [codec.decode(r.value)[1] for r in records if r.topic == "marl.env.state"]
    assert len(states) == 24 and all(s["flags"] == [f"stage:{stage}"] for s in states)

    res = CliRunner().invoke(cli, ["ledger", "sync", *common])
    assert res.exit_code == 0, res.output
    from ledger import SqliteLedger
    from ledger.keys import KeyFile

    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        counts = store.table_counts()
        lifecycle = sorted(r[0] for r in store.query("SELECT event_type FROM runs WHERE run_id = ?", (run_id,)))
        summaries = store.query("SELECT episode, metrics, text_metrics FROM episode_summaries WHERE run_id = ? "
                                "ORDER BY episode", (run_id,))
    finally:
        store.close()
    assert lifecycle == ["run.finished", "run.started"] and counts["joint_actions"] == counts["environment_states"] == 24
    assert len(summaries) == 2
    main = {"supply_chain_v0": ("fill_rate", "bullwhip", "cost_score"),
            "resource_allocation_v0": ("utilization", "jain", "p95_wait", "slo_attainment")}[env]
    for _, metrics, texts in summaries:
        metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
        texts = json.loads(texts) if isinstance(texts, str) else texts
        names = {m["name"]: m["value"] for m in metrics}
        assert {t["name"]: t["text"] for t in texts}["stage"] == stage
        assert all(k in names for k in main) and names["steps"] == 12.0

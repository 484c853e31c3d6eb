"""Issue 15's domain metrics end to end on the real broker: `marlgrc run --env market_v0` writes an
episode.summary per episode, `marlgrc ledger sync` materializes them (SQLCipher and PostgreSQL), and
`marlgrc report --run R` plots them (as the analyst role on PostgreSQL)."""
from __future__ import annotations

import copy
import json
import uuid
from collections import Counter

import psycopg
import pytest
from typer.testing import CliRunner

from eventlog.codec import default_codec
from eventlog.kafka import read_records
from eventlog.log import EventLog, MemorySink
from ledger import SqliteLedger
from ledger.keys import KeyFile
from ledger.postgres import ANALYST, PostgresLedger, drop
from marlgrc.cli import app as cli
from producers.envs import market_v0
from producers.harness import domain_metrics, run_episodes
from producers.policies import HeuristicPolicy
from schemas import TOPICS

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"


def env_metrics(episodes: int, seed: int) -> list[dict]:
    """What market_v0's metrics() says at the end of each episode of `marlgrc run --env market_v0
    --policy heuristic --seed SEED` (the same env, policy and seeds, in memory)."""
    env = market_v0.parallel_env()
    seen: list[dict] = []
    metrics = env.metrics
    env.metrics = lambda: seen.append(copy.deepcopy(metrics())) or seen[-1]
    log = EventLog(MemorySink(), run_id="local", producer_id="h")
    run_episodes(env, HeuristicPolicy(env), log, episodes=episodes, seed=seed, env_id="market_v0", env_version="0",
                 config={})
    return seen


def pairs(metrics, texts) -> tuple[list, list]:
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    texts = json.loads(texts) if isinstance(texts, str) else texts
    return [(m["name"], m["value"]) for m in metrics], [(m["name"], m["text"]) for m in texts]


def test_market_run_summaries_reach_both_ledgers_and_the_report(kafka, topics, tmp_path, postgres):
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    runner = CliRunner()
    res = runner.invoke(cli, ["run", "--env", "market_v0", "--policy", "heuristic", "--episodes", "2", "--seed", "3",
                              "--no-progress", *common])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    res = runner.invoke(cli, ["verify", "--run", run_id, "--require-signed", *common])
    assert res.exit_code == 0 and "no break" in res.output, res.output

    # on the topic: run.started, one summary per episode, run.finished, in chain order
    codec = default_codec()
    lifecycle = [codec.decode(r.value)[1] for r in read_records(kafka.bootstrap, TOPICS, prefix=topics)
                 if r.topic == "marl.run.lifecycle" and r.key == f"{run_id}:lifecycle"]
    assert [e["event_type"] for e in lifecycle] == ["run.started", "episode.summary", "episode.summary",
                                                    "run.finished"]
    assert [e["seq"] for e in lifecycle] == [0, 1, 2, 3]
    expected = [domain_metrics(m) for m in env_metrics(2, 3)]
    assert [pairs(e["metrics"], e["text_metrics"]) for e in lifecycle[1:3]] == [pairs(*m) for m in expected]

    # SQLCipher: `ledger sync`, then the report
    res = runner.invoke(cli, ["ledger", "sync", *common])
    assert res.exit_code == 0 and "0 integrity findings" in res.output, res.output
    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        rows = store.query("SELECT episode, steps, metrics, text_metrics FROM episode_summaries WHERE run_id = ? "
                           "ORDER BY episode", (run_id,))
        n_gini = store.query("SELECT COUNT(*) FROM v_episode_metrics WHERE run_id = ? AND metric = 'wallet_gini'",
                                (run_id,))
    finally:
        store.close()
    assert [(ep, steps) for ep, steps, _, _ in rows] == [(0, lifecycle[1]["steps"]), (1, lifecycle[2]["steps"])]
    assert [pairs(m, t) for _, _, m, t in rows] == [pairs(*m) for m in expected]
    assert n_gini == [(2,)]
    out = tmp_path / "rep"
    res = runner.invoke(cli, ["report", "--run", run_id, "--out", str(out), "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (out / "episode_metrics.png").read_bytes()[:8] == PNG
    text = (out / "summary.txt").read_text()
    scenarios = Counter(dict(pairs(*m)[1])["scenario"] for m in expected)   # the mixture's draw per episode
    line = "  scenario: " + ", ".join(f"{k} x{n}" for k, n in sorted(scenarios.items()))
    assert "domain metrics (2 episodes):" in text and line in text.splitlines() and "  wallet_gini: 2 episodes" in text

    # PostgreSQL: installed and synced by a superuser, reported by the analyst role (views only)
    schema = f"ledger_{uuid.uuid4().hex[:10]}"
    try:
        res = runner.invoke(cli, ["ledger", "sync", *common, "--postgres", postgres.dsn, "--schema", schema])
        assert res.exit_code == 0 and "0 integrity findings" in res.output, res.output
        led = PostgresLedger(postgres.dsn, schema)
        try:
            pg_rows = led.query("SELECT episode, steps, metrics, text_metrics FROM episode_summaries "
                                "WHERE run_id = %s ORDER BY episode", (run_id,))
            gini = led.query("SELECT episode, value FROM v_episode_metrics WHERE run_id = %s AND metric = "
                             "'wallet_gini' ORDER BY episode", (run_id,))
        finally:
            led.close()
        assert [pairs(m, t) for _, _, m, t in pg_rows] == [pairs(*m) for m in expected]
        assert gini == [(ep, dict(pairs(*m)[0])["wallet_gini"]) for ep, m in enumerate(expected)]
        analyst = psycopg.conninfo.make_conninfo(postgres.dsn, user=ANALYST)
        pg_out = tmp_path / "pg_rep"
        res = runner.invoke(cli, ["report", "--run", run_id, "--out", str(pg_out), "--postgres", analyst,
                                  "--schema", schema, "--home", str(tmp_path)])
        assert res.exit_code == 0, res.output
        assert (pg_out / "episode_metrics.png").read_bytes()[:8] == PNG
        assert (pg_out / "summary.txt").read_text() == text
    finally:
        drop(postgres.dsn, schema)

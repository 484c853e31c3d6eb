"""Seed 004's environments (issue 16) through the audited pipeline on the real broker: `marlgrc run
--env E` with the env's heuristic, `marlgrc verify --require-signed`, `marlgrc ledger sync`, and the
episode's domain metrics and stage materialized in the ledger exactly as the env computed them.

One test, parametrized over ``ENVS``: an env joins by adding its entry."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from eventlog.log import EventLog, MemorySink
from ledger import SqliteLedger
from ledger.keys import KeyFile
from marlgrc.cli import app as cli
from marlgrc.config import parse_env_args
from producers.envs import make_env
from producers.harness import domain_metrics, run_episodes
from producers.policies import HeuristicPolicy

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Seed004Env:
    name: str
    env_args: tuple[str, ...]
    """``--env-arg`` pairs (a stage, a shorter episode)"""
    stage: str
    """the stage those arguments select: every env.state carries ``stage:NAME`` and the summaries say it"""
    main_metric: str
    """the env's main metric (a numeric key of ``metrics()``)"""


ENVS = [
    Seed004Env("trading_v0", ("stage=master", "max_cycles=30"), "master", "sharpe"),
    Seed004Env("supply_chain_v0", ("stage=simple", "max_cycles=12"), "simple", "fill_rate"),
    Seed004Env("resource_allocation_v0", ("stage=contended", "max_cycles=12"), "contended", "jain"),
]

EPISODES, SEED = 2, 3


def env_metrics(entry: Seed004Env) -> list[dict]:
    """What the env's ``metrics()`` says at the end of each episode of `marlgrc run --env NAME
    --policy heuristic --seed SEED` with the entry's arguments (the same env and seeds, in memory)."""
    env, env_id, version = make_env(entry.name, **parse_env_args(entry.env_args))
    seen: list[dict] = []
    metrics = env.metrics
    env.metrics = lambda: seen.append(copy.deepcopy(metrics())) or seen[-1]
    run_episodes(env, HeuristicPolicy(env), EventLog(MemorySink(), run_id="local", producer_id="h"),
                 episodes=EPISODES, seed=SEED, env_id=env_id, env_version=version, config={})
    return seen


def pairs(metrics, texts) -> tuple[list, list]:
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    texts = json.loads(texts) if isinstance(texts, str) else texts
    return [(m["name"], m["value"]) for m in metrics], [(m["name"], m["text"]) for m in texts]


@pytest.mark.parametrize("entry", ENVS, ids=[e.name for e in ENVS])
def test_seed004_env_runs_through_kafka_verifies_signed_and_its_metrics_reach_the_ledger(kafka, topics, tmp_path,
                                                                                        entry):
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    runner = CliRunner()
    args = [x for pair in entry.env_args for x in ("--env-arg", pair)]
    res = runner.invoke(cli, ["run", "--env", entry.name, "--policy", "heuristic", "--episodes", str(EPISODES),
                              "--seed", str(SEED), "--no-progress", *args, *common])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    assert run_id.startswith(f"{entry.name}__heuristic__{SEED}__")
    res = runner.invoke(cli, ["verify", "--run", run_id, "--require-signed", *common])
    assert res.exit_code == 0 and "no break" in res.output, res.output
    res = runner.invoke(cli, ["ledger", "sync", *common])
    assert res.exit_code == 0 and "0 integrity findings" in res.output, res.output

    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        lifecycle = sorted(r[0] for r in store.query("SELECT event_type FROM runs WHERE run_id = ?", (run_id,)))
        states = store.query("SELECT flags FROM environment_states WHERE run_id = ?", (run_id,))
        n_actions = store.query("SELECT COUNT(*) FROM joint_actions WHERE run_id = ?", (run_id,))[0][0]
        rows = store.query("SELECT episode, metrics, text_metrics FROM episode_summaries WHERE run_id = ? "
                           "ORDER BY episode", (run_id,))
        main = store.query("SELECT episode, value FROM v_episode_metrics WHERE run_id = ? AND metric = ? "
                           "ORDER BY episode", (run_id, entry.main_metric))
    finally:
        store.close()
    assert lifecycle == ["run.finished", "run.started"]
    assert n_actions > 0 and len(states) == n_actions
    flags = [json.loads(f) if isinstance(f, str) else f for (f,) in states]
    assert all(f"stage:{entry.stage}" in f for f in flags), flags[:3]

    expected = [domain_metrics(m) for m in env_metrics(entry)]
    assert [ep for ep, _, _ in rows] == list(range(EPISODES))
    assert [pairs(m, t) for _, m, t in rows] == [pairs(*m) for m in expected]
    assert all(dict(pairs(*m)[1])["stage"] == entry.stage for m in expected)
    assert main == [(ep, dict(pairs(*m)[0])[entry.main_metric]) for ep, m in enumerate(expected)]

"""The curriculum (seed 004) through the real broker: `marlgrc train-online --curriculum`.

On the toy staged env of tests/unit/test_curriculum.py (``easy`` pays every action, ``hard`` only
action 0; hard's regress_below 0.9 makes the untrained team struggle there): promoted, regressed,
promoted again in three batches of 4 episodes. The three curriculum.stage events are on
marl.policy.update, chain RUN:curriculum, each naming the window's episode.summary events (which say
the stage they were played at); `marlgrc verify --run R --require-signed` passes; `marlgrc ledger
sync` stores them in curriculum_stages with no integrity finding (SQLCipher and PostgreSQL). And on
seed 004's trading_v0 (module:factory): the curriculum starts at the easiest stage, not the env's
default, and every env.state of the run says so."""
from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from eventlog.codec import default_codec
from eventlog.kafka import read_records
from ledger import SqliteLedger
from ledger.keys import KeyFile
from ledger.postgres import PostgresLedger, drop
from marlgrc.cli import app as cli
from tests.unit.test_curriculum import LEARNED_ON

pytestmark = pytest.mark.integration
CODEC = default_codec()


@pytest.mark.timeout(300)
def test_train_online_with_a_curriculum_records_its_stage_changes_signed_on_the_topics(kafka, postgres, topics,
                                                                                         tmp_path):
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    runner = CliRunner()

    def cli_ok(*args):
        res = runner.invoke(cli, list(args))
        assert res.exit_code == 0, res.output
        return res

    res = cli_ok("train-online", "--env", "tests.unit.test_curriculum:parallel_env", "--env-arg",
                 "hard_regress_below=0.9", "--algo", "mappo", "--curriculum", "--curriculum-window", "4",
                 "--iterations", "3", "--set", "episodes_per_update=4", "--eval-episodes", "0", "--seed", "3",
                 "--no-progress", *common)
    run_id = res.stdout.strip().splitlines()[-1]
    assert "curriculum: 3 stage change(s)" in res.output, res.output

    records = list(read_records(kafka.bootstrap, ["marl.policy.update", "marl.run.lifecycle"], prefix=topics))
    stage = [CODEC.decode(r.value)[1] for r in records if r.key == f"{run_id}:curriculum"]
    assert [(e["seq"], e["event_type"], e["from_stage"], e["to_stage"], e["reason"]) for e in stage] == [
        (0, "curriculum.stage", "easy", "hard", "promoted"), (1, "curriculum.stage", "hard", "easy", "regressed"),
        (2, "curriculum.stage", "easy", "hard", "promoted")]
    assert all(r.topic.endswith("marl.policy.update") for r in records if r.key == f"{run_id}:curriculum")
    summaries = {r.value[-32:]: CODEC.decode(r.value)[1] for r in records if r.key == f"{run_id}:lifecycle"
                 and CODEC.decode(r.value)[0] == "episode_summary"}
    for ev in stage:
        named = [summaries[h] for h in ev["source_event_hashes"]]
        assert len(named) == ev["window_n"] == 4
        assert [m["value"] for s in named for m in s["metrics"] if m["name"] == "score"] == ev["window_values"]
        assert {t["text"] for s in named for t in s["text_metrics"] if t["name"] == "stage"} == {ev["from_stage"]}
    assert stage[1]["window_mean"] < 0.9 <= stage[0]["window_mean"]

    res = cli_ok("verify", "--run", run_id, "--require-signed", *common)
    assert "no break" in res.output, res.output
    res = cli_ok("reproduce", "--run", run_id, "--no-progress", *common)   # the stages change batches, not updates
    assert "3 update(s) retrained" in res.output and "reproduced: every update" in res.output, res.output
    res = cli_ok("ledger", "sync", *common)
    assert "0 integrity findings" in res.output, res.output
    want = [(e["seq"], e["reason"], e["to_stage"], e["window_episodes"], e["window_mean"]) for e in stage]
    query = ("SELECT seq, reason, to_stage, window_episodes, window_mean FROM curriculum_stages WHERE run_id = {} "
             "ORDER BY seq")
    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        rows = store.query(query.format(store.ph), (run_id,))
        assert [(s, r, t, json.loads(w), m) for s, r, t, w, m in rows] == want
        # lineage: each update learned on the stage its batch was played at (easy, hard, easy)
        assert [(stage, n) for _, stage, n in store.query(LEARNED_ON)] == [("easy", 4), ("hard", 4), ("easy", 4)]
    finally:
        store.close()
    schema = f"ledger_{uuid.uuid4().hex[:10]}"
    try:
        res = cli_ok("ledger", "sync", *common, "--postgres", postgres.dsn, "--schema", schema)
        assert "0 integrity findings" in res.output, res.output
        led = PostgresLedger(postgres.dsn, schema)
        try:
            rows = led.query(query.format("%s"), (run_id,))
        finally:
            led.close()
        assert [(s, r, t, w if isinstance(w, list) else json.loads(w), m) for s, r, t, w, m in rows] == want
    finally:
        drop(postgres.dsn, schema)


@pytest.mark.timeout(300)
def test_a_seed_004_env_starts_at_its_easiest_stage_and_every_state_says_so(kafka, topics, tmp_path):
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    res = CliRunner().invoke(cli, ["run", "--env", "producers.envs.trading_v0:parallel_env", "--env-arg",
                                   "max_cycles=10", "--algo", "mappo", "--curriculum", "--iterations", "1",
                                   "--set", "episodes_per_update=2", "--no-progress", *common])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    states = [CODEC.decode(r.value)[1] for r in read_records(kafka.bootstrap, ["marl.env.state"], prefix=topics)
              if r.key == f"{run_id}:env"]
    assert len(states) == 20 and all("stage:basic" in s["flags"] for s in states)   # the env's default: multi_asset
    res = CliRunner().invoke(cli, ["verify", "--run", run_id, "--require-signed", *common])
    assert res.exit_code == 0 and "no break" in res.output, res.output

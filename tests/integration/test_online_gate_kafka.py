"""Online learning behind the safety gate through the real broker (seed 001 Innovation #4):
`marlgrc run --env simple_spread_v3 --algo mappo --online` with a corrupted learning rate
(`--set learning_rate=1000`: every Adam step moves each weight by about 1000), so each update is
refused and rolled back. On the topics: each policy.update is followed by its policy.rollback, whose
window offsets name real joint.action records (the last of them the update's last) and whose
baseline is their mean reward; the restored weights are the signed pre-update checkpoint's; `marlgrc
verify --run R --require-signed` passes; `marlgrc ledger sync` stores the rollbacks in
policy_rollbacks, beside the updates of the same chain, with no integrity finding. (SQLCipher only:
simple_spread's run.started carries infinite observation bounds, which PostgreSQL's jsonb refuses.)"""
from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import read_records
from ledger import SqliteLedger
from ledger.keys import KeyFile
from learners.checkpoint import load_checkpoint
from marlgrc.cli import app as cli

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_a_corrupted_learning_rate_is_rolled_back_online_and_the_run_verifies(kafka, topics, tmp_path):
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    runner = CliRunner()

    def cli_ok(*args):
        res = runner.invoke(cli, list(args))
        assert res.exit_code == 0, res.output
        return res

    res = cli_ok("run", "--env", "simple_spread_v3", "--algo", "mappo", "--online", "--update-every", "300",
                 "--window", "100", "--iterations", "2", "--set", "learning_rate=1000", "--no-progress", *common)
    run_id = res.stdout.strip().splitlines()[-1]
    assert "safety gate: 2 of 2 updates rolled back" in res.output, res.output

    codec = default_codec()
    chain = [codec.decode(r.value)[1] for r in read_records(kafka.bootstrap, ["marl.policy.update"], prefix=topics)
             if r.key == f"{run_id}:policy:mappo"]
    assert [e["event_type"] for e in chain] == ["policy.update", "policy.rollback"] * 2
    actions = {(r.partition, r.offset): codec.decode(r.value)[1] | {"_hash": r.value[-32:]}
               for r in read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics)
               if r.key == f"{run_id}:actions"}
    home_key = Signer.load_or_create(tmp_path / "keys" / "signing.pem").public_key
    _, meta = load_checkpoint(tmp_path / "checkpoints" / run_id / "pre-update", home_key)
    initial = chain[0]["parent_policy_version"]
    for update, rb in zip(chain[::2], chain[1::2]):
        assert rb["prev_event_hash"] == update["event_hash"] == rb["rejected_update_event_hash"]
        assert rb["rejected_weights_sha256"] == update["weights_sha256"] != rb["checkpoint_weights_sha256"]
        # nothing was ever accepted: every rollback restores the first policy, whose signed checkpoint is on disk
        assert rb["restored_policy_version"] == rb["policy_version"] == update["parent_policy_version"] == initial
        assert rb["checkpoint_weights_sha256"].hex() == meta["weights_sha256"]
        assert rb["candidate"] < rb["threshold"] == pytest.approx(1.2 * rb["baseline"]) and rb["baseline"] < 0
        # the window: the update's last 100 decisions (3 agents: 34 joint actions, the first in part)
        (lin,) = rb["lineage"]
        upd = next(x for x in update["lineage"] if x["chain_id"] == f"{run_id}:actions")
        assert (lin["topic"], lin["chain_id"], lin["last_offset"]) == ("marl.joint.action", upd["chain_id"],
                                                                      upd["last_offset"])
        assert lin["last_seq"] - lin["first_seq"] == 33 and rb["window_decisions"] == 100
        held = [actions[(lin["partition"], o)] for o in range(lin["first_offset"], lin["last_offset"] + 1)
                if (lin["partition"], o) in actions]
        assert [a["seq"] for a in held] == list(range(lin["first_seq"], lin["last_seq"] + 1))
        assert held[-1]["_hash"] == lin["head_event_hash"]
        rewards = [x["reward"] for a in held for x in a["actions"]][-100:]
        assert math.isclose(sum(rewards) / 100, rb["baseline"], rel_tol=1e-12)

    res = cli_ok("verify", "--run", run_id, "--require-signed", *common)
    assert "no break" in res.output, res.output

    res = cli_ok("ledger", "sync", *common)
    assert "0 integrity findings" in res.output, res.output
    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        rows = store.query(f"SELECT seq, restored_policy_version, window_decisions FROM policy_rollbacks "
                           f"WHERE run_id = {store.ph} ORDER BY seq", (run_id,))
        assert rows == [(1, initial, 100), (3, initial, 100)]
        assert store.query(f"SELECT COUNT(*) FROM policy_updates WHERE run_id = {store.ph}", (run_id,)) == [(2,)]
    finally:
        store.close()

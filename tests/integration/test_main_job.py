"""The main job (`marlgrc demo`, marlgrc/main_job.py) on the real broker, with a real stream processor
worker and the SQLCipher ledger: the trained run beats the random behaviour run, and the ledger holds
the retraining's lineage from the behaviour run's events to the policy that acted in the second run."""
import json
import re

import pytest
from typer.testing import CliRunner

from eventlog.checkpoint import Signer
from ledger import SqliteLedger
from ledger.keys import KeyFile
from learners.checkpoint import load_checkpoint
from marlgrc.cli import app

pytestmark = pytest.mark.integration


def test_demo_retrains_from_topics_and_beats_the_behaviour_policy(kafka, topics, tmp_path):
    res = CliRunner().invoke(app, ["demo", "--home", str(tmp_path), "--bootstrap", kafka.bootstrap,
                                   "--prefix", topics, "--episodes", "20", "--updates", "5", "--seed", "1"])
    out = res.output
    assert res.exit_code == 0, out
    runs = re.findall(r"verdict: VERIFIED \(run (\S+)\)", out)
    assert len(runs) == 2 and "BROKEN" not in out, out
    behaviour, trained = runs
    before = float(re.search(r"before training\s+(-?\d+\.\d+)", out).group(1))
    after = float(re.search(r"after training\s+(-?\d+\.\d+)", out).group(1))
    assert after > before + 5.0, out   # random about -5 per episode, trained about +14 (README)
    assert "1500 optimizer steps" in out and "verified=True" in out

    key = Signer.load(tmp_path / "keys" / "signing.pem").public_key
    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        q = store.query
        # the printed returns are the ledger's: the mean team return per episode of each run
        for run, shown in ((behaviour, before), (trained, after)):
            (mean,), = q("SELECT AVG(episode_return) FROM v_reward_convergence WHERE run_id = ?", (run,))
            assert abs(mean - shown) <= 0.005 + 1e-9, (run, mean, shown)  # printed with 2 decimals
        # five policy.update events on the behaviour run's policy chain, each an optimizer step, verified
        updates = q("SELECT seq, policy_version, parent_policy_version, policy_updated, verified, event_id, "
                    "event_hash, weights_sha256 FROM policy_updates WHERE run_id = ? ORDER BY seq", (behaviour,))
        assert [u[0] for u in updates] == [0, 1, 2, 3, 4]
        assert all(u[3] and u[4] for u in updates)
        assert [u[2] for u in updates[1:]] == [u[1] for u in updates[:-1]]   # each update's parent is the last
        version, event_id, event_hash, weights = updates[-1][1], updates[-1][5], updates[-1][6], updates[-1][7]
        # the last update learned from every joint action (and credit) of the behaviour run
        lineage = {chain: (first, last) for chain, first, last in q(
            "SELECT chain_id, first_seq, last_seq FROM policy_update_lineage WHERE policy_update_event_id = ?",
            (event_id,))}
        assert lineage[f"{behaviour}:actions"] == (0, 399) and lineage[f"{behaviour}:credit"] == (0, 399)
        # the signed checkpoint holds those weights, and the trained run acted with them
        _, meta = load_checkpoint(tmp_path / "checkpoints" / f"{behaviour}__dqn__1" / "policy", key)
        assert meta["weights_sha256"] == weights.hex()
        acted = q("SELECT DISTINCT policy_version FROM joint_actions WHERE run_id = ?", (trained,))
        assert acted == [(f"{version}-greedy",)]
        (config,), = q("SELECT config_json FROM runs WHERE run_id = ? AND event_type = 'run.started'", (trained,))
        config = json.loads(config)
        assert config["trained_from_run"] == behaviour and config["policy_update_event_hash"] == event_hash.hex()
        # every joint action of both runs was scored by the worker
        for run in runs:
            (n,), = q("SELECT COUNT(*) FROM di_credit_assignment WHERE run_id = ?", (run,))
            assert n == 400
    finally:
        store.close()
    for run in runs:
        page = (tmp_path / "reports" / run / "report.html").read_text()
        assert ">VERIFIED<" in page and f"{run}:actions" in page
    assert f"made by policy.update seq 4 on chain {behaviour}:policy:dqn" in (
        tmp_path / "reports" / trained / "report.html").read_text()

"""Decisions per tier in the ledger: joint.action's ``decision_tier`` (per agent) is kept in
``joint_actions.actions`` and counted by the view ``v_decision_tiers`` (run, episode, agent, tier,
decisions; ``unknown`` for actions written before the field existed); ``marlgrc report`` lists and
plots them (ledger/report.py)."""
from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest

import schemas
from eventlog.codec import Codec, default_codec
from eventlog.log import EventLog, MemorySink
from eventlog.privacy import FieldProtector, LocalKeyStore
from learners.replay import records_from_memory
from ledger import Materializer, SqliteLedger, StaticKey
from ledger.report import collect, write_report
from producers.envs import banking_v0
from producers.harness import run_episodes
from producers.policies import HybridPolicy, RandomPolicy

KEY = StaticKey(bytes(range(7, 39)))
CODEC = default_codec()
# a producer from before decision_tier: joint.action written with the schema as it was then
OLD_CODEC = Codec({**schemas.current(), "joint_action": schemas.history()["joint_action.v0"]}, schemas.history())
PNG = b"\x89PNG\r\n\x1a\n"


class Raising:
    """A model that fails every third call and otherwise routes every transaction internally."""

    version = "flaky-v1"

    def __init__(self):
        self.calls = 0

    def act(self, observations, state=None):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("model down")
        return {a: (0, -0.5) for a in observations}


def banking_run(tmp_path, run_id, policy_of, *, codec=None, episodes=2):
    env = banking_v0.parallel_env()
    sink = MemorySink()
    ticks = itertools.count(time.time_ns() // 1000, 11)
    log = EventLog(sink, run_id=run_id, producer_id="h", codec=codec, clock=lambda: next(ticks))
    with LocalKeyStore(tmp_path / f"{run_id}.keys", key=bytes(32)) as keys:
        run_episodes(env, policy_of(env), log, episodes=episodes, seed=2, env_id="banking_v0", env_version="0",
                     config={}, protector=FieldProtector(keys))
    log.close()
    return sink.sent


def event_counts(sent) -> Counter:
    """(run, episode, agent, tier) -> decisions, from the joint.action events themselves."""
    out: Counter = Counter()
    for topic, _, value in sent:
        if topic == "marl.joint.action":
            rec = CODEC.decode(value)[1]
            for a in rec["actions"]:
                out[(rec["run_id"], rec["episode"], a["agent_id"], a["decision_tier"] or "unknown")] += 1
    return out


@pytest.fixture
def ledger(tmp_path):
    led = SqliteLedger(tmp_path / "ledger.db", KEY)
    yield led
    led.close()


def test_the_ledger_counts_each_runs_decisions_per_tier(tmp_path, ledger):
    hybrid = banking_run(tmp_path, "hy", lambda env: HybridPolicy(env, Raising(), explore_rate=0.25, seed=9))
    plain = banking_run(tmp_path, "rn", lambda env: RandomPolicy(env, seed=1), episodes=1)
    old = banking_run(tmp_path, "old", lambda env: RandomPolicy(env, seed=1), codec=OLD_CODEC, episodes=1)
    old_actions = [v for t, _, v in old if t == "marl.joint.action"]
    assert {v[2:10] for v in old_actions} == {OLD_CODEC.fingerprint("joint_action")}  # written as v0 was
    stats = Materializer(ledger).ingest(records_from_memory(hybrid + plain + old), commit_every=50)
    assert stats.findings == []

    expected = event_counts(hybrid + plain + old)
    got = Counter({(r, ep, a, t): n for r, ep, a, t, n in ledger.query(
        "SELECT run_id, episode, agent_id, decision_tier, decisions FROM v_decision_tiers")})
    assert got == expected
    by_run = {run: Counter() for run in ("hy", "rn", "old")}
    for (run, _, _, tier), n in got.items():
        by_run[run][tier] += n
    # the flaky model's failures went to the heuristic or, at the explore rate, to random
    assert set(by_run["hy"]) == {"policy", "heuristic", "random"}
    assert by_run["hy"]["policy"] > 0 and by_run["hy"]["heuristic"] > by_run["hy"]["random"] > 0
    assert set(by_run["rn"]) == {"random"} and set(by_run["old"]) == {"unknown"}
    assert sum(by_run["old"].values()) == 3 * len(old_actions)
    # the per-agent tier is in the stored actions, as the event has it
    (actions,) = ledger.query("SELECT actions FROM v_joint_actions WHERE run_id = 'hy' AND episode = 0 AND step = 2")[0]
    assert '"decision_tier":"policy"' not in actions  # the model failed at its third call
    assert actions.count('"decision_tier":"heuristic"') + actions.count('"decision_tier":"random"') == 3


def test_the_report_lists_and_plots_decisions_per_tier(tmp_path, ledger):
    sent = banking_run(tmp_path, "hy", lambda env: HybridPolicy(env, Raising(), explore_rate=0.25, seed=9))
    Materializer(ledger).ingest(records_from_memory(sent))
    totals = Counter()
    for (_, _, agent, tier), n in event_counts(sent).items():
        totals[tier] += n
    rep = collect(ledger, "hy")
    assert rep.tier_totals() == {t: totals[t] for t in ("policy", "heuristic", "random")}
    n = sum(totals.values())
    lines = rep.summary().splitlines()
    head = next(line for line in lines if line.startswith("decisions per tier"))
    assert head == (f"decisions per tier ({n} decisions): policy {totals['policy']} "
                    f"({100 * totals['policy'] / n:.1f}%), heuristic {totals['heuristic']} "
                    f"({100 * totals['heuristic'] / n:.1f}%), random {totals['random']} "
                    f"({100 * totals['random'] / n:.1f}%)")
    assert sum(line.startswith("  router_") for line in lines) == 3
    out = tmp_path / "rep"
    rep = write_report(ledger, "hy", out)
    assert (out / "decision_tiers.png").read_bytes()[:8] == PNG
    assert head in (out / "summary.txt").read_text()


def test_a_run_with_no_joint_actions_says_so(ledger):
    lines = collect(ledger, "nothing").tier_lines()
    assert lines == ["decisions per tier: no joint actions in the ledger for this run"]

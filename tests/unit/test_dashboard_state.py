"""The dashboard's fold (marlgrc/dashboard/state.py): a real run written by the harness, scored by the
stream processor and updated by a learner's policy.update events, all in memory, folded into what
the page shows. Each figure is compared with its independent source: the harness's own summary,
the processor's decoded events, and the one verifier's report."""
from __future__ import annotations

import ast
import itertools
import json
import time
from pathlib import Path

import pytest

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.verify import Verifier, verify_records
from learners.replay import records_from_memory
from marlgrc.dashboard.state import MAX_POINTS, DashboardState, _thin
from producers.envs import make_env
from producers.harness import run_episodes
from producers.policies import RandomPolicy
from stream_processors.processor import INPUT_TOPICS, Processor

SIGNER = Signer.from_seed(b"dashboard-state")
CODEC = default_codec()
RUN = "dash1"
EPISODES, CYCLES = 4, 12
POISON = b"\x00not an avro event\xff"


def _update(log: EventLog, version: str, lifecycle_seqs: tuple[int, int], env_steps: int) -> None:
    """A learner's policy.update naming a range of the run's lifecycle chain in its lineage."""
    first, last = lifecycle_seqs
    log.append(f"{RUN}:policy:mappo", "policy.update", {
        "algorithm": "mappo", "config_hash": "c" * 64, "seed": 1, "parent_policy_version": "",
        "policy_updated": True, "optimizer_steps": 4, "env_steps": env_steps,
        "losses": [{"name": "losses/policy", "value": 0.5}], "weights_sha256": bytes(32), "verified": True,
        "lineage": [{"topic": "marl.run.lifecycle", "partition": 0, "first_offset": first, "last_offset": last,
                     "chain_id": f"{RUN}:lifecycle", "first_seq": first, "last_seq": last,
                     "head_event_hash": bytes(32)}]}, policy_version=version)


@pytest.fixture(scope="module")
def written():
    """(records in write order, the harness's RunSummary, the processor's decoded outputs)."""
    sink = MemorySink()
    ticks = itertools.count(time.time_ns() // 1000, 7)
    env, env_id, version = make_env("simple_spread_v3", max_cycles=CYCLES)
    log = EventLog(sink, run_id=RUN, producer_id="h", signer=SIGNER, clock=lambda: next(ticks))
    summary = run_episodes(env, RandomPolicy(env, seed=3), log, episodes=EPISODES, seed=7, env_id=env_id,
                           env_version=version, config={})
    log.close()
    # lifecycle: seq 0 run.started, 1..4 the episode summaries, 5 run.finished
    learner = EventLog(sink, run_id=RUN, producer_id="learner-mappo", signer=SIGNER, clock=lambda: next(ticks))
    _update(learner, "v1", (0, 2), 2 * CYCLES)
    _update(learner, "v2", (3, 5), 2 * CYCLES)
    learner.close()
    p = Processor(max_pending=None, max_states=None, signer=SIGNER)
    outs = []
    for r in records_from_memory(list(sink.sent)):
        if r.topic in INPUT_TOPICS:
            outs += p.feed(r.topic, r.partition, r.offset, r.key, r.value)
    outs += p.feed("marl.joint.action", 0, 10_000, "poison", POISON)
    outs += p.finish()
    outs += p.checkpoint()
    sink.sent.append(("marl.joint.action", "poison", POISON))
    sink.sent.extend((e.topic, e.chain_id, e.value) for e in outs)
    return records_from_memory(sink.sent), summary, [CODEC.decode(e.value)[1] for e in outs]


def _folded(records) -> DashboardState:
    state = DashboardState()
    state.apply(records)
    return state


def test_runs_and_returns_come_from_the_harness_events(written):
    records, summary, _ = written
    state = _folded(records)
    (run,) = state.runs_list()
    assert run["run_id"] == RUN and run["env_id"] == "simple_spread_v3" and run["status"] == "completed"
    assert run["episodes"] == EPISODES == summary.episodes and run["steps"] == summary.steps
    detail = state.run_detail(RUN)
    assert [y for _, y in detail["returns"]] == pytest.approx(summary.episode_returns)
    assert [x for x, _ in detail["returns"]] == list(range(1, EPISODES + 1))
    assert run["last_return"] == pytest.approx(summary.episode_returns[-1])
    assert detail["agents"] == ["agent_0", "agent_1", "agent_2"]
    json.dumps(state.snapshot(), allow_nan=False)   # what the server pushes is plain JSON


def test_team_return_per_update_is_the_mean_of_the_episodes_its_lineage_names(written):
    records, summary, _ = written
    (updates,) = _folded(records).run_detail(RUN)["updates"]
    assert updates["chain_id"] == f"{RUN}:policy:mappo"
    r = summary.episode_returns
    assert [(p["x"], p["policy_version"], p["episodes"]) for p in updates["points"]] == [(1, "v1", 2), (2, "v2", 2)]
    assert [p["y"] for p in updates["points"]] == pytest.approx([(r[0] + r[1]) / 2, (r[2] + r[3]) / 2])
    # the policy topic read before the lifecycle topic (partitions interleave): the same figures
    late = _folded(sorted(records, key=lambda rec: rec.topic != "marl.policy.update"))
    assert late.run_detail(RUN)["updates"] == [updates]


def test_credit_and_fairness_are_the_processors_figures(written):
    records, _, outs = written
    detail = _folded(records).run_detail(RUN)
    credits = [e for e in outs if e["event_type"] == "di.credit"]
    per_episode: dict[int, dict[str, float]] = {}
    for c in credits:
        for s in c["shares"]:
            ep = per_episode.setdefault(c["episode"], {})
            ep[s["agent_id"]] = ep.get(s["agent_id"], 0.0) + s["credit"]
    cr = detail["credits"]
    assert cr["chain_id"] == f"{RUN}:credit" and cr["credits"] == len(credits) > 0
    for agent in cr["agents"]:
        expected = [per_episode[e][agent] for e in sorted(per_episode)]
        assert [y for _, y in cr["series"][agent]] == pytest.approx(expected)
    windows = [e for e in outs if e["event_type"] == "fairness.metrics" and e["window"] == "episode"]
    fa = detail["fairness"]
    assert fa["window"] == "episode" and fa["windows"] == len(windows) == EPISODES
    metric = lambda w, name: next(m["value"] for m in w["metrics"] if m["name"] == name)  # noqa: E731
    assert [y for _, y in fa["gini"]] == pytest.approx([metric(w, "gini") for w in windows])
    assert [y for _, y in fa["jain"]] == pytest.approx([metric(w, "jain") for w in windows])
    div0 = [next(m["value"] for m in w["agent_metrics"]
                 if m["agent_id"] == "agent_0" and m["name"] == "diversity_factor") for w in windows]
    assert [y for _, y in fa["diversity"]["agent_0"]] == pytest.approx(div0)
    # decisions per tier: what the joint actions record (a policy that records none: no panel data)
    tiers: dict[str, dict[str, int]] = {}
    for r in records:
        if r.topic == "marl.joint.action" and r.key == f"{RUN}:actions":
            for a in CODEC.decode(r.value)[1]["actions"]:
                if a.get("decision_tier"):
                    per = tiers.setdefault(a["decision_tier"], {})
                    per[a["agent_id"]] = per.get(a["agent_id"], 0) + 1
    assert (detail["tiers"] or {}).get("counts") == (tiers or None)


def test_dead_letters_carry_the_processors_reason(written):
    records, _, outs = written
    state = _folded(records)
    (dead,) = [e for e in outs if e["event_type"] == "dead.letter"]
    snap = state.snapshot()
    assert snap["dead_letters"]["total"] == 1
    (row,) = snap["dead_letters"]["recent"]
    assert (row["source_topic"], row["source_offset"], row["source_key"]) == ("marl.joint.action", 10_000, "poison")
    assert (row["error_kind"], row["reason"]) == (dead["error_kind"], dead["reason"]) and row["reason"]
    assert state.undecodable == {"marl.joint.action": 1}   # the poison itself: counted, not folded


def test_chain_table_and_verdict_are_the_verifiers(written):
    records, _, _ = written
    state = _folded(records)
    before = state.run_detail(RUN)
    assert before["verdict"]["status"] == "pending" and {c["status"] for c in before["chains"]} == {"unverified"}
    report = verify_records(records, SIGNER.public_key)
    state.apply_report(report, at=time.time(), seconds=0.01)
    rows = {(c["topic"], c["chain_id"]): c for c in state.run_detail(RUN)["chains"]}
    mine = {(c.topic, c.chain_id): c for c in report.chains if c.chain_id.startswith(f"{RUN}:")}
    assert set(rows) == set(mine) and len(rows) >= 10
    for key, c in mine.items():
        row = rows[key]
        assert (row["events"], row["last_seq"]) == (c.events, c.last_seq)
        assert row["signed_through_seq"] == c.signed_through_seq
        assert row["status"] == "ok" and c.first_break is None
    assert state.run_detail(RUN)["verdict"] == {"status": "verified", "broken_chains": 0, "chains": len(mine),
                                                 "events": sum(c.events for c in mine.values()),
                                                 "pending_events": 0, "first_break": None}
    # the poison is no run's chain: it breaks the chains of no run, not the run's verdict
    other = {c["chain_id"]: c for c in state.chain_rows(None)}
    assert other["poison"]["status"] == "broken" and "edited" in other["poison"]["detail"]
    assert state.snapshot()["other_verdict"]["status"] == "broken"

    # a run verified on its own (`marlgrc verify --run`) gives each of its chains the same report
    own = Verifier(SIGNER.public_key)
    own.add_checkpoints([r for r in records if r.topic == "marl.audit.checkpoints" and r.key.startswith(f"{RUN}:")])
    own.feed([r for r in records if r.topic != "marl.audit.checkpoints" and r.key.startswith(f"{RUN}:")])
    assert {(c.topic, c.chain_id): c for c in own.finish().chains} == mine


def test_an_edited_event_breaks_the_run(written):
    records, _, _ = written
    i = next(i for i, r in enumerate(records) if r.topic == "marl.joint.action" and r.key == f"{RUN}:actions")
    r = records[i]
    edited = bytearray(r.value)
    edited[60] ^= 1
    tampered = records[:i] + [Record(*r[:4], bytes(edited), r.timestamp)] + records[i + 1:]
    state = _folded(tampered)
    state.apply_report(verify_records(tampered, SIGNER.public_key), at=time.time(), seconds=0.01)
    v = state.run_detail(RUN)["verdict"]
    assert v["status"] == "broken" and v["broken_chains"] >= 1 and f"{RUN}:actions" in v["first_break"]
    assert state.runs_list()[0]["verdict"]["status"] == "broken"


def test_events_after_the_last_verification_are_counted_as_pending(written):
    records, _, _ = written
    cut = len(records) // 2
    state = _folded(records[:cut])
    state.apply_report(verify_records(records[:cut], SIGNER.public_key), at=time.time(), seconds=0.01)
    version = state.version
    state.apply(records[cut:])
    assert state.version > version
    v = state.run_detail(RUN)["verdict"]
    assert v["status"] == "verified" and v["pending_events"] > 0
    pending = [c for c in state.run_detail(RUN)["chains"] if c["last_seq"] > (c["verified_last_seq"] or -1)]
    assert pending and all("not verified yet" in c["detail"] for c in pending)


def test_decision_tiers_are_counted_where_recorded_and_absent_ones_ignored():
    state = DashboardState()
    base = {"run_id": "r", "produced_at": 1, "episode": 0, "step": 0}
    for tiers in (("policy", "heuristic"), ("policy", "random"), ("", "")):
        state.fold_event("r:actions", "joint_action", {**base, "actions": [
            {"agent_id": "a", "decision_tier": tiers[0]}, {"agent_id": "b", "decision_tier": tiers[1]}]})
    state.fold_event("r:actions", "joint_action", {**base, "actions": [{"agent_id": "a"}]})  # written before tiers
    tiers = state.run_detail("r")["tiers"]
    assert tiers["counts"] == {"policy": {"a": 2}, "heuristic": {"b": 1}, "random": {"b": 1}}
    assert tiers["totals"] == {"policy": 2, "heuristic": 1, "random": 1} and state.run_detail("r")["steps"] == 4


def test_newest_run_is_shown_unless_one_is_asked_for():
    state = DashboardState()
    for run, at in (("old", 10), ("new", 20)):
        state.fold_event(f"{run}:lifecycle", "run_started", {
            "run_id": run, "produced_at": at, "env_id": "e", "env_version": "0", "seed": 0,
            "agents": [{"agent_id": "a"}], "episodes_planned": 1})
    assert [r["run_id"] for r in state.runs_list()] == ["new", "old"]
    assert state.snapshot()["run"]["run_id"] == "new"
    assert state.snapshot("old")["run"]["run_id"] == "old"
    assert state.snapshot("nosuch")["run"]["run_id"] == "new"


def test_long_series_are_thinned_to_the_limit_keeping_the_last_point():
    points = [[i, float(i)] for i in range(1, 3 * MAX_POINTS + 2)]
    thin = _thin(points)
    assert len(thin) <= MAX_POINTS + 1 and thin[0] == points[0] and thin[-1] == points[-1]
    assert _thin(points[:10]) == points[:10]


def test_the_dashboard_never_writes():
    """Read-only by construction: it imports no producer, topic admin, event log or ledger, commits no
    offsets and routes nothing but GET."""
    root = Path(__file__).resolve().parents[2] / "marlgrc" / "dashboard"
    sources = {p.name: p.read_text() for p in root.glob("*.py")}
    assert {"state.py", "feed.py", "app.py"} <= set(sources)
    for name, text in sources.items():
        imported = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {a.name for a in node.names}
        banned = {"ledger", "EventProducer", "Producer", "ensure_topics", "EventLog", "eventlog.log"}
        assert not imported & banned, f"{name} imports {imported & banned}"
        for call in (".commit(", ".produce(", "add_post", "add_put", "add_delete", "add_patch"):
            assert call not in text, f"{name} calls {call}"

"""episode.summary: the harness writes one per finished episode with the env's domain metrics
(producers/harness.py); every reader of marl.run.lifecycle copes with it (learners' RunReader, the
stream processor, the verifier); the ledger materializes, verifies, purges and reports it (ledger/)."""
from __future__ import annotations

import copy
import itertools
import json
import math
import time
from hashlib import sha256

import numpy as np
import pytest
from mpe2 import simple_spread_v3

from eventlog.chain import MICROS_PER_DAY
from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.privacy import FieldProtector, LocalKeyStore
from eventlog.verify import verify_records
from learners.replay import read_records_of_run, records_from_memory as to_records
from ledger import Materializer, SqliteLedger, StaticKey, purge_expired, verify_ledger
from ledger.report import collect, domain_series, write_report
from ledger.tables import TABLES
from producers.envs import banking_v0, market_v0
from producers.harness import HarnessError, domain_metrics, run_episodes
from producers.policies import RandomPolicy
from stream_processors.processor import INPUT_TOPICS, Processor

SIGNER = Signer.from_seed(b"episode-metrics")
KEY = StaticKey(bytes(range(1, 33)))
CODEC = default_codec()
PNG = b"\x89PNG\r\n\x1a\n"


class Recording:
    """An env whose ``metrics()`` answers are kept (deep copies), to compare with the events."""

    def __init__(self, env):
        self._env = env
        self.seen: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._env, name)

    def metrics(self):
        m = self._env.metrics()
        self.seen.append(copy.deepcopy(m))
        return m


class WithoutSummaries(EventLog):
    """The log of a harness from before episode.summary: the summaries are never written."""

    def appender(self, chain_id, event_type, **kw):
        if event_type == "episode.summary":
            return lambda payload, source_event_hashes=(), produced_at=None: None
        return super().appender(chain_id, event_type, **kw)


def harness_run(env, *, run_id="m1", episodes=2, seed=5, log_class=EventLog, protector=None, age_micros=0,
                sink=None):
    sink = MemorySink() if sink is None else sink
    ticks = itertools.count(time.time_ns() // 1000 - age_micros, 7)
    log = log_class(sink, run_id=run_id, producer_id="h", signer=SIGNER, checkpoint_every=64,
                    clock=lambda: next(ticks))
    summary = run_episodes(env, RandomPolicy(env, seed=1), log, episodes=episodes, seed=seed, env_id="market_v0",
                           env_version="0", config={}, protector=protector)
    log.close()
    return sink.sent, summary


def decoded(sent, topic=None):
    return [CODEC.decode(v)[1] for t, _, v in sent if topic is None or t == topic]


def as_pairs(values, texts):
    return [(m["name"], m["value"]) for m in values], [(m["name"], m["text"]) for m in texts]


# ---- the harness -----------------------------------------------------------------------------------

def test_domain_metrics_flattens_numbers_strings_lists_and_mappings_in_the_envs_order():
    values, texts = domain_metrics({"scenario": "scarcity", "gini": np.float32(0.25), "jobs": np.int64(5),
                                    "ok": True, "flag": np.bool_(False), "shares": [0.5, np.float64(0.5)],
                                    "grid": np.array([[1, 2], [3, 4]]), "by": {"a": 1, "b": {"c": 2.5}}, "n": 3})
    assert as_pairs(values, texts) == (
        [("gini", 0.25), ("jobs", 5.0), ("ok", 1.0), ("flag", 0.0), ("shares[0]", 0.5), ("shares[1]", 0.5),
         ("grid[0]", 1.0), ("grid[1]", 2.0), ("grid[2]", 3.0), ("grid[3]", 4.0), ("by.a", 1.0), ("by.b.c", 2.5),
         ("n", 3.0)],
        [("scenario", "scarcity")])
    assert all(type(m["value"]) is float for m in values)
    assert domain_metrics({}) == ([], [])


@pytest.mark.parametrize("bad, named", [({"x": None}, "'x'"), ({"l": [1, object()]}, r"'l\[1\]'"),
                                        ({"b": b"raw"}, "'b'")])
def test_a_metric_that_cannot_be_written_names_itself(bad, named):
    with pytest.raises(HarnessError, match=named):
        domain_metrics(bad)
    with pytest.raises(HarnessError, match="must return a dict"):
        domain_metrics([("x", 1.0)])


def test_the_harness_writes_one_summary_per_episode_with_the_envs_metrics():
    env = Recording(market_v0.parallel_env(scenario="normal"))
    sent, summary = harness_run(env, episodes=3)
    lifecycle = decoded(sent, "marl.run.lifecycle")
    assert [e["event_type"] for e in lifecycle] == ["run.started"] + ["episode.summary"] * 3 + ["run.finished"]
    assert [e["seq"] for e in lifecycle] == list(range(5))
    assert {e["chain_id"] for e in lifecycle} == {"m1:lifecycle"}
    started, summaries = lifecycle[0], lifecycle[1:4]
    assert len(env.seen) == 3   # metrics() read once per episode, at its end
    actions = decoded(sent, "marl.joint.action")
    for ep, (s, seen) in enumerate(zip(summaries, env.seen)):
        assert s["episode"] == ep and s["source_event_hashes"] == [started["event_hash"]]
        mine = [a for a in actions if a["episode"] == ep]
        assert s["steps"] == len(mine) == seen["jobs_auctioned"] > 0
        assert s["episode_return"] == summary.episode_returns[ep]
        per_agent = {a: 0.0 for a in env.possible_agents}
        for ja in mine:
            for a in ja["actions"]:
                per_agent[a["agent_id"]] += a["reward"]
        assert [(r["agent_id"], r["return"]) for r in s["agent_returns"]] == list(per_agent.items())
        assert as_pairs(s["metrics"], s["text_metrics"]) == as_pairs(*domain_metrics(seen))
        assert ("scenario", "normal") in as_pairs(s["metrics"], s["text_metrics"])[1]
        names = [m["name"] for m in s["metrics"]]
        assert "wallet_gini" in names and "win_shares[4]" in names
    assert lifecycle[-1]["episodes"] == 3 and summary.events == len([v for t, _, v in sent
                                                                        if t != "marl.audit.checkpoints"])
    report = verify_records(to_records(sent), SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]


def test_an_env_without_metrics_gets_summaries_with_none():
    env = simple_spread_v3.parallel_env(N=3, max_cycles=4, local_ratio=0.5)
    assert not hasattr(env, "metrics")
    sent, _ = harness_run(env, episodes=2)
    summaries = [e for e in decoded(sent, "marl.run.lifecycle") if e["event_type"] == "episode.summary"]
    assert [(s["episode"], s["steps"], s["metrics"], s["text_metrics"]) for s in summaries] == [(0, 4, [], []),
                                                                                               (1, 4, [], [])]
    assert [r["agent_id"] for r in summaries[0]["agent_returns"]] == ["agent_0", "agent_1", "agent_2"]


def test_an_env_whose_metrics_cannot_be_written_fails_the_run_before_counting_the_episode():
    class Bad(Recording):
        def metrics(self):
            return {"when": object()}

    sink = MemorySink()
    with pytest.raises(HarnessError, match="'when'"):
        harness_run(Bad(market_v0.parallel_env(scenario="scarcity")), episodes=2, sink=sink)
    lifecycle = decoded(sink.sent, "marl.run.lifecycle")
    assert [e["event_type"] for e in lifecycle] == ["run.started", "run.finished"]
    assert (lifecycle[-1]["status"], lifecycle[-1]["reason"], lifecycle[-1]["episodes"]) == \
        ("failed", "HarnessError", 0)


def test_with_personal_data_each_summary_follows_its_episodes_steps(tmp_path):
    """banking_v0's steps are sealed in batches; its summaries are sealed in order with them."""
    keys = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    env = Recording(banking_v0.parallel_env())
    sent, _ = harness_run(env, episodes=2, protector=FieldProtector(keys))
    keys.close()
    kinds = [(CODEC.decode(v)[1]["event_type"], CODEC.decode(v)[1].get("episode")) for _, _, v in sent]
    for ep in range(2):
        at = kinds.index(("episode.summary", ep))
        last_action = max(i for i, k in enumerate(kinds) if k == ("joint.action", ep))
        assert at > last_action
        assert ("joint.action", ep + 1) not in kinds[:at]
    summaries = [e for e in decoded(sent, "marl.run.lifecycle") if e["event_type"] == "episode.summary"]
    assert [as_pairs(s["metrics"], s["text_metrics"]) for s in summaries] == \
        [as_pairs(*domain_metrics(m)) for m in env.seen]
    assert "avg_latency_ms" in [m["name"] for m in summaries[0]["metrics"]]
    assert verify_records(to_records(sent), SIGNER.public_key).ok


# ---- readers of marl.run.lifecycle ----------------------------------------------------------------

def test_runs_with_and_without_summaries_replay_and_process_alike():
    new, _ = harness_run(market_v0.parallel_env(scenario="normal"))
    old, _ = harness_run(market_v0.parallel_env(scenario="normal"), log_class=WithoutSummaries)
    assert sum(t == "marl.run.lifecycle" for t, _, _ in new) == sum(t == "marl.run.lifecycle" for t, _, _ in old) + 2
    for sent in (new, old):   # a run written before episode.summary still verifies
        report = verify_records(to_records(sent), SIGNER.public_key)
        assert report.ok, [b.describe() for b in report.breaks]
    a, b = read_records_of_run(to_records(new), "m1", public_key=SIGNER.public_key), \
        read_records_of_run(to_records(old), "m1", public_key=SIGNER.public_key)
    assert len(a.episodes) == len(b.episodes) == 2
    for x, y in zip(a.episodes, b.episodes):
        assert np.array_equal(x.obs, y.obs) and np.array_equal(x.actions, y.actions)
        assert np.array_equal(x.rewards, y.rewards)

    def process(sent):
        p = Processor(max_pending=None, max_states=None)
        outs = [ev for r in to_records(sent) if r.topic in INPUT_TOPICS
                for ev in p.feed(r.topic, r.partition, r.offset, r.key, r.value)] + p.finish()
        return [CODEC.decode(e.value)[1] for e in outs]

    got_new, got_old = process(new), process(old)
    assert not [e for e in got_new if e["event_type"] == "dead.letter"]
    assert [e["event_type"] for e in got_new] == [e["event_type"] for e in got_old]
    assert sum(e["event_type"] == "di.credit" for e in got_new) == sum(t == "marl.joint.action" for t, _, _ in new)


def test_the_processor_dead_letters_a_summary_on_another_topic():
    sent, _ = harness_run(market_v0.parallel_env(scenario="scarcity"), episodes=1)
    value = next(v for _, _, v in sent if CODEC.decode(v)[1]["event_type"] == "episode.summary")
    assert Processor().feed("marl.run.lifecycle", 0, 1, "m1:lifecycle", value) == []
    (dead,) = Processor().feed("marl.env.state", 0, 1, "m1:lifecycle", value)
    assert CODEC.decode(dead.value)[1]["error_kind"] == "wrong_schema"


# ---- the ledger ------------------------------------------------------------------------------------

def ledger_of(tmp_path, records, name="l.db", commit_every=9):
    led = SqliteLedger(tmp_path / name, KEY)
    stats = Materializer(led).ingest(records, commit_every=commit_every)
    assert stats.findings == []
    return led


def test_the_ledger_stores_each_summary_with_its_metrics_and_verifies(tmp_path):
    sent, _ = harness_run(market_v0.parallel_env(scenario="normal"))
    records = to_records(sent)
    led = ledger_of(tmp_path, records)
    summaries = [e for e in decoded(sent) if e["event_type"] == "episode.summary"]
    cols = TABLES["episode_summaries"].column_names
    rows = [dict(zip(cols, r)) for r in led.query(f"SELECT {', '.join(cols)} FROM episode_summaries ORDER BY episode")]
    assert len(rows) == 2
    for row, s in zip(rows, summaries):
        assert (row["event_id"], row["episode"], row["steps"], row["episode_return"]) == \
            (s["event_id"], s["episode"], s["steps"], s["episode_return"])
        assert row["topic"] == "marl.run.lifecycle" and row["chain_id"] == "m1:lifecycle"
        assert json.loads(row["metrics"]) == s["metrics"] and json.loads(row["text_metrics"]) == s["text_metrics"]
        assert json.loads(row["agent_returns"]) == s["agent_returns"]
        assert bytes(row["raw"]) == next(v for _, _, v in sent if v[-32:] == s["event_hash"])
    view = led.query("SELECT episode, metric, value FROM v_episode_metrics WHERE run_id = 'm1' AND metric = "
                     "'wallet_gini' ORDER BY episode")
    assert view == [(s["episode"], "wallet_gini", next(m["value"] for m in s["metrics"] if m["name"] == "wallet_gini"))
                    for s in summaries]
    # the lifecycle chain spans runs and episode_summaries: its head is run.finished
    finished = next(e for e in decoded(sent) if e["event_type"] == "run.finished")
    assert led.chain_heads()[("marl.run.lifecycle", "m1:lifecycle")] == (finished["seq"], finished["event_hash"])
    report = verify_ledger(led, SIGNER.public_key)
    assert report.ok, report.lines()
    assert report.chains.events == len(sent)
    # append-only, idempotent, and the same content whatever the batch size
    with pytest.raises(Exception, match="append-only"):
        led.conn.execute("UPDATE episode_summaries SET steps = 0")
    with pytest.raises(Exception, match="append-only"):
        led.conn.execute("DELETE FROM episode_summaries")
    again = Materializer(led).ingest([r._replace(offset=r.offset + 1000) for r in records
                                      if r.topic == "marl.run.lifecycle"], commit_every=3)
    assert led.count("episode_summaries") == 2 and {f.kind for f in again.findings} == {"duplicated"}
    other = ledger_of(tmp_path, records, "other.db", commit_every=1000)
    assert other.count("episode_summaries") == 2
    fresh = ledger_of(tmp_path, records, "fresh.db", commit_every=2)
    assert fresh.content_hash() == other.content_hash()
    for x in (led, other, fresh):
        x.close()


def test_a_forged_summary_at_run_finished_seq_is_inserted(tmp_path):
    """The ingest looks for a seq taken in every table of the topic (run.finished is in runs)."""
    sent, _ = harness_run(market_v0.parallel_env(scenario="scarcity"), episodes=1)
    led = ledger_of(tmp_path, to_records(sent))
    rec = next(e for e in decoded(sent) if e["event_type"] == "episode.summary")
    finished = next(e for e in decoded(sent) if e["event_type"] == "run.finished")
    forged = dict(rec, seq=finished["seq"], event_id="00000000-0000-8000-8000-0000000000ff",
                  prev_event_hash=rec["event_hash"], event_hash=bytes(32))
    v = CODEC.encode("episode_summary", forged)
    v = v[:-32] + sha256(v[:-32]).digest()
    n = sum(t == "marl.run.lifecycle" for t, _, _ in sent)
    stats = Materializer(led).ingest([Record("marl.run.lifecycle", 0, n, "m1:lifecycle", v, 0)])
    assert [f.kind for f in stats.findings] == ["inserted"]
    led.close()


def test_purge_takes_the_summaries_with_evidence_and_the_ledger_still_verifies(tmp_path):
    old, _ = harness_run(market_v0.parallel_env(scenario="scarcity"), run_id="r0", age_micros=400 * MICROS_PER_DAY)
    new, _ = harness_run(market_v0.parallel_env(scenario="scarcity"), run_id="r1")
    led = ledger_of(tmp_path, to_records(old + new))
    assert led.query("SELECT run_id, COUNT(*) FROM episode_summaries GROUP BY run_id ORDER BY run_id") == \
        [("r0", 2), ("r1", 2)]
    summary = purge_expired(led)
    assert summary.counts["episode_summaries"] == 2 and summary.counts["runs"] == 2
    lifecycle = [e for e in summary.evidence if e.chain_id == "r0:lifecycle"]
    # run.started (seq 0) and run.finished (seq 3) from runs, the summaries (1..2) from episode_summaries
    assert sorted((e.source_table, e.first_seq, e.last_seq) for e in lifecycle) == \
        [("episode_summaries", 1, 2), ("runs", 0, 0), ("runs", 3, 3)]
    assert led.query("SELECT run_id FROM episode_summaries") == [("r1",), ("r1",)]
    report = verify_ledger(led, SIGNER.public_key)
    assert report.ok, report.lines()
    led.close()


# ---- the report ------------------------------------------------------------------------------------

def test_the_report_plots_and_lists_the_domain_metrics_of_a_market_run(tmp_path):
    env = Recording(market_v0.parallel_env(scenario="normal"))
    sent, _ = harness_run(env, episodes=3)
    old, _ = harness_run(market_v0.parallel_env(scenario="normal"), run_id="old", log_class=WithoutSummaries)
    led = ledger_of(tmp_path, to_records(sent + old))
    rep = write_report(led, "m1", tmp_path / "rep")
    png = tmp_path / "rep" / "episode_metrics.png"
    assert png in rep.files and png.read_bytes()[:8] == PNG
    assert [v for _, v in rep.domain["wallet_gini"]] == [m["wallet_gini"] for m in env.seen]
    assert [e for e, _ in rep.domain["total_profit"]] == [0, 1, 2]
    assert rep.domain_text == {"scenario": [(0, "normal"), (1, "normal"), (2, "normal")]}
    text = (tmp_path / "rep" / "summary.txt").read_text()
    assert "domain metrics (3 episodes):" in text and "scenario: normal x3" in text
    gini = [m["wallet_gini"] for m in env.seen]
    assert f"  wallet_gini: 3 episodes, first {gini[0]:.4f}, last {gini[-1]:.4f}" in text
    # a run from before episode.summary still reports, and says it has no domain metrics
    rep_old = write_report(led, "old", tmp_path / "rep_old")
    assert not (tmp_path / "rep_old" / "episode_metrics.png").exists() and rep_old.domain == {}
    assert "no episode.summary events with metrics" in (tmp_path / "rep_old" / "summary.txt").read_text()
    led.close()


def test_non_finite_metrics_are_stored_as_json_and_read_back_as_floats(tmp_path):
    class Odd(Recording):
        def metrics(self):
            return {"ratio": float("nan"), "up": float("inf"), "down": -math.inf, "fine": 1.5, "scenario": "odd"}

    sent, _ = harness_run(Odd(market_v0.parallel_env(scenario="scarcity")), episodes=1)
    led = ledger_of(tmp_path, to_records(sent))
    (stored,), = led.query("SELECT metrics FROM episode_summaries")
    assert json.loads(stored) == [{"name": "ratio", "value": "NaN"}, {"name": "up", "value": "Infinity"},
                                  {"name": "down", "value": "-Infinity"}, {"name": "fine", "value": 1.5}]
    values, texts = domain_series(led.query("SELECT episode, metrics, text_metrics FROM episode_summaries"))
    assert math.isnan(values["ratio"][0][1]) and values["up"] == [(0, math.inf)] and values["down"] == [(0, -math.inf)]
    assert values["fine"] == [(0, 1.5)] and texts == {"scenario": [(0, "odd")]}
    rep = write_report(led, "m1", tmp_path / "rep")
    assert (tmp_path / "rep" / "episode_metrics.png").read_bytes()[:8] == PNG
    assert "ratio: 1 episodes, first nan" in rep.summary()
    assert collect(led, "m1").domain.keys() == values.keys()
    led.close()

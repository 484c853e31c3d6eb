"""The curriculum (learners/curriculum.py, seed 004) and its wiring into training
(marlgrc/curriculum_wiring.py through marlgrc.training.train_on_env).

The rule: promotion when the window's mean reaches the stage's promote_at (trend not falling), none
before min_episodes at a stage, regression when it drops below regress_below (trend not rising),
never past the last stage or below the first; the curriculum.stage event's payload; and, on a toy
staged env (``StagedMatch``, also used by tests/integration/test_curriculum_kafka.py as
``tests.unit.test_curriculum:parallel_env``), MAPPO trained through MemoryTransport where a stage is
passed and where a struggling team regresses: the event is on its chain, signed, names the window's
episode.summary events, later episodes' env.state flags say the new stage, the run verifies and
replays, and the ledger stores the event in curriculum_stages."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from eventlog.verify import verify_records
from learners.curriculum import (FALLING, FLAT, PROMOTED, REGRESSED, RISING, RULE_VERSION, Curriculum,
                                 CurriculumConfig, emit_stage_change, trend_of)
from learners.mappo import MAPPOConfig
from learners.online import MemoryTransport
from learners.replay import read_records_of_run, records_from_memory
from ledger import Materializer, SqliteLedger, StaticKey, verify_ledger
from ledger.ingest import decode_rows
from ledger.tables import TABLES
from marlgrc.curriculum_wiring import CurriculumEnvError, curriculum_for
from marlgrc.training import train_on_env

CODEC = default_codec()
SIGNER = Signer.from_seed(b"curriculum-test")

# ---- a toy staged env, in the stage convention of seed 004's envs ----------------------------------

STAGES = ("easy", "hard")


class StagedMatch(ParallelEnv):
    """Two agents, Discrete(3), ``length`` steps. Observation: the stage one-hot. Reward per agent and
    step: ``easy`` pays 1 for any action; ``hard`` pays 1 only for action 0 (random play: 1/3).
    ``metrics()``: ``score`` (mean reward per agent-step), ``stage``, ``stage_index``; ``state_flags()``:
    ``stage:NAME``. ``CURRICULUM``: promote from easy at 0.9; ``hard_regress_below`` (default 0: never)
    is hard's regression threshold."""

    metadata = {"name": "staged_match_v0"}
    stages = STAGES
    CURRICULUM = {"easy": {"metric": "score", "promote_at": 0.9, "regress_below": 0.0},
                  "hard": {"metric": "score", "promote_at": 1.0, "regress_below": 0.0}}

    def __init__(self, stage: str = "hard", length: int = 4, hard_regress_below: float = 0.0):
        if stage not in STAGES:
            raise ValueError(f"staged_match: stage {stage!r} is not one of {', '.join(STAGES)}")
        self.possible_agents = ["agent_0", "agent_1"]
        self.stage = self._next = stage
        self.length = int(length)
        self.CURRICULUM = {**self.CURRICULUM, "hard": {**self.CURRICULUM["hard"],
                                                       "regress_below": float(hard_regress_below)}}
        self._obs = spaces.Box(0.0, 1.0, (len(STAGES),), np.float32)
        self._act = spaces.Discrete(3)

    def observation_space(self, agent):
        return self._obs

    def action_space(self, agent):
        return self._act

    def set_stage(self, name: str) -> None:
        if name not in STAGES:
            raise ValueError(f"staged_match: stage {name!r} is not one of {', '.join(STAGES)}")
        self._next = name

    def _observe(self):
        one_hot = np.eye(len(STAGES), dtype=np.float32)[STAGES.index(self.stage)]
        return {a: one_hot.copy() for a in self.agents}

    def reset(self, seed=None, options=None):
        self.stage = self._next
        self.agents = list(self.possible_agents)
        self.t, self.paid = 0, 0.0
        return self._observe(), {a: {} for a in self.agents}

    def step(self, actions):
        rew = {a: 1.0 if self.stage == "easy" or int(actions[a]) == 0 else 0.0 for a in self.agents}
        self.paid += sum(rew.values())
        self.t += 1
        done = self.t >= self.length
        obs = self._observe()
        term = {a: False for a in self.agents}
        trunc = {a: done for a in self.agents}
        if done:
            self.agents = []
        return obs, rew, term, trunc, {a: {} for a in self.possible_agents}

    def state_flags(self):
        return [f"stage:{self.stage}"]

    def metrics(self):
        return {"score": self.paid / max(1, self.t * len(self.possible_agents)), "stage": self.stage,
                "stage_index": STAGES.index(self.stage)}


def parallel_env(**kwargs):
    return StagedMatch(**kwargs)


# ---- the rule ----------------------------------------------------------------------------------------

THREE = ("basic", "middle", "master")
CRIT = {"basic": {"metric": "m", "promote_at": 1.0, "regress_below": 0.0},
        "middle": {"metric": "m", "promote_at": 2.0, "regress_below": 1.0},
        "master": {"metric": "m", "promote_at": 3.0, "regress_below": 2.0}}


def feed(cur, values, stage=None):
    out = []
    for v in values:
        m = {"m": v} if stage is None else {"m": v, "stage": stage}
        out.append(cur.observe(m))
    return out


def test_promotion_when_the_window_mean_reaches_promote_at_and_not_before_min_episodes():
    cur = Curriculum(THREE, CRIT, CurriculumConfig(window=8, min_episodes=5))
    # 4 successes are not enough: no decision before 5 episodes at the stage
    assert feed(cur, [1.2, 0.9, 1.1, 1.3]) == [None] * 4 and cur.stage == "basic"
    (d,) = feed(cur, [0.9])       # mean 1.08 >= 1.0, noisy but flat
    assert (d.from_stage, d.to_stage, d.reason, d.metric, d.threshold) == ("basic", "middle", PROMOTED, "m", 1.0)
    assert (d.from_index, d.to_index, d.stage_episodes) == (0, 1, 5)
    assert d.episodes == (0, 1, 2, 3, 4) and d.values == (1.2, 0.9, 1.1, 1.3, 0.9)
    assert d.stats.n == 5 and d.stats.mean == pytest.approx(1.08) and d.stats.trend == FLAT
    assert d.stats.std == pytest.approx(np.std(d.values, ddof=1)) and (d.stats.min, d.stats.max) == (0.9, 1.3)
    assert cur.stage == "middle" and cur.history == [d]
    # the window starts over at the new stage: 4 more episodes decide nothing, even good ones
    assert feed(cur, [2.5] * 4) == [None] * 4
    (d2,) = feed(cur, [2.5])
    assert d2.to_stage == "master" and d2.episodes == (5, 6, 7, 8, 9)


def test_a_window_below_the_threshold_does_not_promote_and_the_window_slides():
    cur = Curriculum(THREE, CRIT, CurriculumConfig(window=5, min_episodes=5))
    assert feed(cur, [0.5] * 5) == [None] * 5            # mean 0.5 < 1.0; cannot regress below the first stage
    # the window holds the last 5: after three 1.5s the mean is (0.5+0.5+1.5*3)/5 = 1.1
    got = feed(cur, [1.5, 1.5, 1.5])
    assert got[:2] == [None, None] and got[2].reason == PROMOTED
    assert got[2].values == (0.5, 0.5, 1.5, 1.5, 1.5) and got[2].episodes == (3, 4, 5, 6, 7)


def test_a_team_whose_performance_drops_below_the_threshold_regresses():
    cur = Curriculum(THREE, CRIT, CurriculumConfig(window=6, min_episodes=4), start="master")
    assert feed(cur, [2.6, 2.4, 2.5]) == [None] * 3
    (d,) = feed(cur, [2.5])
    assert d is None                                  # mean 2.5: between regress_below 2 and promote_at 3
    got = feed(cur, [1.0, 1.1])                       # struggling: window 2.6 2.4 2.5 2.5 1.0 1.1, mean 2.02
    assert got == [None, None]
    (d,) = feed(cur, [1.0])                           # mean 1.75 < 2.0; the fall is not a rising trend
    assert (d.from_stage, d.to_stage, d.reason, d.threshold) == ("master", "middle", REGRESSED, 2.0)
    assert d.stats.mean == pytest.approx(np.mean([2.4, 2.5, 2.5, 1.0, 1.1, 1.0]))
    assert d.stats.trend == FALLING and d.episodes == (1, 2, 3, 4, 5, 6)
    assert cur.stage == "middle" and cur.stages[cur.highest] == "master"
    # and again, down to the first stage, never below it
    (d,) = [x for x in feed(cur, [0.2] * 4) if x]
    assert (d.to_stage, cur.stage) == ("basic", "basic")
    assert feed(cur, [-5.0] * 10) == [None] * 10 and cur.stage == "basic"


def test_the_trend_rule_holds_back_promotion_while_falling_and_regression_while_rising():
    cur = Curriculum(THREE, CRIT, CurriculumConfig(window=5, min_episodes=5, trend_t=2.0))
    # above promote_at on average, but slipping steadily: no promotion
    assert feed(cur, [1.8, 1.6, 1.4, 1.2, 1.0]) == [None] * 5
    assert cur.stats().trend == FALLING and cur.stats().mean == pytest.approx(1.4)
    # 1.6 1.4 1.2 1.0 1.2: still falling (t = -2.6); then 1.4 1.2 1.0 1.2 1.4: the slide is over (slope 0)
    assert feed(cur, [1.2]) == [None] and cur.stats().slope_t == pytest.approx(-2.598, abs=1e-3)
    (d,) = feed(cur, [1.4])
    assert d.reason == PROMOTED and d.stats.trend == FLAT and d.stats.slope_t == 0.0
    # at "middle": below regress_below (1.0) but clearly recovering: no regression
    assert feed(cur, [0.1, 0.3, 0.5, 0.7, 0.9]) == [None] * 5
    assert cur.stats().trend == RISING and cur.stage == "middle"
    # the recovery stalls below the bar (0.3 0.5 0.7 0.9 0.4: t = 0.74): regressed
    (d,) = feed(cur, [0.4])
    assert d.reason == REGRESSED and d.stats.trend == FLAT and d.stats.mean == pytest.approx(0.56)


def test_trend_is_the_least_squares_slope_and_its_t_statistic():
    rng = np.random.default_rng(0)
    y = list(0.05 * np.arange(12) + rng.normal(0, 0.1, 12))
    slope, t, trend = trend_of(y, 2.0)
    x = np.arange(12.0)
    (b, _), unscaled = np.polyfit(x, y, 1, cov="unscaled")
    resid = np.asarray(y) - np.polyval([b, _], x)
    se = math.sqrt(unscaled[0, 0] * float(resid @ resid) / (12 - 2))
    assert slope == pytest.approx(b) and t == pytest.approx(b / se) and trend == RISING
    assert trend_of([1.0, 1.0, 1.0], 2.0) == (0.0, 0.0, FLAT)
    assert trend_of([3.0, 2.0, 1.0], 2.0) == (-1.0, -math.inf, FALLING)
    with pytest.raises(ValueError, match="at least 3"):
        trend_of([1.0, 2.0], 2.0)


def test_the_last_stage_is_kept_and_other_stages_episodes_are_not_counted():
    cur = Curriculum(THREE, CRIT, CurriculumConfig(window=3, min_episodes=3), start="master")
    assert feed(cur, [10.0] * 20, stage="master") == [None] * 20 and cur.stage == "master"
    cur = Curriculum(THREE, CRIT, CurriculumConfig(window=3, min_episodes=3))
    # the rest of a batch played at another stage says nothing about this one
    assert feed(cur, [5.0] * 5, stage="master") == [None] * 5 and cur.stats() is None
    assert cur.episodes_seen == 5
    (d,) = [x for x in feed(cur, [5.0] * 3, stage="basic") if x]
    assert d.episodes == (5, 6, 7)


def test_bad_criteria_and_metrics_are_clear_errors():
    with pytest.raises(ValueError, match="regress_below 2.0 is above promote_at 1.0"):
        Curriculum(["a"], {"a": {"metric": "m", "promote_at": 1.0, "regress_below": 2.0}})
    with pytest.raises(ValueError, match="stage 'b' need metric, promote_at, regress_below"):
        Curriculum(["a", "b"], {"a": {"metric": "m", "promote_at": 1.0, "regress_below": 0.0}})
    with pytest.raises(ValueError, match="start stage 'x'"):
        Curriculum(THREE, CRIT, start="x")
    with pytest.raises(ValueError, match="3 <= min_episodes <= window"):
        CurriculumConfig(window=5, min_episodes=6)
    cur = Curriculum(THREE, CRIT)
    with pytest.raises(ValueError, match="judged on metric 'm', which the episode's metrics do not have"):
        cur.observe({"score": 1.0})
    with pytest.raises(ValueError, match="is nan"):
        cur.observe({"m": float("nan")})
    with pytest.raises(CurriculumEnvError, match="env mailbox_v0 has no curriculum stages"):
        curriculum_for(object(), "mailbox_v0")


def test_the_stage_change_event_and_its_ledger_row():
    cur = Curriculum(THREE, CRIT, CurriculumConfig(window=4, min_episodes=4))
    hashes = [bytes([i]) * 32 for i in range(4)]
    for i, v in enumerate([1.0, 1.5, 1.2, 1.3]):
        d = cur.observe({"m": v}, episode=10 + i, source=hashes[i])
    sink = MemorySink()
    ev = emit_stage_change(EventLog(sink, run_id="r", producer_id="p"), "r", d, cur.config,
                           policy_version="mappo-v3-abc", source_event_hashes=d.sources)
    ((topic, key, value),) = sink.sent
    assert (topic, key) == ("marl.policy.update", "r:curriculum") and value[-32:] == ev.event_hash
    name, rec = CODEC.decode(value)
    assert name == "curriculum_stage" and rec["event_type"] == "curriculum.stage"
    assert (rec["policy_version"], rec["rule_version"]) == ("mappo-v3-abc", RULE_VERSION)
    assert rec["source_event_hashes"] == hashes
    assert (rec["from_stage"], rec["to_stage"], rec["from_stage_index"], rec["to_stage_index"]) == \
        ("basic", "middle", 0, 1)
    assert (rec["reason"], rec["metric"], rec["threshold"]) == ("promoted", "m", 1.0)
    assert rec["window_episodes"] == [10, 11, 12, 13] and rec["window_values"] == [1.0, 1.5, 1.2, 1.3]
    assert rec["window_n"] == 4 and rec["window_mean"] == pytest.approx(1.25)
    assert (rec["window_min"], rec["window_max"], rec["trend"]) == (1.0, 1.5, d.stats.trend)
    assert (rec["trend_slope"], rec["trend_t"]) == (d.stats.slope, d.stats.slope_t)
    assert (rec["stage_episodes"], rec["config_window"], rec["config_min_episodes"], rec["config_trend_t"]) == \
        (4, 4, 4, 2.0)
    got, rows = decode_rows(value, topic, 0, 7)
    ((table, row),) = rows
    row = dict(zip(TABLES[table].column_names, row))
    assert table == "curriculum_stages" and (row["to_stage"], row["reason"], row["kafka_offset"]) == \
        ("middle", "promoted", 7)
    assert json.loads(row["window_episodes"]) == [10, 11, 12, 13]


# ---- wiring: training through train_on_env -------------------------------------------------------

def train(hard_regress_below: float, iterations: int, run_id: str):
    torch.set_num_threads(1)
    env = StagedMatch(hard_regress_below=hard_regress_below)
    cur = curriculum_for(env, "staged_match_v0", CurriculumConfig(window=4, min_episodes=4))
    assert cur.stage == "easy" and env.stage == "hard"  # the curriculum starts at the easiest stage
    transport = MemoryTransport()
    rows = []
    res = train_on_env(env, "staged_match_v0", "0", "mappo", transport=transport, iterations=iterations, seed=3,
                       run_id=run_id, config=MAPPOConfig(seed=3, episodes_per_update=4), signer=SIGNER,
                       public_key=SIGNER.public_key, curriculum=cur, on_update=rows.append)
    sent = records_from_memory(transport.sink.sent)
    return res, cur, sent, rows


def decoded(sent, chain):
    return [(r, *CODEC.decode(r.value)) for r in sent if r.key == chain]


def batch_stages(sent, run_id):
    """The stage flags of each batch's env.state events (a batch's episodes restart at 0)."""
    out, last = [], None
    for _, _, rec in decoded(sent, f"{run_id}:env"):
        if (rec["episode"], rec["step"]) == (0, 0):
            out.append(set())
        out[-1].update(f for f in rec["flags"] if f.startswith("stage:"))
        last = rec
    assert last is not None
    return out


LEARNED_ON = """
SELECT u.policy_version, json_extract(t.value, '$.text') AS stage, COUNT(*) AS episodes
FROM policy_updates u
JOIN policy_update_lineage l ON l.policy_update_event_id = u.event_id AND l.lineage_topic = 'marl.run.lifecycle'
JOIN episode_summaries e ON e.chain_id = l.chain_id AND e.seq BETWEEN l.first_seq AND l.last_seq
JOIN json_each(e.text_metrics) t ON json_extract(t.value, '$.name') = 'stage'
GROUP BY u.seq, u.policy_version, stage ORDER BY u.seq, stage"""


@pytest.mark.timeout(120)
def test_a_stage_is_passed_in_training_and_recorded_as_a_signed_event(tmp_path):
    res, cur, sent, rows = train(0.0, 3, "cur-pass")
    run = res.run_id
    (d,) = cur.history
    assert (d.from_stage, d.to_stage, d.reason, d.episodes) == ("easy", "hard", PROMOTED, (0, 1, 2, 3))
    assert d.stats.mean == 1.0 and cur.stage == "hard"
    # the event: on its own chain, naming the window's episode.summary events, the policy that played them
    ((r, name, rec),) = decoded(sent, f"{run}:curriculum")
    assert (r.topic, name, rec["seq"]) == ("marl.policy.update", "curriculum_stage", 0)
    summaries = [(x, rec_) for x, n, rec_ in decoded(sent, f"{run}:lifecycle") if n == "episode_summary"]
    assert rec["source_event_hashes"] == [x.value[-32:] for x, _ in summaries[:4]]
    assert all(dict((m["name"], m["text"]) for m in s["text_metrics"])["stage"] == "easy" for _, s in summaries[:4])
    updates = [u for _, n, u in decoded(sent, f"{run}:policy:mappo") if n == "policy_update"]
    assert rec["policy_version"] == updates[0]["parent_policy_version"]   # batch 0 played the first policy
    assert (rec["window_values"], rec["to_stage"], rec["producer_id"]) == ([1.0] * 4, "hard", "harness-0")
    # each batch's episodes were played at the curriculum's stage; its run.started names it
    assert batch_stages(sent, run) == [{"stage:easy"}, {"stage:hard"}, {"stage:hard"}]
    started = [json.loads(s["config_json"])["curriculum_stage"]
               for _, n, s in decoded(sent, f"{run}:lifecycle") if n == "run_started"]
    assert started == ["easy", "hard", "hard"]
    assert [row["stage"] for row in rows] == ["easy", "hard", "hard"] and rows[0]["stage_changes"]
    assert res.curve == rows and "stage_changes" not in rows[1]
    # sealed and signed with the batch, the run verifies and replays
    report = verify_records(sent, SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    chain = next(c for c in report.chains if c.chain_id == f"{run}:curriculum")
    assert chain.last_seq == chain.signed_through_seq == 0
    replay = read_records_of_run(sent, run, public_key=SIGNER.public_key)
    assert replay.verified and len(replay.episodes) == 12
    # the ledger stores it in curriculum_stages and verifies
    led = SqliteLedger(tmp_path / "l.db", StaticKey(bytes(range(1, 33))))
    try:
        stats = Materializer(led).ingest(sent, commit_every=50)
        assert stats.findings == []
        assert led.query("SELECT from_stage, to_stage, reason, window_n, policy_version FROM curriculum_stages") == \
            [("easy", "hard", "promoted", 4, rec["policy_version"])]
        assert verify_ledger(led, SIGNER.public_key).ok
        # lineage: the stage each policy update learned on (docs/LEARNERS.md, Curriculum)
        assert led.query(LEARNED_ON) == [(updates[0]["policy_version"], "easy", 4),
                                         (updates[1]["policy_version"], "hard", 4),
                                         (updates[2]["policy_version"], "hard", 4)]
    finally:
        led.close()


@pytest.mark.timeout(120)
def test_a_struggling_team_regresses_in_training():
    # hard pays 1 only for action 0: the untrained team scores about 1/3 there, below 0.9
    res, cur, sent, rows = train(0.9, 3, "cur-regress")
    run = res.run_id
    assert [(d.from_stage, d.to_stage, d.reason) for d in cur.history] == \
        [("easy", "hard", PROMOTED), ("hard", "easy", REGRESSED), ("easy", "hard", PROMOTED)]
    down = cur.history[1]
    assert down.stats.mean < 0.9 and down.stats.trend != RISING and down.episodes == (4, 5, 6, 7)
    events = [rec for _, _, rec in decoded(sent, f"{run}:curriculum")]
    assert [(e["seq"], e["reason"], e["producer_id"]) for e in events] == \
        [(0, "promoted", "harness-0"), (1, "regressed", "harness-1"), (2, "promoted", "harness-2")]
    assert events[1]["window_mean"] == down.stats.mean and events[1]["threshold"] == 0.9
    assert batch_stages(sent, run) == [{"stage:easy"}, {"stage:hard"}, {"stage:easy"}]
    assert [row["stage"] for row in rows] == ["easy", "hard", "easy"]
    report = verify_records(sent, SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    chain = next(c for c in report.chains if c.chain_id == f"{run}:curriculum")
    assert chain.last_seq == chain.signed_through_seq == 2


def test_an_env_whose_metrics_lack_its_criterion_stops_training_with_a_clear_error():
    env = StagedMatch()
    env.CURRICULUM = {s: {**c, "metric": "sharpe"} for s, c in env.CURRICULUM.items()}
    cur = curriculum_for(env, "staged_match_v0", CurriculumConfig(window=3, min_episodes=3))
    with pytest.raises(CurriculumEnvError, match=r"episode 0: stage 'easy' is judged on metric 'sharpe', which the "
                                                 r"episode's metrics do not have \(they have: episode_return, score, "
                                                 r"stage, stage_index\)"):
        train_on_env(env, "staged_match_v0", "0", "mappo", transport=MemoryTransport(), iterations=1, seed=3,
                     run_id="cur-bad", config=MAPPOConfig(seed=3, episodes_per_update=2), curriculum=cur)

"""The one fairness definition (stream_processors/fairness.py): seed 001's formulas on hand-computed
cases, their invariants under Hypothesis, what a bid and a win are, the windows, and the DI worker and
the faust app giving the same metrics for the same credit events."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from stream_processors import fairness as f
from stream_processors import faust_fairness as ff
from stream_processors.processor import INPUT_TOPICS, Processor
from stream_processors.replay import payload_fields
from tests.synthetic import synthetic_run

# ------------------------------------------------------------------ Gini and Jain


@pytest.mark.parametrize("values, expected", [
    ([5, 5, 5, 5], 0.0),                  # perfect equality
    ([0, 0, 0, 10], 0.75),                # one holds everything: (n-1)/n
    ([1, 2, 3, 4], 0.25),                 # 2*30/(4*10) - 5/4
    ([1, 3], 0.25),                       # 2*7/(2*4) - 3/2
    ([4, 1, 3, 2], 0.25),                 # sorted first
    ([7], 0.0),
    ([], 0.0), ([0, 0], 0.0),
])
def test_gini_known_distributions(values, expected):
    assert f.gini(values) == pytest.approx(expected)


def test_gini_and_jain_shift_negative_credit_to_zero_first():
    assert f.gini([-1, -1, -1]) == 0.0
    assert f.gini([-2, 0, 2, 4]) == pytest.approx(f.gini([0, 2, 4, 6]))
    assert f.gini([-1, 1]) == pytest.approx(0.5)        # [0, 2]: one holds everything
    assert f.jain([-1, 1]) == pytest.approx(0.5)
    assert f.jain([-3, -3]) == 1.0


@pytest.mark.parametrize("values, expected", [
    ([3, 3, 3], 1.0), ([0, 0, 0, 8], 0.25), ([1, 2], 0.9), ([1, 3], 0.8), ([0, 0], 1.0), ([], 1.0)])
def test_jain_known_distributions(values, expected):
    assert f.jain(values) == pytest.approx(expected)


_amounts = st.floats(0, 1e6, allow_nan=False, allow_subnormal=False)
_credit_values = st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=30)


@given(_credit_values)
def test_gini_in_0_1_and_jain_in_1_over_n_1(values):
    n = len(values)
    g = f.gini(values)
    assert 0.0 <= g < 1.0
    assert g <= (n - 1) / n + 1e-12
    assert 1 / n - 1e-12 <= f.jain(values) <= 1 + 1e-12


@given(st.lists(_amounts, min_size=1, max_size=30), st.floats(1e-3, 1e3))
def test_gini_and_jain_ignore_the_unit(values, scale):
    scaled = [v * scale for v in values]
    assert f.gini(scaled) == pytest.approx(f.gini(values), abs=1e-9)
    assert f.jain(scaled) == pytest.approx(f.jain(values), abs=1e-9)


@given(st.lists(_amounts, min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_gini_and_jain_ignore_who_holds_what(values, rnd):
    shuffled = list(values)
    rnd.shuffle(shuffled)
    assert f.gini(shuffled) == f.gini(values)   # sorted, and exact sums (math.fsum): not even a rounding apart
    assert f.jain(shuffled) == f.jain(values)


@given(st.floats(1e-3, 1e6), st.integers(1, 30))
def test_equal_shares_are_perfectly_fair(v, n):
    assert f.gini([v] * n) == pytest.approx(0.0, abs=1e-12)
    assert f.jain([v] * n) == pytest.approx(1.0, abs=1e-12)


@given(st.lists(_amounts, min_size=2, max_size=30), st.floats(1.0, 1e6))
def test_giving_the_richest_more_never_lowers_gini(values, extra):
    richer = sorted(values)
    richer[-1] += extra
    assert f.gini(richer) >= f.gini(values) - 1e-12


# ------------------------------------------------------------------ seed 001's thresholds


@pytest.mark.parametrize("wealth, rate", [
    (0, 0.0), (199.99, 0.0), (200, 0.10), (499.99, 0.10), (500, 0.20), (999.99, 0.20), (1000, 0.30), (1e9, 0.30)])
def test_tax_brackets_of_the_seed(wealth, rate):
    assert f.tax_rate(wealth) == rate


@pytest.mark.parametrize("share, factor", [
    (0.0, 0.15), (0.1499, 0.15), (0.15, 0.0), (0.2, 0.0), (0.30, 0.0), (0.3001, -0.2), (1.0, -0.2)])
def test_diversity_bands_of_the_seed(share, factor):
    assert f.diversity_factor(share) == factor


@pytest.mark.parametrize("wealth, eligible, payment", [(0, 1.0, 50), (99.99, 1.0, 50), (100, 0.0, 0), (5000, 0.0, 0)])
def test_ubi_threshold_of_the_seed(wealth, eligible, payment):
    assert f.ubi_eligibility(wealth) == eligible
    assert f.ubi_payment(wealth) == payment


@pytest.mark.parametrize("won, bid, boost", [(0, 0, 0.15), (1, 10, 0.15), (3, 20, 0.0), (2, 10, 0.0)])
def test_affirmative_boost(won, bid, boost):
    assert f.affirmative_boost(won, bid) == boost


@pytest.mark.parametrize("bph, collab, ratio, score", [
    (10, 0, 2.0, 0.5), (60, 0, 2.0, 0.3), (10, 11, 1.0, 0.8), (60, 11, 1.0, 0.6), (10, 10, 1.2, 0.5)])
def test_cooperative_score(bph, collab, ratio, score):
    assert f.cooperative_score(bph, collab, ratio) == pytest.approx(score)


# ------------------------------------------------------------------ a step: wealth, win, bid


def credit(shares, penalized=(), g=None):
    """A di.credit payload as fairness reads it."""
    return {"shares": [{"agent_id": a, "credit": c, "rule": "r"} for a, c in shares],
            "penalties": [{"rule": "p", "agent_id": a, "amount": 0.25, "reason": ""} for a in penalized],
            "global_reward": sum(c for _, c in shares) if g is None else g}


@pytest.mark.parametrize("shares, penalized, winner, bidders", [
    ([("a", 0.5), ("b", 0.0), ("c", 0.0)], (), "a", ("a",)),               # a zero share is no bid
    ([("a", 0.5), ("b", 0.0), ("c", 0.0)], ("c",), "a", ("a", "c")),       # a penalty is a stake
    ([("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3)], (), None, ("a", "b", "c")),  # a tie wins nobody the step
    ([("a", 0.0), ("b", -1.0), ("c", -1.0)], (), "a", ("a", "b", "c")),     # only a bid wins: the winner bid
    ([("a", 0.0), ("b", 0.0)], (), None, ()),
])
def test_who_wins_and_who_bids(shares, penalized, winner, bidders):
    o = f.outcome(credit(shares, penalized))
    assert (o.winner, o.bidders, o.penalized) == (winner, bidders, tuple(sorted(penalized)))
    assert o.credits == tuple(shares)


@pytest.mark.parametrize("payload, reason", [
    (credit([]), "no shares"),
    (credit([("a", 1.0), ("a", 2.0)]), "two shares"),
    (credit([("a", math.nan)], g=0.0), "not finite"),
    (credit([("a", math.inf)], g=0.0), "not finite"),
    (credit([("a", 1.0)], g=math.nan), "global reward"),
])
def test_a_credit_no_metric_can_use_is_refused(payload, reason):
    with pytest.raises(f.InvalidCredit, match=reason):
        f.outcome(payload)


_agents = st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True)
_credit = st.one_of(st.just(0.0), st.sampled_from([1.0, -1.0]), st.floats(-10, 10, allow_nan=False))


@st.composite
def outcomes(draw):
    agents = draw(_agents)
    shares = [(a, draw(_credit)) for a in agents]
    penalized = draw(st.lists(st.sampled_from(agents), unique=True))
    return f.outcome(credit(shares, penalized, g=draw(st.floats(-5, 5, allow_nan=False))))


@given(st.lists(outcomes(), min_size=1, max_size=40))
def test_a_tally_never_counts_a_win_without_a_bid(outs):
    t = f.Tally()
    for o in outs:
        assert o.winner is None or o.winner in o.bidders
        t.add(o)
    assert all(t.wins[a] <= t.bids[a] <= t.steps for a in t.agents)
    assert all(t.collab[a] <= t.bids[a] for a in t.agents)
    assert sum(t.wins.values()) <= t.steps
    assert math.fsum(t.wealth.values()) == pytest.approx(math.fsum(c for o in outs for _, c in o.credits), abs=1e-9)
    _, agent = t.metrics()
    boost = {x["agent_id"]: x["value"] for x in agent if x["name"] == "affirmative_boost"}
    assert all(boost[a] == 0.0 for a in t.agents if t.wins[a] == t.steps)   # winning every step earns no boost


def test_a_steady_winner_at_zero_credit_gets_no_affirmative_boost():
    # fairness/seed001-1 counted no bid for a (zero credit, or a NOOP action) yet a win every step, and
    # boosted it as if it were starved (win rate of an agent that never bid = 0)
    outs = [f.outcome(credit([("a", 0.0), ("b", -1.0), ("c", -1.0)])) for _ in range(10)]
    _, agent = f.window_metrics(outs)
    am = {(x["agent_id"], x["name"]): x["value"] for x in agent}
    assert am[("a", "win_share")] == 1.0 and am[("a", "affirmative_boost")] == 0.0
    assert am[("b", "affirmative_boost")] == 0.15


# ------------------------------------------------------------------ windows of steps


def test_window_metrics_monopoly():
    # agent a wins every step and holds all the wealth; the others have zero shares: only a bids
    outs = [f.outcome(credit([("a", 10.0), ("b", 0.0), ("c", 0.0), ("d", 0.0)])) for _ in range(20)]
    metrics, agent = f.window_metrics(outs)
    m = {x["name"]: x["value"] for x in metrics}
    am = {(x["agent_id"], x["name"]): x["value"] for x in agent}
    assert m["gini"] == pytest.approx(0.75) and m["jain"] == pytest.approx(0.25)
    assert m["total_credit"] == 200.0 and m["steps"] == 20 and m["agents"] == 4
    assert am[("a", "win_share")] == 1.0 and am[("a", "diversity_factor")] == -0.2
    assert am[("b", "diversity_factor")] == 0.15 and am[("b", "affirmative_boost")] == 0.15
    assert am[("a", "wealth")] == 200.0 and am[("a", "tax_rate")] == 0.10
    assert am[("a", "ubi_eligibility")] == 0.0 and am[("b", "ubi_eligibility")] == 1.0
    # a bids every step: 100 bids per 100-step hour > 50 -> -0.2; takes 4x its fair share -> no +0.1
    assert am[("a", "cooperative_index")] == pytest.approx(0.3)
    # b never bids (0 per hour), no collaborative job, ratio 0 < 1.2 -> 0.5 + 0.1
    assert am[("b", "cooperative_index")] == pytest.approx(0.6)
    assert m["cooperative_index"] == pytest.approx((0.3 + 3 * 0.6) / 4)


def test_window_metrics_equal_cooperative_team():
    outs = [f.outcome(credit([("a", 1.0), ("b", 1.0)])) for _ in range(12)]
    metrics, agent = f.window_metrics(outs)
    m = {x["name"]: x["value"] for x in metrics}
    am = {(x["agent_id"], x["name"]): x["value"] for x in agent}
    assert m["gini"] == 0.0 and m["jain"] == 1.0 and m["steps"] == 12
    # ties win nobody a step; 12 collaborative steps > 10; fair share ratio 1.0 < 1.2; 100 bids/hour
    assert am[("a", "win_share")] == 0.0
    assert am[("a", "cooperative_index")] == pytest.approx(0.6)
    assert m["cooperative_index"] == pytest.approx(0.6)


def test_a_penalty_or_a_team_loss_is_no_collaborative_job():
    penalized = [f.outcome(credit([("a", 1.0), ("b", 1.0)], penalized=("b",))) for _ in range(12)]
    lost = [f.outcome(credit([("a", 1.0), ("b", 1.0)], g=-0.5)) for _ in range(12)]
    for outs in (penalized, lost):
        t = f.Tally()
        for o in outs:
            t.add(o)
        assert t.collab == {"a": 0, "b": 0} and t.bids == {"a": 12, "b": 12}


def test_tally_is_incremental_and_round_trips():
    outs = [f.outcome(credit([("a", float(i)), ("b", 1.0)])) for i in range(5)]
    t = f.Tally()
    for o in outs[:3]:
        t.add(o)
    t = f.Tally.from_json(t.to_json())
    for o in outs[3:]:
        t.add(o)
    assert t.metrics() == f.window_metrics(outs)
    assert all(math.isfinite(x["value"]) for x in t.metrics()[0])


@given(outcomes())
def test_a_step_outcome_round_trips_through_json(o):
    assert f.StepOutcome.from_json(o.to_json()) == o


def test_a_window_saved_under_seed001_1_reads_with_todays_bids():
    # [credits, acted, penalized, g]: the stored "acted" list is not trusted, bids follow from the credits
    old = [[["a", 0.0], ["b", 2.0]], ["a"], ["a"], 2.0]
    o = f.StepOutcome.from_json(old)
    assert o == f.outcome(credit([("a", 0.0), ("b", 2.0)], penalized=("a",)))
    assert o.bidders == ("a", "b")


def _add_all(w, items, **kw):
    return [win for episode, o, h in items for win in w.add(episode, o, h, "rule", **kw)]


def _steps(episodes, steps):
    return [(e, f.outcome(credit([("a", float(i % 3)), ("b", 1.0)])), bytes([e, i % 256]) * 16)
            for e in range(episodes) for i in range(steps)]


def test_windows_close_an_episode_when_the_next_begins_and_slide_every_hop():
    items = _steps(3, 10)
    wins = _add_all(f.Windows(), items, size=8, hop=4)
    kinds = [(w.kind, w.payload["window_start"], w.payload["window_end"]) for w in wins]
    # sliding windows once 8 credits are in, every 4 credits; episodes 0 and 1 closed by their successors
    # (an episode's last credit comes before the credit that closes it)
    assert kinds == [("sliding", 0, 7), ("episode", 0, 9), ("sliding", 4, 11), ("sliding", 8, 15),
                     ("sliding", 12, 19), ("episode", 10, 19), ("sliding", 16, 23), ("sliding", 20, 27)]
    ep1 = wins[5]
    assert ep1.payload["episode"] == 1 and ep1.sources == [items[10][2], items[19][2]]
    assert ep1.payload["metrics"] == f.window_metrics([o for _, o, _ in items[10:20]])[0]
    assert wins[2].sources == [items[4][2], items[11][2]] and wins[2].rule_version == "rule"


def test_windows_close_episode_is_empty_once_closed():
    w = f.Windows()
    _add_all(w, _steps(1, 3))
    closed = w.close_episode()
    assert closed.kind == "episode" and closed.payload["window_end"] == 2
    assert w.close_episode() is None
    assert _add_all(w, [(1, f.outcome(credit([("a", 1.0)])), b"\1" * 32)]) == []  # nothing left to close


@given(st.lists(st.tuples(st.integers(0, 2), outcomes()), min_size=1, max_size=60), st.integers(0, 60))
def test_windows_restored_from_json_at_any_point_continue_identically(items, cut):
    items = [(e, o, i.to_bytes(32, "big")) for i, (e, o) in enumerate(sorted(items, key=lambda x: x[0]))]
    whole = _add_all(f.Windows(), items, size=10, hop=3)
    first = f.Windows()
    a = _add_all(first, items[:cut], size=10, hop=3)
    again = f.Windows.from_json(first.to_json())
    assert a + _add_all(again, items[cut:], size=10, hop=3) == whole


# ------------------------------------------------------------------ one definition, two live processors


def _di_run(run_id="r", episodes=2, steps=140, agents=3, seed=4):
    sink = MemorySink()
    synthetic_run(EventLog(sink, run_id=run_id, producer_id="t"), episodes=episodes, steps=steps, agents=agents,
                  seed=seed)
    p = Processor()
    out = []
    for i, (t, k, v) in enumerate(sink.sent):
        if t in INPUT_TOPICS:
            out += p.feed(t, 0, i, k, v)
    return out


def test_the_faust_app_and_the_di_worker_give_the_same_windows_for_the_same_credits():
    events = _di_run()
    codec = default_codec()
    credits = [e for e in events if e.topic == "marl.di.credit"]
    di = {"episode": [], "sliding": []}
    for e in events:
        if e.topic == "marl.fairness.metrics":
            rec = codec.decode(e.value)[1]
            di[rec["window"]].append((payload_fields(e.value), rec["rule_version"], rec["source_event_hashes"]))
    st_ = ff.ChainState()
    faust = {"episode": [], "sliding": []}
    for n, e in enumerate(credits):
        for w in ff.step(st_, n, codec.decode(e.value)[1], e.event_hash):
            faust[w.kind].append((w.payload, w.rule_version, w.sources))
    assert len(di["sliding"]) == (280 - 100) // 25 + 1 and len(di["episode"]) == 2
    assert faust["sliding"] == di["sliding"]
    assert faust["episode"] == di["episode"][:-1]    # the faust app cannot see the run's last episode end
    assert {r for _, r, _ in di["sliding"]} == {"passthrough/di-1;" + f.VERSION}


def test_the_faust_step_skips_what_it_already_processed_and_refuses_a_bad_credit_unchanged():
    codec = default_codec()
    credits = [(codec.decode(e.value)[1], e.event_hash) for e in _di_run(episodes=1, steps=140)
               if e.topic == "marl.di.credit"]
    straight = ff.ChainState()
    whole = [w for n, (rec, h) in enumerate(credits) for w in ff.step(straight, n, rec, h)]
    st_ = ff.ChainState()
    for n, (rec, h) in enumerate(credits[:110]):
        ff.step(st_, n, rec, h)
    saved = st_.to_bytes()
    assert ff.step(st_, 109, *credits[109]) == []                     # redelivered after a crash: skipped
    with pytest.raises(f.InvalidCredit):
        ff.step(st_, 110, dict(credits[110][0], shares=[]), credits[110][1])
    assert st_.to_bytes() == saved                                     # refused before any change
    restored = ff.ChainState.from_bytes(saved)
    rest = [w for n, (rec, h) in enumerate(credits[110:], 110) for w in ff.step(restored, n, rec, h)]
    assert [w.payload["window_end"] for w in whole] == [99, 124]
    assert rest == whole[1:]
    assert ff.output_chain("r:credit", "sliding") == "r:fairness:faust:sliding"
    assert ff.output_chain("r:credit:reprocess:x", "sliding") is None


# ------------------------------------------------------------------ the faust app signs what it writes


class _App:
    """The faust app's ``handle`` without a broker: input records in, and what faust's commit would
    publish (``Attachments._attachments_for``, the code the commit runs) out, in order; a crash drops
    what was not published and rebuilds the table from the changelog rows that were."""

    def __init__(self):
        from faust.types import TP

        self.tps = {p: TP(ff.PREFIX + ff.IN_TOPIC, p) for p in range(ff.PARTITIONS)}
        self.published: list[tuple[str, int, bytes, bytes]] = []   # (logical topic, partition, key, value)
        self.reset()

    def reset(self):
        for tp in self.tps.values():
            list(ff.app._attachments._attachments_for(tp, 1 << 62))    # what a crash loses
        for k in list(ff.state.data.keys()):
            del ff.state.data[k]
        ff._cache.clear()

    def handle(self, partition, offset, key, value):
        from types import SimpleNamespace

        ff.handle(SimpleNamespace(message=SimpleNamespace(partition=partition, offset=offset, key=key, value=value,
                                                          tp=self.tps[partition])))

    def commit(self, partition, position):
        for fut in ff.app._attachments._attachments_for(self.tps[partition], position):
            m = fut.message
            topic = m.channel.get_topic_name()
            self.published.append((topic[len(ff.PREFIX):] if topic.startswith(ff.PREFIX) else topic,
                                   m.partition, m.key, m.value))

    def crash(self):
        """Unpublished attachments are gone; the store comes back from the published changelog rows."""
        rows = {k: v for t, _, k, v in self.published if t == ff.state.changelog_topic.get_topic_name()}
        self.reset()
        for k, v in rows.items():
            ff.state.data[k] = v

    def records(self, topic):
        from eventlog.kafka import Record

        offsets: dict[int, int] = {}
        out = []
        for t, p, k, v in self.published:
            if t == topic:
                o = offsets[p] = offsets.get(p, -1) + 1
                out.append(Record(t, p, o, k.decode(), v, 0))
        return out


@pytest.fixture
def faust_app(monkeypatch):
    from eventlog.checkpoint import Signer

    signer = Signer.from_seed(b"faust-app")
    monkeypatch.setattr(ff, "signer", signer)
    app = _App()
    yield app, signer
    app.reset()


def test_a_records_attachments_are_published_in_order_all_or_none(faust_app):
    app, _ = faust_app
    from types import SimpleNamespace

    topic = ff.fairness_out
    for offset, n in ((7, 2), (8, 6)):
        attach = ff._Outputs(SimpleNamespace(message=SimpleNamespace(tp=app.tps[0], offset=offset)))
        for i in range(n):
            attach(topic, b"k", b"%d:%d" % (offset, i), 0)
    app.commit(0, 7)     # the position after record 7 is 8: record 8's attachments wait for it
    assert [v for *_, v in app.published] == [b"7:0", b"7:1"]
    app.commit(0, 8)
    assert [v for *_, v in app.published] == [b"7:0", b"7:1"] + [b"8:%d" % i for i in range(6)]


def _verify_strict(records, public_key):
    from eventlog.verify import Verifier, split_checkpoints

    cps, data = split_checkpoints(records)
    v = Verifier(public_key, require_signed=True)
    v.add_checkpoints(cps)
    v.feed(data)
    return v.finish()


def test_every_chain_the_faust_app_writes_is_signed_through_its_head_across_a_crash(faust_app):
    """Issue 14 item 3 for the faust app: its fairness chains, its dead-letter chain and their
    checkpoint chains are signed through their heads in whatever a commit publishes, also after a
    crash that lost unpublished attachments and a redelivery."""
    app, signer = faust_app
    runs = {0: [e for e in _di_run("ra", episodes=2, steps=140) if e.topic == "marl.di.credit"],
            1: [e for e in _di_run("rb", episodes=2, steps=100, seed=5) if e.topic == "marl.di.credit"]}
    inputs = {p: [(e.chain_id.encode(), e.value) for e in evs] for p, evs in runs.items()}
    inputs[1].insert(60, (b"poison", b"\x00not an event"))
    inputs[1].insert(150, (b"poison", b"\x00another"))
    for p, recs in inputs.items():
        for o, (k, v) in enumerate(recs[:120]):
            app.handle(p, o, k, v)
            if o % 37 == 36:
                app.commit(p, o + 1)
    committed = [r for t in ("marl.fairness.metrics", "marl.dlq", "marl.audit.checkpoints") for r in app.records(t)]
    app.crash()   # records from each partition's last commit position on come again
    for p, recs in inputs.items():
        start = (120 // 37) * 37
        for o, (k, v) in enumerate(recs[start:], start):
            app.handle(p, o, k, v)
        app.commit(p, len(recs))
    records = [r for t in ("marl.fairness.metrics", "marl.dlq", "marl.audit.checkpoints") for r in app.records(t)]
    report = _verify_strict(records, signer.public_key)
    assert report.ok, report.breaks
    chains = {c.chain_id: c for c in report.chains}
    written = {"ra:fairness:faust:episode", "ra:fairness:faust:sliding", "rb:fairness:faust:episode",
               "rb:fairness:faust:sliding", "dlq:fairness-faust:p1", "ra:checkpoints:marlgrc-fairness-faust",
               "rb:checkpoints:marlgrc-fairness-faust", "dlq:fairness-faust:p1:checkpoints:marlgrc-fairness-faust"}
    assert set(chains) == written
    for chain in written:
        c = chains[chain]
        assert c.last_seq >= 0 and c.signed_through_seq == c.last_seq, (chain, c)
    assert chains["dlq:fairness-faust:p1"].events == 2
    assert chains["ra:fairness:faust:sliding"].events == (280 - 100) // 25 + 1
    # a run's checkpoint chain is in its credit chain's partition (one transaction per partition number)
    assert {r.partition for r in records if r.key.startswith("ra:")} == {0}
    assert {r.partition for r in records if r.key.startswith(("rb:", "dlq:"))} == {1}
    # what the commits before the crash published was already signed through every head
    early = _verify_strict(committed, signer.public_key)
    assert early.ok and len(early.chains) >= 6, early.breaks
    assert all(c.signed_through_seq == c.last_seq for c in early.chains)


def test_faust_rows_saved_before_the_app_signed_still_load_and_continue(faust_app):
    app, signer = faust_app
    codec = default_codec()
    row = ff.ChainState(last_offset=3, sliding_head=ff.ChainHead(5, b"\x11" * 32)).to_bytes()
    old = {k: v for k, v in __import__("json").loads(row).items() if k != "checkpoints"}
    st_ = ff.ChainState.from_bytes(__import__("json").dumps(old).encode())
    assert st_.sliding_head.seq == 5 and st_.checkpoints.head.seq == st_.checkpoints.covered.seq == -1
    ff.state.data[b"\0dlq:2"] = b'[4, 9, "' + (b"22" * 32) + b'"]'   # [last offset, seq, head]: the old row
    app.handle(2, 5, b"poison", b"\x00junk")
    app.commit(2, 6)
    dead = app.records("marl.dlq")
    assert [codec.decode(r.value)[1]["seq"] for r in dead] == [10]
    assert codec.decode(dead[0].value)[1]["prev_event_hash"] == b"\x22" * 32
    cps = [codec.decode(r.value)[1] for r in app.records("marl.audit.checkpoints")]
    assert [(c["checked_chain_id"], c["first_seq"], c["last_seq"]) for c in cps] == [
        ("dlq:fairness-faust:p2", 10, 10), ("dlq:fairness-faust:p2:checkpoints:marlgrc-fairness-faust", 0, 0)]
    assert [c["seq"] for c in cps] == [0, 1]

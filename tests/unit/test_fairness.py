"""Fairness metrics against seed 001's own numbers and known distributions."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_processors import fairness as f


@pytest.mark.parametrize("values, expected", [
    ([5, 5, 5, 5], 0.0),                  # perfect equality
    ([0, 0, 0, 10], 0.75),                # one holds everything: (n-1)/n
    ([1, 2, 3, 4], 0.25),                 # 2*30/(4*10) - 5/4
    ([1, 3], 0.25),                       # 2*7/(2*4) - 3/2
    ([], 0.0), ([0, 0], 0.0),
])
def test_gini_known_distributions(values, expected):
    assert f.gini(values) == pytest.approx(expected)


def test_gini_shifts_negative_rewards():
    assert f.gini([-1, -1, -1]) == 0.0
    assert f.gini([-2, 0, 2, 4]) == pytest.approx(f.gini([0, 2, 4, 6]))


@pytest.mark.parametrize("values, expected", [
    ([3, 3, 3], 1.0), ([0, 0, 0, 8], 0.25), ([1, 2], 0.9), ([0, 0], 1.0)])
def test_jain_known_distributions(values, expected):
    assert f.jain(values) == pytest.approx(expected)


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30))
def test_gini_and_jain_bounds(values):
    n = len(values)
    assert -1e-9 <= f.gini(values) <= (n - 1) / n + 1e-9
    assert 1 / n - 1e-9 <= f.jain(values) <= 1 + 1e-9


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


def _outcome(credits, acted=None, penalized=(), g=None):
    acted = tuple(a for a, _ in credits) if acted is None else acted
    return f.StepOutcome(tuple(credits), acted, tuple(penalized), sum(c for _, c in credits) if g is None else g)


def test_window_metrics_monopoly():
    # agent a wins every step and holds all the wealth
    outs = [_outcome([("a", 10.0), ("b", 0.0), ("c", 0.0), ("d", 0.0)], acted=("a",)) for _ in range(20)]
    metrics, agent = f.window_metrics(outs)
    m = {x["name"]: x["value"] for x in metrics}
    am = {(x["agent_id"], x["name"]): x["value"] for x in agent}
    assert m["gini"] == pytest.approx(0.75) and m["jain"] == pytest.approx(0.25)
    assert am[("a", "win_share")] == 1.0 and am[("a", "diversity_factor")] == -0.2
    assert am[("b", "diversity_factor")] == 0.15 and am[("b", "affirmative_boost")] == 0.15
    assert am[("a", "wealth")] == 200.0 and am[("a", "tax_rate")] == 0.10
    assert am[("a", "ubi_eligibility")] == 0.0 and am[("b", "ubi_eligibility")] == 1.0
    # a bids every step: 100 bids per 100-step hour > 50 -> -0.2; takes 4x its fair share
    assert am[("a", "cooperative_index")] == pytest.approx(0.3)


def test_window_metrics_equal_cooperative_team():
    outs = [_outcome([("a", 1.0), ("b", 1.0)]) for _ in range(12)]
    metrics, agent = f.window_metrics(outs)
    m = {x["name"]: x["value"] for x in metrics}
    am = {(x["agent_id"], x["name"]): x["value"] for x in agent}
    assert m["gini"] == 0.0 and m["jain"] == 1.0 and m["steps"] == 12
    # ties win nobody a step; 12 collaborative steps > 10; fair share ratio 1.0 < 1.2; 100 bids/hour
    assert am[("a", "win_share")] == 0.0
    assert am[("a", "cooperative_index")] == pytest.approx(0.6)
    assert m["cooperative_index"] == pytest.approx(0.6)


def test_tally_is_incremental_and_round_trips():
    outs = [_outcome([("a", float(i)), ("b", 1.0)]) for i in range(5)]
    t = f.Tally()
    for o in outs[:3]:
        t.add(o)
    t = f.Tally.from_json(t.to_json())
    for o in outs[3:]:
        t.add(o)
    assert t.metrics() == f.window_metrics(outs)
    assert all(math.isfinite(x["value"]) for x in t.metrics()[0])

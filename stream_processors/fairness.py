"""Fairness metrics (seed 001, "Fairness Integration"), pure, over a window of credit assignments.

The seed's formulas are kept exactly (thresholds included); ``window_metrics`` maps a MARL stream
onto them (docs/PROCESSORS.md): an agent's *wealth* is its summed credit in the window, it *wins*
a step when its credit is the unique maximum, it *bids* when it takes a non-NOOP action.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

VERSION = "fairness/seed001-1"


def _non_negative(values: Sequence[float]) -> list[float]:
    """Shift so the smallest value is 0 when any is negative (rewards can be; wealth in the seed is not)."""
    lo = min(values)
    return [v - lo for v in values] if lo < 0 else list(values)


def gini(values: Sequence[float]) -> float:
    """Seed 001 mechanism #5: ``2 * sum((i+1) * w_i) / (n * sum(w)) - (n+1)/n`` over sorted values.

    0 for perfect equality, (n-1)/n when one holds everything; 0.0 for an empty or all-zero input.
    Negative values are shifted first (``_non_negative``)."""
    if not values:
        return 0.0
    w = sorted(_non_negative(values))
    n, total = len(w), sum(w)
    if total == 0:
        return 0.0
    cumsum = sum((i + 1) * x for i, x in enumerate(w))
    return (2 * cumsum) / (n * total) - (n + 1) / n


def jain(values: Sequence[float]) -> float:
    """Jain's index ``(sum x)^2 / (n * sum x^2)``: 1 when equal, 1/n when one holds everything.
    1.0 for all-zero input (nobody is favoured); negatives are shifted first."""
    if not values:
        return 1.0
    x = _non_negative(values)
    sq = sum(v * v for v in x)
    return 1.0 if sq == 0 else sum(x) ** 2 / (len(x) * sq)


def diversity_factor(win_share: float) -> float:
    """Seed 001 mechanism #4: winning > 30% -> -0.2; < 15% -> +0.15; 15-30% (inclusive) -> 0.0."""
    if win_share > 0.30:
        return -0.2
    if win_share < 0.15:
        return 0.15
    return 0.0


def tax_rate(wealth: float) -> float:
    """Seed 001 mechanism #1: < 200 -> 0%; 200-500 -> 10%; 500-1000 -> 20%; >= 1000 -> 30%."""
    if wealth < 200:
        return 0.0
    if wealth < 500:
        return 0.10
    if wealth < 1000:
        return 0.20
    return 0.30


UBI_THRESHOLD = 100.0
UBI_PAYMENT = 50.0


def ubi_eligibility(wealth: float) -> float:
    """Seed 001 mechanism #2: 1.0 when wealth < 100 (paid 50 a week), else 0.0."""
    return 1.0 if wealth < UBI_THRESHOLD else 0.0


def ubi_payment(wealth: float) -> float:
    return UBI_PAYMENT if wealth < UBI_THRESHOLD else 0.0


def affirmative_boost(jobs_won: int, jobs_bid: int) -> float:
    """Seed 001 mechanism #3: win rate < 15% -> 0.15 boost. An agent that never bid has win rate 0."""
    win_rate = jobs_won / jobs_bid if jobs_bid else 0.0
    return 0.15 if win_rate < 0.15 else 0.0


def cooperative_score(bids_per_hour: float, collaborative_jobs: int, avg_bid_ratio: float) -> float:
    """Seed 001 mechanism #6: -0.2 for > 50 bids/hour, +0.2 for > 10 collaborative jobs, +0.1 for an
    average bid ratio < 1.2; ``clamp(score + 0.5, 0, 1)``."""
    score = 0.0
    if bids_per_hour > 50:
        score -= 0.2
    if collaborative_jobs > 10:
        score += 0.2
    if avg_bid_ratio < 1.2:
        score += 0.1
    return max(0.0, min(1.0, score + 0.5))


@dataclass(frozen=True)
class StepOutcome:
    """What fairness needs from one credit assignment."""

    credits: tuple[tuple[str, float], ...]   # (agent_id, credit) in the joint action's order
    acted: tuple[str, ...]                    # agents that took a non-NOOP action
    penalized: tuple[str, ...]                # agents with any penalty this step
    global_reward: float


STEPS_PER_HOUR = 100  # a window's "hour" for the bids-per-hour rule: 100 steps


@dataclass
class Tally:
    """Per-agent counts over a window, built one step at a time (episodes can be long)."""

    agents: list[str] = field(default_factory=list)
    wealth: dict[str, float] = field(default_factory=dict)
    wins: dict[str, int] = field(default_factory=dict)
    bids: dict[str, int] = field(default_factory=dict)
    collab: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def add(self, o: StepOutcome) -> "Tally":
        for aid, c in o.credits:
            if aid not in self.wealth:
                self.agents.append(aid)
                self.wealth[aid], self.wins[aid], self.bids[aid], self.collab[aid] = 0.0, 0, 0, 0
            self.wealth[aid] += c
        if o.credits:
            top = max(c for _, c in o.credits)
            leaders = [aid for aid, c in o.credits if c == top]
            if len(leaders) == 1:
                self.wins[leaders[0]] += 1
        for aid in o.acted:
            if aid in self.bids:
                self.bids[aid] += 1
                # a collaborative job: acted with another agent, nobody penalized, the team gained
                if len(o.acted) > 1 and not o.penalized and o.global_reward > 0:
                    self.collab[aid] += 1
        self.steps += 1
        return self

    def to_json(self) -> dict:
        return {"agents": self.agents, "wealth": self.wealth, "wins": self.wins, "bids": self.bids,
                "collab": self.collab, "steps": self.steps}

    @classmethod
    def from_json(cls, d: dict) -> "Tally":
        return cls(list(d["agents"]), dict(d["wealth"]), dict(d["wins"]), dict(d["bids"]), dict(d["collab"]),
                   int(d["steps"]))

    def metrics(self) -> tuple[list[dict], list[dict]]:
        """(metrics, agent_metrics) for the fairness.metrics payload."""
        agents, steps = self.agents, max(self.steps, 1)
        values = [self.wealth[a] for a in agents]
        total, n = sum(values), len(agents)
        total_wins = sum(self.wins.values())
        agent_metrics: list[dict] = []
        coop = []
        for a in agents:
            share = self.wins[a] / total_wins if total_wins else 0.0
            ratio = (self.wealth[a] / total) * n if total > 0 else 1.0  # credit relative to a fair share
            c = cooperative_score(self.bids[a] * STEPS_PER_HOUR / steps, self.collab[a], ratio)
            coop.append(c)
            w = self.wealth[a]
            for name, v in (("wealth", w), ("win_share", share), ("diversity_factor", diversity_factor(share)),
                            ("tax_rate", tax_rate(w)), ("ubi_eligibility", ubi_eligibility(w)),
                            ("affirmative_boost", affirmative_boost(self.wins[a], self.bids[a])),
                            ("cooperative_index", c)):
                agent_metrics.append({"agent_id": a, "name": name, "value": float(v)})
        metrics = [{"name": k, "value": float(v)} for k, v in (
            ("gini", gini(values)), ("jain", jain(values)),
            ("cooperative_index", sum(coop) / n if n else 0.0),
            ("total_credit", total), ("steps", self.steps), ("agents", n))]
        return metrics, agent_metrics


def window_metrics(outcomes: Sequence[StepOutcome]) -> tuple[list[dict], list[dict]]:
    """(metrics, agent_metrics) over ``outcomes``."""
    t = Tally()
    for o in outcomes:
        t.add(o)
    return t.metrics()

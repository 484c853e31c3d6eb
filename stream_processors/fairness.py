"""Fairness metrics (seed 001, "Fairness Integration"): the one definition, pure, over credit assignments.

Every fairness number in marlgrc comes from here, computed from ``di.credit`` events alone: the DI
worker's ``{run}:fairness`` chain, the faust app's ``{run}:fairness:faust:*`` chains and
``marlgrc reprocess`` all call ``outcome`` on a credit payload and fold it into ``Windows``. So a
fairness event can be recomputed from the credit events it names (its sources), and the two live
processors agree on every window both emit (tests/unit/test_fairness.py).

The seed's formulas are kept exactly (thresholds included); the mapping of a MARL step onto the
seed's job market (docs/PROCESSORS.md): an agent's *wealth* is its summed credit in the window; it
*wins* a step when its credit is the unique maximum; it *bids* in a step when the credit assignment
gives it a stake in the outcome (a non-zero share or a penalty) or it won the step.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

VERSION = "fairness/seed001-2"
WINDOW, HOP = 100, 25   # sliding window: the last 100 credits, every 25 credits


class InvalidCredit(ValueError):
    """A di.credit record that no metric can use (goes to the dead-letter topic)."""


def _non_negative(values: Sequence[float]) -> list[float]:
    """Shift so the smallest value is 0 when any is negative (rewards can be; wealth in the seed is not)."""
    lo = min(values)
    return [v - lo for v in values] if lo < 0 else list(values)


def gini(values: Sequence[float]) -> float:
    """Seed 001 mechanism #5: ``2 * sum((i+1) * w_i) / (n * sum(w)) - (n+1)/n`` over sorted values.

    In ``[0, (n-1)/n]``: 0 for perfect equality, (n-1)/n when one holds everything; 0.0 for an empty
    or all-zero input. Negative values are shifted first (``_non_negative``). Sums are exact
    (``math.fsum``) and a rounding residue below 0 reads as 0."""
    if not values:
        return 0.0
    w = sorted(_non_negative(values))
    n, total = len(w), math.fsum(w)
    if total == 0:
        return 0.0
    cumsum = math.fsum((i + 1) * x for i, x in enumerate(w))
    return max(0.0, (2 * cumsum) / (n * total) - (n + 1) / n)


def jain(values: Sequence[float]) -> float:
    """Jain's index ``(sum x)^2 / (n * sum x^2)``: 1 when equal, 1/n when one holds everything.
    1.0 for all-zero input (nobody is favoured); negatives are shifted first."""
    if not values:
        return 1.0
    x = _non_negative(values)
    sq = math.fsum(v * v for v in x)
    return 1.0 if sq == 0 else math.fsum(x) ** 2 / (len(x) * sq)


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
    """What fairness takes from one credit assignment; who won and who bid follow from it."""

    credits: tuple[tuple[str, float], ...]   # (agent_id, credit) in the credit event's order
    penalized: tuple[str, ...]                # agents with any penalty this step, sorted
    global_reward: float

    @property
    def winner(self) -> str | None:
        """The agent with the unique maximum credit; None on a tie."""
        if not self.credits:
            return None
        top = max(c for _, c in self.credits)
        leaders = [a for a, c in self.credits if c == top]
        return leaders[0] if len(leaders) == 1 else None

    @property
    def bidders(self) -> tuple[str, ...]:
        """Agents with a stake in the step: a non-zero share or a penalty; and the winner (only a bid wins)."""
        won, pen = self.winner, set(self.penalized)
        return tuple(a for a, c in self.credits if c != 0.0 or a in pen or a == won)

    def to_json(self) -> list:
        return [[[a, c] for a, c in self.credits], list(self.penalized), self.global_reward]

    @classmethod
    def from_json(cls, j: list) -> "StepOutcome":
        if len(j) == 4:  # saved under fairness/seed001-1: [credits, bidders, penalized, g]; bidders now follow
            j = [j[0], j[2], j[3]]
        return cls(tuple((a, c) for a, c in j[0]), tuple(j[1]), j[2])


def outcome(credit: Mapping) -> StepOutcome:
    """The fairness view of one di.credit payload (a decoded record or ``Credit.payload``). Raises
    InvalidCredit on a record no metric can use: no shares, a repeated agent, a non-finite number."""
    shares = credit.get("shares") or []
    if not shares:
        raise InvalidCredit("di.credit has no shares")
    credits, seen = [], set()
    for s in shares:
        aid, c = s["agent_id"], float(s["credit"])
        if aid in seen:
            raise InvalidCredit(f"di.credit names agent {aid!r} in two shares")
        if not math.isfinite(c):
            raise InvalidCredit(f"agent {aid}: credit {c!r} is not finite")
        seen.add(aid)
        credits.append((aid, c))
    g = float(credit["global_reward"])
    if not math.isfinite(g):
        raise InvalidCredit(f"global reward {g!r} is not finite")
    return StepOutcome(tuple(credits), tuple(sorted({p["agent_id"] for p in credit.get("penalties") or []})), g)


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
        won = o.winner
        if won is not None:
            self.wins[won] += 1
        bidders = o.bidders
        # a collaborative job: bid with another agent, nobody penalized, the team gained
        collaborative = len(bidders) > 1 and not o.penalized and o.global_reward > 0
        for aid in bidders:
            self.bids[aid] += 1
            if collaborative:
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


class Window(NamedTuple):
    """One fairness.metrics event to seal: its kind, payload, source hashes and rule_version."""

    kind: str                 # "episode" | "sliding"
    payload: dict
    sources: list[bytes]      # first and last credit event hash of the window (the credit chain links the rest)
    rule_version: str


@dataclass
class Windows:
    """The fairness windows over one credit chain: the current episode, and the last ``size`` credits
    (emitted every ``hop`` credits). Serializes to JSON-able keys (``to_json``), so a processor keeps
    it in its committed state."""

    episode: int | None = None
    ep_tally: Tally = field(default_factory=Tally)
    ep_hashes: list = field(default_factory=list)     # [first, last] credit hash hex of the episode
    ep_rule: str = ""                                 # rule_version of the episode's last credit
    window: deque = field(default_factory=deque)      # [outcome json, credit hash hex]
    credits: int = 0                                  # credits added, ever: window_start/end count them

    def add(self, episode: int, o: StepOutcome, credit_hash: bytes, rule_version: str, *,
            size: int = WINDOW, hop: int = HOP) -> list[Window]:
        """Fold in one credit (of ``episode``); returns the windows it completes: the previous episode
        when this credit starts a new one, then a sliding window when one is due."""
        out = []
        if self.episode is not None and episode != self.episode:
            self.ep_rule = self.ep_rule or rule_version   # a state saved before ep_rule was kept
            closed = self.close_episode()
            if closed is not None:
                out.append(closed)
        h = credit_hash.hex()
        self.episode, self.ep_rule = episode, rule_version
        self.ep_tally.add(o)
        self.ep_hashes = [self.ep_hashes[0] if self.ep_hashes else h, h]
        self.window.append([o.to_json(), h])
        while len(self.window) > size:
            self.window.popleft()
        self.credits += 1
        if self.credits % hop == 0 and len(self.window) == size:
            metrics, agent_metrics = window_metrics([StepOutcome.from_json(j) for j, _ in self.window])
            out.append(Window("sliding", {
                "episode": episode, "window": "sliding", "window_start": self.credits - size,
                "window_end": self.credits - 1, "metrics": metrics, "agent_metrics": agent_metrics},
                [bytes.fromhex(self.window[0][1]), bytes.fromhex(self.window[-1][1])], rule_version))
        return out

    def close_episode(self) -> Window | None:
        """The current episode's window (None when it has no credit yet); the next credit starts afresh."""
        t = self.ep_tally
        if not t.steps:
            return None
        metrics, agent_metrics = t.metrics()
        end = self.credits - 1
        w = Window("episode", {"episode": self.episode, "window": "episode", "window_start": end - t.steps + 1,
                               "window_end": end, "metrics": metrics, "agent_metrics": agent_metrics},
                   [bytes.fromhex(h) for h in self.ep_hashes], self.ep_rule)
        self.ep_tally, self.ep_hashes = Tally(), []
        return w

    def to_json(self) -> dict:
        return {"episode": self.episode, "ep_tally": self.ep_tally.to_json(), "ep_hashes": self.ep_hashes,
                "ep_rule": self.ep_rule, "window": list(self.window), "credits": self.credits}

    @classmethod
    def from_json(cls, d: dict) -> "Windows":
        return cls(d["episode"], Tally.from_json(d["ep_tally"]), list(d["ep_hashes"]), d.get("ep_rule", ""),
                   deque(d["window"]), d["credits"])

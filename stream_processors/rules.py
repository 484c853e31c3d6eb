"""The decision interpreter (seed 000): pure, versioned rules from a joint action and the state it
acted on to a credit assignment.

Pipeline, the same for every rule set (docs/PROCESSORS.md):

1. late fusion: the agents' actions become one joint vector (``late_fusion``);
2. raw reward: the sum of the env's own reward signals;
3. penalties routed to the agents that caused them (conflicts, security breaches, costs);
4. ``pre = raw - sum(penalties)``, clipped to ``[-clip, clip]``;
5. running normalization: scaled by ``1 / std`` of the clipped values seen so far in the run
   (Welford; scale only, so the sign of a reward never flips), clipped again to
   ``[-norm_clip, norm_clip]``: the global reward ``g``;
6. the split per agent, naming its rule; the shares always sum to ``g``.

A rule set is a frozen dataclass; its ``version`` goes into ``rule_version`` of every output.
Nothing here does I/O: the same functions serve the live worker and ``marlgrc reprocess``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence


class InvalidDecision(ValueError):
    """A joint action (or its state) that no rule can score; goes to the dead-letter topic."""


@dataclass(frozen=True)
class AgentAct:
    agent_id: str
    discrete: int
    continuous: tuple[float, ...]
    reward: float
    terminated: bool
    truncated: bool


@dataclass(frozen=True)
class Decision:
    """One joint action joined with the env.state it acted on (decoded payloads, no I/O)."""

    episode: int
    step: int
    actions: tuple[AgentAct, ...]
    state: tuple[float, ...] = ()
    state_flags: tuple[str, ...] = ()

    @property
    def episode_over(self) -> bool:
        return all(a.terminated or a.truncated for a in self.actions)


def decision_from_records(joint_action: Mapping, state: Mapping | None) -> Decision:
    """Build a Decision from decoded ``joint.action`` and ``env.state`` records; validates them."""
    raw = joint_action.get("actions") or []
    if not raw:
        raise InvalidDecision("joint.action has no actions")
    acts, seen = [], set()
    for a in raw:
        aid = a["agent_id"]
        if not aid or aid in seen:
            raise InvalidDecision(f"joint.action has an empty or repeated agent_id {aid!r}")
        seen.add(aid)
        r = float(a["reward"])
        if not math.isfinite(r):
            raise InvalidDecision(f"agent {aid}: reward {r!r} is not finite")
        cont = tuple(float(x) for x in a.get("continuous") or ())
        if not all(math.isfinite(x) for x in cont):
            raise InvalidDecision(f"agent {aid}: continuous action is not finite")
        acts.append(AgentAct(aid, int(a["discrete"]), cont, r, bool(a["terminated"]), bool(a["truncated"])))
    st = tuple(float(x) for x in (state or {}).get("state") or ())
    flags = tuple((state or {}).get("flags") or ())
    return Decision(int(joint_action["episode"]), int(joint_action["step"]), tuple(acts), st, flags)


def late_fusion(actions: Sequence[AgentAct]) -> tuple[float, ...]:
    """The joint action vector: each agent's discrete action, then its continuous components, in
    agent order (the order the joint action lists them)."""
    out: list[float] = []
    for a in actions:
        if a.discrete >= 0:
            out.append(float(a.discrete))
        out.extend(a.continuous)
    return tuple(out)


@dataclass(frozen=True)
class Normalizer:
    """Running statistics (Welford) of the clipped rewards of one run."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: float) -> "Normalizer":
        n = self.count + 1
        d = x - self.mean
        mean = self.mean + d / n
        return Normalizer(n, mean, self.m2 + d * (x - mean))

    @property
    def scale(self) -> float:
        """1/std once there are two samples and some spread; 1.0 before."""
        if self.count < 2:
            return 1.0
        std = math.sqrt(self.m2 / self.count)
        return 1.0 / std if std > 1e-6 else 1.0


@dataclass(frozen=True)
class Penalty:
    rule: str
    agent_id: str
    amount: float
    reason: str


@dataclass(frozen=True)
class Share:
    agent_id: str
    credit: float
    rule: str


@dataclass(frozen=True)
class Credit:
    raw_reward: float
    global_reward: float
    penalties: tuple[Penalty, ...]
    shares: tuple[Share, ...]
    joint_vector: tuple[float, ...]

    def payload(self, episode: int, step: int, joint_action_hash: bytes) -> dict:
        """The di.credit payload (schema credit_assignment, fields after the header)."""
        return {
            "episode": episode, "step": step, "joint_action_hash": joint_action_hash,
            "raw_reward": self.raw_reward, "global_reward": self.global_reward,
            "penalties": [{"rule": p.rule, "agent_id": p.agent_id, "amount": p.amount, "reason": p.reason}
                          for p in self.penalties],
            "shares": [{"agent_id": s.agent_id, "credit": s.credit, "rule": s.rule} for s in self.shares],
        }


def clip(x: float, bound: float) -> float:
    return max(-bound, min(bound, x))


def _global(raw: float, penalties: Sequence[Penalty], norm: Normalizer, clip_at: float, norm_clip: float
            ) -> tuple[float, float, Normalizer]:
    """(pre, g, new normalizer): steps 4 and 5 of the pipeline."""
    pre = raw - sum(p.amount for p in penalties)
    clipped = clip(pre, clip_at)
    norm = norm.update(clipped)
    return pre, clip(clipped * norm.scale, norm_clip), norm


def _factor(pre: float, g: float, norm: Normalizer) -> float:
    """The one factor that maps the team's pre-reward to g (clip and scale together)."""
    return g / pre if pre != 0.0 else norm.scale


def _penalty_by_agent(penalties: Sequence[Penalty]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in penalties:
        out[p.agent_id] = out.get(p.agent_id, 0.0) + p.amount
    return out


# --------------------------------------------------------------------------------------------
# mailbox_v0 (seed 000): GET, OPEN and BIN agents acting on the step's mail item
# --------------------------------------------------------------------------------------------

MAILBOX_ACTIONS: dict[str, tuple[str, ...]] = {
    # producers/envs/mailbox_v0.py: agents "get", "open", "bin"; Discrete(3), Discrete(5), Discrete(2)
    "get": ("SKIP", "GET", "DEFER"),
    "open": ("NOOP", "OPEN", "OPEN_SAFE_PREVIEW", "OPEN_SANDBOX", "QUARANTINE"),
    "bin": ("KEEP", "BIN"),
}
OPEN_FAMILY = frozenset({"OPEN", "OPEN_SAFE_PREVIEW", "OPEN_SANDBOX"})
MALICIOUS_FLAGS = frozenset({"label:malicious", "malicious"})


@dataclass(frozen=True)
class MailboxRules:
    """Rule set for ``mailbox_v0`` (producers/envs/mailbox_v0.py).

    Contract with the env: agents ``get``, ``open``, ``bin`` (an agent's role is its id up to the
    first ``_``, so ``get_0`` works too); its discrete action indexes ``action_names[role]``; all
    agents act on the step's one mail item; the item is malicious when env.state's privileged
    ``flags`` contain ``label:malicious`` (written by the harness from the env's ``state_flags()``;
    the agents never observe it) or, for other producers, ``state[malicious_index] >= 0.5`` with the
    index from the run's config (``state_layout.malicious``). The env's 9-float state has no label.
    """

    version: str = "mailbox_v0/di-2"
    action_names: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(MAILBOX_ACTIONS))
    malicious_index: int | None = None
    conflict_penalty: float = 0.5       # per conflicting pair, split evenly between the two agents
    breach_penalty: float = 1.0         # a plain OPEN of a malicious item
    clip_at: float = 2.0
    norm_clip: float = 10.0

    @classmethod
    def from_config(cls, config: Mapping) -> "MailboxRules":
        """Overrides from run.started's config_json: ``action_names`` {role: [names]} and
        ``state_layout.malicious`` (an index into env.state's state vector)."""
        r = cls()
        names = config.get("action_names")
        if isinstance(names, Mapping):
            merged = dict(r.action_names)
            merged.update({str(k).lower(): tuple(str(x).upper() for x in v) for k, v in names.items()})
            r = replace(r, action_names=merged)
        layout = config.get("state_layout")
        if isinstance(layout, Mapping) and isinstance(layout.get("malicious"), int):
            r = replace(r, malicious_index=layout["malicious"])
        return r

    def role(self, agent_id: str) -> str:
        return agent_id.split("_", 1)[0].lower()

    def action_name(self, a: AgentAct) -> str:
        names = self.action_names.get(self.role(a.agent_id))
        if names is None:
            raise InvalidDecision(f"mailbox_v0: agent {a.agent_id!r} has no known role "
                                  f"(expected an id starting with one of {sorted(self.action_names)})")
        if not 0 <= a.discrete < len(names):
            raise InvalidDecision(f"mailbox_v0: agent {a.agent_id} action {a.discrete} is outside 0..{len(names) - 1}")
        return names[a.discrete]

    def malicious(self, d: Decision) -> bool:
        if MALICIOUS_FLAGS.intersection(d.state_flags):
            return True
        i = self.malicious_index
        return i is not None and -len(d.state) <= i < len(d.state) and d.state[i] >= 0.5

    def penalties(self, d: Decision) -> list[Penalty]:
        named = [(a.agent_id, self.action_name(a)) for a in d.actions]
        out: list[Penalty] = []
        gets = [aid for aid, n in named if n == "GET"]
        bins = [aid for aid, n in named if n == "BIN"]
        opens = [aid for aid, n in named if n in OPEN_FAMILY]
        half = self.conflict_penalty / 2
        for g_ in gets:
            for b in bins:
                out.append(Penalty("conflict_get_bin", g_, half, f"{g_} GET and {b} BIN on the same item"))
                out.append(Penalty("conflict_get_bin", b, half, f"{b} BIN and {g_} GET on the same item"))
        for o in opens:
            for b in bins:
                out.append(Penalty("conflict_open_bin", o, half, f"{o} opens an item {b} bins"))
                out.append(Penalty("conflict_open_bin", b, half, f"{b} bins an item {o} opens"))
        if self.malicious(d):
            for aid, n in named:
                if n == "OPEN":
                    out.append(Penalty("security_breach_open_malicious", aid, self.breach_penalty,
                                       f"{aid} used a plain OPEN on a malicious item; use OPEN_SANDBOX or QUARANTINE"))
        return out

    def interpret(self, d: Decision, norm: Normalizer) -> tuple[Credit, Normalizer]:
        raw = sum(a.reward for a in d.actions)
        pens = self.penalties(d)
        pre, g, norm = _global(raw, pens, norm, self.clip_at, self.norm_clip)
        k, n = _factor(pre, g, norm), len(d.actions)
        total = sum(p.amount for p in pens)
        own = _penalty_by_agent(pens)
        # team share of g, with each penalty moved from the whole team to the agent that caused it
        shares = tuple(Share(a.agent_id, g / n - k * (own.get(a.agent_id, 0.0) - total / n),
                             "team_share+penalty_routing" if a.agent_id in own else "team_share")
                       for a in d.actions)
        return Credit(raw, g, tuple(pens), shares, late_fusion(d.actions)), norm


# --------------------------------------------------------------------------------------------
# sandbox_v0 (seed 002): containment actions scored by detection outcomes
# --------------------------------------------------------------------------------------------

SANDBOX_ACTIONS = ("CONTINUE_MONITORING", "INCREASE_ISOLATION", "TERMINATE_PROCESS", "QUARANTINE_FILE",
                   "REQUEST_HUMAN_REVIEW")


@dataclass(frozen=True)
class SandboxRules:
    """Rule set for ``sandbox_v0`` (producers/envs/sandbox_v0.py): agents ``sandbox_0..n-1``, each
    owning ONE sandbox with its own sample, Discrete(5) actions in ``SANDBOX_ACTIONS`` order, state
    = 30 telemetry features per sandbox. The env's detection rewards are the signal; a human review
    costs ``review_cost`` (so escalating everything cannot be the best policy). There is no
    cross-agent conflict rule: two agents never act on the same sample (di-1 assumed they did)."""

    version: str = "sandbox_v0/di-2"
    review_cost: float = 0.05
    clip_at: float = 5.0
    norm_clip: float = 10.0

    def action_name(self, a: AgentAct) -> str:
        if not 0 <= a.discrete < len(SANDBOX_ACTIONS):
            raise InvalidDecision(f"sandbox_v0: agent {a.agent_id} action {a.discrete} is outside 0..4")
        return SANDBOX_ACTIONS[a.discrete]

    def penalties(self, d: Decision) -> list[Penalty]:
        named = [(a.agent_id, self.action_name(a)) for a in d.actions]
        return [Penalty("human_review_cost", aid, self.review_cost, f"{aid} requested human review")
                for aid, n in named if n == "REQUEST_HUMAN_REVIEW"]

    def interpret(self, d: Decision, norm: Normalizer) -> tuple[Credit, Normalizer]:
        raw = sum(a.reward for a in d.actions)
        pens = self.penalties(d)
        pre, g, norm = _global(raw, pens, norm, self.clip_at, self.norm_clip)
        k = _factor(pre, g, norm)
        own = _penalty_by_agent(pens)
        # each agent's own detection reward minus its own penalties, on the team's scale
        shares = tuple(Share(a.agent_id, k * (a.reward - own.get(a.agent_id, 0.0)), "own_signal_scaled")
                       for a in d.actions)
        return Credit(raw, g, tuple(pens), shares, late_fusion(d.actions)), norm


# --------------------------------------------------------------------------------------------
# shared by the seed 001 / 003 rule sets
# --------------------------------------------------------------------------------------------


def _env_args(config: Mapping) -> dict:
    """The env's keyword arguments as a run's config carries them: at the top level (the harness's
    ``config=``) or under ``env_args`` (``marlgrc run``); ``env_args`` wins."""
    out = {k: v for k, v in config.items() if isinstance(k, str)}
    inner = config.get("env_args")
    if isinstance(inner, Mapping):
        out.update(inner)
    return out


def _agent_indices(d: Decision, prefix: str, env: str) -> list[int]:
    """Each agent's index from its id ``{prefix}{i}``; the ids must be exactly ``{prefix}0..{n-1}``
    (the env's ``state()`` lists agents in that order)."""
    n, out = len(d.actions), []
    for a in d.actions:
        tail = a.agent_id[len(prefix):] if a.agent_id.startswith(prefix) else ""
        if not tail.isdigit() or not 0 <= int(tail) < n:
            raise InvalidDecision(f"{env}: agent {a.agent_id!r} is not one of {prefix}0..{prefix}{n - 1} "
                                  f"(the joint action has {n} agents)")
        out.append(int(tail))
    return out


def _need_state_length(d: Decision, want: int, env: str, layout: str) -> None:
    if len(d.state) != want:
        raise InvalidDecision(f"{env}: env.state has {len(d.state)} floats, the rule set needs {want} ({layout}) "
                              f"for {len(d.actions)} agents; check the producer wrote {env}'s state()")


def _shares_scaled(d: Decision, k: float, parts: Sequence[float], rules: Sequence[str]) -> tuple[Share, ...]:
    return tuple(Share(a.agent_id, k * p, r) for a, p, r in zip(d.actions, parts, rules))


# --------------------------------------------------------------------------------------------
# market_v0 (seed 001): nodes bid for one job per step in a fairness-aware market
# --------------------------------------------------------------------------------------------

MARKET_OBS = 25            # the seed's 25-D state, one block per agent in env.state
M_DIVERSITY, M_GINI, M_UBI, M_BOOST, M_COMPLEXITY = 18, 20, 21, 22, 23
MARKET_ACTIONS = 9         # 0 NO_BID, 1..8 ask rungs
GINI_BONUS, UBI_BONUS, DIVERSITY_PENALTY = 0.1, 0.05, 0.1


def market_standing_reward(block: Sequence[float], bid: bool, fair: bool) -> float:
    """producers/envs/market_v0.py ``standing_reward``, the same arithmetic: the reward of an agent
    that ran no job (Gini < 0.3: +0.1; UBI-eligible and it bid: +0.05; monopolizing: -0.1)."""
    if not fair:
        return 0.0
    r = GINI_BONUS if block[M_GINI] < 0.3 else 0.0
    if bid and block[M_UBI] > 0.5:
        r += UBI_BONUS
    if float(block[M_DIVERSITY]) <= -0.2 + 1e-6:
        r -= DIVERSITY_PENALTY
    return float(r)


@dataclass(frozen=True)
class MarketRules:
    """Rule set for ``market_v0`` (producers/envs/market_v0.py, seed 001).

    Reads: the joint action's agents ``node_0..node_{n-1}`` (all, every step), each one's discrete
    action (0 NO_BID, 1..8 a bid) and reward; env.state = ``25 n + 5`` floats, agent i's 25-D block
    at ``[25 i, 25 i + 25)`` (the observation it bid on), of which index 18 (diversity factor), 20
    (Gini of wallets), 21 (UBI eligibility), 22 (affirmative boost) and 23 (job complexity).

    Who won: a non-winner's reward is exactly ``standing_reward`` of its block (the env's rule), so
    the winner is the one bidding agent whose reward differs (none: nobody bid, or a background
    bidder won). Credit, per the seed's reward components: the winner keeps its job outcome
    (success/failure, time, profit *after its tax*, trust, its UBI and diversity terms, all x
    complexity: it bore the job, its tax bracket and its monopoly); every agent keeps its own UBI
    (+0.05, for staying active) and diversity (-0.1, monopolizing) terms; the Gini bonus (+0.1 each,
    x complexity for the winner) is a property of every wallet together, so the pool of all agents'
    Gini bonuses is split evenly. The affirmative boost is a market mechanism (the winner's score),
    not a reward term: a boosted winner's share is named ``+affirmative_boost``. Shares sum to g.

    ``fair_reward`` from the run's config (the env's ``fair_reward``); None: inferred per step (the
    fair rule first, then the profit-only one). A step whose rewards fit neither is refused.
    """

    version: str = "market/seed001-1"
    fair_reward: bool | None = None
    clip_at: float = 25.0       # above any team reward the market gives (|winner| <= ~20.5 at 5x)
    norm_clip: float = 10.0

    @classmethod
    def from_config(cls, config: Mapping) -> "MarketRules":
        fair = _env_args(config).get("fair_reward")
        return cls(fair_reward=fair) if isinstance(fair, bool) else cls()

    def blocks(self, d: Decision) -> list[tuple[float, ...]]:
        n = len(d.actions)
        _need_state_length(d, MARKET_OBS * n + 5, "market_v0", "25 per agent, then jobs left and the scenario one-hot")
        idx = _agent_indices(d, "node_", "market_v0")
        for a in d.actions:
            if not 0 <= a.discrete < MARKET_ACTIONS:
                raise InvalidDecision(f"market_v0: agent {a.agent_id} action {a.discrete} is outside 0..8")
        return [d.state[MARKET_OBS * i:MARKET_OBS * (i + 1)] for i in idx]

    def split(self, d: Decision, fair: bool) -> tuple[int | None, list[float], float] | None:
        """(winner's position in the joint action or None, each agent's own part, the Gini pool), or
        None when the rewards do not follow the env's rule under ``fair``."""
        blocks = self.blocks(d)
        diff = [j for j, (a, b) in enumerate(zip(d.actions, blocks))
                if abs(a.reward - market_standing_reward(b, a.discrete != 0, fair)) > 1e-9]
        if len(diff) > 1 or (diff and d.actions[diff[0]].discrete == 0):
            return None
        winner = diff[0] if diff else None
        own, pool = [], 0.0
        for j, (a, b) in enumerate(zip(d.actions, blocks)):
            g = (GINI_BONUS * (float(b[M_COMPLEXITY]) if j == winner else 1.0)) if fair and b[M_GINI] < 0.3 else 0.0
            own.append(a.reward - g)
            pool += g
        return winner, own, pool

    def interpret(self, d: Decision, norm: Normalizer) -> tuple[Credit, Normalizer]:
        modes = (self.fair_reward,) if self.fair_reward is not None else (True, False)
        found = next((s for s in (self.split(d, m) for m in modes) if s is not None), None)
        if found is None:
            raise InvalidDecision(f"market_v0: more than one agent's reward differs from the env's standing reward "
                                  f"(or a non-bidder's does) under fair_reward={'/'.join(map(str, modes))}; these "
                                  f"rewards are not market_v0's (rule set {self.version})")
        winner, own, pool = found
        raw = sum(a.reward for a in d.actions)
        pre, g, norm = _global(raw, (), norm, self.clip_at, self.norm_clip)
        k, n = _factor(pre, g, norm), len(d.actions)
        blocks = self.blocks(d)
        names = []
        for j, b in enumerate(blocks):
            name = "winner_outcome" if j == winner else "standing"
            if j == winner and b[M_BOOST] > 0:
                name += "+affirmative_boost"
            names.append(name + ("+fairness_pool" if pool else ""))
        shares = _shares_scaled(d, k, [o + pool / n for o in own], names)
        return Credit(raw, g, (), shares, late_fusion(d.actions)), norm


# --------------------------------------------------------------------------------------------
# retail_v0 (seed 003 RETAIL): warehouses order, transfer and meet demand
# --------------------------------------------------------------------------------------------

RETAIL_TRANSFER_COST = 0.5   # $ per unit, paid by the sender (seed 003)


def retail_feasible_transfers(requested: Sequence[Sequence[float]], on_hand: Sequence[float],
                              free: Sequence[float]) -> list[list[int]]:
    """producers/envs/retail_v0.py ``feasible_transfers`` in plain Python (same arithmetic): each
    sender's row scaled down to its on-hand stock, then each receiver's column to its free capacity
    (plus its own outgoing units), proportionally, floored."""
    n = len(on_hand)
    req = [[0.0 if i == j else max(float(requested[i][j]), 0.0) for j in range(n)] for i in range(n)]
    sent = []
    for i in range(n):
        out = sum(req[i])
        row = on_hand[i] / out if out > on_hand[i] else 1.0
        sent.append([math.floor(x * row + 1e-9) for x in req[i]])
    room = [free[j] + sum(sent[j]) for j in range(n)]
    inb = [sum(sent[i][j] for i in range(n)) for j in range(n)]
    col = [room[j] / inb[j] if inb[j] > room[j] else 1.0 for j in range(n)]
    return [[int(math.floor(sent[i][j] * col[j] + 1e-9)) for j in range(n)] for i in range(n)]


@dataclass(frozen=True)
class RetailRules:
    """Rule set for ``retail_v0`` (producers/envs/retail_v0.py, seed 003 RETAIL).

    Reads: agents ``warehouse_0..warehouse_{n-1}``, each one's action (continuous: ``[order,
    transfer to each other warehouse in index order]`` in [0, 1]; discrete: an order level, no
    transfers) and reward; env.state = ``n (6 + L)`` floats (L = lead time): warehouse i's block of
    ``5 + L`` at ``[(5 + L) i, (5 + L)(i + 1))``, of which only index 0 (on-hand inventory /
    capacity) is read, then the n hidden demand rates (not read). From the inventories and the
    actions the rule recomputes the env's same-day transfers (``retail_feasible_transfers``), so it
    knows each warehouse's units sent and received.

    Credit: each warehouse's own cost, a transfer's $0.50/unit charged to its sender. With the env's
    local rewards (``reward_mode="local"``, seed 003's ``[cost1, cost2, ...]``) that is the reward
    itself, checked against the transfers (a reward cannot cost less than the units it sent), and a
    receiver's reward already counts the stockouts its received units relieved. With
    ``reward_mode="shared"`` (every reward = -total/n) the events do not tell which warehouse had
    the stockouts or holding: the transfer costs go to their senders, the rest of the day's cost is
    split evenly; the relief cannot be seen, so it is not credited. Shares sum to g.

    Config (``lead_time``, ``capacity``, ``max_transfer``, ``reward_mode``): the env's defaults 2,
    100, 10 where the run's config does not say; ``reward_mode`` unset: shared when every reward is
    equal (n > 1), else local. The state's length must be ``n (6 + lead_time)``.
    """

    version: str = "retail/seed003-1"
    lead_time: int = 2
    capacity: int = 100
    max_transfer: int = 10
    reward_mode: str | None = None
    clip_per_agent: float = 100.0   # a warehouse's bad day: ~10 units short at $10, holding, transfers
    norm_clip: float = 10.0

    @classmethod
    def from_config(cls, config: Mapping) -> "RetailRules":
        a, r = _env_args(config), cls()
        for f in ("lead_time", "capacity", "max_transfer"):
            if isinstance(a.get(f), int) and not isinstance(a.get(f), bool):
                r = replace(r, **{f: a[f]})
        if a.get("reward_mode") in ("local", "shared"):
            r = replace(r, reward_mode=a["reward_mode"])
        return r

    def transfers(self, d: Decision) -> tuple[list[int], list[int]]:
        """(units sent, units received) per agent in joint-action order."""
        n, L = len(d.actions), self.lead_time
        _need_state_length(d, n * (6 + L), "retail_v0", f"5 + lead_time {L} per warehouse, then n demand rates")
        idx = _agent_indices(d, "warehouse_", "retail_v0")
        blk = 5 + L
        inv = [0.0] * n
        for i in idx:
            inv[i] = float(round(d.state[blk * i] * self.capacity))
        req = [[0.0] * n for _ in range(n)]
        for a, i in zip(d.actions, idx):
            if not a.continuous:
                continue  # discrete order level: no transfers
            if len(a.continuous) != n:
                raise InvalidDecision(f"retail_v0: {a.agent_id}'s action has {len(a.continuous)} values; it needs {n} "
                                      f"(order, then a transfer to each of the {n - 1} other warehouses)")
            others = [j for j in range(n) if j != i]
            for j, x in zip(others, a.continuous[1:]):
                req[i][j] = float(round(min(1.0, max(0.0, x)) * self.max_transfer))  # round: half to even, as rint
        m = retail_feasible_transfers(req, inv, [self.capacity - x for x in inv])
        return [sum(m[i]) for i in idx], [sum(m[j][i] for j in range(n)) for i in idx]

    def mode(self, d: Decision) -> str:
        if self.reward_mode is not None:
            return self.reward_mode
        rs = {a.reward for a in d.actions}
        return "shared" if len(d.actions) > 1 and len(rs) == 1 else "local"

    def interpret(self, d: Decision, norm: Normalizer) -> tuple[Credit, Normalizer]:
        sent, received = self.transfers(d)
        n = len(d.actions)
        raw = sum(a.reward for a in d.actions)
        tcost = [RETAIL_TRANSFER_COST * s for s in sent]
        if self.mode(d) == "local":
            for a, t in zip(d.actions, tcost):
                if -a.reward < t - 1e-6:
                    raise InvalidDecision(f"retail_v0: {a.agent_id}'s reward {a.reward} costs less than the ${t:.2f} "
                                          f"of the units it sent (state and actions say so); not retail_v0's local reward")
            parts = [a.reward for a in d.actions]
            names = ["own_cost" + ("+transfer_sent" if s else "") + ("+transfer_received" if r else "")
                     for s, r in zip(sent, received)]
        else:
            rest = -raw - sum(tcost)
            if rest < -1e-6:
                raise InvalidDecision(f"retail_v0: the day's cost {-raw} is less than its transfer costs {sum(tcost)}")
            parts = [-t - rest / n for t in tcost]
            names = ["pooled_cost" + ("+transfer_sent" if s else "") for s in sent]
        pre, g, norm = _global(raw, (), norm, self.clip_per_agent * n, self.norm_clip)
        shares = _shares_scaled(d, _factor(pre, g, norm), parts, names)
        return Credit(raw, g, (), shares, late_fusion(d.actions)), norm


# --------------------------------------------------------------------------------------------
# banking_v0 (seed 003 BANKING): routers pick a channel per transaction
# --------------------------------------------------------------------------------------------

BANKING_LATENCY_MS = (20.0, 80.0, 200.0)     # internal, external, blockchain (seed 003)
BANKING_RISK = (0.03, 0.02, 0.01)
BANKING_COST = (0.10, 0.50, 2.00)
BANKING_PROFILE_RISK = (0.5, 1.0, 3.0)       # KYC rating low / standard / high
BANKING_RISK_LIMIT, BANKING_RISK_PENALTY, BANKING_LATENCY_LIMIT_MS = 0.05, 5.0, 100.0


@dataclass(frozen=True)
class BankingRules:
    """Rule set for ``banking_v0`` (producers/envs/banking_v0.py, seed 003 BANKING).

    Reads: agents ``router_0..router_{n-1}``, each one's discrete channel (0 internal, 1 external,
    2 blockchain) and reward; env.state = ``6 n + 9`` floats, of which router i's transaction block
    ``[4 i, 4 i + 4)``: index 4i = log10(amount) / 6, 4i+1..4i+3 = its customer's risk rating
    one-hot (low, standard, high). From them: each transaction's risk (channel base risk x rating
    multiplier), its contribution ``amount x risk / sum(amounts)`` and the step's portfolio risk
    (their sum; >= 5% is a violation), as the env computes them.

    The env gives every router ``-(latency/100 ms + cost + contribution/5% + [latency >= 100 ms] +
    5 [portfolio >= 5%])``. Credit: each router keeps its own latency, cost, risk-contribution and
    latency-violation terms; the portfolio penalty (5 per router when the portfolio breaks 5%, 5 n
    in all) is a joint outcome, re-split in proportion to each router's risk contribution, so the
    router that put the risk in pays for the breach. Each reward is checked to decompose into the
    env's terms (latency at least the channel's base, the violation term consistent with it); one
    that does not is refused. Shares sum to g.
    """

    version: str = "banking/seed003-1"
    clip_per_agent: float = 15.0   # a bad router step: ~3 latency + 2 cost + 1.8 risk + 1 + 5
    norm_clip: float = 10.0
    tol: float = 1e-4              # amounts come from float32 log10(amount)/6: ~1e-6 relative

    def contributions(self, d: Decision) -> list[float]:
        """Each agent's risk contribution in joint-action order, from the state and the actions."""
        n = len(d.actions)
        _need_state_length(d, 6 * n + 9, "banking_v0", "4 per router transaction, loads, rates, portfolio, "
                                                       "latency, 2 per router recent, elapsed")
        idx = _agent_indices(d, "router_", "banking_v0")
        amounts, risks = [], []
        for a, i in zip(d.actions, idx):
            if not 0 <= a.discrete < 3:
                raise InvalidDecision(f"banking_v0: {a.agent_id} channel {a.discrete} is not 0, 1 or 2")
            onehot = d.state[4 * i + 1:4 * i + 4]
            if sorted(onehot) != [0.0, 0.0, 1.0]:
                raise InvalidDecision(f"banking_v0: env.state[{4 * i + 1}:{4 * i + 4}] {list(onehot)} is not "
                                      f"{a.agent_id}'s risk-rating one-hot")
            amounts.append(10.0 ** (6.0 * d.state[4 * i]))
            risks.append(BANKING_RISK[a.discrete] * BANKING_PROFILE_RISK[onehot.index(1.0)])
        total = math.fsum(amounts)
        return [x * r / total for x, r in zip(amounts, risks)]

    def _consistent(self, d: Decision, contrib: Sequence[float], violation: bool) -> bool:
        for a, c in zip(d.actions, contrib):
            y = -a.reward - BANKING_COST[a.discrete] - c / BANKING_RISK_LIMIT - BANKING_RISK_PENALTY * violation
            lat, late = (y - 1.0, True) if y >= 1.5 else (y, False)
            if lat < BANKING_LATENCY_MS[a.discrete] / BANKING_LATENCY_LIMIT_MS - self.tol:
                return False
            if late != (lat >= 1.0 - self.tol) and abs(lat - 1.0) > self.tol:
                return False
        return True

    def interpret(self, d: Decision, norm: Normalizer) -> tuple[Credit, Normalizer]:
        contrib = self.contributions(d)
        portfolio = math.fsum(contrib)
        violation = portfolio >= BANKING_RISK_LIMIT
        if not self._consistent(d, contrib, violation):
            # on the 5% line the float32 amounts cannot tell: the rewards do
            if not (abs(portfolio - BANKING_RISK_LIMIT) <= self.tol and self._consistent(d, contrib, not violation)):
                raise InvalidDecision(f"banking_v0: the rewards {[a.reward for a in d.actions]} do not decompose into "
                                      f"the env's latency/cost/risk terms for channels {[a.discrete for a in d.actions]} "
                                      f"and portfolio risk {portfolio:.4%} (rule set {self.version})")
            violation = not violation
        n = len(d.actions)
        raw = sum(a.reward for a in d.actions)
        pool = BANKING_RISK_PENALTY * n if violation else 0.0
        parts = [a.reward + (BANKING_RISK_PENALTY if violation else 0.0) - (pool * c / portfolio if violation else 0.0)
                 for a, c in zip(d.actions, contrib)]
        names = ["own_terms+portfolio_penalty_by_risk" if violation else "own_terms"] * n
        pre, g, norm = _global(raw, (), norm, self.clip_per_agent * n, self.norm_clip)
        shares = _shares_scaled(d, _factor(pre, g, norm), parts, names)
        return Credit(raw, g, (), shares, late_fusion(d.actions)), norm


# --------------------------------------------------------------------------------------------
# pass-through: environments whose own rewards are final
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassThroughRules:
    """Each agent keeps its own env reward, clipped to ``[-clip_at, clip_at]``; no penalties, no
    normalization. The global reward is the sum of the shares."""

    version: str = "passthrough/di-1"
    clip_at: float = 10.0

    def interpret(self, d: Decision, norm: Normalizer) -> tuple[Credit, Normalizer]:
        shares = tuple(Share(a.agent_id, clip(a.reward, self.clip_at), "passthrough_clipped") for a in d.actions)
        raw = sum(a.reward for a in d.actions)
        return Credit(raw, sum(s.credit for s in shares), (), shares, late_fusion(d.actions)), norm


RuleSet = MailboxRules | SandboxRules | MarketRules | RetailRules | BankingRules | PassThroughRules

RULE_SETS = {"mailbox_v0": MailboxRules, "sandbox_v0": SandboxRules, "market_v0": MarketRules,
             "retail_v0": RetailRules, "banking_v0": BankingRules, "passthrough": PassThroughRules}


def rules_for(env_id: str | None, config_json: str = "", default: str = "passthrough") -> RuleSet:
    """The rule set for a run's env id (from run.started); ``default`` for an env without its own."""
    name = env_id if env_id in RULE_SETS else default
    if name not in RULE_SETS:
        raise ValueError(f"no rule set {name!r}; known: {sorted(RULE_SETS)}")
    rules = RULE_SETS[name]
    if hasattr(rules, "from_config"):
        try:
            cfg = json.loads(config_json) if config_json else {}
        except ValueError:
            cfg = {}
        return rules.from_config(cfg if isinstance(cfg, dict) else {})
    return rules()

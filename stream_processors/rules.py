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


RuleSet = MailboxRules | SandboxRules | PassThroughRules

RULE_SETS = {"mailbox_v0": MailboxRules, "sandbox_v0": SandboxRules, "passthrough": PassThroughRules}


def rules_for(env_id: str | None, config_json: str = "", default: str = "passthrough") -> RuleSet:
    """The rule set for a run's env id (from run.started); ``default`` for an env without its own."""
    name = env_id if env_id in RULE_SETS else default
    if name not in RULE_SETS:
        raise ValueError(f"no rule set {name!r}; known: {sorted(RULE_SETS)}")
    if name == "mailbox_v0":
        try:
            cfg = json.loads(config_json) if config_json else {}
        except ValueError:
            cfg = {}
        return MailboxRules.from_config(cfg if isinstance(cfg, dict) else {})
    return RULE_SETS[name]()

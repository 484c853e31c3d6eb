"""banking_v0: transaction routers choose a payment channel per transaction (seed 003).

Seed 003's BANKING demo: 3 routers each pick, for the transaction in front of them, one of three
channels: internal (20 ms, 3% risk, $0.10), external (80 ms, 2% risk, $0.50) or blockchain
(200 ms, 1% risk, $2.00); channel load raises latency; constraints: latency < 100 ms and portfolio
risk < 5%. Centralized training, decentralized execution: a router observes its own transaction,
the channel loads and its own recent latency and risk; ``state()`` holds every router's transaction,
the channel loads, the hidden background traffic rates, the portfolio risk and the average latency
(what the seed's centralized critic sees).

| | |
|---|---|
| Agents | ``router_0`` .. ``router_{n-1}`` (``n_routers=3``); all act every step, one transaction each |
| Action | Discrete(3): 0 INTERNAL, 1 EXTERNAL, 2 BLOCKCHAIN |
| Channels (``CHANNELS``) | base latency ms / base risk / cost $ per transaction: internal 20 / 3% / 0.10, external 80 / 2% / 0.50, blockchain 200 / 1% / 2.00 (seed 003); ``CAPACITY`` (in-flight transactions that double the latency) 1.5 / 16 / 40 |
| Latency (``channel_latency``) | ``base * (1 + ahead / capacity)``, ``ahead`` = load in flight on the channel besides the transaction itself (a queueing-style linear rule; the seed gives none): an idle channel gives exactly the seed's latency |
| Load (``next_load``) | per channel, ``LOAD_DECAY * previous + routed + background`` with ``LOAD_DECAY = 0.5`` (half of the in-flight work settles per step) and background traffic ``Poisson(rate_c)`` per step, ``rate_c ~ Uniform(BACKGROUND[c])`` drawn per episode (hidden; in ``state()``) |
| Transaction | customer from a pool of ``n_customers`` (personal data, see below) with a KYC risk rating low / standard / high (``PROFILE_P`` 0.6 / 0.3 / 0.1), risk multiplier ``PROFILE_RISK`` 0.5 / 1.0 / 3.0; amount log-normal, median $1,000, sigma 1.2, clipped to [$1, $1,000,000] |
| Risk (``transaction_risk``, ``portfolio_risk``) | a transaction's risk = channel base risk * its customer's multiplier; portfolio risk of a step = amount-weighted mean risk of the step's transactions (all routers) |
| Constraints (``latency_violation``, ``risk_violation``) | a transaction with latency >= 100 ms is a latency violation; a step with portfolio risk >= 5% is a risk violation; ``constraint violations`` = latency violations + risk violations, counted per step (infos) and per episode (``metrics()``) |
| Observation (local) | Box(0, 1, (10,)): log10(amount)/6, risk rating one-hot (3), channel loads / ``LOAD_SCALE`` (3, previous step's, clipped), own recent latency / ``LATENCY_SCALE`` (500 ms), own recent risk / ``RISK_SCALE`` (10%) (exponential averages, weight 0.3, 0 before the first transaction), fraction of the episode elapsed |
| State (global) | Box(0, 1, (4n + 3 + 3 + 2 + 2n + 1,)) = (27,) for n=3: every router's (log amount, rating one-hot), channel loads, background rates / 2, last portfolio risk / ``RISK_SCALE``, average latency so far / ``LATENCY_SCALE``, every router's recent latency and risk, fraction elapsed |
| Rewards (per router, ``router_reward``) | ``-(W_LATENCY * latency / 100 ms + W_COST * cost$ + W_RISK * contribution / 5% + LATENCY_PENALTY * [latency >= 100 ms] + RISK_PENALTY * [portfolio >= 5%])``, weights 1, 1, 1, penalties 1 and 5; ``contribution`` = amount * risk / (sum of the step's amounts), so the routers' contributions add up to the portfolio risk; every router pays the (joint) portfolio penalty |
| Termination | none; truncation of every router after ``max_cycles`` steps |
| Infos | per router and step: ``channel``, ``latency_ms``, ``cost``, ``risk``, ``portfolio_risk``, ``latency_violation``, ``risk_violation``, ``step_violations`` (the step's latency violations of all routers + its risk violation) |
| Metrics | ``metrics()``: the episode so far: ``steps``, ``transactions``, ``avg_latency_ms``, ``total_cost``, ``avg_cost``, ``latency_violations``, ``latency_violation_rate`` (per transaction), ``risk_violations``, ``risk_violation_rate`` (per step, the seed's "risk violations: 8%"), ``constraint_violations``, ``avg_portfolio_risk``, ``max_portfolio_risk``, ``share_internal``, ``share_external``, ``share_blockchain`` (channel utilization) |
| Arguments | ``n_routers=3``, ``max_cycles=50``, ``n_customers=50`` |

Where seed 003 is silent, these choices are a domain expert's (none tuned to reach a number):

- One transaction per router per step (a busy bank: a router's queue never runs dry); arrivals are
  stochastic in who pays, how much and at which risk, and in the background traffic that shares the
  channels with the routers (other systems of the bank), whose level changes per episode.
- Capacities: the internal ledger is fast but small (two routers fit under 100 ms at average
  background load, three do not), the external gateway larger, blockchain settles in large batches
  (its base latency alone breaks the 100 ms target: it pays only for high-risk transactions).
- Risk ratings multiply the channel's base risk: a high-risk customer on the internal channel (9%) or
  external (6%) can push the portfolio over 5%, on blockchain (3%) it cannot.
- Reward weights: each term normalized by its limit (100 ms, 5%) or in dollars; the portfolio
  penalty (5) is larger than the latency one (1) because a risk limit breach is a regulatory breach,
  and large enough that a router prefers blockchain for a dominant high-risk transaction.

Confidential fields: a transaction's customer id is personal data, and so are its account number
and exact amount. They never enter an observation or ``state()`` (the observation has only
log10(amount)/6 and the rating); ``subject_fields(agent)`` hands them to the harness as
``ProtectedValue("customer", ...)`` (pseudonym + AES-GCM ciphertext under the customer's key).

The heuristic (``heuristic_action``) routes to the cheapest channel whose predicted latency is
under 100 ms and whose transaction risk is under 5%; when none meets both, the fastest channel
within the risk limit. Predicted latency: what is left of the observed load, plus
``HEURISTIC_EXTRA_LOAD`` for this step's unseen background, plus one transaction per router ranked
before this one (a fixed priority order, ``router_0`` first: routers that see the same loads would
otherwise all herd onto the same channel). A router cannot see the other transactions' amounts, so
it keeps each transaction's own risk under 5%, which keeps the portfolio under it. The seed gives no
rule of its own.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from eventlog.privacy import ProtectedValue

ENV_ID = "banking_v0"
ENV_VERSION = "0"
REWARD_VERSION = 0

INTERNAL, EXTERNAL, BLOCKCHAIN = 0, 1, 2
CHANNELS = ("internal", "external", "blockchain")
# seed 003: base latency (ms), base risk (fraction), cost ($ per transaction)
BASE_LATENCY_MS = np.array([20.0, 80.0, 200.0])
BASE_RISK = np.array([0.03, 0.02, 0.01])
COST = np.array([0.10, 0.50, 2.00])
# in-flight transactions (besides the one routed) that double a channel's latency (not in the seed)
CAPACITY = np.array([1.5, 16.0, 40.0])
LOAD_DECAY = 0.5
# background traffic per step, Poisson(rate), rate ~ Uniform(low, high) per episode and channel
BACKGROUND = np.array([[0.5, 1.5], [0.0, 1.0], [0.0, 2.0]])
# seed 003's constraints
LATENCY_LIMIT_MS = 100.0
RISK_LIMIT = 0.05
# KYC risk ratings of customers: probability and risk multiplier
PROFILES = ("low", "standard", "high")
PROFILE_P = np.array([0.6, 0.3, 0.1])
PROFILE_RISK = np.array([0.5, 1.0, 3.0])
AMOUNT_MEDIAN, AMOUNT_SIGMA, AMOUNT_MIN, AMOUNT_MAX = 1_000.0, 1.2, 1.0, 1_000_000.0
# reward weights and penalties
W_LATENCY, W_COST, W_RISK = 1.0, 1.0, 1.0
LATENCY_PENALTY, RISK_PENALTY = 1.0, 5.0
# observation scales
LOAD_SCALE, LATENCY_SCALE, RISK_SCALE = 20.0, 500.0, 0.10
RECENT = 0.3  # weight of the newest transaction in a router's recent latency / risk
HEURISTIC_EXTRA_LOAD = 1.0


# --- pure channel model and reward terms --------------------------------------------------------
def channel_latency(channel: Any, ahead: Any) -> Any:
    """Latency (ms) of a transaction on ``channel`` with ``ahead`` transactions in flight besides it:
    ``BASE_LATENCY_MS[c] * (1 + ahead / CAPACITY[c])``; element-wise over arrays."""
    c = np.asarray(channel, np.int64)
    out = BASE_LATENCY_MS[c] * (1.0 + np.maximum(np.asarray(ahead, np.float64), 0.0) / CAPACITY[c])
    return float(out) if out.ndim == 0 else out


def transaction_risk(channel: Any, profile: Any) -> Any:
    """Risk of a transaction: the channel's base risk times its customer's rating multiplier."""
    out = BASE_RISK[np.asarray(channel, np.int64)] * PROFILE_RISK[np.asarray(profile, np.int64)]
    return float(out) if out.ndim == 0 else out


def channel_cost(channel: Any) -> Any:
    """Dollars per transaction on ``channel``."""
    out = COST[np.asarray(channel, np.int64)]
    return float(out) if out.ndim == 0 else out


def portfolio_risk(amounts: Any, risks: Any) -> float:
    """Amount-weighted mean risk of a set of transactions (0.0 for no amount)."""
    a, r = np.asarray(amounts, np.float64), np.asarray(risks, np.float64)
    total = float(a.sum())
    return float((a * r).sum() / total) if total > 0 else 0.0


def risk_contributions(amounts: Any, risks: Any) -> np.ndarray:
    """Each transaction's share of the portfolio risk: ``amount * risk / sum(amounts)`` (sums to it)."""
    a, r = np.asarray(amounts, np.float64), np.asarray(risks, np.float64)
    total = float(a.sum())
    return a * r / total if total > 0 else np.zeros_like(a)


def latency_violation(latency_ms: float) -> bool:
    """Seed 003's target is latency < 100 ms: 100 ms or more is a violation."""
    return bool(latency_ms >= LATENCY_LIMIT_MS)


def risk_violation(portfolio: float) -> bool:
    """Seed 003's limit is portfolio risk < 5%: 5% or more is a violation."""
    return bool(portfolio >= RISK_LIMIT)


def next_load(load: Any, routed: Any, background: Any) -> np.ndarray:
    """Channel loads after a step: ``LOAD_DECAY * load + routed + background``, per channel."""
    return LOAD_DECAY * np.asarray(load, np.float64) + np.asarray(routed, np.float64) \
        + np.asarray(background, np.float64)


def reward_terms(latency_ms: float, cost: float, contribution: float, portfolio: float) -> dict[str, float]:
    """One router's reward terms (each a cost, >= 0); ``router_reward`` is minus their sum."""
    return {"latency": W_LATENCY * float(latency_ms) / LATENCY_LIMIT_MS,
            "cost": W_COST * float(cost),
            "risk": W_RISK * float(contribution) / RISK_LIMIT,
            "latency_violation": LATENCY_PENALTY * latency_violation(latency_ms),
            "risk_violation": RISK_PENALTY * risk_violation(portfolio)}


def router_reward(latency_ms: float, cost: float, contribution: float, portfolio: float) -> float:
    return -float(sum(reward_terms(latency_ms, cost, contribution, portfolio).values()))


class BankingEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}

    def __init__(self, n_routers: int = 3, max_cycles: int = 50, n_customers: int = 50):
        if n_routers < 1 or max_cycles < 1 or n_customers < 1:
            raise ValueError(f"banking_v0 needs n_routers, max_cycles, n_customers >= 1; got n_routers={n_routers}, "
                             f"max_cycles={max_cycles}, n_customers={n_customers}")
        self.n, self.max_cycles, self.n_customers = n_routers, max_cycles, n_customers
        self.possible_agents = [f"router_{i}" for i in range(n_routers)]
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        self.agents: list[str] = []
        self._obs_space = spaces.Box(0.0, 1.0, (10,), np.float32)
        self._act_space = spaces.Discrete(3)
        self.state_space = spaces.Box(0.0, 1.0, (6 * n_routers + 9,), np.float32)
        self._rng = np.random.default_rng()
        self._new_episode()

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    # --- episode state ---------------------------------------------------------------------------
    def _new_episode(self) -> None:
        rng, n = self._rng, self.n
        self._customers = [f"cust-{rng.integers(16**10):010x}" for _ in range(self.n_customers)]
        self._accounts = [f"ACC{rng.integers(10**12):012d}" for _ in range(self.n_customers)]
        self._rating = rng.choice(3, size=self.n_customers, p=PROFILE_P)
        self._rates = rng.uniform(BACKGROUND[:, 0], BACKGROUND[:, 1])
        self._load = self._rates / (1.0 - LOAD_DECAY)  # background traffic's steady state
        self._recent = np.zeros((n, 2))  # latency ms, risk
        self._portfolio = 0.0
        self._t = 0
        self._tot = {"transactions": 0, "latency": 0.0, "cost": 0.0, "latency_violations": 0, "risk_violations": 0,
                     "portfolio": 0.0, "max_portfolio": 0.0}
        self._shares = np.zeros(3, np.int64)
        self._draw_transactions()

    def _draw_transactions(self) -> None:
        rng, n = self._rng, self.n
        self._cust = rng.integers(self.n_customers, size=n)
        amount = np.exp(np.log(AMOUNT_MEDIAN) + AMOUNT_SIGMA * rng.standard_normal(n))
        self._amount = np.round(np.clip(amount, AMOUNT_MIN, AMOUNT_MAX), 2)
        self._profile = self._rating[self._cust]

    def _tx_block(self) -> np.ndarray:
        blk = np.zeros((self.n, 4))
        blk[:, 0] = np.log10(self._amount) / 6.0
        blk[np.arange(self.n), 1 + self._profile] = 1.0
        return blk

    def _observations(self) -> dict[str, np.ndarray]:
        tx = self._tx_block()
        loads = np.clip(self._load / LOAD_SCALE, 0.0, 1.0)
        recent = np.clip(self._recent / [LATENCY_SCALE, RISK_SCALE], 0.0, 1.0)
        frac = self._t / self.max_cycles
        return {a: np.clip(np.concatenate([tx[i], loads, recent[i], [frac]]), 0.0, 1.0).astype(np.float32)
                for a in self.agents for i in [self._index[a]]}

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._new_episode()
        self.agents = list(self.possible_agents)
        return self._observations(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("banking_v0: step() after the episode ended; call reset() first")
        n = self.n
        channel = np.zeros(n, np.int64)
        for a in self.agents:
            c = int(actions.get(a, INTERNAL))
            if c not in (INTERNAL, EXTERNAL, BLOCKCHAIN):
                raise ValueError(f"banking_v0: action {c!r} of {a} is not 0 (internal), 1 (external) or 2 (blockchain)")
            channel[self._index[a]] = c
        routed = np.bincount(channel, minlength=3)
        background = self._rng.poisson(self._rates)
        in_flight = LOAD_DECAY * self._load + background + routed
        latency = channel_latency(channel, in_flight[channel] - 1.0)
        risk = transaction_risk(channel, self._profile)
        cost = channel_cost(channel)
        portfolio = portfolio_risk(self._amount, risk)
        contrib = risk_contributions(self._amount, risk)
        lat_v = latency >= LATENCY_LIMIT_MS
        risk_v = risk_violation(portfolio)
        step_violations = int(lat_v.sum()) + int(risk_v)
        rewards, infos = {}, {}
        for a in self.agents:
            i = self._index[a]
            rewards[a] = router_reward(latency[i], cost[i], contrib[i], portfolio)
            infos[a] = {"channel": CHANNELS[channel[i]], "latency_ms": float(latency[i]), "cost": float(cost[i]),
                        "risk": float(risk[i]), "portfolio_risk": portfolio, "latency_violation": bool(lat_v[i]),
                        "risk_violation": risk_v, "step_violations": step_violations}
        # the episode's books
        t = self._tot
        t["transactions"] += n
        t["latency"] += float(latency.sum())
        t["cost"] += float(cost.sum())
        t["latency_violations"] += int(lat_v.sum())
        t["risk_violations"] += int(risk_v)
        t["portfolio"] += portfolio
        t["max_portfolio"] = max(t["max_portfolio"], portfolio)
        self._shares += routed
        self._recent = (1.0 - RECENT) * self._recent + RECENT * np.stack([latency, risk], axis=1)
        if self._t == 0:
            self._recent = np.stack([latency, risk], axis=1)
        self._portfolio = portfolio
        self._load = next_load(self._load, routed, background)
        self._t += 1
        done = self._t >= self.max_cycles
        truncs = {a: done for a in self.agents}
        terms = {a: False for a in self.agents}
        if done:
            self._t -= 1  # the final observation keeps the last step's clock
            obs = self._observations()
            self._t += 1
            self.agents = []
        else:
            self._draw_transactions()
            obs = self._observations()
        return obs, rewards, terms, truncs, infos

    def state(self) -> np.ndarray:
        tx = self._tx_block().ravel()
        loads = np.clip(self._load / LOAD_SCALE, 0.0, 1.0)
        rates = self._rates / 2.0
        avg = self._tot["latency"] / self._tot["transactions"] if self._tot["transactions"] else 0.0
        recent = (self._recent / [LATENCY_SCALE, RISK_SCALE]).ravel()
        frac = min(self._t, self.max_cycles - 1) / self.max_cycles
        s = np.concatenate([tx, loads, rates, [self._portfolio / RISK_SCALE, avg / LATENCY_SCALE], recent, [frac]])
        return np.clip(s, 0.0, 1.0).astype(np.float32)

    def metrics(self) -> dict[str, float]:
        """The episode so far (all routers): latency in ms, cost in dollars, violation counts and rates."""
        t, steps = self._tot, self._tot["transactions"] // self.n
        tx = t["transactions"]
        share = self._shares / tx if tx else np.zeros(3)
        return {"steps": float(steps), "transactions": float(tx),
                "avg_latency_ms": t["latency"] / tx if tx else 0.0, "total_cost": t["cost"],
                "avg_cost": t["cost"] / tx if tx else 0.0,
                "latency_violations": float(t["latency_violations"]),
                "latency_violation_rate": t["latency_violations"] / tx if tx else 0.0,
                "risk_violations": float(t["risk_violations"]),
                "risk_violation_rate": t["risk_violations"] / steps if steps else 0.0,
                "constraint_violations": float(t["latency_violations"] + t["risk_violations"]),
                "avg_portfolio_risk": t["portfolio"] / steps if steps else 0.0,
                "max_portfolio_risk": t["max_portfolio"],
                **{f"share_{name}": float(share[c]) for c, name in enumerate(CHANNELS)}}

    # --- personal data, for the harness's FieldProtector only --------------------------------------
    def subject_fields(self, agent: str | None) -> list[ProtectedValue]:
        """The personal data of the transaction(s) ``agent`` routes (None: every router's, for the
        global state): customer id, account number and exact amount, under the customer's key."""
        if agent is None:
            return [v for a in self.possible_agents for v in self.subject_fields(a)]
        i = self._index[agent]
        k = int(self._cust[i])
        cust = self._customers[k]
        return [ProtectedValue("customer", "customer_id", cust, cust.encode()),
                ProtectedValue("customer", "account_id", cust, self._accounts[k].encode()),
                ProtectedValue("customer", "amount", cust, f"{self._amount[i]:.2f}".encode())]

    def raw_identifiers(self) -> set[str]:
        """Every raw identifier of the current episode (for leak scans in tests)."""
        return set(self._customers) | set(self._accounts)

    def heuristic_action(self, agent: str, observation: np.ndarray) -> int:
        """Cheapest channel meeting both constraints under the predicted load, else the fastest one
        within the risk limit. Predicted load: what is left of the observed load, one background
        arrival, and one transaction for each router ranked before this one (``router_0`` first), a
        fixed priority order so that routers seeing the same loads do not all herd onto one channel."""
        o = np.asarray(observation, np.float64)
        profile = int(np.argmax(o[1:4]))
        # the load left from the last step, this step's background, and the routers ranked before this one
        ahead = LOAD_DECAY * o[4:7] * LOAD_SCALE + HEURISTIC_EXTRA_LOAD + self._index[agent]
        latency = channel_latency(np.arange(3), ahead)
        safe = [c for c in (INTERNAL, EXTERNAL, BLOCKCHAIN) if transaction_risk(c, profile) < RISK_LIMIT]
        for c in safe:  # in order of cost
            if latency[c] < LATENCY_LIMIT_MS:
                return c
        return min(safe, key=lambda c: latency[c])  # none meets both: the fastest within the risk limit

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> BankingEnv:
    return BankingEnv(**kwargs)


env = parallel_env

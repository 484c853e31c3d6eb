"""market_v0: compute nodes bid for jobs in a fairness-aware token market (seed 001, MarlOS).

Each step one job is auctioned (a reverse, pay-as-bid auction): every agent asks a price or stays
out; the lowest *score* wins, is paid its ask if the job succeeds, and bears its cost either way. The
seed's fairness mechanisms run in the market (progressive tax, UBI, affirmative bid boost) and its
``calculate_reward`` scores the agents (``fair_reward=False``: the same reward without the fairness
terms, for the seed's fairness-vs-profit comparison).

| | |
|---|---|
| Agents | ``node_0`` .. ``node_{n-1}`` (``num_agents``; default: the scenario's count, 5 for ``mixture``), all act every step |
| Action | Discrete(9): 0 NO_BID; k = 1..8 asks ``BID_LADDER[k] x`` the job's posted payment, ``BID_LADDER = 0.3, 0.4, .., 1.0`` (asks above the posted payment are refused by the job's owner, so the ladder stops at 1.0x; the payment is at most 500, inside the seed's 0-1000 bid range) |
| Observation | Box((25,)), the seed's exact layout and normalization: [0-4] agent (cpu, memory, disk, network bandwidth, active_jobs/10), [5-9] job (type 0 shell / 1 scan / 2 forensics, priority, urgency, size/1000, payment/500), [10-14] history (success rate of the last 50 jobs, avg completion time/3600 s, failures/100, total jobs/1000, trust), [15-17] network (peers/50, wallet/5000, competition = bids in the last auction / peers), [18-24] fairness (diversity factor -0.2/0/+0.15, tax rate 0-0.3, Gini of all wallets, UBI eligibility 0/1, affirmative boost 0/0.15, job complexity 1.0/2.5/5.0, cooperative index 0-1) |
| State | Box((25 n + 5,)): every agent's 25-D observation in agent order, then the fraction of the episode's jobs left and the scenario one-hot (normal, high_competition, scarcity, abundance): what a centralized critic needs |
| Reward, job winner (``calculate_reward``, on the observation it acted on) | success +1.0 / failure -1.0; time efficiency +0.3 (1 - actual/expected) when faster than expected; profit after tax ``min(0.5, (payment - cost - tax)/100)`` (a loss counts in full); fairness +0.1 if Gini < 0.3; UBI +0.05 if UBI-eligible; trust +0.02 on success; diversity -0.1 if monopolizing (diversity factor -0.2); the sum x job complexity (1.0 / 2.5 / 5.0) |
| Reward, every other agent (``standing_reward``) | fairness +0.1 if Gini < 0.3; UBI +0.05 if UBI-eligible and active (it bid); diversity -0.1 if monopolizing; not scaled (it ran no job). ``fair_reward=False``: 0 |
| Market mechanisms (``fair_market=True``) | progressive tax on a winner's positive profit by its wallet bracket (0% < 200 <= 10% < 500 <= 20% < 1000 <= 30%) into a treasury; UBI: every ``UBI_PERIOD`` = 5 jobs (a "week") each wallet < 100 receives 50 from the treasury (a shortfall is minted and counted); affirmative boost: an agent that won < 15% of the jobs it bid on has its score cut 15% |
| Winner | lowest ``ask x (1 - boost) / (0.75 + 0.5 trust)`` (trust-based bidding: trust 1 beats trust 0.5 by 20%); ties drawn at random; no bid: the job goes unassigned |
| Episode end | after the scenario's jobs (20 / 20 / 5 / 50): every agent terminates |
| Scenarios | ``normal`` 5 agents / 20 jobs, ``high_competition`` 10/20, ``scarcity`` 5/5, ``abundance`` 3/50; ``mixture`` (default) draws one per episode 50/20/15/15 from the reset seed; ``reset(options={"scenario": name})`` forces one episode's |
| Infos | per agent: ``scenario``, ``won``, ``bid`` (tokens, 0 = no bid), ``profit`` (after tax), ``tax``; the episode's scenario is also in ``state()`` (one-hot) and in ``state_flags()`` (``scenario:NAME``, written on every env.state event) |
| Arguments | ``scenario="mixture"``, ``num_agents=None``, ``fair_reward=True``, ``fair_market=True`` |

Choices where the seed is silent (a domain expert's, stated here):

- The number of agents is fixed per instance (learners need a fixed agent set), so a scenario's
  *agent count* is met by the market, not by the agent set: the scenario sets the jobs per episode,
  and when it names more bidders than ``num_agents`` the rest are scripted background bidders (the
  heuristic below, asking 0-2 rungs higher at random), who hold wallets, win jobs and count in the
  Gini and in ``peers``. When it names fewer (abundance: 3 with 5 agents) all agents play its 50
  jobs: the defining feature, many jobs per bidder, stays. ``num_agents`` = the scenario's count
  gives the scenario exactly.
- Costs and payments: a job's base value is ``40 x complexity x (0.5 + size)`` tokens; its posted
  payment is that times U(0.9, 1.5) (at most 500); an agent's cost is the base value times
  ``0.35 + 0.4 cpu + 0.15 memory + 0.1 (1 - bandwidth)``: observable, so a policy can price it.
  A failed job is not paid; its cost is. Wallets start U(50, 800) and never go below 0 (a debt
  beyond the wallet is written off).
- Success probability ``0.97 - 0.3 cpu - 0.2 active_jobs/10 - 0.05 (complexity - 1)/4 + 0.1
  (trust - 0.5)``, within [0.3, 0.99]; actual time = expected x U(0.7, 1.3) x (0.8 + 0.4 cpu);
  a job keeps its winner busy 1-3 steps by size (raising its cpu and memory load).
- The seed's monopoly test ``state[18] < -0.2`` can never hold for its own factor values
  (-0.2, 0, +0.15) in exact arithmetic; it is read as ``<= -0.2`` (monopolizing).
- Win share (diversity) = jobs won / jobs auctioned so far this episode (0 at the first job);
  win rate (affirmative boost) = jobs won / jobs bid this episode (no bid yet: 0, so eligible).
- Cooperative index: 0.5, -0.2 if bidding on more than 50 jobs an hour (a job arrives every
  minute: bids / jobs so far x 60), +0.1 if the mean ask / cost ratio is < 1.2 (no bid yet: fair);
  this market has no shared jobs, so the +0.2 collaboration term never applies.
- Trust = 0.4 success rate + 0.4 mean rating (1 on-time success, 0.7 late success, 0 failure) +
  0.2 min(1, days active/365); agents start with a drawn history (0-100 past jobs, 0-365 days).
- Heuristic: the seed's fallback ``bid = max(10, 0.8 payment - cost)`` is written for another price
  convention: under pay-as-bid it *lowers* the ask as cost rises and loses money whenever the cost
  exceeds 40% of the payment (``seed_heuristic_bid`` keeps it, for reference). ``heuristic_action``
  bids its cost instead: the lowest rung that asks at least 1.15x its cost (fair pricing in the
  seed's cooperative index), no bid when even 1.0x does not.

No confidential fields: the agents are compute nodes of the MarlOS network and their wallets hold
network tokens; no natural person is identified or described by any field, so this env has no
``subject_fields()`` and nothing goes through the privacy layer.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

ENV_ID = "market_v0"
ENV_VERSION = "0"
REWARD_VERSION = 0

OBS_DIM = 25
NO_BID = 0
BID_LADDER = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # index 0: no bid
N_ACTIONS = len(BID_LADDER)

# scenario: (agents, jobs); mixture weights from the seed's training distribution
SCENARIOS = {"normal": (5, 20), "high_competition": (10, 20), "scarcity": (5, 5), "abundance": (3, 50)}
SCENARIO_NAMES = tuple(SCENARIOS)
MIXTURE = {"normal": 0.50, "high_competition": 0.20, "scarcity": 0.15, "abundance": 0.15}

JOB_TYPES = ("shell_command", "network_scan", "forensic_analysis")
COMPLEXITY = {"shell_command": 1.0, "network_scan": 2.5, "forensic_analysis": 5.0}
JOB_TYPE_P = (0.5, 0.3, 0.2)

TAX_BRACKETS = ((200.0, 0.0), (500.0, 0.10), (1000.0, 0.20))  # (wealth below, rate); else 0.30
TOP_TAX = 0.30
UBI_THRESHOLD, UBI_PAYMENT, UBI_PERIOD = 100.0, 50.0, 5
AFFIRMATIVE_BOOST, AFFIRMATIVE_BELOW = 0.15, 0.15
MONOPOLY_ABOVE, MONOPOLY_FACTOR, MINORITY_BELOW, MINORITY_FACTOR = 0.30, -0.2, 0.15, 0.15
MAX_TOKENS, MAX_PAYMENT, HISTORY_WINDOW = 5000.0, 500.0, 50

OBS_LOW = np.array([0.0] * 18 + [-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], np.float32)
OBS_HIGH = np.array([1.0] * 5 + [2.0] + [1.0] * 12 + [1.0, TOP_TAX, 1.0, 1.0, 0.2, 5.0, 1.0], np.float32)


# --- the seed's formulas, pure ---------------------------------------------------------------------
def tax_rate(wealth: float) -> float:
    """Progressive tax (seed ``calculate_tax``): < 200: 0, < 500: 0.10, < 1000: 0.20, else 0.30."""
    for below, rate in TAX_BRACKETS:
        if wealth < below:
            return rate
    return TOP_TAX


def ubi_eligible(wallet: float) -> bool:
    """Welfare qualification (seed ``ubi_payment``): a wallet under 100 tokens."""
    return wallet < UBI_THRESHOLD


def ubi_payment(wallet: float) -> float:
    """The seed's weekly UBI: 50 tokens to a wallet under 100, else 0."""
    return UBI_PAYMENT if ubi_eligible(wallet) else 0.0


def affirmative_boost(jobs_won: int, jobs_bid: int) -> float:
    """Seed ``affirmative_boost``: 0.15 when the win rate (won / bid) is under 15% (no bid yet: 0%)."""
    rate = jobs_won / jobs_bid if jobs_bid > 0 else 0.0
    return AFFIRMATIVE_BOOST if rate < AFFIRMATIVE_BELOW else 0.0


def diversity_factor(win_share: float) -> float:
    """Seed ``diversity_penalty`` (state[18]): share of all jobs won > 30%: -0.2; < 15%: +0.15; else 0."""
    if win_share > MONOPOLY_ABOVE:
        return MONOPOLY_FACTOR
    if win_share < MINORITY_BELOW:
        return MINORITY_FACTOR
    return 0.0


def gini(wealth: Sequence[float]) -> float:
    """Seed ``calculate_gini``: 2 sum((i+1) w_i) / (n sum w) - (n+1)/n over sorted wealth (0 if all 0)."""
    w = np.sort(np.asarray(wealth, np.float64))
    n, total = len(w), float(w.sum())
    if n == 0 or total <= 0.0:
        return 0.0
    return float(2.0 * np.dot(np.arange(1, n + 1), w) / (n * total) - (n + 1) / n)


def job_complexity(job_type: str) -> float:
    """Seed ``job_complexity``: shell 1.0, scan 2.5, forensics 5.0 (unknown: 1.0)."""
    return COMPLEXITY.get(job_type, 1.0)


def cooperative_index(bids_per_hour: float, collaborative_jobs: int, avg_bid_ratio: float) -> float:
    """Seed ``cooperative_score``: 0.5, -0.2 if > 50 bids/hour, +0.2 if > 10 shared jobs, +0.1 if the
    mean ask/cost ratio is < 1.2; within [0, 1]."""
    score = 0.0
    if bids_per_hour > 50:
        score -= 0.2
    if collaborative_jobs > 10:
        score += 0.2
    if avg_bid_ratio < 1.2:
        score += 0.1
    return max(0.0, min(1.0, score + 0.5))


def trust_score(success_rate: float, avg_rating: float, days_active: float) -> float:
    """Seed ``trust_score``: 0.4 success rate + 0.4 mean rating + 0.2 min(1, days/365)."""
    return 0.4 * success_rate + 0.4 * avg_rating + 0.2 * min(1.0, days_active / 365.0)


def _monopolizing(state: Sequence[float]) -> bool:
    return float(state[18]) <= MONOPOLY_FACTOR + 1e-6


def calculate_reward(success: bool, actual_time: float, expected_time: float, payment: float, cost: float,
                     state: Sequence[float], fair: bool = True) -> float:
    """The seed's ``calculate_reward`` for the agent that ran a job, on the 25-D ``state`` it bid on.

    ``payment - cost`` is the profit (after tax: pass ``cost`` including the tax). ``fair=False``
    drops the fairness terms (Gini bonus, UBI, diversity penalty) and keeps success, time, profit,
    trust and the complexity scaling: the profit-only reward.
    """
    reward = 1.0 if success else -1.0
    time_ratio = actual_time / expected_time
    if time_ratio < 1.0:
        reward += 0.3 * (1.0 - time_ratio)
    reward += min(0.5, (payment - cost) / 100.0)
    if fair:
        if state[20] < 0.3:
            reward += 0.1
        if state[21] > 0.5:
            reward += 0.05
    if success:
        reward += 0.02
    if fair and _monopolizing(state):
        reward -= 0.1
    return float(reward * float(state[23]))


def standing_reward(state: Sequence[float], active: bool, fair: bool = True) -> float:
    """Reward of an agent that ran no job this step: the seed's fairness terms that need no outcome
    (Gini < 0.3: +0.1; UBI-eligible and active, i.e. it bid: +0.05; monopolizing: -0.1), unscaled.
    ``fair=False``: 0."""
    if not fair:
        return 0.0
    r = 0.1 if state[20] < 0.3 else 0.0
    if active and state[21] > 0.5:
        r += 0.05
    if _monopolizing(state):
        r -= 0.1
    return float(r)


def auction_score(ask: float, boost: float, trust: float) -> float:
    """A bid's score; the lowest wins: ``ask x (1 - boost) / (0.75 + 0.5 trust)`` (the affirmative
    boost cuts it 15%; trust 1 beats trust 0.5 by 20%)."""
    return ask * (1.0 - boost) / (0.75 + 0.5 * trust)


def seed_heuristic_bid(payment: float, cost: float) -> float:
    """The seed's ``heuristic_bid`` in tokens: ``max(10, 0.8 payment - cost)`` (see the docstring)."""
    return max(10.0, payment * 0.8 - cost)


def cost_ratio(cpu: float, memory: float, bandwidth: float) -> float:
    """An agent's cost per token of a job's base value, from its observed resources."""
    return 0.35 + 0.4 * cpu + 0.15 * memory + 0.1 * (1.0 - bandwidth)


def estimate_cost(observation: Sequence[float]) -> float:
    """The agent's own cost of the observed job (tokens), from its 25-D observation alone."""
    o = observation
    base = 40.0 * float(o[23]) * (0.5 + float(o[8]))
    return base * cost_ratio(float(o[0]), float(o[1]), float(o[3]))


def heuristic_bid_action(observation: Sequence[float], margin: float = 1.15) -> int:
    """Bid your cost: the lowest rung whose ask is at least ``margin`` x cost; NO_BID if none is."""
    payment = float(observation[9]) * MAX_PAYMENT
    if payment <= 0.0:
        return NO_BID
    need = margin * estimate_cost(observation) / payment
    for k in range(1, N_ACTIONS):
        if BID_LADDER[k] >= need - 1e-9:
            return k
    return NO_BID


# --- the environment ---------------------------------------------------------------------------------
class MarketEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}

    def __init__(self, scenario: str = "mixture", num_agents: int | None = None, fair_reward: bool = True,
                 fair_market: bool = True):
        if scenario != "mixture" and scenario not in SCENARIOS:
            raise ValueError(f"market_v0: scenario {scenario!r} is not one of mixture, {', '.join(SCENARIOS)}")
        n = num_agents if num_agents is not None else (SCENARIOS[scenario][0] if scenario in SCENARIOS else 5)
        if int(n) < 1:
            raise ValueError(f"market_v0 needs num_agents >= 1, got {n}")
        self.scenario, self.n = scenario, int(n)
        self.fair_reward, self.fair_market = bool(fair_reward), bool(fair_market)
        self.possible_agents = [f"node_{i}" for i in range(self.n)]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(OBS_LOW, OBS_HIGH, dtype=np.float32)
        self._act_space = spaces.Discrete(N_ACTIONS)
        self.state_space = spaces.Box(np.concatenate([np.tile(OBS_LOW, self.n), np.zeros(5, np.float32)]),
                                      np.concatenate([np.tile(OBS_HIGH, self.n), np.ones(5, np.float32)]),
                                      dtype=np.float32)
        self._rng = np.random.default_rng()
        self._reset_market("normal" if scenario == "mixture" else scenario)

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    # --- market ---------------------------------------------------------------------------------------
    def _draw_scenario(self) -> str:
        if self.scenario != "mixture":
            return self.scenario
        return SCENARIO_NAMES[int(self._rng.choice(len(SCENARIO_NAMES), p=[MIXTURE[s] for s in SCENARIO_NAMES]))]

    def _reset_market(self, scenario: str) -> None:
        rng = self._rng
        self.current_scenario = scenario
        bidders, self.n_jobs = SCENARIOS[scenario]
        m = self.m = max(self.n, bidders)  # market participants: the agents, then background bidders
        self.base_cpu = rng.uniform(0.1, 0.7, m)
        self.base_mem = rng.uniform(0.1, 0.6, m)
        self.disk = rng.uniform(0.1, 0.9, m)
        self.bandwidth = rng.uniform(0.3, 1.0, m)
        self.cpu, self.mem = self.base_cpu.copy(), self.base_mem.copy()
        self.busy: list[list[int]] = [[] for _ in range(m)]  # steps left of each running job
        self.wallet = rng.uniform(50.0, 800.0, m)
        self.initial_wallet = self.wallet.copy()
        prior = rng.integers(0, 101, m)
        self.outcomes: list[list[int]] = [list((rng.uniform(size=int(k)) < rng.uniform(0.6, 0.95)).astype(int))
                                          for k in prior]
        self.total_jobs = prior.astype(np.int64)
        self.failures = np.array([len(o) - sum(o) for o in self.outcomes], np.int64)
        self.rating_sum = np.array([0.9 * sum(o) for o in self.outcomes], np.float64)
        self.time_sum = prior * rng.uniform(900.0, 2400.0, m)
        self.days_active = rng.uniform(0.0, 365.0, m)
        self.won = np.zeros(m, np.int64)
        self.bid_count = np.zeros(m, np.int64)
        self.ratio_sum = np.zeros(m, np.float64)
        self.profit = np.zeros(m, np.float64)
        self.t = 0
        self.last_bids = 0
        self.treasury = self.tax_collected = self.ubi_paid = self.ubi_minted = 0.0
        self.unassigned = self.successes = self.assigned = 0
        self._new_job()

    def _new_job(self) -> None:
        rng = self._rng
        k = int(rng.choice(3, p=JOB_TYPE_P))
        size = float(rng.uniform(0.0, 1.0))
        complexity = COMPLEXITY[JOB_TYPES[k]]
        base = 40.0 * complexity * (0.5 + size)
        self.job = {"type": k, "complexity": complexity, "size": size, "base": base,
                    "payment": float(min(MAX_PAYMENT, base * rng.uniform(0.9, 1.5))),
                    "priority": float(rng.uniform()), "urgency": float(rng.uniform()),
                    "expected_time": 600.0 * complexity * (0.5 + size)}

    def _trust(self, i: int) -> float:
        o = self.outcomes[i][-HISTORY_WINDOW:]
        rate = sum(o) / len(o) if o else 0.5
        rating = self.rating_sum[i] / self.total_jobs[i] if self.total_jobs[i] else 0.5
        return trust_score(rate, float(rating), float(self.days_active[i]))

    def _observe(self, i: int, g: float) -> np.ndarray:
        job, o = self.job, np.zeros(OBS_DIM, np.float32)
        hist = self.outcomes[i][-HISTORY_WINDOW:]
        o[0], o[1], o[2], o[3] = self.cpu[i], self.mem[i], self.disk[i], self.bandwidth[i]
        o[4] = min(1.0, len(self.busy[i]) / 10.0)
        o[5], o[6], o[7] = job["type"], job["priority"], job["urgency"]
        o[8], o[9] = job["size"], job["payment"] / MAX_PAYMENT
        o[10] = sum(hist) / len(hist) if hist else 0.5
        o[11] = min(1.0, self.time_sum[i] / max(1, self.total_jobs[i]) / 3600.0)
        o[12] = min(1.0, self.failures[i] / 100.0)
        o[13] = min(1.0, self.total_jobs[i] / 1000.0)
        o[14] = self._trust(i)
        o[15] = min(1.0, (self.m - 1) / 50.0)
        o[16] = min(1.0, max(0.0, self.wallet[i]) / MAX_TOKENS)
        o[17] = min(1.0, self.last_bids / max(1, self.m - 1))
        o[18] = diversity_factor(self.won[i] / self.t if self.t else 0.0)
        o[19] = tax_rate(self.wallet[i]) if self.fair_market else 0.0
        o[20] = g
        o[21] = 1.0 if ubi_eligible(self.wallet[i]) else 0.0
        o[22] = affirmative_boost(int(self.won[i]), int(self.bid_count[i])) if self.fair_market else 0.0
        o[23] = job["complexity"]
        bids_per_hour = self.bid_count[i] / self.t * 60.0 if self.t else 0.0
        ratio = self.ratio_sum[i] / self.bid_count[i] if self.bid_count[i] else 1.0
        o[24] = cooperative_index(bids_per_hour, 0, ratio)
        return np.clip(o, OBS_LOW, OBS_HIGH)

    def _observe_all(self) -> list[np.ndarray]:
        g = gini(self.wallet)
        self._obs = [self._observe(i, g) for i in range(self.m)]
        return self._obs

    def _background_action(self, i: int) -> int:
        k = heuristic_bid_action(self._obs[i])
        return k if k == NO_BID else min(N_ACTIONS - 1, k + int(self._rng.integers(0, 3)))

    # --- ParallelEnv ------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        forced = (options or {}).get("scenario")
        if forced is not None and forced not in SCENARIOS:
            raise ValueError(f"market_v0: options['scenario'] {forced!r} is not one of {', '.join(SCENARIOS)}")
        self._reset_market(forced or self._draw_scenario())
        self.agents = list(self.possible_agents)
        obs = self._observe_all()
        return ({a: obs[i].copy() for i, a in enumerate(self.possible_agents)},
                {a: {"scenario": self.current_scenario} for a in self.agents})

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("market_v0: step() after the episode ended; call reset() first")
        rng, job, m = self._rng, self.job, self.m
        before = self._obs
        acts = [int(actions.get(a, NO_BID)) for a in self.possible_agents]
        acts += [self._background_action(i) for i in range(self.n, m)]
        for i, k in enumerate(acts):
            if not 0 <= k < N_ACTIONS:
                raise ValueError(f"market_v0: action {k!r} of participant {i} is not in 0..{N_ACTIONS - 1}")
        payment = job["payment"]
        asks = np.array([BID_LADDER[k] * payment for k in acts])
        bidders = [i for i, k in enumerate(acts) if k != NO_BID]
        costs = job["base"] * np.array([cost_ratio(self.cpu[i], self.mem[i], self.bandwidth[i]) for i in range(m)])
        winner, tax, net = -1, 0.0, 0.0
        if bidders:
            scores = np.array([auction_score(asks[i], float(before[i][22]), float(before[i][14])) for i in bidders])
            best = np.flatnonzero(scores <= scores.min() + 1e-9)
            winner = bidders[int(best[0] if len(best) == 1 else rng.choice(best))]
        for i in bidders:
            self.bid_count[i] += 1
            self.ratio_sum[i] += asks[i] / costs[i]
        rewards = [standing_reward(before[i], i in bidders, self.fair_reward) for i in range(self.n)]
        if winner >= 0:
            w = winner
            cpu = float(self.cpu[w])
            p = 0.97 - 0.3 * cpu - 0.2 * min(1.0, len(self.busy[w]) / 10.0) - 0.05 * (job["complexity"] - 1.0) / 4.0 \
                + 0.1 * (float(before[w][14]) - 0.5)
            success = bool(rng.uniform() < min(0.99, max(0.3, p)))
            actual = job["expected_time"] * rng.uniform(0.7, 1.3) * (0.8 + 0.4 * cpu)
            paid = asks[w] if success else 0.0
            gross = paid - costs[w]
            if self.fair_market and gross > 0:
                tax = tax_rate(self.wallet[w]) * gross
            net = gross - tax
            self.wallet[w] = max(0.0, self.wallet[w] + net)
            self.treasury += tax
            self.tax_collected += tax
            self.profit[w] += net
            self.won[w] += 1
            self.assigned += 1
            self.successes += success
            self.total_jobs[w] += 1
            self.outcomes[w].append(int(success))
            self.failures[w] += not success
            self.rating_sum[w] += (1.0 if actual <= job["expected_time"] else 0.7) if success else 0.0
            self.time_sum[w] += actual
            self.busy[w].append(1 + int(job["size"] * 2.999))
            if w < self.n:
                rewards[w] = calculate_reward(success, actual, job["expected_time"], paid, costs[w] + tax,
                                              before[w], self.fair_reward)
        else:
            self.unassigned += 1
        self.last_bids = len(bidders)
        # time passes: running jobs advance, load follows them
        for i in range(m):
            self.busy[i] = [d - 1 for d in self.busy[i] if d > 1]
        load = np.array([len(b) for b in self.busy], np.float64)
        self.cpu = np.clip(self.base_cpu + 0.12 * load + rng.normal(0.0, 0.03, m), 0.0, 1.0)
        self.mem = np.clip(self.base_mem + 0.08 * load + rng.normal(0.0, 0.02, m), 0.0, 1.0)
        self.t += 1
        if self.fair_market and self.t % UBI_PERIOD == 0:
            for i in range(m):
                amount = ubi_payment(self.wallet[i])
                if amount:
                    from_treasury = min(self.treasury, amount)
                    self.treasury -= from_treasury
                    self.ubi_minted += amount - from_treasury
                    self.ubi_paid += amount
                    self.wallet[i] += amount
        done = self.t >= self.n_jobs
        self._new_job()
        obs = self._observe_all()
        infos = {a: {"scenario": self.current_scenario, "won": i == winner, "bid": float(asks[i]),
                     "profit": float(net) if i == winner else 0.0, "tax": float(tax) if i == winner else 0.0}
                 for i, a in enumerate(self.possible_agents)}
        out_obs = {a: obs[i].copy() for i, a in enumerate(self.possible_agents)}
        out_rew = {a: float(rewards[i]) for i, a in enumerate(self.possible_agents)}
        terms = {a: done for a in self.agents}
        truncs = {a: False for a in self.agents}
        if done:
            self.agents = []
        return out_obs, out_rew, terms, truncs, infos

    def state(self) -> np.ndarray:
        onehot = np.zeros(4, np.float32)
        onehot[SCENARIO_NAMES.index(self.current_scenario)] = 1.0
        left = np.float32(max(0, self.n_jobs - self.t) / self.n_jobs)
        return np.concatenate([*self._obs[:self.n], [left], onehot]).astype(np.float32)

    def state_flags(self) -> list[str]:
        """Episode metadata for env.state's ``flags``: ``scenario:NAME``."""
        return [f"scenario:{self.current_scenario}"]

    def metrics(self) -> dict:
        """Domain metrics of the episode so far (all market participants unless said otherwise)."""
        shares = self.won / self.assigned if self.assigned else np.zeros(self.m)
        return {
            "scenario": self.current_scenario, "jobs": self.n_jobs, "jobs_auctioned": self.t,
            "jobs_assigned": self.assigned, "jobs_unassigned": self.unassigned,
            "success_rate": self.successes / self.assigned if self.assigned else 0.0,
            "wallet_gini": gini(self.wallet), "initial_wallet_gini": gini(self.initial_wallet),
            "total_profit": float(self.profit.sum()), "agents_profit": float(self.profit[:self.n].sum()),
            "win_shares": [float(x) for x in shares], "tax_collected": float(self.tax_collected),
            "ubi_paid": float(self.ubi_paid), "ubi_minted": float(self.ubi_minted),
            "treasury": float(self.treasury), "participants": self.m,
        }

    def heuristic_action(self, agent: str, observation: np.ndarray) -> int:
        """Bid your cost (``heuristic_bid_action``): lowest rung asking >= 1.15x cost, else no bid."""
        return heuristic_bid_action(observation)

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> MarketEnv:
    return MarketEnv(**kwargs)


env = parallel_env

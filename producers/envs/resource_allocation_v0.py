"""resource_allocation_v0: tenants request shared CPU, memory and bandwidth pools under a fair allocator (seed 004).

Seed 004's resource allocation environment: "dynamic resource allocation, fairness constraints,
multi-objective optimization, real-time adaptation" (its demo: 8 agents; business uses: cloud
computing, energy management). Here: a cluster's tenants (services) each keep a queue of jobs; every
step each asks the scheduler for an amount of each pool, the scheduler grants by max-min fairness with
a per-tenant cap, and each tenant serves as many jobs as its scarcest granted resource allows.
Centralized training, decentralized execution: a tenant observes its own queue and grants and the
cluster's public telemetry (pool utilization and total requests), ``state()`` adds every tenant's
view and the hidden arrival rates.

| | |
|---|---|
| Agents | ``tenant_0`` .. ``tenant_{n-1}`` (``n_tenants=8``), all act every step. Tenant ``i`` runs jobs of profile ``i % 3`` (``PROFILES``): ``compute`` (2 cores, 4 GiB, 0.25 Gbps per job-step), ``memory`` (0.5 cores, 16 GiB, 0.25 Gbps), ``network`` (0.5 cores, 4 GiB, 1.5 Gbps) |
| Pools (``CAPACITY``) | 48 cores, 384 GiB memory, 24 Gbps bandwidth |
| Action (``continuous_actions=True``, default) | Box(0, 1, (3,)): request ``a[k] * MAX_SHARE * CAPACITY[k]`` of pool ``k`` (cpu, memory, bandwidth); clipped to [0, 1] |
| Action (``continuous_actions=False``) | Discrete(``request_levels``): request ``k / (request_levels - 1) * 2`` times what the tenant's queue needs (queued jobs x its profile), capped at ``MAX_SHARE`` of each pool (a documented discretization for discrete-only learners) |
| Allocation (``max_min_fair``) | per pool, max-min fair (water-filling) over the requests, each capped at ``MAX_SHARE`` = 50% of the pool: uncontended, every request is granted in full; contended, every tenant gets ``min(request, level)`` with one level for all that fills the pool. A tenant is thus guaranteed ``min(request, pool / n)``, and asking for more than it can use takes from others only what they do not ask for |
| Service (``jobs_served``) | jobs' worth of service ``x = min_k grant_k / profile_k`` (Leontief: the scarcest granted resource binds), at most the work queued; jobs are unit-sized and served first come first served (a job partly served continues next step); the resources it used are ``x * profile``, the rest of a grant idles |
| Observation (local) | Box(0, 1, (17,)): jobs queued / 50, jobs that arrived last step / 20, age of its oldest queued job / 50 steps, its profile as fractions of an equal share (3: ``profile_k / (CAPACITY[k] / n)``), its last grants / its cap (3), every pool's last utilization (3), every pool's last total requests / ``n * MAX_SHARE * CAPACITY`` (3, the contention signal), its arrival average (exponential, weight 0.2) / 20, fraction of the episode elapsed |
| State (global) | Box(0, 1, (17 n + 2 n + 3,)) = (155,) for 8 tenants: every tenant's observation in agent order, every tenant's current arrival rate / 20 and burst flag, the stage one-hot |
| Rewards (per tenant, ``reward_terms``) | ``W_UTILIZATION * U + W_FAIRNESS * J - W_LATENCY * waiting_i / LATENCY_SCALE`` with ``U`` the step's utilization (resources used by served jobs / capacity, mean of the 3 pools), ``J`` the step's Jain index over the satisfaction (work served / work queued) of the tenants that had work (``fairness``: 1.0 when none had work, 0.0 when some had and none was served), ``waiting_i`` the tenant's jobs still queued after service (by Little's law, the sum over steps is the total wait of its jobs), ``LATENCY_SCALE`` = 10 jobs. Weights ``weights=(1.0, 1.0, 1.0)``: each term is about 0..1 at a healthy load, so equal weights give utilization, fairness and latency the same say; pass others to trade them |
| Episode end | none terminates; every tenant is truncated after ``max_cycles`` steps |
| Stages (``STAGES``, ``set_stage``) | ``steady``: Poisson arrivals, offered load 60% of the bottleneck pool. ``bursty`` (default): the same mean tenant rates scaled to a 70% mean load, each tenant in a burst (arrivals x4) with probability 0.1 per step for 3-6 steps: momentary overload. ``contended``: Poisson arrivals at 110%: sustained overload, queues grow and fairness decides who waits. Spaces are the same in every stage |
| Infos | per tenant and step: ``requested`` and ``granted`` (3 each), ``served`` (jobs' worth), ``queued`` (jobs waiting after service), ``arrived``, ``completed``, ``utilization`` and ``jain`` (the step's) |
| Metrics | ``metrics()``: the episode so far: ``stage``, ``stage_index``, ``steps``, ``utilization`` (mean over steps and pools of used / capacity), ``allocated`` (granted / capacity), ``idle_grant`` (granted but unused / capacity), ``jain`` (``fairness`` of work served / work offered in the episode, over the tenants that were offered work), ``mean_jain_step``, ``p95_wait`` and ``mean_wait`` (steps from a job's arrival to its completion; jobs still queued at the end count with their age so far, a lower bound), ``slo_attainment`` (jobs completed within ``SLO_STEPS`` = 3 steps / jobs whose outcome is known: completed, or queued longer than the SLO), ``jobs_arrived``, ``jobs_completed``, ``jobs_queued``, ``objective`` (the mean per-tenant reward per step) |
| Arguments | ``stage="bursty"``, ``n_tenants=8``, ``max_cycles=50``, ``weights=(1.0, 1.0, 1.0)``, ``continuous_actions=True``, ``request_levels=9`` |

Where seed 004 is silent, these choices are a domain expert's (none tuned to reach a number):

- Arrivals: tenant ``i``'s rate is ``w_i * base`` jobs a step, ``w_i ~ Uniform(0.5, 1.5)`` per episode
  (hidden), ``base`` set so the offered load of the busiest pool is the stage's (bursty: counting the
  bursts' expected share); jobs that arrive during a step queue for the next one. The first step
  starts with one step's arrivals queued.
- The allocator is the scheduler's, not the agents': they choose what to ask for. Max-min fairness
  is the usual fairness constraint of cluster schedulers (it guarantees the equal share to whoever
  asks for it, and overstating demand gains nothing at the level); the 50% cap keeps one tenant from
  draining a pool when the others are quiet.
- Fairness in the reward and the metrics is about demand met (satisfaction), not equal grants:
  tenants of different sizes are treated fairly when each gets the same share of what it needed.
  Jain's index ``(sum x)^2 / (n sum x^2)`` is the same formula as ``stream_processors.fairness.jain``
  (producers may import only ``eventlog``, so the pure formula is repeated here, in ``jain``).
- Every tenant is paid the shared utilization and fairness terms and its own latency term, so a
  tenant that hoards gains latency for itself and loses utilization and fairness with everyone.

Confidential fields: none. Tenants are anonymous indices and their requests, grants and queue lengths
aggregate counts; no person, customer or identifier is modelled, so the env has no
``subject_fields()`` and runs without a key store.

The heuristic (``heuristic_action``) requests what its queue needs, capped at its fair share: serve
``min(queued jobs, its DRF share)`` this step and ask for exactly that many jobs' profile (nothing
idles in its grant). The fair share is dominant resource fairness (``drf_jobs``, the multi-resource
generalization of max-min: equal shares of each tenant's scarcest pool, computed from the public
capacities and job profiles), not ``CAPACITY / n`` per pool: with these profiles an equal split
of every pool leaves half of each tenant's non-dominant resources idle. The tenants' DRF requests
fit the pools together, so when every tenant follows the rule nothing is contended. Seed 004 gives
no rule of its own.

Curriculum (``CURRICULUM``): the criterion is ``slo_attainment``, the operator's service-level
objective (jobs done within 3 steps), which needs utilization (serving) and fairness (no tenant
starved) to be high: a team is promoted when it meets the SLO about as well as the fair-share rule
does at that stage (it reaches 0.94 steady, 0.77 bursty, 0.51 contended, continuous actions, seeds
0-9), and regresses when it falls about a fifth below that.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

ENV_ID = "resource_allocation_v0"
ENV_VERSION = "0"
REWARD_VERSION = 0

STAGES: tuple[str, ...] = ("steady", "bursty", "contended")
DEFAULT_STAGE = "bursty"
RESOURCES = ("cpu", "memory", "bandwidth")
CAPACITY = np.array([48.0, 384.0, 24.0])          # cores, GiB, Gbps
PROFILE_NAMES = ("compute", "memory", "network")
PROFILES = np.array([[2.0, 4.0, 0.25], [0.5, 16.0, 0.25], [0.5, 4.0, 1.5]])  # per job-step
MAX_SHARE = 0.5
# reward: weights of utilization, fairness, latency; jobs waiting that cost one unit of reward
W_UTILIZATION, W_FAIRNESS, W_LATENCY = 1.0, 1.0, 1.0
DEFAULT_WEIGHTS = (W_UTILIZATION, W_FAIRNESS, W_LATENCY)
LATENCY_SCALE = 10.0
SLO_STEPS = 3
# stage: offered load of the busiest pool, burst probability per step, burst length, burst multiplier
STAGE_LOAD = {"steady": 0.6, "bursty": 0.7, "contended": 1.1}
BURST_P, BURST_STEPS, BURST_X = 0.1, (3, 6), 4.0
RATE_LOW, RATE_HIGH = 0.5, 1.5
QUEUE_SCALE, ARRIVAL_SCALE, AGE_SCALE = 50.0, 20.0, 50.0
ARRIVAL_EMA = 0.2
OBS_DIM = 17


# --- pure allocation, service and metrics -------------------------------------------------------------
def max_min_fair(requests: Any, capacity: float, cap: float = np.inf) -> np.ndarray:
    """Max-min fair (water-filling) split of ``capacity`` over ``requests``, each first capped at ``cap``:
    all granted when they fit; otherwise ``min(request, level)`` with the one ``level`` that uses the
    whole capacity. Requires capacity >= 0."""
    r = np.minimum(np.maximum(np.asarray(requests, np.float64), 0.0), cap)
    if r.sum() <= capacity:
        return r
    srt = np.sort(r)
    n = len(srt)
    used = 0.0
    for k, x in enumerate(srt):
        level = (capacity - used) / (n - k)  # split what is left equally among the n - k largest
        if x >= level:
            return np.minimum(r, level)
        used += x
    return r  # not reached: the sum exceeds the capacity


def jobs_served(grants: Any, profile: Any, queued: Any) -> np.ndarray:
    """Jobs' worth of service per tenant: ``min_k grant_k / profile_k`` (the scarcest granted resource
    binds), at most the work queued. ``grants`` and ``profile`` [n, 3], ``queued`` [n]."""
    g, p = np.asarray(grants, np.float64), np.asarray(profile, np.float64)
    return np.minimum((g / p).min(axis=-1), np.asarray(queued, np.float64))


def drf_jobs(profiles: Any, capacity: Any = CAPACITY) -> np.ndarray:
    """Each tenant's dominant resource fairness share (Ghodsi et al., NSDI 2011) when every tenant is
    active, in jobs a step: the largest equal dominant share ``d`` that fits every pool
    (``d = min_k C_k / sum_i profile_ik / m_i``, ``m_i = max_k profile_ik / C_k`` a job's dominant share)
    gives tenant ``i`` ``d / m_i`` jobs. With identical profiles it is the equal share ``C / n``."""
    p, c = np.asarray(profiles, np.float64), np.asarray(capacity, np.float64)
    m = (p / c).max(axis=1)
    d = float((c / (p / m[:, None]).sum(0)).min())
    return d / m


def jain(values: Sequence[float]) -> float:
    """Jain's index ``(sum x)^2 / (n * sum x^2)``: 1 when equal, 1/n when one holds everything; 1.0
    for no values or all zero (the formula of ``stream_processors.fairness.jain``, for non-negative x)."""
    x = np.asarray(values, np.float64)
    sq = float((x * x).sum())
    return 1.0 if x.size == 0 or sq == 0 else float(x.sum()) ** 2 / (x.size * sq)


def fairness(served: Any, demand: Any) -> float:
    """Jain's index of the satisfaction ``served_i / demand_i`` of the tenants with demand > 0: 1.0 when
    none had demand; 0.0 when some had and none was served (Jain's 0/0 read as everyone starved, so a
    step that serves nobody never scores as perfectly fair)."""
    s, d = np.asarray(served, np.float64), np.asarray(demand, np.float64)
    has = d > 1e-9
    if not has.any():
        return 1.0
    x = s[has] / d[has]
    return jain(x) if x.sum() > 0 else 0.0


def utilization(used: Any, capacity: Any = CAPACITY) -> float:
    """Mean over pools of the resources used / capacity (``used`` [n, 3] or [3])."""
    u = np.asarray(used, np.float64)
    return float((u.reshape(-1, len(capacity)).sum(0) / np.asarray(capacity, np.float64)).mean())


def reward_terms(util: float, fairness: float, waiting: float, weights: Sequence[float] = DEFAULT_WEIGHTS
                 ) -> dict[str, float]:
    """One tenant's weighted reward terms; its reward is their sum."""
    wu, wf, wl = weights
    return {"utilization": wu * float(util), "fairness": wf * float(fairness),
            "latency": -wl * float(waiting) / LATENCY_SCALE}


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (numpy's linear interpolation between order statistics); 0.0 for none."""
    v = np.asarray(values, np.float64)
    return float(np.percentile(v, 95)) if v.size else 0.0


def slo_attainment(completed_waits: Sequence[float], queued_ages: Sequence[float], slo: int = SLO_STEPS) -> float:
    """Jobs completed within ``slo`` steps over jobs whose outcome is known (completed, or queued for
    longer than ``slo``); 1.0 when none is known yet."""
    w, q = np.asarray(completed_waits, np.float64), np.asarray(queued_ages, np.float64)
    known = w.size + int((q > slo).sum())
    return float((w <= slo).sum()) / known if known else 1.0


class ResourceAllocationEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}
    stages = STAGES
    # per stage: promote / regress on slo_attainment; see the docstring
    CURRICULUM: dict[str, dict] = {
        "steady": {"metric": "slo_attainment", "promote_at": 0.93, "regress_below": 0.75},
        "bursty": {"metric": "slo_attainment", "promote_at": 0.75, "regress_below": 0.60},
        "contended": {"metric": "slo_attainment", "promote_at": 0.50, "regress_below": 0.40},
    }

    def __init__(self, stage: str = DEFAULT_STAGE, n_tenants: int = 8, max_cycles: int = 50,
                 weights: Sequence[float] = DEFAULT_WEIGHTS, continuous_actions: bool = True,
                 request_levels: int = 9):
        self._check_stage(stage)
        weights = tuple(float(w) for w in weights)
        if n_tenants < 2 or max_cycles < 1 or request_levels < 2 or len(weights) != 3 or min(weights) < 0:
            raise ValueError(f"resource_allocation_v0 needs n_tenants >= 2, max_cycles >= 1, request_levels >= 2 and "
                             f"3 non-negative weights (utilization, fairness, latency); got n_tenants={n_tenants}, "
                             f"max_cycles={max_cycles}, request_levels={request_levels}, weights={weights}")
        self.stage = self._next_stage = stage
        self.n, self.max_cycles, self.weights = n_tenants, max_cycles, weights
        self.continuous, self.request_levels = continuous_actions, request_levels
        self.possible_agents = [f"tenant_{i}" for i in range(n_tenants)]
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        self.profile = PROFILES[np.arange(n_tenants) % len(PROFILES)]
        self.cap = MAX_SHARE * CAPACITY
        self.fair_jobs = drf_jobs(self.profile)  # jobs a step of each tenant's fair (DRF) share
        self.agents: list[str] = []
        self._obs_space = spaces.Box(0.0, 1.0, (OBS_DIM,), np.float32)
        self._act_space = (spaces.Box(0.0, 1.0, (len(RESOURCES),), np.float32) if continuous_actions
                           else spaces.Discrete(request_levels))
        self.state_space = spaces.Box(0.0, 1.0, (n_tenants * (OBS_DIM + 2) + len(STAGES),), np.float32)
        self._rng = np.random.default_rng()
        self._new_episode()

    @staticmethod
    def _check_stage(name: str) -> None:
        if name not in STAGES:
            raise ValueError(f"resource_allocation_v0: unknown stage {name!r}; choose one of {', '.join(STAGES)}")

    def set_stage(self, name: str) -> None:
        """Use stage ``name`` from the next ``reset()`` on (``self.stage`` is the current episode's)."""
        self._check_stage(name)
        self._next_stage = name

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_space

    # --- episode state ------------------------------------------------------------------------------
    def _new_episode(self) -> None:
        self.stage = self._next_stage
        rng, n = self._rng, self.n
        w = rng.uniform(RATE_LOW, RATE_HIGH, n)
        load = (w[:, None] * self.profile).sum(0) / CAPACITY           # offered load per pool at base = 1
        bursty = self.stage == "bursty"
        mean_burst = BURST_P * np.mean(BURST_STEPS)
        on = mean_burst / (1.0 + mean_burst)                           # share of steps in a burst
        mult = 1.0 + (BURST_X - 1.0) * on if bursty else 1.0
        self._base = w * STAGE_LOAD[self.stage] / (load.max() * mult)
        self._burst = np.zeros(n, np.int64)                            # burst steps left
        self._queue: list[list[int]] = [[] for _ in range(n)]          # arrival stamp of each queued job
        self._progress = np.zeros(n)                                   # work done on the head job
        self._t = 0
        self._arrived = np.zeros(n, np.int64)
        self._avg = self._base.copy()
        self._grant = np.zeros((n, len(RESOURCES)))
        self._util = np.zeros(len(RESOURCES))
        self._requests = np.zeros(len(RESOURCES))
        self._waits: list[int] = []
        self._tot = {k: 0.0 for k in ("util", "alloc", "jain", "reward", "arrived", "completed")}
        self._offered = np.zeros(n)
        self._served = np.zeros(n)
        self._arrive()

    def _rates(self) -> np.ndarray:
        return self._base * np.where(self._burst > 0, BURST_X, 1.0)

    def _arrive(self) -> None:
        """This step's arrivals join the queues (stamped with the clock); bursts start or run down."""
        arrivals = self._rng.poisson(self._rates())
        for i, k in enumerate(arrivals):
            self._queue[i].extend([self._t] * int(k))
        self._arrived = arrivals
        self._offered += arrivals
        self._tot["arrived"] += int(arrivals.sum())
        if self.stage == "bursty":
            running = self._burst > 0
            self._burst = np.where(running, self._burst - 1, 0)
            start = ~running & (self._rng.random(self.n) < BURST_P)
            self._burst = np.where(start, self._rng.integers(BURST_STEPS[0], BURST_STEPS[1] + 1, self.n), self._burst)

    def _work(self) -> np.ndarray:
        return np.array([len(q) for q in self._queue], np.float64) - self._progress

    def _obs_block(self) -> np.ndarray:
        n = self.n
        age = np.array([self._t - q[0] if q else 0 for q in self._queue], np.float64)
        blk = np.concatenate([
            self._work()[:, None] / QUEUE_SCALE, self._arrived[:, None] / ARRIVAL_SCALE, age[:, None] / AGE_SCALE,
            self.profile / (CAPACITY / n), self._grant / self.cap,
            np.broadcast_to(self._util, (n, 3)), np.broadcast_to(self._requests / (n * self.cap), (n, 3)),
            self._avg[:, None] / ARRIVAL_SCALE, np.full((n, 1), min(self._t, self.max_cycles) / self.max_cycles)],
            axis=1)
        return np.clip(blk, 0.0, 1.0).astype(np.float32)

    def _observations(self) -> dict[str, np.ndarray]:
        blk = self._obs_block()
        return {a: blk[self._index[a]].copy() for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._new_episode()
        self.agents = list(self.possible_agents)
        return self._observations(), {a: {} for a in self.agents}

    # --- actions ------------------------------------------------------------------------------------
    def _decode(self, actions: dict[str, Any]) -> np.ndarray:
        """[n, 3] requests in pool units; a missing tenant requests nothing."""
        req = np.zeros((self.n, len(RESOURCES)))
        work = self._work()
        for a, act in actions.items():
            i = self._index.get(a)
            if i is None:
                continue
            if not self.continuous:
                k = int(np.clip(int(act), 0, self.request_levels - 1))
                req[i] = np.minimum(self.cap, k / (self.request_levels - 1) * 2.0 * work[i] * self.profile[i])
                continue
            x = np.clip(np.nan_to_num(np.asarray(act, np.float64).ravel(), nan=0.0), 0.0, 1.0)
            if x.shape[0] != len(RESOURCES):
                raise ValueError(f"resource_allocation_v0: {a}'s action has {x.shape[0]} values; it needs "
                                 f"{len(RESOURCES)} (a request fraction for cpu, memory and bandwidth)")
            req[i] = x * self.cap
        return req

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("resource_allocation_v0: step() after the episode ended; call reset() first")
        n = self.n
        req = self._decode(actions)
        grant = np.stack([max_min_fair(req[:, k], CAPACITY[k], self.cap[k]) for k in range(len(RESOURCES))], axis=1)
        work = self._work()
        served = jobs_served(grant, self.profile, work)
        used = served[:, None] * self.profile
        util = utilization(used)
        fair = fairness(served, work)
        # first come, first served: whole jobs complete, a partly served head job keeps its progress
        self._t += 1
        completed = np.zeros(n, np.int64)
        for i in range(n):
            done = self._progress[i] + served[i]
            k = min(int(np.floor(done + 1e-9)), len(self._queue[i]))
            self._waits.extend(self._t - s for s in self._queue[i][:k])
            del self._queue[i][:k]
            completed[i] = k
            self._progress[i] = done - k if self._queue[i] else 0.0
        waiting = self._work()
        rewards, infos = {}, {}
        r = np.array([sum(reward_terms(util, fair, waiting[i], self.weights).values()) for i in range(n)])
        self._served += served
        self._grant, self._util, self._requests = grant, used.sum(0) / CAPACITY, req.sum(0)
        tot = self._tot
        tot["util"] += util
        tot["alloc"] += float((grant.sum(0) / CAPACITY).mean())
        tot["jain"] += fair
        tot["reward"] += float(r.mean())
        tot["completed"] += int(completed.sum())
        done = self._t >= self.max_cycles
        if not done:
            self._arrive()
            self._avg = (1 - ARRIVAL_EMA) * self._avg + ARRIVAL_EMA * self._arrived
        for a in self.agents:
            i = self._index[a]
            rewards[a] = float(r[i])
            infos[a] = {"requested": req[i].tolist(), "granted": grant[i].tolist(), "served": float(served[i]),
                        "queued": float(waiting[i]), "arrived": int(self._arrived[i]) if not done else 0,
                        "completed": int(completed[i]), "utilization": util, "jain": fair}
        terms = {a: False for a in self.agents}
        truncs = {a: done for a in self.agents}
        obs = self._observations()
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    # --- centralized view, metrics, baseline --------------------------------------------------------------
    def state(self) -> np.ndarray:
        rates = np.clip(self._rates() / ARRIVAL_SCALE, 0.0, 1.0)
        stage = np.eye(len(STAGES))[STAGES.index(self.stage)]
        return np.concatenate([self._obs_block().ravel(), rates, (self._burst > 0).astype(np.float64),
                               stage]).astype(np.float32)

    def state_flags(self) -> list[str]:
        """Episode metadata for env.state's ``flags``: ``stage:NAME``."""
        return [f"stage:{self.stage}"]

    def _queued_ages(self) -> list[int]:
        return [self._t - s for q in self._queue for s in q]

    def metrics(self) -> dict:
        """The episode so far (all tenants): utilization, fairness, waits in steps, job counts."""
        t, steps = self._tot, max(self._t, 1)
        ages = self._queued_ages()
        waits = self._waits + ages
        return {"stage": self.stage, "stage_index": STAGES.index(self.stage), "steps": float(self._t),
                "utilization": t["util"] / steps, "allocated": t["alloc"] / steps,
                "idle_grant": (t["alloc"] - t["util"]) / steps,
                "jain": fairness(self._served, self._offered), "mean_jain_step": t["jain"] / steps,
                "p95_wait": p95(waits), "mean_wait": float(np.mean(waits)) if waits else 0.0,
                "slo_attainment": slo_attainment(self._waits, ages), "jobs_arrived": t["arrived"],
                "jobs_completed": t["completed"], "jobs_queued": float(len(ages)), "objective": t["reward"] / steps}

    def heuristic_action(self, agent: str, observation: np.ndarray) -> Any:
        """Request what the queue needs, capped at the fair share: ``min(queued, equal-share jobs)`` jobs'
        worth of the tenant's profile."""
        i = self._index[agent]
        queued = float(observation[0]) * QUEUE_SCALE
        jobs = min(queued, float(self.fair_jobs[i]))  # what the queue needs, at most the DRF share
        if not self.continuous:
            ratio = jobs / queued if queued > 0 else 0.0
            return int(np.clip(np.rint(ratio * (self.request_levels - 1) / 2.0), 0, self.request_levels - 1))
        return np.clip(jobs * self.profile[i] / self.cap, 0.0, 1.0).astype(np.float32)

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> ResourceAllocationEnv:
    return ResourceAllocationEnv(**kwargs)


env = parallel_env

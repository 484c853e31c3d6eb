"""retail_v0: warehouses order stock, move it between each other and meet random demand (seed 003).

Seed 003's RETAIL demo: 5 warehouses optimize their collective inventory while meeting random
customer demand; stockout $10 per unmet unit, transfer $0.50 per unit moved, holding $0.10 per unit
held. Centralized training, decentralized execution: each warehouse observes only its own state,
``state()`` holds every warehouse's (and the hidden demand rates), for a centralized critic.

| | |
|---|---|
| Agents | ``warehouse_0`` .. ``warehouse_{n-1}`` (``n_warehouses=5``); all act every day |
| Action (``continuous_actions=True``, default) | Box(0, 1, (n,)): ``[order, transfer to each other warehouse in index order]``. Order quantity ``rint(a[0] * max_order)`` units from the supplier (on the shelf ``lead_time`` days later); transfer quantity ``rint(a[1+k] * max_transfer)`` units to the k-th other warehouse (same day). Out-of-range values are clipped to [0, 1] |
| Action (``continuous_actions=False``) | Discrete(``order_levels``): order ``rint(k / (order_levels - 1) * max_order)`` units, no transfers (a documented discretization for discrete-only learners) |
| Observation (local) | Box(0, 1, (5 + lead_time,)), all quantities divided by ``capacity`` and clipped to 1: on-hand inventory, units ordered and not yet delivered, oldest first (``lead_time - 1`` values: the pipeline), today's demand, today's unmet demand, units received by transfer today, demand average (exponential, weight 0.2, starting from the prior mean ``(demand_low + demand_high) / 2``), fraction of the episode elapsed |
| State (global) | Box(0, 1, (n * (6 + lead_time),)): every warehouse's observation block, in agent order, then every warehouse's hidden demand rate ``lambda_i / capacity`` |
| Rewards (per agent, ``reward_mode="local"``, seed 003's ``rewards: [cost1, cost2, ...]``) | ``-(STOCKOUT_COST * unmet_i + HOLDING_COST * end_of_day_inventory_i + TRANSFER_COST * units_sent_i)``: stockout $10/unit of unmet demand, holding $0.10/unit left at the end of the day, transfer $0.50/unit, paid by the sender. ``reward_mode="shared"``: every agent gets ``-total_cost / n`` (team return = -total cost in both modes) |
| Termination | none; truncation of every agent after ``max_cycles`` days |
| Infos | per agent and day: ``demand``, ``unmet``, ``sent``, ``received``, ``ordered``, ``delivered``, ``refused`` (supplier units over capacity), ``cost`` (its own cost) |
| Metrics | ``metrics()``: the episode so far: ``total_cost``, ``stockout_cost``, ``holding_cost``, ``transfer_cost``, ``demand``, ``unmet``, ``stockout_rate`` (unmet / demand, seed 003's "% of unmet demand"), ``fill_rate``, ``units_transferred``, ``units_ordered``, ``units_refused``, ``inventory_balance`` (mean over days of the std of warehouse levels, seed 003's metric), ``days`` |
| Arguments | ``n_warehouses=5``, ``max_cycles=30``, ``lead_time=2``, ``capacity=100``, ``max_order=20``, ``max_transfer=10``, ``demand_low=2.0``, ``demand_high=8.0``, ``initial_high=20``, ``reward_mode="local"``, ``continuous_actions=True``, ``order_levels=11`` |

Where seed 003 is silent, these choices are a domain expert's (none tuned to reach a number):

- Demand: lost sales (no backorders), daily demand at warehouse i ``Poisson(lambda_i)`` with
  ``lambda_i ~ Uniform(demand_low, demand_high)`` drawn per episode (stores differ in size), hidden
  from the agents (they see their own demand and its running average); the state carries it.
- A day: (1) transfers leave and arrive, each sender limited to its on-hand stock and each receiver
  to its free capacity (requested quantities scaled down proportionally, then floored); (2) demand
  is served from on-hand stock, the rest is lost (stockout); (3) holding is charged on what is left;
  (4) the order is placed, and the supplier delivers the order placed ``lead_time - 1`` days ago (units
  over capacity are refused and not billed): an order placed on day t serves demand from day
  t + ``lead_time`` on (``lead_time=1``: tomorrow).
- No ordering or purchase cost: the seed lists none, and the issue names only the three costs.
- Initial inventory ``Uniform{0..initial_high}`` per warehouse, empty pipeline.
- Rewards are per agent (the seed's replay buffer stores one cost per warehouse); with local rewards
  the sender pays a transfer that helps the receiver, so ``reward_mode="shared"`` (one company, one
  cost) is there for cooperative training. The metrics are the same in both modes.

Confidential fields: none. Inventories, orders, transfers and demand counts are aggregate business
quantities of anonymous warehouses: no customer, person or identifier is modelled, so the env has
no ``subject_fields()`` and runs without a key store.

The heuristic (``heuristic_action``) is a base-stock (order-up-to) rule on local information only:
order ``S - inventory - pipeline`` with ``S = mu * (lead_time + 1) + z * sqrt(mu * (lead_time + 1))``,
``mu`` the observed demand average and ``z = Z_SERVICE`` (the newsvendor critical ratio
10 / (10 + 0.1) = 0.99 under Poisson-like demand), and no transfers (a warehouse cannot see who
needs stock). The seed gives no rule of its own.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

ENV_ID = "retail_v0"
ENV_VERSION = "0"
REWARD_VERSION = 0

# seed 003's costs, dollars per unit
STOCKOUT_COST = 10.0
TRANSFER_COST = 0.5
HOLDING_COST = 0.1
# z of the base-stock heuristic: the service level STOCKOUT / (STOCKOUT + HOLDING) = 0.990 -> z = 2.33
Z_SERVICE = 2.33
DEMAND_EMA = 0.2
REWARD_MODES = ("local", "shared")


# --- pure cost terms and dynamics ------------------------------------------------------------------
def stockout_cost(unmet: Any) -> Any:
    """$10 per unit of demand not served (lost sale)."""
    return STOCKOUT_COST * np.asarray(unmet, np.float64) if np.ndim(unmet) else STOCKOUT_COST * float(unmet)


def transfer_cost(units: Any) -> Any:
    """$0.50 per unit moved between warehouses (paid by the sender)."""
    return TRANSFER_COST * np.asarray(units, np.float64) if np.ndim(units) else TRANSFER_COST * float(units)


def holding_cost(units: Any) -> Any:
    """$0.10 per unit held at the end of the day."""
    return HOLDING_COST * np.asarray(units, np.float64) if np.ndim(units) else HOLDING_COST * float(units)


def day_cost(unmet: Any, held: Any, sent: Any) -> Any:
    """One warehouse's (or each warehouse's, element-wise) cost of a day."""
    return stockout_cost(unmet) + holding_cost(held) + transfer_cost(sent)


def serve(on_hand: np.ndarray, demand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lost-sales fulfilment: (units left, unmet demand), element-wise."""
    on_hand, demand = np.asarray(on_hand, np.int64), np.asarray(demand, np.int64)
    sold = np.minimum(on_hand, demand)
    return on_hand - sold, demand - sold


def feasible_transfers(requested: np.ndarray, on_hand: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Transfers ``requested[i, j]`` (units from i to j, diagonal ignored) cut to what can move: each
    sender's row scaled down to its on-hand stock, then each receiver's column to its free capacity
    (after its own outgoing units leave), each time proportionally and floored. Integer units."""
    req = np.maximum(np.asarray(requested, np.float64), 0.0)
    np.fill_diagonal(req, 0.0)
    on_hand = np.asarray(on_hand, np.float64)
    out = req.sum(1)
    row = np.where(out > on_hand, on_hand / np.where(out > 0, out, 1.0), 1.0)
    sent = np.floor(req * row[:, None] + 1e-9)
    room = np.asarray(free, np.float64) + sent.sum(1)
    inb = sent.sum(0)
    col = np.where(inb > room, room / np.where(inb > 0, inb, 1.0), 1.0)
    return np.floor(sent * col[None, :] + 1e-9).astype(np.int64)


def base_stock_level(mu: float, lead_time: int, z: float = Z_SERVICE) -> float:
    """Order-up-to level: the inventory position before today's demand (on hand + pipeline + today's
    order) covers today and the ``lead_time`` days until tomorrow's order arrives (``lead_time + 1``
    days of mean demand ``mu``), plus safety stock ``z * sqrt(that mean)`` (Poisson)."""
    cover = max(0.0, float(mu)) * (lead_time + 1)
    return cover + z * float(np.sqrt(cover))


class RetailEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}

    def __init__(self, n_warehouses: int = 5, max_cycles: int = 30, lead_time: int = 2, capacity: int = 100,
                 max_order: int = 20, max_transfer: int = 10, demand_low: float = 2.0, demand_high: float = 8.0,
                 initial_high: int = 20, reward_mode: str = "local", continuous_actions: bool = True,
                 order_levels: int = 11):
        if (n_warehouses < 2 or max_cycles < 1 or lead_time < 1 or capacity < 1 or max_order < 0
                or max_transfer < 0 or not 0.0 <= demand_low <= demand_high or initial_high < 0
                or order_levels < 2):
            raise ValueError(
                f"retail_v0 needs n_warehouses >= 2, max_cycles, lead_time, capacity >= 1, max_order, max_transfer, "
                f"initial_high >= 0, 0 <= demand_low <= demand_high and order_levels >= 2; got n_warehouses="
                f"{n_warehouses}, max_cycles={max_cycles}, lead_time={lead_time}, capacity={capacity}, max_order="
                f"{max_order}, max_transfer={max_transfer}, demand_low={demand_low}, demand_high={demand_high}, "
                f"initial_high={initial_high}, order_levels={order_levels}")
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"retail_v0: reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        self.n = n_warehouses
        self.max_cycles, self.lead_time, self.capacity = max_cycles, lead_time, capacity
        self.max_order, self.max_transfer = max_order, max_transfer
        self.demand_low, self.demand_high, self.initial_high = demand_low, demand_high, initial_high
        self.reward_mode, self.continuous, self.order_levels = reward_mode, continuous_actions, order_levels
        self.possible_agents = [f"warehouse_{i}" for i in range(n_warehouses)]
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        self.agents: list[str] = []
        self.obs_dim = 5 + lead_time
        self._obs_space = spaces.Box(0.0, 1.0, (self.obs_dim,), np.float32)
        self._act_space = (spaces.Box(0.0, 1.0, (n_warehouses,), np.float32) if continuous_actions
                           else spaces.Discrete(order_levels))
        self.state_space = spaces.Box(0.0, 1.0, (n_warehouses * (self.obs_dim + 1),), np.float32)
        self._rng = np.random.default_rng()
        self._reset_arrays(np.zeros(n_warehouses), np.zeros(n_warehouses, np.int64))

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_space

    # --- episode state ---------------------------------------------------------------------------
    def _reset_arrays(self, lam: np.ndarray, inventory: np.ndarray) -> None:
        n = self.n
        self._lambda = np.asarray(lam, np.float64)
        self._inv = np.asarray(inventory, np.int64)
        self._pipe = np.zeros((n, self.lead_time - 1), np.int64)   # orders not delivered yet, oldest first
        self._demand = np.zeros(n, np.int64)
        self._unmet = np.zeros(n, np.int64)
        self._received = np.zeros(n, np.int64)
        self._avg = np.full(n, (self.demand_low + self.demand_high) / 2, np.float64)  # the prior forecast
        self._t = 0
        self._tot = {k: 0.0 for k in ("stockout_cost", "holding_cost", "transfer_cost", "demand", "unmet",
                                      "units_transferred", "units_ordered", "units_refused", "balance")}

    def _obs_block(self) -> np.ndarray:
        c = float(self.capacity)
        blk = np.concatenate([self._inv[:, None] / c, self._pipe / c, self._demand[:, None] / c,
                              self._unmet[:, None] / c, self._received[:, None] / c, self._avg[:, None] / c,
                              np.full((self.n, 1), self._t / self.max_cycles)], axis=1)
        return np.clip(blk, 0.0, 1.0).astype(np.float32)

    def _observations(self) -> dict[str, np.ndarray]:
        blk = self._obs_block()
        return {a: blk[self._index[a]].copy() for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        lam = self._rng.uniform(self.demand_low, self.demand_high, self.n)
        inv = self._rng.integers(0, self.initial_high + 1, self.n)
        self._reset_arrays(lam, inv)
        self.agents = list(self.possible_agents)
        return self._observations(), {a: {} for a in self.agents}

    # --- actions -------------------------------------------------------------------------------
    def _decode(self, actions: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(orders [n], requested transfers [n, n]) in units; a missing agent orders and sends nothing."""
        n = self.n
        orders = np.zeros(n, np.int64)
        req = np.zeros((n, n), np.float64)
        for a, act in actions.items():
            if a not in self._index:
                continue
            i = self._index[a]
            if not self.continuous:
                k = int(np.clip(int(act), 0, self.order_levels - 1))
                orders[i] = int(np.rint(k / (self.order_levels - 1) * self.max_order))
                continue
            x = np.clip(np.nan_to_num(np.asarray(act, np.float64).ravel(), nan=0.0), 0.0, 1.0)
            if x.shape[0] != n:
                raise ValueError(f"retail_v0: {a}'s action has {x.shape[0]} values; it needs {n} "
                                 f"(order, then a transfer to each of the {n - 1} other warehouses)")
            orders[i] = int(np.rint(x[0] * self.max_order))
            others = [j for j in range(n) if j != i]
            req[i, others] = np.rint(x[1:] * self.max_transfer)
        return orders, req

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("retail_v0: step() after the episode ended; call reset() first")
        n, cap = self.n, self.capacity
        orders, req = self._decode(actions)
        # (1) transfers, same day
        sent_m = feasible_transfers(req, self._inv, cap - self._inv)
        sent, received = sent_m.sum(1), sent_m.sum(0)
        on_hand = self._inv - sent + received
        # (2) demand, lost sales
        demand = self._rng.poisson(self._lambda).astype(np.int64)
        left, unmet = serve(on_hand, demand)
        # (3) holding on what is left
        costs = day_cost(unmet, left, sent)
        # (4) today's order joins the pipeline; the oldest order (placed lead_time - 1 days ago) arrives
        queue = np.concatenate([self._pipe, orders[:, None]], axis=1)
        arriving, self._pipe = queue[:, 0], queue[:, 1:]
        delivered = np.minimum(arriving, cap - left)
        refused = arriving - delivered
        self._inv = left + delivered
        # observations' memory
        self._avg = (1 - DEMAND_EMA) * self._avg + DEMAND_EMA * demand
        self._demand, self._unmet, self._received = demand, unmet, received
        self._t += 1
        tot = self._tot
        tot["stockout_cost"] += float(stockout_cost(unmet).sum())
        tot["holding_cost"] += float(holding_cost(left).sum())
        tot["transfer_cost"] += float(transfer_cost(sent).sum())
        tot["demand"] += int(demand.sum())
        tot["unmet"] += int(unmet.sum())
        tot["units_transferred"] += int(sent.sum())
        tot["units_ordered"] += int(orders.sum())
        tot["units_refused"] += int(refused.sum())
        tot["balance"] += float(np.std(self._inv))
        total = float(costs.sum())
        rewards, infos = {}, {}
        for a in self.agents:
            i = self._index[a]
            rewards[a] = -total / n if self.reward_mode == "shared" else -float(costs[i])
            infos[a] = {"demand": int(demand[i]), "unmet": int(unmet[i]), "sent": int(sent[i]),
                        "received": int(received[i]), "ordered": int(orders[i]), "delivered": int(delivered[i]),
                        "refused": int(refused[i]), "cost": float(costs[i])}
        done = self._t >= self.max_cycles
        terms = {a: False for a in self.agents}
        truncs = {a: done for a in self.agents}
        obs = self._observations()
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    # --- centralized view, metrics, baseline ----------------------------------------------------
    def state(self) -> np.ndarray:
        blk = self._obs_block()
        lam = np.clip(self._lambda / self.capacity, 0.0, 1.0).astype(np.float32)
        return np.concatenate([blk.reshape(-1), lam])

    def metrics(self) -> dict[str, float]:
        """The episode so far (all warehouses): costs in dollars, units, rates."""
        t = self._tot
        total = t["stockout_cost"] + t["holding_cost"] + t["transfer_cost"]
        rate = t["unmet"] / t["demand"] if t["demand"] else 0.0
        return {"total_cost": total, "stockout_cost": t["stockout_cost"], "holding_cost": t["holding_cost"],
                "transfer_cost": t["transfer_cost"], "demand": float(t["demand"]), "unmet": float(t["unmet"]),
                "stockout_rate": rate, "fill_rate": 1.0 - rate, "units_transferred": float(t["units_transferred"]),
                "units_ordered": float(t["units_ordered"]), "units_refused": float(t["units_refused"]),
                "inventory_balance": t["balance"] / self._t if self._t else 0.0, "days": float(self._t)}

    def heuristic_action(self, agent: str, observation: np.ndarray) -> Any:
        """Base-stock (order-up-to) rule on the agent's own observation; no transfers."""
        o = np.asarray(observation, np.float64)
        c, L = float(self.capacity), self.lead_time
        inventory, pipeline, mu = o[0] * c, float(o[1:L].sum()) * c, o[L + 3] * c
        order = max(0.0, base_stock_level(mu, L) - inventory - pipeline)
        frac = min(1.0, order / self.max_order) if self.max_order else 0.0
        if not self.continuous:
            return int(np.ceil(frac * (self.order_levels - 1) - 1e-9))
        act = np.zeros(self.n, np.float32)
        act[0] = frac
        return act

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> RetailEnv:
    return RetailEnv(**kwargs)


env = parallel_env

"""supply_chain_v0: retailers, distributors and plants order stock up a multi-tier supply chain (seed 004).

Seed 004's supply chain environment: "multi-tier supply networks, demand forecasting, inventory
management, disruption simulation", trained with its supply chain curriculum: simple chain (2
suppliers, 3 products), medium complexity (4 suppliers, 6 products, disruptions), complex network (8
suppliers, 10 products, high variability); its demo runs 6 agents. Every tier holds stock of every
product it handles, orders from the tier above it and ships to the tier below; shipments take a lead
time; customer demand that cannot be served waits (backlog). Centralized training, decentralized
execution: an agent observes only its own node (and the shared point-of-sale forecast), ``state()``
holds every node's view, the true demand rates and the suppliers' outages.

| | |
|---|---|
| Agents (default 6) | ``retailer_i`` (``n_regions=2``): a region's store, serves its customers' demand; orders every product from ``distributor_i``. ``distributor_i``: the region's distribution centre, serves ``retailer_i``; orders product ``p`` from ``manufacturer_{p % n_plants}``. ``manufacturer_m`` (``n_plants=2``): plant ``m`` makes the products ``p % n_plants == m`` (its product line), serves every distributor; buys from the external suppliers (product ``p`` from supplier ``p % n_suppliers``). Suppliers are not agents: their number is the stage's. All agents act every step |
| Lead times (``LEAD_TIME``) | distributor -> retailer 1 step, plant -> distributor 2, supplier -> plant 3 (purchase and production; one bought unit makes one product unit). ``complex``: each supplier shipment takes 0-2 steps more (uniform) |
| Action (``continuous_actions=True``, default) | Box(0, 1, (10,)): order ``rint(a[p] * max_order)`` units of product ``p`` from the agent's upstream. Entries of products the stage does not use, and a plant's entries of products it does not make, are ignored. Clipped to [0, 1] |
| Action (``continuous_actions=False``) | Discrete(``order_levels``): order ``rint(k / (order_levels - 1) * 2 * forecast_p)`` of every product the agent handles, ``forecast_p`` the forecast of the demand reaching it (observation feature 5): between nothing and twice the forecast (a documented discretization for discrete-only learners) |
| Observation (local) | Box(0, 1, (84,)): role one-hot (retailer, distributor, manufacturer); then for each of the 10 product slots 8 values: on-hand stock, backlog it owes downstream (a retailer: its customers'), units in transit to it, units its upstream owes it (its unfilled orders), demand reaching it this step (a retailer: customer demand; above: the orders it received), the forecast of the next step's demand reaching it (retailer: its customers'; distributor: its retailer's customers'; plant: all customers' for the product: collaborative demand planning, the point-of-sale forecast is shared up the chain), the product's supplier up (1) or in an outage (0), the product handled by this agent in this stage (1/0); then the fraction of the episode elapsed. Quantities are divided by ``SCALE`` = 100 units and clipped to 1; a slot the agent does not handle is all zero |
| State (global) | Box(0, 1, (84 n + 10 n_regions + 8 + 3,)) = (535,) for 6 agents: every agent's observation in agent order, every region's true mean demand per product this step / ``SCALE``, every supplier's outage steps left / ``OUTAGE_SCALE``, the stage one-hot |
| Costs (``holding_cost``, ``backlog_cost``, ``ordering_cost``) | holding per unit on hand at the end of a step: retailer $0.50, distributor $0.40, plant $0.30 (value added downstream); backlog per unit owed at the end of a step: a customer's at the retailer $2.00 (stockout: goodwill), a tier's to the tier below $1.00 (Sterman's beer game); ordering: $0.50 per order line (a product ordered in a step), not billed for an order a supplier in an outage refuses |
| Rewards (``reward_mode="local"``) | each agent: minus its own costs of the step. ``reward_mode="shared"``: every agent gets ``-total_cost / n`` (team return = -total cost in both modes) |
| Episode end | none terminates; every agent is truncated after ``max_cycles`` steps |
| Stages (``STAGES``, ``set_stage``) | ``simple``: 2 suppliers, 3 products, Poisson demand, no disruptions, forecast error 10%. ``medium`` (default): 4 suppliers, 6 products, seasonal demand (+-20%), supplier outages (3% per supplier and step, 2-6 steps), forecast error 20%. ``complex``: 8 suppliers, 10 products, high variability: gamma-Poisson demand (variance m + m^2 / 2), seasonality +-30%, outages 5% for 3-8 steps, supplier lead times + 0-2 steps, forecast error 30%. Spaces are the same in every stage (sized for ``complex``) |
| Infos | per agent and step: ``cost``, ``holding``, ``backlog``, ``ordering``, ``ordered`` (units requested), ``shipped`` (units sent downstream or to customers), ``received``, ``refused`` (units refused by suppliers in an outage; plants only), ``demand`` and ``filled`` (customer units served from stock on arrival; retailers only) |
| Metrics | ``metrics()``: the episode so far: ``stage``, ``stage_index``, ``steps``, ``total_cost``, ``holding_cost``, ``backlog_cost``, ``ordering_cost``, ``customer_demand``, ``filled``, ``fill_rate`` (share of customer demand served from stock the step it arrives: the type-2 service level), ``customer_backlog`` (units waiting at the end), ``cost_to_serve`` ($ per unit of customer demand), ``cost_score`` (minus ``cost_to_serve``: the curriculum's higher-is-better form), ``bullwhip`` (= ``bullwhip_manufacturer``), ``bullwhip_retailer``, ``bullwhip_distributor``, ``bullwhip_manufacturer`` (variance of the tier's orders per step over the variance of customer demand per step, both summed over regions and products: Lee, Padmanabhan and Whang's ratio, > 1 = amplification), ``units_refused``, ``outage_steps`` (supplier-steps in an outage) |
| Arguments | ``stage="medium"``, ``n_regions=2``, ``n_plants=2``, ``max_cycles=52``, ``max_order=40``, ``reward_mode="local"``, ``continuous_actions=True``, ``order_levels=9`` |

Where seed 004 is silent, these choices are a domain expert's (none tuned to reach a number):

- A step is a week; 52 steps a year. Demand of region ``r`` for product ``p``: mean ``mu_rp ~
  Uniform(2, 6)`` units a step drawn per episode (hidden), times a seasonal factor ``1 + A sin(2 pi t /
  26 + phase_p)``; realized Poisson (``complex``: gamma-Poisson, shape 2). Unserved customer demand is
  backlogged (customers wait), served before new demand.
- The forecast is the true mean of the next step times a log-normal error (mean 1, sigma the stage's
  forecast error): informative, not exact.
- A step: (1) shipments due arrive; (2) retailers serve their customers' backlog, then this step's
  demand; (3) distributors, then plants, serve what the tier below is owed plus its new orders, each
  product rationed proportionally to the claims when short (largest remainders get the odd units),
  the rest owed (backorders); shipments leave with their lead time; (4) plants' orders go to the
  suppliers: a supplier in an outage refuses them (the plant must order again); (5) costs on the
  end-of-step positions; (6) outages start (each supplier up, with the stage's probability) or run
  down, so the status an agent observes holds for its next order.
- Each node starts in steady state: ``rint(m (L + 1))`` on hand and ``rint(m)`` in each of its ``L``
  pipeline slots, ``m`` its mean demand, ``L`` its lead time.
- Per-agent costs (each node's books); ``reward_mode="shared"`` (one company, one cost) is there for
  cooperative training. Bullwhip is measured on what was ordered (requested), the ordering signal
  itself, refused or not.

Confidential fields: none. Stock levels, orders and demand are aggregate quantities of anonymous
nodes and products; suppliers are indices, no customer, person or identifier is modelled, so the env
has no ``subject_fields()`` and runs without a key store.

The heuristic (``heuristic_action``) is a base-stock (order-up-to) rule on the agent's own
observation and the shared forecast: order ``S - IP`` with inventory position ``IP = on hand + in
transit + owed to it - owed by it`` and ``S = f (L + 1) + z sqrt(f (L + 1))``, ``f`` the forecast of
the demand reaching the node, ``L`` its nominal lead time, ``z`` the newsvendor quantile of its
critical ratio backlog / (backlog + holding) (retailer 2 / 2.5 -> z = 0.84; distributor 1 / 1.4,
plant 1 / 1.3); a plant whose supplier is in an outage orders nothing (it would be refused). With
discrete actions it picks the level nearest the forecast-weighted mean of order / (2 x forecast).
Seed 004 gives no rule of its own.

Curriculum (``CURRICULUM``): the criterion is ``cost_score`` (minus the cost per unit of customer
demand): the learners minimize cost, and a criterion on fill rate alone would promote a team that
over-stocks (random orders reach ~99% fill at fifty times the cost). A team is promoted when it runs
the chain within about 20% of what the base-stock rule costs at that stage (a planner's textbook
rule: $2.1, $2.8 and $6.7 per unit of demand at simple, medium and complex, continuous actions,
seeds 0-9), and regresses at about twice that.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

ENV_ID = "supply_chain_v0"
ENV_VERSION = "0"
REWARD_VERSION = 0

STAGES: tuple[str, ...] = ("simple", "medium", "complex")
DEFAULT_STAGE = "medium"
ROLES = ("retailer", "distributor", "manufacturer")
RETAILER, DISTRIBUTOR, MANUFACTURER = 0, 1, 2
MAX_PRODUCTS, MAX_SUPPLIERS = 10, 8
# lead time of each role's inbound shipments (from its upstream), steps
LEAD_TIME = (1, 2, 3)
MAX_JITTER = 2
PIPE_SLOTS = LEAD_TIME[MANUFACTURER] + MAX_JITTER
# $ per unit and step, by role; $ per order line
HOLDING = (0.5, 0.4, 0.3)
BACKLOG = (2.0, 1.0, 1.0)
ORDER_COST = 0.5
SCALE = 100.0
OUTAGE_SCALE = 10.0
FEATURES = 8
OBS_DIM = len(ROLES) + FEATURES * MAX_PRODUCTS + 1
DEMAND_LOW, DEMAND_HIGH = 2.0, 6.0
SEASON_PERIOD = 26
GAMMA_SHAPE = 2.0
REWARD_MODES = ("local", "shared")


@dataclass(frozen=True)
class Stage:
    suppliers: int
    products: int
    outage_p: float
    outage_steps: tuple[int, int]
    season: float
    forecast_error: float
    gamma_demand: bool
    jitter: int


STAGE_CONFIG = {
    "simple": Stage(2, 3, 0.0, (0, 0), 0.0, 0.10, False, 0),
    "medium": Stage(4, 6, 0.03, (2, 6), 0.2, 0.20, False, 0),
    "complex": Stage(8, 10, 0.05, (3, 8), 0.3, 0.30, True, MAX_JITTER),
}


# --- pure cost terms, rationing and metrics ----------------------------------------------------------
def _per_node(rates: tuple[float, ...], role: Any, units: Any) -> Any:
    out = np.asarray(rates)[np.asarray(role)] * np.sum(np.asarray(units, np.float64), axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def holding_cost(role: Any, units: Any) -> Any:
    """Holding cost of the ``units`` (per product, last axis) on hand at the end of a step at a node of
    ``role``; element-wise over an array of roles with one row of units each."""
    return _per_node(HOLDING, role, units)


def backlog_cost(role: Any, units: Any) -> Any:
    """Backlog cost of the ``units`` (per product, last axis) owed at the end of a step (a retailer:
    to its customers); element-wise over roles like ``holding_cost``."""
    return _per_node(BACKLOG, role, units)


def ordering_cost(orders: Any) -> Any:
    """$0.50 per order line: per product (last axis) with a positive order."""
    out = ORDER_COST * np.count_nonzero(np.asarray(orders) > 0, axis=-1)
    return float(out) if np.ndim(out) == 0 else out.astype(np.float64)


def ration(stock: Any, claims: Any) -> np.ndarray:
    """Ship ``min(stock, sum(claims))`` units split proportionally to the (integer) ``claims``, the odd
    units to the largest remainders (ties: the lower index): each claimant gets at most its claim.
    ``claims`` [k] with a scalar ``stock``, or [k, P] with ``stock`` [P] (one rationing per column)."""
    c = np.maximum(np.asarray(claims, np.int64), 0)
    c2 = c.reshape(c.shape[0], -1)
    s = np.broadcast_to(np.maximum(np.asarray(stock, np.int64), 0), c2.shape[1:])
    total = c2.sum(0)
    short = total > s
    exact = c2 * (s / np.where(total > 0, total, 1))
    out = np.where(short, np.floor(exact).astype(np.int64), c2)
    left = np.where(short, s - out.sum(0), 0)
    order = np.argsort(-(exact - np.floor(exact)), axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(c2.shape[0])[:, None], order.shape), axis=0)
    return (out + (rank < left)).reshape(c.shape)


def bullwhip(orders: Any, demand: Any) -> float:
    """Variance of an order series over the variance of the demand series (population variances, the
    same steps); 0.0 when demand does not vary (fewer than 2 steps, or constant)."""
    o, d = np.asarray(orders, np.float64), np.asarray(demand, np.float64)
    vd = float(d.var()) if d.size > 1 else 0.0
    return float(o.var()) / vd if vd > 0 else 0.0


def fill_rate(filled: float, demand: float) -> float:
    """Share of demand served from stock the step it arrived (1.0 when there was none)."""
    return float(filled) / float(demand) if demand else 1.0


def base_stock_level(forecast: Any, lead_time: int, z: float) -> Any:
    """Order-up-to level covering ``lead_time + 1`` steps of forecast demand plus ``z`` Poisson
    standard deviations of it; element-wise over an array of forecasts."""
    cover = np.maximum(0.0, np.asarray(forecast, np.float64)) * (lead_time + 1)
    out = cover + z * np.sqrt(cover)
    return float(out) if out.ndim == 0 else out


Z_ROLE = tuple(NormalDist().inv_cdf(b / (b + h)) for b, h in zip(BACKLOG, HOLDING))


class SupplyChainEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}
    stages = STAGES
    # per stage: promote / regress on cost_score (minus $ per unit of customer demand); see the docstring
    CURRICULUM: dict[str, dict] = {
        "simple": {"metric": "cost_score", "promote_at": -2.5, "regress_below": -4.5},
        "medium": {"metric": "cost_score", "promote_at": -3.5, "regress_below": -6.0},
        "complex": {"metric": "cost_score", "promote_at": -8.0, "regress_below": -14.0},
    }

    def __init__(self, stage: str = DEFAULT_STAGE, n_regions: int = 2, n_plants: int = 2, max_cycles: int = 52,
                 max_order: int = 40, reward_mode: str = "local", continuous_actions: bool = True,
                 order_levels: int = 9):
        self._check_stage(stage)
        if n_regions < 1 or n_plants < 1 or max_cycles < 1 or max_order < 1 or order_levels < 2:
            raise ValueError(f"supply_chain_v0 needs n_regions, n_plants, max_cycles, max_order >= 1 and order_levels "
                             f">= 2; got n_regions={n_regions}, n_plants={n_plants}, max_cycles={max_cycles}, "
                             f"max_order={max_order}, order_levels={order_levels}")
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"supply_chain_v0: reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        self.stage = self._next_stage = stage
        self.R, self.M = n_regions, n_plants
        self.n = 2 * n_regions + n_plants
        self.max_cycles, self.max_order = max_cycles, max_order
        self.reward_mode, self.continuous, self.order_levels = reward_mode, continuous_actions, order_levels
        self.possible_agents = ([f"retailer_{i}" for i in range(n_regions)]
                                + [f"distributor_{i}" for i in range(n_regions)]
                                + [f"manufacturer_{m}" for m in range(n_plants)])
        self._index = {a: j for j, a in enumerate(self.possible_agents)}
        self.role = np.array([RETAILER] * n_regions + [DISTRIBUTOR] * n_regions + [MANUFACTURER] * n_plants)
        self.agents: list[str] = []
        self._obs_space = spaces.Box(0.0, 1.0, (OBS_DIM,), np.float32)
        self._act_space = (spaces.Box(0.0, 1.0, (MAX_PRODUCTS,), np.float32) if continuous_actions
                           else spaces.Discrete(order_levels))
        self.state_space = spaces.Box(0.0, 1.0, (self.n * OBS_DIM + n_regions * MAX_PRODUCTS + MAX_SUPPLIERS
                                                 + len(STAGES),), np.float32)
        self._rng = np.random.default_rng()
        self._new_episode()

    @staticmethod
    def _check_stage(name: str) -> None:
        if name not in STAGES:
            raise ValueError(f"supply_chain_v0: unknown stage {name!r}; choose one of {', '.join(STAGES)}")

    def set_stage(self, name: str) -> None:
        """Use stage ``name`` from the next ``reset()`` on (``self.stage`` is the current episode's)."""
        self._check_stage(name)
        self._next_stage = name

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_space

    # --- network ------------------------------------------------------------------------------------
    def _handles(self) -> np.ndarray:
        """[n, MAX_PRODUCTS] 1 where the node handles the product in this stage."""
        h = np.zeros((self.n, MAX_PRODUCTS), bool)
        P = self.cfg.products
        h[:2 * self.R, :P] = True
        for m in range(self.M):
            h[2 * self.R + m, [p for p in range(P) if p % self.M == m]] = True
        return h

    def upstream(self, j: int, p: int) -> int:
        """The node that supplies node ``j`` with product ``p`` (-1: an external supplier)."""
        if self.role[j] == RETAILER:
            return self.R + j
        if self.role[j] == DISTRIBUTOR:
            return 2 * self.R + p % self.M
        return -1

    # --- episode state ------------------------------------------------------------------------------
    def _new_episode(self) -> None:
        self.stage = self._next_stage
        self.cfg = cfg = STAGE_CONFIG[self.stage]
        rng, R, n, P = self._rng, self.R, self.n, cfg.products
        self._handled = self._handles()
        self._mu = np.zeros((R, MAX_PRODUCTS))
        self._mu[:, :P] = rng.uniform(DEMAND_LOW, DEMAND_HIGH, (R, P))
        self._phase = rng.uniform(0.0, 2 * np.pi, MAX_PRODUCTS)
        self._t = 0
        # the mean demand reaching each node (steady state)
        node_mu = np.zeros((n, MAX_PRODUCTS))
        node_mu[:R] = self._mu
        node_mu[R:2 * R] = self._mu
        for m in range(self.M):
            node_mu[2 * R + m] = self._mu.sum(0) * self._handled[2 * R + m]
        self._inv = np.zeros((n, MAX_PRODUCTS), np.int64)
        self._pipe = np.zeros((n, MAX_PRODUCTS, PIPE_SLOTS), np.int64)
        for j in range(n):
            L = LEAD_TIME[self.role[j]]
            self._inv[j] = np.rint(node_mu[j] * (L + 1))
            self._pipe[j, :, :L] = np.rint(node_mu[j])[:, None]
        self._owed = np.zeros((n, MAX_PRODUCTS), np.int64)        # what node j's upstream owes it
        self._cust_backlog = np.zeros((R, MAX_PRODUCTS), np.int64)
        self._seen = np.zeros((n, MAX_PRODUCTS), np.int64)        # demand / orders that reached node j
        self._outage = np.zeros(MAX_SUPPLIERS, np.int64)          # steps left in an outage
        self._forecast = self._draw_forecast()
        self._tot = {k: 0.0 for k in ("holding", "backlog", "ordering", "demand", "filled", "refused", "outage")}
        self._series = {k: [] for k in ("demand", "retailer", "distributor", "manufacturer")}

    def _mean_demand(self, t: int) -> np.ndarray:
        """[R, MAX_PRODUCTS] the true mean customer demand of step ``t``."""
        return self._mu * (1.0 + self.cfg.season * np.sin(2 * np.pi * t / SEASON_PERIOD + self._phase))

    def _draw_forecast(self) -> np.ndarray:
        s = self.cfg.forecast_error
        noise = np.exp(s * self._rng.standard_normal(self._mu.shape) - s * s / 2)
        return self._mean_demand(self._t) * noise

    def _supplier_up(self) -> np.ndarray:
        """[MAX_PRODUCTS] 1 where the product's supplier is up (0 for products the stage does not use)."""
        up = np.zeros(MAX_PRODUCTS)
        P, S = self.cfg.products, self.cfg.suppliers
        up[:P] = [self._outage[p % S] == 0 for p in range(P)]
        return up

    def _node_forecast(self) -> np.ndarray:
        """[n, MAX_PRODUCTS] the forecast of next step's demand reaching each node (shared POS forecast)."""
        R = self.R
        f = np.zeros((self.n, MAX_PRODUCTS))
        f[:R] = self._forecast
        f[R:2 * R] = self._forecast
        f[2 * R:] = self._forecast.sum(0)[None, :]
        return f * self._handled

    def _owed_by(self) -> np.ndarray:
        """[n, MAX_PRODUCTS] what each node owes downstream (a retailer: its customers)."""
        R = self.R
        out = np.zeros((self.n, MAX_PRODUCTS), np.int64)
        out[:R] = self._cust_backlog
        out[R:2 * R] = self._owed[:R]
        for m in range(self.M):
            out[2 * R + m] = self._owed[R:2 * R].sum(0) * self._handled[2 * R + m]
        return out

    def _obs_block(self) -> np.ndarray:
        n = self.n
        feats = np.stack([self._inv / SCALE, self._owed_by() / SCALE, self._pipe.sum(2) / SCALE, self._owed / SCALE,
                          self._seen / SCALE, self._node_forecast() / SCALE,
                          np.broadcast_to(self._supplier_up(), (n, MAX_PRODUCTS)),
                          np.ones((n, MAX_PRODUCTS))], axis=2) * self._handled[:, :, None]
        onehot = np.eye(len(ROLES))[self.role]
        frac = np.full((n, 1), min(self._t, self.max_cycles) / self.max_cycles)
        blk = np.concatenate([onehot, feats.reshape(n, -1), frac], axis=1)
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
        """[n, MAX_PRODUCTS] orders in units; unhandled products and missing agents order nothing."""
        orders = np.zeros((self.n, MAX_PRODUCTS), np.int64)
        frac = np.zeros((self.n, MAX_PRODUCTS))
        fc = self._node_forecast()
        for a, act in actions.items():
            j = self._index.get(a)
            if j is None:
                continue
            if not self.continuous:
                k = int(np.clip(int(act), 0, self.order_levels - 1))
                orders[j] = np.rint(k / (self.order_levels - 1) * 2.0 * fc[j])
            else:
                x = np.asarray(act, np.float64).ravel()
                if x.shape[0] != MAX_PRODUCTS:
                    raise ValueError(f"supply_chain_v0: {a}'s action has {x.shape[0]} values; it needs "
                                     f"{MAX_PRODUCTS} (an order fraction per product slot)")
                frac[j] = x
        if self.continuous:  # NaN orders nothing; out of range is clipped
            orders = np.rint(np.clip(np.where(np.isnan(frac), 0.0, frac), 0.0, 1.0) * self.max_order).astype(np.int64)
        return orders * self._handled

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("supply_chain_v0: step() after the episode ended; call reset() first")
        cfg, rng, R, n = self.cfg, self._rng, self.R, self.n
        orders = self._decode(actions)
        shipped = np.zeros((n, MAX_PRODUCTS), np.int64)
        # (1) arrivals
        received = self._pipe[:, :, 0].copy()
        self._inv += received
        self._pipe = np.concatenate([self._pipe[:, :, 1:], np.zeros((n, MAX_PRODUCTS, 1), np.int64)], axis=2)
        # (2) customers: backlog first, then this step's demand
        mean = self._mean_demand(self._t)
        if cfg.gamma_demand:
            mean = mean * rng.gamma(GAMMA_SHAPE, 1.0 / GAMMA_SHAPE, mean.shape)
        demand = rng.poisson(mean).astype(np.int64) * self._handled[:R]
        on_hand = self._inv[:R]
        to_backlog = np.minimum(on_hand, self._cust_backlog)
        filled = np.minimum(on_hand - to_backlog, demand)
        self._inv[:R] -= to_backlog + filled
        self._cust_backlog = self._cust_backlog - to_backlog + demand - filled
        shipped[:R] = to_backlog + filled
        seen = np.zeros((n, MAX_PRODUCTS), np.int64)
        seen[:R] = demand
        # (3) distributors serve their retailer, then plants serve the distributors
        dist, plants = slice(R, 2 * R), slice(2 * R, n)
        claim = self._owed[:R] + orders[:R]
        ship = np.minimum(self._inv[dist], claim)
        self._inv[dist] -= ship
        self._owed[:R] = claim - ship
        self._pipe[:R, :, LEAD_TIME[RETAILER] - 1] += ship
        shipped[dist], seen[dist] = ship, orders[:R]
        claims = self._owed[dist] + orders[dist]                  # [R, P], product p claims on plant p % M
        plant_of = np.arange(MAX_PRODUCTS) % self.M
        stock = self._inv[2 * R + plant_of, np.arange(MAX_PRODUCTS)]
        ship = ration(stock, claims)
        self._inv[2 * R + plant_of, np.arange(MAX_PRODUCTS)] -= ship.sum(0)
        self._owed[dist] = claims - ship
        self._pipe[dist, :, LEAD_TIME[DISTRIBUTOR] - 1] += ship
        shipped[plants] = ship.sum(0) * self._handled[plants]
        seen[plants] = orders[dist].sum(0) * self._handled[plants]
        # (4) plants buy from the suppliers; one in an outage refuses the order
        up = self._supplier_up().astype(bool)
        buy = orders[plants]
        refused = np.zeros((n, MAX_PRODUCTS), np.int64)
        refused[plants] = buy * ~up
        accepted = orders - refused
        lead = np.full(buy.shape, LEAD_TIME[MANUFACTURER])
        if cfg.jitter:
            lead = lead + rng.integers(0, cfg.jitter + 1, buy.shape)
        m_idx, p_idx = np.nonzero(buy * up)
        np.add.at(self._pipe, (2 * R + m_idx, p_idx, lead[m_idx, p_idx] - 1), buy[m_idx, p_idx])
        self._seen = seen
        # (5) costs on the end-of-step positions
        owed_by = self._owed_by()
        hold = holding_cost(self.role, self._inv)
        back = backlog_cost(self.role, owed_by)
        ordc = ordering_cost(accepted)
        costs = hold + back + ordc
        # (6) outages start or run down; the next forecast
        S = cfg.suppliers
        running = self._outage[:S] > 0
        self._tot["outage"] += float(running.sum())
        self._outage[:S] = np.where(running, self._outage[:S] - 1, 0)
        if cfg.outage_p > 0:
            start = (~running) & (rng.random(S) < cfg.outage_p)
            lo, hi = cfg.outage_steps
            self._outage[:S] = np.where(start, rng.integers(lo, hi + 1, S), self._outage[:S])
        self._t += 1
        self._forecast = self._draw_forecast()
        # the episode's books
        tot = self._tot
        tot["holding"] += float(hold.sum())
        tot["backlog"] += float(back.sum())
        tot["ordering"] += float(ordc.sum())
        tot["demand"] += int(demand.sum())
        tot["filled"] += int(filled.sum())
        tot["refused"] += int(refused.sum())
        self._series["demand"].append(int(demand.sum()))
        for r, name in enumerate(ROLES):
            self._series[name].append(int(orders[self.role == r].sum()))
        total = float(costs.sum())
        rewards, infos = {}, {}
        per_node = np.stack([orders.sum(1), shipped.sum(1), received.sum(1), refused.sum(1)], axis=1).tolist()
        per_region = np.stack([demand.sum(1), filled.sum(1)], axis=1).tolist()
        for a in self.agents:
            j = self._index[a]
            rewards[a] = -total / n if self.reward_mode == "shared" else -float(costs[j])
            info = {"cost": float(costs[j]), "holding": float(hold[j]), "backlog": float(back[j]),
                    "ordering": float(ordc[j]), **dict(zip(("ordered", "shipped", "received", "refused"), per_node[j]))}
            if j < R:
                info.update(demand=per_region[j][0], filled=per_region[j][1])
            infos[a] = info
        done = self._t >= self.max_cycles
        terms = {a: False for a in self.agents}
        truncs = {a: done for a in self.agents}
        obs = self._observations()
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    # --- centralized view, metrics, baseline --------------------------------------------------------------
    def state(self) -> np.ndarray:
        mean = np.clip(self._mean_demand(self._t) / SCALE, 0.0, 1.0)
        outage = np.clip(self._outage / OUTAGE_SCALE, 0.0, 1.0)
        stage = np.eye(len(STAGES))[STAGES.index(self.stage)]
        return np.concatenate([self._obs_block().ravel(), mean.ravel(), outage, stage]).astype(np.float32)

    def state_flags(self) -> list[str]:
        """Episode metadata for env.state's ``flags``: ``stage:NAME``."""
        return [f"stage:{self.stage}"]

    def metrics(self) -> dict:
        """The episode so far (the whole chain): costs in dollars, units, rates, bullwhip ratios."""
        t, s = self._tot, self._series
        total = t["holding"] + t["backlog"] + t["ordering"]
        per_unit = total / t["demand"] if t["demand"] else 0.0
        bw = {name: bullwhip(s[name], s["demand"]) for name in ROLES}
        return {"stage": self.stage, "stage_index": STAGES.index(self.stage), "steps": float(self._t),
                "total_cost": total, "holding_cost": t["holding"], "backlog_cost": t["backlog"],
                "ordering_cost": t["ordering"], "customer_demand": t["demand"], "filled": t["filled"],
                "fill_rate": fill_rate(t["filled"], t["demand"]), "customer_backlog": float(self._cust_backlog.sum()),
                "cost_to_serve": per_unit, "cost_score": -per_unit, "bullwhip": bw["manufacturer"],
                **{f"bullwhip_{name}": bw[name] for name in ROLES},
                "units_refused": t["refused"], "outage_steps": t["outage"]}

    def heuristic_action(self, agent: str, observation: np.ndarray) -> Any:
        """Base-stock (order-up-to) rule on the agent's own observation and the shared forecast."""
        o = np.asarray(observation, np.float64)
        role = int(np.argmax(o[:len(ROLES)]))
        f = o[len(ROLES):len(ROLES) + FEATURES * MAX_PRODUCTS].reshape(MAX_PRODUCTS, FEATURES) * SCALE
        on_hand, owed_by, transit, owed_to, _, forecast = (f[:, k] for k in range(6))
        up, handled = f[:, 6] > 0, f[:, 7] > 0
        L = LEAD_TIME[role]
        level = base_stock_level(forecast, L, Z_ROLE[role])
        order = np.maximum(0.0, level - (on_hand + transit + owed_to - owed_by)) * handled
        if role == MANUFACTURER:
            order = order * up
        if not self.continuous:
            cover = 2.0 * forecast
            ratio = np.divide(order, cover, out=np.zeros(MAX_PRODUCTS), where=cover > 0)
            weights = np.where(handled, cover, 0.0)
            mean = float(np.average(ratio, weights=weights)) if weights.sum() > 0 else 0.0
            return int(np.clip(np.rint(mean * (self.order_levels - 1)), 0, self.order_levels - 1))
        return np.clip(order / self.max_order, 0.0, 1.0).astype(np.float32)

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> SupplyChainEnv:
    return SupplyChainEnv(**kwargs)


env = parallel_env

"""trading_v0: traders manage portfolios in a simulated market with volatility regimes (seed 004).

Seed 004's trading environment: several traders over several assets, "realistic market dynamics",
transaction costs, market impact and technical indicators, trained with its trading curriculum
(2 assets at low volatility, 5 medium, 8 high, 10 in a crisis, 15 with regime switching). The market
is simulated here, seeded, nothing downloaded: regime-dependent geometric Brownian motion with a
common factor, jumps and a slowly moving hidden drift per asset; the traders' net order flow moves
prices (linear impact in log price, part of it permanent). Centralized training, decentralized
execution: a trader sees the public indicators and its own book; ``state()`` holds every trader's
book, the hidden drifts and the regime.

| | |
|---|---|
| Agents | ``trader_0`` .. ``trader_{n-1}`` (``n_traders=4``), all act every trading day; each starts with ``initial_cash`` ($100,000, the seed's ``initial_balance``) and no positions |
| Assets | ``MAX_ASSETS = 15`` slots; the stage makes the first ``k`` of them trade (2 / 5 / 8 / 10 / 15), the rest have zero observations, zero state entries and ignored actions, so every space is the same at every stage |
| Action (``continuous_actions=True``, default) | Box(0, 1, (15,)): target portfolio weight of each asset slot; NaN is 0, values are clipped to [0, 1], inactive slots are set to 0, and the weights are divided by their sum when it exceeds 1 (``action_weights``); the rest of the portfolio is cash (long only, no leverage). A trade worth less than ``MIN_TRADE_WEIGHT`` (0.1%) of the portfolio is not sent (a minimum order size) |
| Action (``continuous_actions=False``) | Discrete(31): 0 hold; ``1 + i`` buys asset i for ``TRADE_STEP`` (10%) of the portfolio's value (at most the cash); ``16 + i`` sells asset i for 10% of the portfolio's value (at most the position); an inactive asset's buy or sell is a hold |
| Observation (local) | Box((124,)): per asset slot (8 values, 15 slots): active 0/1, 1-day log return / 0.1, 5-day log return / 0.2, 20-day log return / 0.4, price / 20-day simple moving average - 1 (/ 0.2), 20-day volatility of daily log returns (std, ddof 1) / 0.1, RSI(14) / 100 (simple averages of the last 14 gains and losses; 50 when flat), the trader's own weight in it; then cash weight, own value / initial - 1, own drawdown from its peak value, fraction of the episode elapsed; all clipped to [-1, 1] (returns, MA ratio, P&L) or [0, 1] |
| State (global) | Box((105 + 18 n + 20,)) = (197,) for n = 4: per asset slot its first 7 observation values (the public market), every trader's 15 weights, cash weight, P&L and drawdown, the hidden drifts / 0.01 (clipped to [-1, 1]), the regime one-hot (low, medium, high, crisis), fraction elapsed |
| Day (``step``) | (1) orders from the actions at the day's close ``p``; (2) net order flow ``F_i`` ($, all traders) moves the price: trades fill at ``p exp(impact F / depth)``, and the price after trading is ``p exp(permanent_impact impact F / depth)`` (``impact_prices``; ``depth``: the asset's daily traded value, ~ U($5M, $20M) per episode; ``impact = 0.1``: an order of 1% of a day's volume moves the fill 10 bps); (3) fees ``cost_bps`` (10 bps, the seed's 0.001) of the traded notional; buys that the cash cannot pay after fees and impact are scaled down (``settle``); (4) the market moves one day (``_market_day``); (5) books are marked at the new close |
| Reward (per trader, ``step_reward``) | ``100 (V_after - V_before) / initial_cash - risk_aversion (100 (V_after / V_before - 1))**2``: the day's change of its portfolio value (cash + positions at the close) in percent of its starting capital, net of fees and impact (they are in V_after); ``risk_aversion=0`` by default (a mean-variance penalty on the day's return when set) |
| Episode end | no termination; every trader is truncated after ``max_cycles`` trading days |
| Infos | per trader and day: ``value``, ``cash``, ``step_return``, ``fees``, ``impact_cost`` ($ paid over the post-trade price), ``traded`` ($ notional), ``turnover`` (traded / value before trading) |
| Metrics (``metrics()``) | the episode so far: ``return`` (value / initial - 1), ``max_drawdown``, ``sharpe`` (annualized: mean / std (ddof 1) of daily simple returns x sqrt(252), 0 when the std is 0), ``turnover`` (sum over days of bought + sold notional / value before trading; 1.0 = the portfolio traded once), each the mean over traders, and per trader as ``trader_*`` lists; ``excess_return`` (over ``market_return``, an equal-weight costless buy-and-hold of the active assets), ``fees``, ``impact_cost`` (all traders, $), ``crisis_days``, ``regime_switches``, ``assets``, ``steps``, ``stage``, ``stage_index`` |
| Stages (``STAGES``, ``set_stage``) | ``basic`` 2 assets, low volatility; ``multi_asset`` 5, medium; ``volatile`` 8, high; ``crisis`` 10, crisis; ``master`` 15, a Markov chain over the four regimes (``REGIME_TRANSITIONS``), starting from its stationary distribution. Default ``multi_asset``; ``set_stage`` takes effect at the next ``reset()``; ``state_flags()`` gives ``stage:NAME`` and ``regime:NAME`` on every env.state event |
| Arguments | ``n_traders=4``, ``stage="multi_asset"``, ``max_cycles=100``, ``initial_cash=100000``, ``cost_bps=10``, ``impact=0.1``, ``permanent_impact=0.5``, ``risk_aversion=0``, ``continuous_actions=True`` |

The market, per regime (``REGIMES``; daily figures, a step is one trading day, 252 a year):

| regime | volatility | factor correlation | expected return | jump probability / mean / sd |
|---|---|---|---|---|
| low | 0.6% | 0.2 | +0.04% | 0 |
| medium | 1.2% | 0.35 | +0.04% | 1% / -2% / 2% |
| high | 2.5% | 0.5 | +0.03% | 3% / -3% / 3% |
| crisis | 4.5% | 0.8 | -0.20% | 5% / -4% / 5% |

Asset i's log return: ``LOG_DRIFT + alpha_i - sigma_i**2 / 2 + sigma_i (sqrt(rho) z_market + sqrt(1 - rho)
z_i) + jump_i``, with ``sigma_i`` the regime's volatility times an asset multiplier ~ U(0.7, 1.3) drawn
per episode, and on a jump day (one market-wide draw) ``jump_i ~ N(mean, sd)`` for every asset. The
jumps are compensated (``LOG_DRIFT`` = expected return - probability x E[exp(jump) - 1]), so the
expected simple return is the table's: jumps fatten the left tail, the crisis alone loses. The hidden
drift ``alpha_i`` is AR(1), persistence 0.97 (a half-life of about 23 days), stationary sd 0.1
``sigma_i``: trends exist and are weak, so momentum indicators carry some information and most of a
day's move is noise. Prices start ~ U($20, $200); 20 days are simulated before the episode so every
indicator is defined at the first observation. Seed 004 gives no numbers; these are a domain
expert's, from market facts (US equities: ~10-20% annual volatility in calm markets, 60-80% in
2008, crash days clustering in crises), not fitted to any result.

Market impact (``impact_prices``): linear in log price, ``impact x F / depth``, the same for every
trader of the day (net flow: a buyer and a seller of the same asset cross without moving it, the
seed's ``market_impact_factor`` has no stated unit). Trades fill at the impacted price;
``permanent_impact`` (one half) of the move stays, the rest reverts at once, so a trader that pushes
the price pays the temporary part (its ``impact_cost``), and the permanent part moves every holder's
marked value (traders share one market). The impact is the submitted flow's: buys scaled down for
lack of cash do not move it again.

Curriculum (``CURRICULUM``): every stage is judged on ``sharpe`` (annualized, the mean over the
traders), the risk-adjusted return a desk is judged by; the manager averages it over a window of
episodes (one 100-day episode's Sharpe has a standard error of about 1.6). Promotion when the team
earns most of what the stage's market pays for its risk (``basic`` 0.5, ``multi_asset`` 0.3: a costless
buy-and-hold of the market expects about 1.4 and 0.8 there, before its trading costs and with each
episode's hidden drifts), when it no longer loses risk-adjusted in high volatility (``volatile`` 0.0:
the premium is small against the noise and the jumps), when it preserves capital while the market
falls (``crisis`` -0.1: a trader in cash scores 0, one that holds the market about -0.8), and 0.5 in
``master`` (mastery: it must time the regimes; holding the market gives about 0.55). A team regresses
when its windowed mean falls below -0.5 (``basic`` to ``volatile``, ``master``: losing money
risk-adjusted where the market rises on average; random trading scores -0.6 to -1.6) or below -1.0
in ``crisis`` (worse than riding the crash). Measured on seeds 0-59 (4 traders; heuristic / buy-and-hold
of all active assets / random): basic 0.48 / 0.87 / -1.59, multi_asset 0.47 / 0.43 / -0.86, volatile
0.02 / -0.05 / -0.57, crisis 0.00 / -0.81 / -1.06, master 0.84 / 0.55 / -0.59 (for reference; the
thresholds follow the reasoning above, and these numbers show each stage can be passed and failed).

Baselines: ``heuristic_action`` is a trend filter with inverse-volatility sizing and a rebalancing band
(what a systematic desk would run first), on the trader's own observation: each active asset has a
risk budget of ``TARGET_VOL / k`` (1% a day shared by the ``k`` active assets), so its weight is
``TARGET_VOL / k / vol_i`` while it is held; it is bought when its 20-day return is above ``ENTER_Z``
(0.5) standard deviations (``vol_i sqrt(20)``) and sold when it falls below ``EXIT_Z`` (-1.0)
(hysteresis through the trader's own weight: the gap between the two keeps noise from flipping the
position); the sum is capped at 100%; the book is rebalanced to that target only when some weight is
more than ``BAND`` (10 points) away from it, else kept (no trade). In a crisis the risk budget leaves
each asset about 2%, below the band: it stays in cash. The discrete variant buys or sells 10% of the
asset with the largest gap to that target, when the gap is more than 5 points. Four traders running
the same rule trade together and pay each other's impact. Random: ``producers.policies.RandomPolicy``.

Confidential fields: none go through the privacy layer. The traders are trading strategies (desks of
one firm), not natural persons: their cash, positions and P&L are business-confidential, which the
event's topic classification covers, but no field identifies or describes a data subject, so the env
has no ``subject_fields()`` and runs without a key store (as market_v0, whose wallets are agents').
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

ENV_ID = "trading_v0"
ENV_VERSION = "0"
REWARD_VERSION = 0

MAX_ASSETS = 15
STAGES: tuple[str, ...] = ("basic", "multi_asset", "volatile", "crisis", "master")
DEFAULT_STAGE = "multi_asset"
REGIMES = ("low", "medium", "high", "crisis")
SWITCHING = "switching"
# stage -> (active assets, regime or SWITCHING)
STAGE_MARKETS = {"basic": (2, "low"), "multi_asset": (5, "medium"), "volatile": (8, "high"),
                 "crisis": (10, "crisis"), "master": (15, SWITCHING)}

# per regime (low, medium, high, crisis), daily
VOL = np.array([0.006, 0.012, 0.025, 0.045])
CORR = np.array([0.2, 0.35, 0.5, 0.8])
EXPECTED_RETURN = np.array([0.0004, 0.0004, 0.0003, -0.002])  # E[simple daily return] before alpha
JUMP_P = np.array([0.0, 0.01, 0.03, 0.05])
JUMP_MEAN = np.array([0.0, -0.02, -0.03, -0.04])
JUMP_SD = np.array([0.0, 0.02, 0.03, 0.05])
# log-return drift before the volatility term: the jumps are compensated (Merton), so they fatten
# the left tail without changing the expected return
LOG_DRIFT = EXPECTED_RETURN - JUMP_P * np.expm1(JUMP_MEAN + JUMP_SD ** 2 / 2)
# master stage: P(regime tomorrow | regime today), rows and columns low, medium, high, crisis
REGIME_TRANSITIONS = np.array([[0.970, 0.025, 0.004, 0.001],
                               [0.015, 0.970, 0.012, 0.003],
                               [0.005, 0.025, 0.960, 0.010],
                               [0.000, 0.010, 0.030, 0.960]])
REGIME_STATIONARY = np.linalg.matrix_power(REGIME_TRANSITIONS, 4096)[0]
ALPHA_PERSISTENCE, ALPHA_SCALE = 0.97, 0.1
ASSET_VOL_RANGE = (0.7, 1.3)
PRICE_RANGE = (20.0, 200.0)
DEPTH_RANGE = (5e6, 2e7)
WINDOW, SHORT, RSI_WINDOW = 20, 5, 14
HISTORY = WINDOW + 1  # closes kept: 20 daily returns
TRADING_DAYS = 252
REWARD_SCALE = 100.0
MIN_TRADE_WEIGHT = 1e-3
TRADE_STEP = 0.1
N_DISCRETE = 1 + 2 * MAX_ASSETS
# heuristic: daily risk budget, rebalancing band, volatility floor, trend to enter / leave a position
# (20-day return in standard deviations) and the weight above which a position counts as held
TARGET_VOL, BAND, VOL_FLOOR = 0.01, 0.10, 1e-3
ENTER_Z, EXIT_Z, HELD = 0.5, -1.0, 0.01

# observation layout and scales
ASSET_FEATURES = 8
ACTIVE, R1, R5, R20, MA, VOLA, RSI, WEIGHT = range(ASSET_FEATURES)
SCALES = {R1: 0.1, R5: 0.2, R20: 0.4, MA: 0.2, VOLA: 0.1}
MARKET_FEATURES = 7  # ACTIVE .. RSI: public, the same for every trader
OBS_DIM = MAX_ASSETS * ASSET_FEATURES + 4
ALPHA_STATE_SCALE = 0.01
_ASSET_LOW = np.array([0, -1, -1, -1, -1, 0, 0, 0], np.float32)
_ASSET_HIGH = np.ones(ASSET_FEATURES, np.float32)
_GLOBAL_LOW = np.array([0, -1, 0, 0], np.float32)
OBS_LOW = np.concatenate([np.tile(_ASSET_LOW, MAX_ASSETS), _GLOBAL_LOW])
_BOOK_LOW = np.concatenate([np.zeros(MAX_ASSETS + 1), [-1.0, 0.0]])  # weights, cash weight, P&L, drawdown
OBS_HIGH = np.ones(OBS_DIM, np.float32)


def check_stage(name: str) -> str:
    if name not in STAGES:
        raise ValueError(f"trading_v0: stage {name!r} is not one of {', '.join(STAGES)}")
    return name


# --- pure market mechanics ---------------------------------------------------------------------
def action_weights(action: Any, n_active: int) -> np.ndarray:
    """Target weights from a continuous action: NaN -> 0, clipped to [0, 1], slots from ``n_active``
    on set to 0, divided by the sum when it exceeds 1 (the rest is cash)."""
    w = np.asarray(action, np.float64).ravel()
    w = np.minimum(np.maximum(np.where(w == w, w, 0.0), 0.0), 1.0)  # NaN -> 0, then [0, 1]
    w[n_active:] = 0.0
    total = w.sum()
    return w / total if total > 1.0 else w


def impact_prices(price: Any, net_flow: Any, depth: Any, impact: float, permanent: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(fill price, price after trading) per asset for a day's net order flow ``net_flow`` ($, buys
    positive): ``price exp(impact flow / depth)`` and ``price exp(permanent impact flow / depth)``."""
    p = np.asarray(price, np.float64)
    move = impact * np.asarray(net_flow, np.float64) / np.asarray(depth, np.float64)
    return p * np.exp(move), p * np.exp(permanent * move)


def settle(cash: Any, shares: Any, orders: Any, price: Any, cost_bps: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fill ``orders`` (shares, buys positive; [..., assets]) at ``price``, charging ``cost_bps`` of
    the notional bought and sold. Sells are capped at the position; a trader's buys are scaled down
    together when its cash plus the sales' proceeds (after fees) cannot pay them with their fees.
    Returns (cash, shares, fees $, traded notional $, filled orders), per trader."""
    cash = np.asarray(cash, np.float64)
    shares = np.asarray(shares, np.float64)
    orders = np.asarray(orders, np.float64)
    price = np.asarray(price, np.float64)
    rate = cost_bps / 1e4
    sells = np.minimum(np.maximum(-orders, 0.0), shares)
    buys = np.maximum(orders, 0.0)
    sold = (sells * price).sum(-1)
    need = (buys * price).sum(-1) * (1.0 + rate)
    available = cash + sold * (1.0 - rate)
    scale = np.where(need > available, available / np.where(need > 0, need, 1.0), 1.0)
    buys = buys * np.asarray(scale)[..., None]
    bought = (buys * price).sum(-1)
    fees = rate * (bought + sold)
    new_cash = np.maximum(cash + sold - bought - fees, 0.0)
    return new_cash, shares + buys - sells, fees, bought + sold, buys - sells


def portfolio_value(cash: Any, shares: Any, price: Any) -> np.ndarray:
    """Cash plus positions at ``price``, per trader."""
    return np.asarray(cash, np.float64) + np.asarray(shares, np.float64) @ np.asarray(price, np.float64)


def step_reward(value_before: Any, value_after: Any, initial: float, risk_aversion: float = 0.0) -> Any:
    """``100 (after - before) / initial - risk_aversion (100 (after / before - 1))**2``, element-wise."""
    before, after = np.asarray(value_before, np.float64), np.asarray(value_after, np.float64)
    pct = REWARD_SCALE * (after / before - 1.0)
    return REWARD_SCALE * (after - before) / initial - risk_aversion * pct ** 2


# --- technical indicators (pure) -----------------------------------------------------------------
def rsi(closes: Any, window: int = RSI_WINDOW) -> np.ndarray:
    """Relative strength index over the last ``window`` price changes of each row, with simple
    averages (Cutler's RSI): ``100 gains / (gains + losses)``; 50 when the price did not move."""
    d = np.diff(np.asarray(closes, np.float64)[..., -(window + 1):], axis=-1)
    gains, losses = np.maximum(d, 0.0).mean(-1), np.maximum(-d, 0.0).mean(-1)
    total = gains + losses
    return np.where(total > 0, 100.0 * gains / np.where(total > 0, total, 1.0), 50.0)


def indicators(closes: Any) -> np.ndarray:
    """[assets, 6] from closes [assets, >= 21] (oldest first): 1-, 5- and 20-day log returns, price /
    20-day simple moving average - 1, 20-day volatility (std of daily log returns, ddof 1), RSI(14)."""
    c = np.asarray(closes, np.float64)
    logp = np.log(c)
    daily = np.diff(logp[..., -HISTORY:], axis=-1)
    return np.stack([logp[..., -1] - logp[..., -2], logp[..., -1] - logp[..., -1 - SHORT],
                     logp[..., -1] - logp[..., -1 - WINDOW], c[..., -1] / c[..., -WINDOW:].mean(-1) - 1.0,
                     daily.std(-1, ddof=1), rsi(c)], axis=-1)


# --- episode metrics (pure) ----------------------------------------------------------------------
def total_return(values: Sequence[float]) -> float:
    """Last value / first value - 1."""
    v = np.asarray(values, np.float64)
    return float(v[-1] / v[0] - 1.0) if len(v) else 0.0


def max_drawdown(values: Sequence[float]) -> float:
    """Largest fall from a running peak, as a fraction of the peak (0 for a series that never falls)."""
    v = np.asarray(values, np.float64)
    if not len(v):
        return 0.0
    peak = np.maximum.accumulate(v)
    return float(((peak - v) / peak).max())


def sharpe_ratio(values: Sequence[float], periods_per_year: int = TRADING_DAYS) -> float:
    """Annualized Sharpe ratio of a value series (risk-free rate 0): mean / std (ddof 1) of its
    per-step simple returns x sqrt(periods_per_year); 0 with fewer than two returns or no variation."""
    v = np.asarray(values, np.float64)
    if len(v) < 3:
        return 0.0
    r = v[1:] / v[:-1] - 1.0
    sd = r.std(ddof=1)
    return float(r.mean() / sd * np.sqrt(periods_per_year)) if sd > 1e-12 else 0.0


def turnover(traded: Sequence[float], values_before: Sequence[float]) -> float:
    """Sum over steps of notional traded (bought + sold) / portfolio value before trading."""
    t, v = np.asarray(traded, np.float64), np.asarray(values_before, np.float64)
    return float((t / v).sum()) if len(t) else 0.0


# --- the heuristic (pure, on one observation) ----------------------------------------------------
def heuristic_weights(observation: Any) -> np.ndarray:
    """Trend filter with inverse-volatility sizing and a rebalancing band (see the module docstring):
    the target weights, or the current ones when every gap is within ``BAND``."""
    o = np.asarray(observation, np.float64)
    blk = o[:MAX_ASSETS * ASSET_FEATURES].reshape(MAX_ASSETS, ASSET_FEATURES)
    active = blk[:, ACTIVE] > 0.5
    current = blk[:, WEIGHT] * active
    vol = np.maximum(blk[:, VOLA] * SCALES[VOLA], VOL_FLOOR)
    trend = blk[:, R20] * SCALES[R20] / (vol * np.sqrt(WINDOW))  # the 20-day return in standard deviations
    keep = active & np.where(current > HELD, trend > EXIT_Z, trend > ENTER_Z)
    target = np.zeros(MAX_ASSETS)
    k = int(active.sum())
    if k:
        target[keep] = TARGET_VOL / k / vol[keep]
    total = target.sum()
    if total > 1.0:
        target /= total
    return current if np.abs(target - current).max() <= BAND else target


class TradingEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}
    stages = STAGES
    CURRICULUM: dict[str, dict] = {
        "basic": {"metric": "sharpe", "promote_at": 0.5, "regress_below": -0.5},
        "multi_asset": {"metric": "sharpe", "promote_at": 0.3, "regress_below": -0.5},
        "volatile": {"metric": "sharpe", "promote_at": 0.0, "regress_below": -0.5},
        "crisis": {"metric": "sharpe", "promote_at": -0.1, "regress_below": -1.0},
        "master": {"metric": "sharpe", "promote_at": 0.5, "regress_below": -0.5},
    }

    def __init__(self, n_traders: int = 4, stage: str = DEFAULT_STAGE, max_cycles: int = 100,
                 initial_cash: float = 100_000.0, cost_bps: float = 10.0, impact: float = 0.1,
                 permanent_impact: float = 0.5, risk_aversion: float = 0.0, continuous_actions: bool = True):
        if (int(n_traders) < 1 or int(max_cycles) < 1 or not initial_cash > 0 or not cost_bps >= 0
                or not impact >= 0 or not 0.0 <= permanent_impact <= 1.0 or not risk_aversion >= 0):
            raise ValueError(
                f"trading_v0 needs n_traders, max_cycles >= 1, initial_cash > 0, cost_bps, impact, risk_aversion >= 0 "
                f"and 0 <= permanent_impact <= 1; got n_traders={n_traders}, max_cycles={max_cycles}, "
                f"initial_cash={initial_cash}, cost_bps={cost_bps}, impact={impact}, "
                f"permanent_impact={permanent_impact}, risk_aversion={risk_aversion}")
        self.n, self.max_cycles = int(n_traders), int(max_cycles)
        self.initial_cash, self.cost_bps = float(initial_cash), float(cost_bps)
        self.impact, self.permanent_impact = float(impact), float(permanent_impact)
        self.risk_aversion, self.continuous = float(risk_aversion), bool(continuous_actions)
        self.stage = check_stage(stage)
        self._next_stage = self.stage
        self.possible_agents = [f"trader_{i}" for i in range(self.n)]
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        self.agents: list[str] = []
        self._obs_space = spaces.Box(OBS_LOW, OBS_HIGH, dtype=np.float32)
        self._act_space = (spaces.Box(0.0, 1.0, (MAX_ASSETS,), np.float32) if self.continuous
                           else spaces.Discrete(N_DISCRETE))
        market_low = np.tile(_ASSET_LOW[:MARKET_FEATURES], MAX_ASSETS)
        book_low = np.tile(_BOOK_LOW, self.n)
        low = np.concatenate([market_low, book_low, -np.ones(MAX_ASSETS), np.zeros(len(REGIMES) + 1)])
        self.state_space = spaces.Box(low.astype(np.float32), np.ones_like(low, np.float32), dtype=np.float32)
        self._rng = np.random.default_rng()
        self._new_episode()

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_space

    # --- stages ----------------------------------------------------------------------------------
    def set_stage(self, name: str) -> None:
        """Play stage ``name`` from the next ``reset()`` on."""
        self._next_stage = check_stage(name)

    # --- the market --------------------------------------------------------------------------------
    def _new_episode(self) -> None:
        rng = self._rng
        self.stage = self._next_stage
        self._switches = 0
        self._m, regime = STAGE_MARKETS[self.stage]
        self._switching = regime == SWITCHING
        self._regime = int(rng.choice(len(REGIMES), p=REGIME_STATIONARY)) if self._switching \
            else REGIMES.index(regime)
        m = self._m
        self._vol_mult = np.zeros(MAX_ASSETS)
        self._vol_mult[:m] = rng.uniform(*ASSET_VOL_RANGE, m)
        self._depth = np.ones(MAX_ASSETS)
        self._depth[:m] = rng.uniform(*DEPTH_RANGE, m)
        self._alpha = np.zeros(MAX_ASSETS)
        self._alpha[:m] = ALPHA_SCALE * VOL[self._regime] * self._vol_mult[:m] * rng.standard_normal(m)
        self._closes = np.ones((MAX_ASSETS, HISTORY))
        self._closes[:m, -1] = rng.uniform(*PRICE_RANGE, m)
        for _ in range(HISTORY - 1):  # the indicators' history, before the episode
            close = self._closes[:, -1] * np.exp(self._market_day())
            self._closes = np.concatenate([self._closes[:, 1:], close[:, None]], axis=1)
        self._start_prices = self._closes[:, -1].copy()
        n = self.n
        self._cash = np.full(n, self.initial_cash)
        self._shares = np.zeros((n, MAX_ASSETS))
        self._values = [self._cash.copy()]
        self._peak = self._cash.copy()
        self._traded: list[np.ndarray] = []
        self._before: list[np.ndarray] = []
        self._fees = np.zeros(n)
        self._impact_cost = np.zeros(n)
        self._regime_days = np.zeros(len(REGIMES), np.int64)
        self._switches = 0  # counted from the episode's first day (not the history before it)
        self._t = 0
        self._market = self._market_block()

    def _market_day(self) -> np.ndarray:
        """One day of the market: the regime moves (master stage), then every active asset's log
        return is drawn; the hidden drifts move. Zeros for inactive slots."""
        rng, m = self._rng, self._m
        if self._switching:
            new = int(rng.choice(len(REGIMES), p=REGIME_TRANSITIONS[self._regime]))
            self._switches += new != self._regime
            self._regime = new
        g = self._regime
        sigma = VOL[g] * self._vol_mult[:m]
        eps = np.sqrt(CORR[g]) * rng.standard_normal() + np.sqrt(1.0 - CORR[g]) * rng.standard_normal(m)
        jump_day = rng.random() < JUMP_P[g]
        jumps = JUMP_MEAN[g] + JUMP_SD[g] * rng.standard_normal(m)
        r = np.zeros(MAX_ASSETS)
        r[:m] = LOG_DRIFT[g] + self._alpha[:m] - 0.5 * sigma ** 2 + sigma * eps + (jumps if jump_day else 0.0)
        self._alpha[:m] = ALPHA_PERSISTENCE * self._alpha[:m] \
            + np.sqrt(1.0 - ALPHA_PERSISTENCE ** 2) * ALPHA_SCALE * sigma * rng.standard_normal(m)
        return r

    def _market_block(self) -> np.ndarray:
        """[MAX_ASSETS, 7]: active flag and the scaled indicators; zeros for inactive slots."""
        blk = np.zeros((MAX_ASSETS, MARKET_FEATURES))
        m = self._m
        ind = indicators(self._closes[:m])
        blk[:m, ACTIVE] = 1.0
        for j, col in enumerate((R1, R5, R20, MA, VOLA)):
            blk[:m, col] = ind[:, j] / SCALES[col]
        blk[:m, RSI] = ind[:, 5] / 100.0
        blk[:, R1:MA + 1] = np.clip(blk[:, R1:MA + 1], -1.0, 1.0)
        blk[:, VOLA] = np.clip(blk[:, VOLA], 0.0, 1.0)
        return blk

    def _books(self) -> np.ndarray:
        """[n, 18]: each trader's 15 weights, cash weight, P&L (value / initial - 1) and drawdown."""
        value = self._values[-1]
        v = np.maximum(value, 1e-9)[:, None]
        weights = self._shares * self._closes[:, -1] / v
        pnl = np.clip(value / self.initial_cash - 1.0, -1.0, 1.0)
        dd = 1.0 - value / self._peak
        book = np.concatenate([weights, self._cash[:, None] / v, pnl[:, None], dd[:, None]], axis=1)
        return np.minimum(np.maximum(book, _BOOK_LOW), 1.0)

    def _observations(self) -> dict[str, np.ndarray]:
        books, n = self._books(), self.n
        blk = np.concatenate([np.broadcast_to(self._market, (n, MAX_ASSETS, MARKET_FEATURES)),
                              books[:, :MAX_ASSETS, None]], axis=2).reshape(n, -1)
        obs = np.concatenate([blk, books[:, MAX_ASSETS:], np.full((n, 1), self._t / self.max_cycles)],
                             axis=1).astype(np.float32)
        return {a: obs[self._index[a]] for a in self.agents}

    # --- ParallelEnv --------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._new_episode()
        self.agents = list(self.possible_agents)
        return self._observations(), {a: {} for a in self.agents}

    def _orders(self, actions: dict[str, Any], price: np.ndarray, value: np.ndarray) -> np.ndarray:
        """[n, MAX_ASSETS] orders in shares (buys positive); a missing trader holds."""
        orders = np.zeros((self.n, MAX_ASSETS))
        m = self._m
        for a, act in actions.items():
            if a not in self._index:
                continue
            i = self._index[a]
            if not self.continuous:
                k = int(act)
                if not 0 <= k < N_DISCRETE:
                    raise ValueError(f"trading_v0: action {act!r} of {a} is not in 0..{N_DISCRETE - 1} "
                                     f"(0 hold, 1..15 buy asset 0..14, 16..30 sell asset 0..14)")
                asset = (k - 1) % MAX_ASSETS
                if k == 0 or asset >= m:
                    continue
                size = TRADE_STEP * value[i] / price[asset]
                orders[i, asset] = size if k <= MAX_ASSETS else -min(size, self._shares[i, asset])
                continue
            x = np.asarray(act, np.float64).ravel()
            if x.shape[0] != MAX_ASSETS:
                raise ValueError(f"trading_v0: {a}'s action has {x.shape[0]} values; it needs {MAX_ASSETS} "
                                 f"(a target weight per asset slot, inactive slots ignored)")
            target = action_weights(x, m) * value[i] / price
            order = target - self._shares[i]
            order[np.abs(order) * price < MIN_TRADE_WEIGHT * value[i]] = 0.0
            orders[i] = order
        return orders

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("trading_v0: step() after the episode ended; call reset() first")
        price = self._closes[:, -1]
        before = portfolio_value(self._cash, self._shares, price)
        orders = self._orders(actions, price, before)
        flow = orders.sum(0) * price
        fill, after_trade = impact_prices(price, flow, self._depth, self.impact, self.permanent_impact)
        self._cash, self._shares, fees, traded, filled = settle(self._cash, self._shares, orders, fill, self.cost_bps)
        impact_cost = (filled * (fill - after_trade)).sum(1)
        close = after_trade * np.exp(self._market_day())
        self._closes = np.concatenate([self._closes[:, 1:], close[:, None]], axis=1)
        self._regime_days[self._regime] += 1
        value = portfolio_value(self._cash, self._shares, close)
        rewards = step_reward(before, value, self.initial_cash, self.risk_aversion)
        self._values.append(value)
        self._peak = np.maximum(self._peak, value)
        self._traded.append(traded)
        self._before.append(before)
        self._fees += fees
        self._impact_cost += impact_cost
        self._t += 1
        self._market = self._market_block()
        done = self._t >= self.max_cycles
        out_rew, infos = {}, {}
        for a in self.agents:
            i = self._index[a]
            out_rew[a] = float(rewards[i])
            infos[a] = {"value": float(value[i]), "cash": float(self._cash[i]),
                        "step_return": float(value[i] / before[i] - 1.0), "fees": float(fees[i]),
                        "impact_cost": float(impact_cost[i]), "traded": float(traded[i]),
                        "turnover": float(traded[i] / before[i])}
        obs = self._observations()
        terms = {a: False for a in self.agents}
        truncs = {a: done for a in self.agents}
        if done:
            self.agents = []
        return obs, out_rew, terms, truncs, infos

    # --- centralized view, metrics, baseline ----------------------------------------------------
    def state(self) -> np.ndarray:
        regime = np.zeros(len(REGIMES))
        regime[self._regime] = 1.0
        alpha = np.clip(self._alpha / ALPHA_STATE_SCALE, -1.0, 1.0)
        s = np.concatenate([self._market.ravel(), self._books().ravel(), alpha, regime,
                            [min(self._t, self.max_cycles) / self.max_cycles]])
        return s.astype(np.float32)

    def state_flags(self) -> list[str]:
        """Episode metadata for env.state's ``flags``: ``stage:NAME`` and today's ``regime:NAME``."""
        return [f"stage:{self.stage}", f"regime:{REGIMES[self._regime]}"]

    def metrics(self) -> dict:
        """The episode so far: team means of return, max drawdown, Sharpe and turnover, the same per
        trader, costs in dollars, the market benchmark and the regimes seen (see the module docstring)."""
        values = np.stack(self._values, axis=1)  # [n, steps + 1]
        rets = [total_return(v) for v in values]
        dds = [max_drawdown(v) for v in values]
        sharpes = [sharpe_ratio(v) for v in values]
        if self._traded:
            traded, before = np.stack(self._traded, axis=1), np.stack(self._before, axis=1)
            turns = [turnover(t, b) for t, b in zip(traded, before)]
        else:
            turns = [0.0] * self.n
        m = self._m
        market = float(np.mean(self._closes[:m, -1] / self._start_prices[:m]) - 1.0)
        return {"stage": self.stage, "stage_index": STAGES.index(self.stage), "assets": m, "steps": self._t,
                "return": float(np.mean(rets)), "max_drawdown": float(np.mean(dds)),
                "sharpe": float(np.mean(sharpes)), "turnover": float(np.mean(turns)),
                "market_return": market, "excess_return": float(np.mean(rets)) - market,
                "fees": float(self._fees.sum()), "impact_cost": float(self._impact_cost.sum()),
                "crisis_days": int(self._regime_days[REGIMES.index("crisis")]), "regime_switches": int(self._switches),
                "trader_return": rets, "trader_max_drawdown": dds, "trader_sharpe": sharpes, "trader_turnover": turns}

    def heuristic_action(self, agent: str, observation: np.ndarray) -> Any:
        """Trend filter with inverse-volatility sizing and a 10-point rebalancing band
        (``heuristic_weights``); discrete: buy or sell 10% of the asset furthest from that target,
        when more than 5 points away."""
        target = heuristic_weights(observation)
        if self.continuous:
            return target.astype(np.float32)
        blk = np.asarray(observation, np.float64)[:MAX_ASSETS * ASSET_FEATURES].reshape(MAX_ASSETS, ASSET_FEATURES)
        gap = target - blk[:, WEIGHT] * (blk[:, ACTIVE] > 0.5)
        i = int(np.argmax(np.abs(gap)))
        if abs(gap[i]) <= TRADE_STEP / 2:
            return 0
        return 1 + i if gap[i] > 0 else 1 + MAX_ASSETS + i

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> TradingEnv:
    return TradingEnv(**kwargs)


env = parallel_env

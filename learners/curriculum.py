"""Curriculum learning (seed 004): named stages of an env's difficulty, a sliding window of each
episode's success metric, automatic promotion, regression of a struggling team, and trend analysis.

An env that has stages (seed 004's ``trading_v0``, ``supply_chain_v0``, ``resource_allocation_v0``;
the convention: ``STAGES`` easiest -> hardest, ``set_stage(name)`` from the next ``reset()``,
``metrics()`` with ``"stage"``) declares per stage what success means in its ``CURRICULUM`` class
attribute: ``{"metric": a key of metrics() where higher is better, "promote_at": x, "regress_below": y}``.
``Curriculum`` reads that, never the env: the wiring (``marlgrc.curriculum_wiring``) sets the env's
stage before each batch and feeds each finished episode's metrics (its ``episode.summary``) to
``observe``.

The rule (``CurriculumConfig``; every number is the config's):

- The window holds the metric of the last ``window`` episodes played at the current stage. A stage
  change empties it: an episode of another stage says nothing about this one. An episode whose
  metrics name another stage (``"stage"``, e.g. the rest of a batch under way when the stage
  changed) is not counted.
- No decision before ``min_episodes`` episodes at the current stage.
- The trend is the least-squares slope of the window's values against their position (metric units
  per episode) and its t statistic, slope / standard error (n - 2 degrees of freedom): ``falling``
  when t <= -``trend_t``, ``rising`` when t >= ``trend_t``, else ``flat``. A t test rather than the
  slope's sign: noise alone makes half the slopes of a plateau negative.
- **Promote** to the next stage when the window's mean >= the stage's ``promote_at`` and the trend is
  not ``falling`` (a team whose success is slipping away is not moved on). Never past the last stage.
- **Regress** to the previous stage when the window's mean < the stage's ``regress_below`` and the
  trend is not ``rising`` (a team below the bar that is clearly recovering is given the time to).
  Never below the first stage.

``observe`` returns a ``Decision`` (from, to, reason, the window's stats and episodes) when the stage
changes, else None; the wiring writes it as a ``curriculum.stage`` event (``stage_change_payload``,
``emit_stage_change``) on ``{run}:curriculum`` (topic ``marl.policy.update``, beside the policy chain
whose updates it explains). Pure and deterministic: the same metrics give the same decisions.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

from eventlog.chain import Event
from eventlog.log import EventLog

RULE_VERSION = "curriculum.v1"
"""The rule above; written as the event's ``rule_version``."""

PROMOTED, REGRESSED = "promoted", "regressed"
RISING, FLAT, FALLING = "rising", "flat", "falling"
CRITERION_KEYS = ("metric", "promote_at", "regress_below")


@dataclass(frozen=True)
class CurriculumConfig:
    window: int = 20
    """episodes in the sliding window (the last ones played at the current stage)"""
    min_episodes: int = 20
    """episodes at a stage before any decision there (at most ``window``; 3 or more: a trend needs 3 points)"""
    trend_t: float = 2.0
    """|t| of the window's least-squares slope at which the trend counts as rising or falling (about 95%)"""

    def __post_init__(self) -> None:
        if self.window < 3 or not 3 <= self.min_episodes <= self.window:
            raise ValueError(f"curriculum window {self.window} and min_episodes {self.min_episodes}: need "
                             f"3 <= min_episodes <= window (a trend needs at least 3 episodes)")
        if not self.trend_t > 0:
            raise ValueError(f"curriculum trend_t must be > 0, got {self.trend_t}")


@dataclass(frozen=True)
class Criterion:
    """A stage's success criteria: the metric (higher is better) and its two thresholds."""

    metric: str
    promote_at: float
    regress_below: float


@dataclass(frozen=True)
class WindowStats:
    """The window's metric values, summarized: ``std`` is the sample standard deviation (ddof 1),
    ``slope`` the least-squares slope per episode, ``slope_t`` its t statistic (±inf when the values
    lie exactly on a sloped line, 0 for a constant window), ``trend`` what the rule reads from it."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    slope: float
    slope_t: float
    trend: str


@dataclass(frozen=True)
class Decision:
    """A stage change: ``from_stage`` -> ``to_stage`` for ``reason`` (``promoted`` | ``regressed``),
    judged on ``metric`` against ``threshold`` (the from-stage's ``promote_at`` or ``regress_below``).
    ``episodes``, ``values`` and ``sources`` are the window's, oldest first (``sources``: whatever the
    caller passed along with each episode, e.g. its episode.summary hash); ``stage_episodes``: episodes
    counted at ``from_stage`` before the change."""

    from_stage: str
    to_stage: str
    from_index: int
    to_index: int
    reason: str
    metric: str
    threshold: float
    stats: WindowStats
    episodes: tuple[int, ...]
    values: tuple[float, ...]
    stage_episodes: int
    sources: tuple[Any, ...] = ()


def trend_of(values: Sequence[float], trend_t: float) -> tuple[float, float, str]:
    """(slope, t, trend) of ``values`` against their positions 0..n-1 by least squares (n >= 3)."""
    n = len(values)
    if n < 3:
        raise ValueError(f"a trend needs at least 3 values, got {n}")
    xm = (n - 1) / 2
    ym = math.fsum(values) / n
    sxx = math.fsum((i - xm) ** 2 for i in range(n))
    sxy = math.fsum((i - xm) * (y - ym) for i, y in enumerate(values))
    slope = sxy / sxx
    sse = math.fsum((y - ym - slope * (i - xm)) ** 2 for i, y in enumerate(values))
    se = math.sqrt(max(sse, 0.0) / (n - 2) / sxx)
    if se > 0:
        t = slope / se
    else:  # exactly on a line: a constant window has no trend, any other a certain one
        t = 0.0 if slope == 0 else math.copysign(math.inf, slope)
    trend = FALLING if t <= -trend_t else RISING if t >= trend_t else FLAT
    return slope, t, trend


def window_stats(values: Sequence[float], trend_t: float) -> WindowStats:
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    slope, t, trend = trend_of(values, trend_t)
    return WindowStats(n, mean, std, min(values), max(values), slope, t, trend)


def criteria_of(stages: Sequence[str], curriculum: Mapping[str, Mapping[str, Any]]) -> dict[str, Criterion]:
    """Each stage's ``Criterion`` from an env's ``CURRICULUM``; a ``ValueError`` naming what is missing."""
    out = {}
    for s in stages:
        c = curriculum.get(s)
        if c is None or any(k not in c for k in CRITERION_KEYS):
            raise ValueError(f"curriculum criteria for stage {s!r} need {', '.join(CRITERION_KEYS)}; got "
                             f"{dict(c) if c is not None else 'nothing'}")
        crit = Criterion(str(c["metric"]), float(c["promote_at"]), float(c["regress_below"]))
        if not (math.isfinite(crit.promote_at) and math.isfinite(crit.regress_below)):
            raise ValueError(f"curriculum criteria for stage {s!r}: thresholds must be finite numbers, got {dict(c)}")
        if crit.regress_below > crit.promote_at:
            raise ValueError(f"curriculum criteria for stage {s!r}: regress_below {crit.regress_below} is above "
                             f"promote_at {crit.promote_at}; a team cannot be both promoted and regressed")
        out[s] = crit
    return out


class Curriculum:
    """Stages easiest -> hardest, their criteria, and the sliding window (see the module docstring).

    ``stages``: names in order; ``criteria``: stage -> ``{"metric", "promote_at", "regress_below"}``
    (an env's ``CURRICULUM``); ``start``: the first stage played (default: the easiest).
    ``history`` keeps every ``Decision``; ``highest`` is the hardest stage reached so far.
    """

    def __init__(self, stages: Sequence[str], criteria: Mapping[str, Mapping[str, Any]],
                 config: CurriculumConfig | None = None, *, start: str | None = None):
        self.stages = tuple(str(s) for s in stages)
        if not self.stages or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"a curriculum needs one or more distinct stage names, got {list(stages)}")
        self.criteria = criteria_of(self.stages, criteria)
        self.config = config or CurriculumConfig()
        start = self.stages[0] if start is None else start
        if start not in self.stages:
            raise ValueError(f"curriculum start stage {start!r} is not one of {', '.join(self.stages)}")
        self.index = self.stages.index(start)
        self.highest = self.index
        self.history: list[Decision] = []
        self.episodes_seen = 0      # every episode passed to observe (numbers episodes given none)
        self._window: deque[tuple[int, float, Any]] = deque(maxlen=self.config.window)
        self._at_stage = 0          # episodes counted at the current stage

    @property
    def stage(self) -> str:
        return self.stages[self.index]

    @property
    def criterion(self) -> Criterion:
        return self.criteria[self.stage]

    def stats(self) -> WindowStats | None:
        """The current window's stats (None below 3 episodes)."""
        values = [v for _, v, _ in self._window]
        return window_stats(values, self.config.trend_t) if len(values) >= 3 else None

    def observe(self, episode_metrics: Mapping[str, Any], *, episode: int | None = None,
                source: Any = None) -> Decision | None:
        """Count one finished episode (its ``metrics()``: the criterion's metric, and ``"stage"`` where
        the env gives it) and return the stage change it causes, if any. ``episode``: its number in
        the run (default: the count of episodes observed before it); ``source``: kept with it and
        returned in ``Decision.sources`` (e.g. its episode.summary's hash)."""
        number = self.episodes_seen if episode is None else int(episode)
        self.episodes_seen += 1
        played = episode_metrics.get("stage")
        if played is not None and str(played) != self.stage:
            return None  # played before the stage changed: it says nothing about this stage
        crit = self.criterion
        if crit.metric not in episode_metrics:
            raise ValueError(f"stage {self.stage!r} is judged on metric {crit.metric!r}, which the episode's "
                             f"metrics do not have (they have: {', '.join(sorted(map(str, episode_metrics))) or 'none'}"
                             f"); fix the env's CURRICULUM or its metrics()")
        value = episode_metrics[crit.metric]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {crit.metric!r} of episode {number} is {value!r}, not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"metric {crit.metric!r} of episode {number} is {value}; the curriculum needs a "
                             f"finite number (fix the env's metrics())")
        self._window.append((number, value, source))
        self._at_stage += 1
        if self._at_stage < self.config.min_episodes:
            return None
        st = self.stats()
        assert st is not None  # min_episodes >= 3
        if self.index + 1 < len(self.stages) and st.mean >= crit.promote_at and st.trend != FALLING:
            return self._move(+1, PROMOTED, crit.promote_at, st)
        if self.index > 0 and st.mean < crit.regress_below and st.trend != RISING:
            return self._move(-1, REGRESSED, crit.regress_below, st)
        return None

    def _move(self, step: int, reason: str, threshold: float, st: WindowStats) -> Decision:
        w = list(self._window)
        d = Decision(self.stage, self.stages[self.index + step], self.index, self.index + step, reason,
                     self.criterion.metric, threshold, st, tuple(e for e, _, _ in w), tuple(v for _, v, _ in w),
                     self._at_stage, tuple(s for _, _, s in w))
        self.index += step
        self.highest = max(self.highest, self.index)
        self._window.clear()
        self._at_stage = 0
        self.history.append(d)
        return d


def stage_chain(run_id: str) -> str:
    return f"{run_id}:curriculum"


def stage_change_payload(d: Decision, config: CurriculumConfig) -> dict:
    """The ``curriculum.stage`` payload of a decision (``schemas/curriculum_stage.avsc``)."""
    st = d.stats
    return {"from_stage": d.from_stage, "to_stage": d.to_stage, "from_stage_index": d.from_index,
            "to_stage_index": d.to_index, "reason": d.reason, "metric": d.metric, "threshold": float(d.threshold),
            "window_n": st.n, "window_mean": st.mean, "window_std": st.std, "window_min": st.min,
            "window_max": st.max, "trend_slope": st.slope, "trend_t": st.slope_t, "trend": st.trend,
            "window_episodes": [int(e) for e in d.episodes], "window_values": [float(v) for v in d.values],
            "stage_episodes": int(d.stage_episodes), "config_window": config.window,
            "config_min_episodes": config.min_episodes, "config_trend_t": float(config.trend_t)}


def emit_stage_change(log: EventLog, run_id: str, d: Decision, config: CurriculumConfig, *,
                      policy_version: str, source_event_hashes: Iterable[bytes] = ()) -> Event:
    """Append ``curriculum.stage`` on ``{run}:curriculum``: header ``policy_version`` = the policy that
    played the window (the one current at the change), ``rule_version`` = ``RULE_VERSION``,
    ``source_event_hashes`` = the window's episode.summary hashes (oldest first)."""
    return log.append(stage_chain(run_id), "curriculum.stage", stage_change_payload(d, config),
                      policy_version=policy_version, rule_version=RULE_VERSION,
                      source_event_hashes=list(source_event_hashes))


def decision_dict(d: Decision) -> dict:
    """A decision as plain JSON-able data (learning-curve files)."""
    out = asdict(d)
    out.pop("sources")
    return out


__all__ = ["CurriculumConfig", "Criterion", "Curriculum", "Decision", "WindowStats", "RULE_VERSION", "PROMOTED",
           "REGRESSED", "RISING", "FLAT", "FALLING", "trend_of", "window_stats", "criteria_of", "stage_chain",
           "stage_change_payload", "emit_stage_change", "decision_dict"]

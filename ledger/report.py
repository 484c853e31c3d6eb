"""``marlgrc report --run R``: the seeds' analyses from the ledger's views, as PNG plots and text.

Reads only the analyst views (``v_reward_convergence``, ``v_credit_per_agent``,
``v_fairness_over_time``, ``v_episode_summaries``, ``v_decision_tiers``), so it runs with the
``ledger_analyst`` role on PostgreSQL. The env's domain metrics (``episode.summary`` events) are
plotted per episode, one panel per metric, and listed in the summary with their string metrics (e.g.
market_v0's scenario). The joint actions' decisions are counted per tier (policy, heuristic, random;
``unknown`` for actions written before joint.action recorded it), in all and per agent.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .store import LedgerStore


@dataclass
class RunReport:
    run_id: str
    episodes: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    credit: dict[str, float] = field(default_factory=dict)
    fairness: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # the env's domain metrics per episode (episode.summary): name -> [(episode, value)], in the env's order
    domain: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    domain_text: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    # decisions per agent and tier (joint.action's decision_tier): agent -> tier -> count
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"run {self.run_id}", f"episodes: {len(self.episodes)}"]
        if self.returns:
            k = max(1, len(self.returns) // 4)
            first, last = self.returns[:k], self.returns[-k:]
            lines.append(f"episode return: first {len(first)} mean {sum(first) / len(first):.4f}, "
                         f"last {len(last)} mean {sum(last) / len(last):.4f}, "
                         f"best {max(self.returns):.4f}, worst {min(self.returns):.4f}")
        else:
            lines.append("episode return: no joint actions in the ledger for this run")
        if self.credit:
            total = sum(self.credit.values())
            lines.append("credit per agent: " + ", ".join(f"{a} {c:.4f}" for a, c in sorted(self.credit.items()))
                         + f" (total {total:.4f})")
        else:
            lines.append("credit per agent: no di.credit events for this run")
        for name, pts in sorted(self.fairness.items()):
            vals = [v for _, v in pts]
            lines.append(f"fairness {name}: {len(vals)} windows, first {vals[0]:.4f}, last {vals[-1]:.4f}")
        if not self.fairness:
            lines.append("fairness: no fairness.metrics events for this run")
        lines.extend(self.tier_lines())
        lines.extend(self.domain_lines())
        return "\n".join(lines) + "\n"

    def tier_totals(self) -> dict[str, int]:
        """Decisions per tier over all agents, in ``TIER_ORDER`` (then any other value)."""
        totals: Counter[str] = Counter()
        for counts in self.tiers.values():
            totals.update(counts)
        return {t: totals[t] for t in _tier_order(totals)}

    def tier_lines(self) -> list[str]:
        """Decisions per tier, with their shares, in all and per agent."""
        totals = self.tier_totals()
        n = sum(totals.values())
        if not n:
            return ["decisions per tier: no joint actions in the ledger for this run"]
        lines = [f"decisions per tier ({n} decisions): " + ", ".join(f"{t} {c} ({100 * c / n:.1f}%)"
                                                                      for t, c in totals.items())]
        for agent, counts in sorted(self.tiers.items()):
            lines.append(f"  {agent}: " + ", ".join(f"{t} {counts[t]}" for t in _tier_order(counts)))
        return lines

    def domain_lines(self) -> list[str]:
        """The domain metrics: per numeric metric its episodes, first, last, mean, min and max; per
        string metric how often each value occurred."""
        if not self.domain and not self.domain_text:
            return ["domain metrics: no episode.summary events with metrics for this run"]
        n = len({e for pts in (*self.domain.values(), *self.domain_text.values()) for e, _ in pts})
        lines = [f"domain metrics ({n} episodes):"]
        for name, pts in self.domain.items():
            vals = [v for _, v in pts]
            finite = [v for v in vals if math.isfinite(v)]
            mean = f"{sum(finite) / len(finite):.4f}" if finite else "n/a"
            lo, hi = (f"{min(finite):.4f}", f"{max(finite):.4f}") if finite else ("n/a", "n/a")
            lines.append(f"  {name}: {len(vals)} episodes, first {vals[0]:.4f}, last {vals[-1]:.4f}, "
                         f"mean {mean}, min {lo}, max {hi}")
        for name, pts in self.domain_text.items():
            counts = Counter(t for _, t in pts)
            lines.append(f"  {name}: " + ", ".join(f"{t} x{c}" for t, c in sorted(counts.items())))
        return lines


def collect(store: LedgerStore, run_id: str) -> RunReport:
    p = store.ph
    rep = RunReport(run_id)
    for ep, ret in store.query(f"SELECT episode, episode_return FROM v_reward_convergence WHERE run_id = {p} "
                               f"ORDER BY episode", (run_id,)):
        rep.episodes.append(int(ep))
        rep.returns.append(float(ret))
    for agent, credit in store.query(f"SELECT agent_id, SUM(credit) FROM v_credit_per_agent WHERE run_id = {p} "
                                     f"GROUP BY agent_id ORDER BY agent_id", (run_id,)):
        rep.credit[agent] = float(credit)
    fair: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for metric, end, value in store.query(f"SELECT metric, window_end, value FROM v_fairness_over_time "
                                          f"WHERE run_id = {p} ORDER BY window_end", (run_id,)):
        fair[metric].append((int(end), float(value)))
    rep.fairness = dict(fair)
    for agent, tier, n in store.query(f"SELECT agent_id, decision_tier, SUM(decisions) FROM v_decision_tiers "
                                      f"WHERE run_id = {p} GROUP BY agent_id, decision_tier", (run_id,)):
        rep.tiers.setdefault(agent, {})[tier] = int(n)
    rep.domain, rep.domain_text = domain_series(store.query(
        f"SELECT episode, metrics, text_metrics FROM v_episode_summaries WHERE run_id = {p} ORDER BY episode",
        (run_id,)))
    return rep


TIER_ORDER = ("policy", "heuristic", "random", "unknown")


def _tier_order(counts) -> list[str]:
    return [t for t in TIER_ORDER if t in counts] + sorted(t for t in counts if t not in TIER_ORDER)


def domain_series(rows) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """``(episode, metrics, text_metrics)`` rows (JSON text on SQLite, parsed on PostgreSQL) as series
    per metric name, in the order the env gave them. A non-finite value is stored as the string
    ``"NaN"``/``"Infinity"``/``"-Infinity"`` (valid JSON for both backends) and read back as the float."""
    values: dict[str, list[tuple[int, float]]] = {}
    texts: dict[str, list[tuple[int, str]]] = {}
    for ep, metrics, text_metrics in rows:
        for m in json.loads(metrics) if isinstance(metrics, (str, bytes)) else metrics or []:
            values.setdefault(m["name"], []).append((int(ep), float(m["value"])))
        for m in json.loads(text_metrics) if isinstance(text_metrics, (str, bytes)) else text_metrics or []:
            texts.setdefault(m["name"], []).append((int(ep), m["text"]))
    return values, texts


def write_report(store: LedgerStore, run_id: str, out_dir: Path) -> RunReport:
    """Write reward_convergence.png, credit_per_agent.png, fairness_over_time.png, episode_metrics.png
    (when the run has domain metrics), decision_tiers.png (when it has joint actions) and summary.txt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = collect(store, run_id)
    if not (rep.episodes or rep.credit or rep.fairness or rep.domain or rep.domain_text or rep.tiers):
        raise LookupError(f"the ledger has no rows for run {run_id!r}; check the run id "
                          f"(`SELECT DISTINCT run_id FROM v_runs`) and that `marlgrc ledger sync` ran")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rep.episodes, rep.returns, marker="o", label="episode return")
    if len(rep.returns) >= 3:
        w = max(2, len(rep.returns) // 5)
        avg = [sum(rep.returns[max(0, i - w + 1):i + 1]) / len(rep.returns[max(0, i - w + 1):i + 1])
               for i in range(len(rep.returns))]
        ax.plot(rep.episodes, avg, label=f"moving mean ({w})")
    ax.set(title=f"Reward convergence: {run_id}", xlabel="episode", ylabel="team return")
    ax.legend()
    rep.files.append(_save(fig, out_dir / "reward_convergence.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4))
    agents = sorted(rep.credit)
    ax.bar(agents, [rep.credit[a] for a in agents])
    ax.set(title=f"Credit per agent: {run_id}", xlabel="agent", ylabel="total credit")
    rep.files.append(_save(fig, out_dir / "credit_per_agent.png", plt))

    from .report_html import fairness_grid  # one metric per panel: counts never share the 0..1 axis

    rep.files.append(_save(fairness_grid(run_id, rep.fairness, plt), out_dir / "fairness_over_time.png", plt))

    if rep.domain:
        rep.files.append(_domain_figure(rep, out_dir / "episode_metrics.png", plt))

    if rep.tiers:
        fig, ax = plt.subplots(figsize=(7, 4))
        agents = sorted(rep.tiers)
        bottom = [0] * len(agents)
        for tier in rep.tier_totals():
            counts = [rep.tiers[a].get(tier, 0) for a in agents]
            ax.bar(agents, counts, bottom=bottom, label=tier, color=_TIER_COLOURS.get(tier))
            bottom = [b + c for b, c in zip(bottom, counts)]
        ax.legend()
        ax.set(title=f"Decisions per tier: {run_id}", xlabel="agent", ylabel="decisions")
        rep.files.append(_save(fig, out_dir / "decision_tiers.png", plt))

    summary = out_dir / "summary.txt"
    summary.write_text(rep.summary())
    rep.files.append(summary)
    return rep


# one colour per tier in every figure
_TIER_COLOURS = {"policy": "tab:blue", "heuristic": "tab:orange", "random": "tab:green", "unknown": "tab:gray"}


def _domain_figure(rep: RunReport, path: Path, plt) -> Path:
    """One panel per numeric domain metric, its value per episode; the string metrics of each
    episode (e.g. the scenario) in the title when there are few enough to read."""
    from matplotlib.ticker import MaxNLocator

    names = list(rep.domain)
    episodes = [e for pts in rep.domain.values() for e, _ in pts]
    lo, hi = min(episodes), max(episodes)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = rep.domain[name]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("episode", fontsize=8)
        ax.set_xlim(lo - 0.5, hi + 0.5)   # every panel on the run's episodes (a metric may skip some)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    texts = "; ".join(f"{k}: " + ", ".join(sorted({t for _, t in pts})) for k, pts in rep.domain_text.items())
    title = f"Domain metrics per episode: {rep.run_id}"
    fig.suptitle(title + (f"\n{texts}" if texts and len(texts) <= 120 else ""), fontsize=10)
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

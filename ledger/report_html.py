"""``marlgrc report --run R`` as one self-contained HTML page: every panel a PNG embedded as a data
URI, so the file can be mailed, archived or opened offline as it is.

Panels, each ONE metric with its unit and range on its own axis (a count never shares an axis with an
index in [0, 1]):

- convergence: the team return per episode; the mean return per acting policy version (a run trained
  online changes version at every update); the loss of each ``policy.update`` that names the run;
- policy lineage: which ``policy.update`` (of which run) produced each policy version that acted;
- credit per agent over time: each agent's summed ``di.credit`` share per episode;
- fairness over time: one panel per fairness metric of ``fairness.metrics`` (Gini, Jain, cooperative
  index, total credit), per episode window and per sliding window, and the diversity factor per agent;
- decisions per tier: joint actions per agent and tier (``decision_tier``), or "not recorded";
- verification: the verdict of ``ledger.verify.verify_ledger`` for the run's chains, and its chain table;
- the env's domain metrics (``episode.summary``), as a table.

Reads the ledger's analyst views (``ledger.report.collect`` and ``v_*``) and, for the verdict, the
stored events' raw bytes; a role that may not read those gets the report with the verdict marked as
not checked and the command to run instead.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .report import RunReport, collect
from .store import LedgerError, LedgerStore

# fairness metric -> (what it is, its unit, its fixed range or None: the observed range)
FAIRNESS_METRICS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "gini": ("Gini coefficient of the agents' credit (0 equal, (n-1)/n one agent holds all)", "index", (0.0, 1.0)),
    "jain": ("Jain's fairness index of the agents' credit (1 equal, 1/n one agent holds all)", "index", (0.0, 1.0)),
    "cooperative_index": ("mean cooperative score of the agents (seed 001 mechanism #6)", "score", (0.0, 1.0)),
    "total_credit": ("credit assigned in the window, all agents", "reward units", None),
    "steps": ("joint actions in the window", "count", None),
    "agents": ("agents in the window", "count", None),
}
# window metadata: shown as figures, never drawn beside an index
WINDOW_COUNTS = ("steps", "agents")
# sums over a window: a 100-step sliding window and a 20-step episode are not comparable, so only the
# episode windows are drawn (both kinds are in the figures)
WINDOW_SUMS = ("total_credit",)
TIER_COLOURS = {"policy": "tab:blue", "heuristic": "tab:orange", "random": "tab:green", "unknown": "tab:gray"}


@dataclass
class Panel:
    """One section of the page: a single metric (``metric``, ``unit``, ``value_range``), its figure as
    PNG bytes (None when there is nothing to draw: ``note`` says why) and its figures as text."""

    key: str
    title: str
    metric: str
    unit: str
    value_range: str
    png: bytes | None = None
    facts: list[str] = field(default_factory=list)
    note: str = ""
    table: tuple[list[str], list[list[str]]] | None = None


@dataclass
class Verification:
    """The run's chains as the ledger verifier sees them."""

    verdict: str                  # VERIFIED | BROKEN | NOT CHECKED
    rows: list[list[str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@dataclass
class HtmlReport:
    run_id: str
    path: Path
    run: dict
    data: RunReport
    panels: list[Panel]
    verification: Verification

    def panel(self, key: str) -> Panel:
        return next(p for p in self.panels if p.key == key)


# ---------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _axes(plt, title: str, xlabel: str, ylabel: str, bounds: tuple[float, float] | None = None):
    fig, ax = plt.subplots(figsize=(7.0, 3.2))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if bounds is not None:
        lo, hi = bounds
        pad = (hi - lo) * 0.03
        ax.set_ylim(lo - pad, hi + pad)
    ax.grid(alpha=0.3)
    return fig, ax


def _range(values: Sequence[float], bounds: tuple[float, float] | None = None) -> str:
    if bounds is not None:
        return f"{bounds[0]:g} to {bounds[1]:g} (fixed axis)"
    finite = [v for v in values if math.isfinite(v)]
    return f"observed {min(finite):.4g} to {max(finite):.4g}" if finite else "no finite values"


def _stats(values: Sequence[float]) -> str:
    return (f"first {values[0]:.4g}, last {values[-1]:.4g}, mean {sum(values) / len(values):.4g}, "
            f"min {min(values):.4g}, max {max(values):.4g}")


# ---------------------------------------------------------------- the ledger's rows
def _json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, (str, bytes)) else v


def run_info(store: LedgerStore, run_id: str) -> dict:
    """The run's run.started and run.finished rows merged: env, seed, status, episodes, steps, ..."""
    p = store.ph
    cols = ("env_id", "env_version", "seed", "config_json", "episodes_planned", "status", "reason", "episodes",
            "steps", "mean_return")
    info: dict = {}
    for row in store.query(f"SELECT {', '.join(cols)} FROM v_runs WHERE run_id = {p} ORDER BY seq", (run_id,)):
        info.update({k: v for k, v in zip(cols, row) if v not in (None, "")})
    return info


def _returns_per_version(store: LedgerStore, run_id: str) -> list[tuple[str, list[float]]]:
    """Team return per episode grouped by the policy version that acted, in order of first use."""
    p = store.ph
    per: dict[str, dict[int, float]] = {}
    for ep, version, ret in store.query(
            f"SELECT episode, policy_version, SUM(team_reward) FROM v_joint_actions WHERE run_id = {p} "
            f"GROUP BY episode, policy_version ORDER BY MIN(seq)", (run_id,)):
        per.setdefault(version or "(none)", {})[int(ep)] = float(ret)
    return [(v, list(eps.values())) for v, eps in per.items()]


def _policy_updates(store: LedgerStore, run_id: str | None = None) -> list[dict]:
    p = store.ph
    where, params = (f"WHERE run_id = {p}", (run_id,)) if run_id else ("", ())
    cols = ("event_id", "run_id", "chain_id", "seq", "policy_version", "algorithm", "parent_policy_version",
            "policy_updated", "optimizer_steps", "env_steps", "losses", "verified")
    return [dict(zip(cols, r)) for r in store.query(
        f"SELECT {', '.join(cols)} FROM v_policy_updates {where} ORDER BY chain_id, seq", params)]


def _lineage(store: LedgerStore, event_id: str) -> list[tuple]:
    p = store.ph
    return store.query(f"SELECT lineage_topic, chain_id, first_seq, last_seq FROM v_policy_update_lineage "
                       f"WHERE policy_update_event_id = {p} ORDER BY idx", (event_id,))


def _credit_per_episode(store: LedgerStore, run_id: str) -> dict[str, list[tuple[int, float]]]:
    p = store.ph
    out: dict[str, list[tuple[int, float]]] = {}
    for ep, agent, credit in store.query(f"SELECT episode, agent_id, credit FROM v_credit_per_agent "
                                         f"WHERE run_id = {p} ORDER BY episode, agent_id", (run_id,)):
        out.setdefault(agent, []).append((int(ep), float(credit)))
    return out


def _fairness_windows(store: LedgerStore, run_id: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> window kind (episode | sliding) -> [(window end, value)]."""
    p = store.ph
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for metric, kind, end, value in store.query(
            f"SELECT metric, window_kind, window_end, value FROM v_fairness_over_time WHERE run_id = {p} "
            f"ORDER BY window_end", (run_id,)):
        out.setdefault(metric, {}).setdefault(kind, []).append((int(end), float(value)))
    return out


def _diversity(store: LedgerStore, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Each agent's diversity factor per episode window: agent -> [(episode, value)]."""
    p = store.ph
    out: dict[str, list[tuple[int, float]]] = {}
    for ep, agent_metrics in store.query(
            f"SELECT episode, agent_metrics FROM v_fairness_metrics WHERE run_id = {p} AND window_kind = 'episode' "
            f"ORDER BY window_end", (run_id,)):
        for m in _json(agent_metrics) or []:
            if m["name"] == "diversity_factor":
                out.setdefault(m["agent_id"], []).append((int(ep), float(m["value"])))
    return out


# ---------------------------------------------------------------- panels
def convergence_panels(store: LedgerStore, rep: RunReport, plt) -> list[Panel]:
    run_id = rep.run_id
    unit = "team return (all agents' raw rewards summed over an episode)"
    ep = Panel("convergence", "Convergence: team return per episode", "team return per episode", unit, "")
    if rep.returns:
        fig, ax = _axes(plt, f"Team return per episode: {run_id}", "episode", "team return (reward units)")
        ax.plot(rep.episodes, rep.returns, marker="o", markersize=3, label="episode return")
        if len(rep.returns) >= 3:
            w = max(2, len(rep.returns) // 5)
            avg = [sum(rep.returns[max(0, i - w + 1):i + 1]) / len(rep.returns[max(0, i - w + 1):i + 1])
                   for i in range(len(rep.returns))]
            ax.plot(rep.episodes, avg, label=f"moving mean of {w} episodes")
        ax.legend(fontsize=8)
        ep.png = _png(fig, plt)
        ep.value_range = _range(rep.returns)
        ep.facts = [f"{len(rep.returns)} episodes", "team return: " + _stats(rep.returns)]
    else:
        ep.value_range, ep.note = "-", "no joint actions in the ledger for this run"
    panels = [ep]

    per_version = _returns_per_version(store, run_id)
    pv = Panel("returns-per-version", "Convergence: mean team return per acting policy version (per update)",
               "mean team return per episode, by the policy version that acted", unit, "")
    if per_version:
        names = [v for v, _ in per_version]
        means = [sum(r) / len(r) for _, r in per_version]
        fig, ax = _axes(plt, f"Mean team return per policy version: {run_id}", "policy version (in order of use)",
                        "mean team return (reward units)")
        ax.bar(range(len(names)), means, color="tab:blue", width=0.6)
        ax.set_xticks(range(len(names)), [n if len(n) <= 28 else n[:25] + "…" for n in names],
                      rotation=20 if len(names) > 1 else 0, ha="right" if len(names) > 1 else "center", fontsize=7)
        ax.axhline(0.0, color="black", linewidth=0.6)
        pv.png = _png(fig, plt)
        pv.value_range = _range(means)
        pv.facts = [f"{v}: {len(r)} episodes, mean team return {sum(r) / len(r):.4g}" for v, r in per_version]
    else:
        pv.value_range, pv.note = "-", "no joint actions in the ledger for this run"
    panels.append(pv)

    updates = _policy_updates(store, run_id)
    losses: dict[str, list[tuple[int, float]]] = {}
    for i, u in enumerate(updates):
        for m in _json(u["losses"]) or []:
            losses.setdefault(m["name"], []).append((i + 1, float(m["value"])))
    if not updates:
        panels.append(Panel("training", "Training: policy updates from this run's events", "loss per update", "-",
                            "-", note="no policy.update event names this run: no learner was trained on it"))
    for name, pts in losses.items():
        p = Panel(f"training-{name.replace('/', '-')}", f"Training: {name} per policy update",
                  f"{name} after each update", "loss (squared reward units for a TD or value loss)",
                  _range([v for _, v in pts]))
        fig, ax = _axes(plt, f"{name} per update: {run_id}", "policy update", name)
        ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", markersize=3)
        p.png = _png(fig, plt)
        p.facts = [f"{len(pts)} updates", f"{name}: " + _stats([v for _, v in pts])]
        panels.append(p)
    if updates and not losses:
        panels.append(Panel("training", "Training: policy updates from this run's events", "loss per update", "-",
                            "-", note="the policy.update events carry no losses"))
    return panels


def lineage_panel(store: LedgerStore, run_id: str) -> Panel:
    """Which policy acted in this run and which update (of which run) made it; which updates this
    run's events trained, and what the last of them learned from."""
    p = Panel("lineage", "Policy lineage", "policy versions and the policy.update events behind them", "-", "-")
    acting = [v for v, _ in _returns_per_version(store, run_id)]
    updates = _policy_updates(store)
    for v in acting:
        made = [u for u in updates if u["policy_version"] and (v == u["policy_version"]
                                                               or v.startswith(u["policy_version"] + "-"))]
        if made:
            u = made[-1]
            p.facts.append(f"acted: {v}, made by policy.update seq {u['seq']} on chain {u['chain_id']} "
                           f"(trained from run {u['run_id']}; that update took {u['optimizer_steps']} optimizer "
                           f"steps; verified replay: {bool(u['verified'])})")
        else:
            p.facts.append(f"acted: {v} (a built-in or external policy: no policy.update in this ledger made it)")
    own = [u for u in updates if u["run_id"] == run_id]
    if own:
        last = own[-1]
        steps = sum(u["optimizer_steps"] for u in own)
        p.facts.append(f"trained on this run: {len(own)} policy.update events, {steps} optimizer steps, last version "
                       f"{last['policy_version']}")
        for topic, chain, first, last_seq in _lineage(store, last["event_id"]):
            p.facts.append(f"last update learned from {topic} {chain} seq {first}..{last_seq}")
    if not p.facts:
        p.note = "no joint actions and no policy updates for this run"
    return p


def credit_panel(store: LedgerStore, run_id: str, plt) -> Panel:
    p = Panel("credit", "Credit per agent over time", "credit per agent per episode",
              "credit (reward units: the agent's share of the decision interpreter's global reward)", "")
    series = _credit_per_episode(store, run_id)
    if not series:
        p.value_range, p.note = "-", "no di.credit events in the ledger for this run"
        return p
    fig, ax = _axes(plt, f"Credit per agent per episode: {run_id}", "episode", "credit (reward units)")
    for agent, pts in sorted(series.items()):
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=3, label=agent)
    ax.legend(fontsize=8)
    p.png = _png(fig, plt)
    p.value_range = _range([v for pts in series.values() for _, v in pts])
    p.facts = [f"{agent}: {len(pts)} episodes, total {sum(v for _, v in pts):.4g}, "
               f"mean per episode {sum(v for _, v in pts) / len(pts):.4g}" for agent, pts in sorted(series.items())]
    return p


def fairness_figure(title: str, name: str, windows: dict[str, list[tuple[int, float]]], plt) -> bytes:
    """One fairness metric over time on its own axis: its episode windows and sliding windows."""
    _, unit, bounds = FAIRNESS_METRICS.get(name, (name, "as emitted", None))
    fig, ax = _axes(plt, title, "joint actions scored (credit index at the window's end)", f"{name} ({unit})",
                    bounds)
    for kind, style in (("sliding", dict(linewidth=1.2)), ("episode", dict(marker="o", linestyle="none"))):
        pts = windows.get(kind)
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], label=f"{kind} windows", **style)
    for kind in sorted(set(windows) - {"sliding", "episode"}):
        ax.plot([e for e, _ in windows[kind]], [v for _, v in windows[kind]], label=f"{kind} windows")
    ax.legend(fontsize=8)
    return _png(fig, plt)


def fairness_grid(run_id: str, fairness: dict[str, list[tuple[int, float]]], plt):
    """The fairness metrics of ``ledger.report.collect`` as one figure of small panels, ONE metric per
    panel on its own axis (its unit, and 0..1 for the indices), windows as points (episode and sliding
    windows are both in ``fairness``). For ``fairness_over_time.png``; the caller saves it."""
    names = [m for m in FAIRNESS_METRICS if m in fairness] + sorted(m for m in fairness if m not in FAIRNESS_METRICS)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows + 0.5), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _, unit, bounds = FAIRNESS_METRICS.get(name, (name, "as emitted", None))
        pts = fairness[name]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=3, linestyle="none")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("window end (credit index)", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        if bounds is not None:
            ax.set_ylim(bounds[0] - 0.03, bounds[1] + 0.03)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if not names:
        axes.flat[0].set_visible(False)
    fig.suptitle(f"Fairness over time: {run_id}" + ("" if names else " (no fairness.metrics events)"), fontsize=10)
    return fig


def fairness_panels(store: LedgerStore, run_id: str, plt) -> list[Panel]:
    fair = _fairness_windows(store, run_id)
    if not fair:
        return [Panel("fairness", "Fairness over time", "fairness metrics", "-", "-",
                      note="no fairness.metrics events in the ledger for this run")]
    panels = []
    order = [m for m in FAIRNESS_METRICS if m in fair and m not in WINDOW_COUNTS]
    order += sorted(m for m in fair if m not in FAIRNESS_METRICS)
    counts = {m: fair[m] for m in WINDOW_COUNTS if m in fair}
    for name in order:
        what, unit, bounds = FAIRNESS_METRICS.get(name, (name, "as emitted", None))
        drawn = fair[name]
        if name in WINDOW_SUMS and "episode" in drawn:
            drawn = {"episode": drawn["episode"]}
            what += " (episode windows drawn: a sum depends on the window's length)"
        values = [v for pts in drawn.values() for _, v in pts]
        p = Panel(f"fairness-{name}", f"Fairness over time: {name}", what, unit, _range(values, bounds))
        p.png = fairness_figure(f"{name} over time: {run_id}", name, drawn, plt)
        p.facts = [f"{kind} windows: {len(pts)}, " + _stats([v for _, v in pts]) for kind, pts in
                   sorted(fair[name].items())]
        if bounds is not None:
            p.facts.append(_range(values))
        panels.append(p)
    if counts:
        facts = []
        for m, per in counts.items():
            for kind, pts in sorted(per.items()):
                vals = sorted({int(v) for _, v in pts})
                facts.append(f"{m} per {kind} window: {', '.join(map(str, vals[:8]))}{' …' if len(vals) > 8 else ''}")
        panels[0].facts.extend(facts)
    diversity = _diversity(store, run_id)
    if diversity:
        p = Panel("fairness-diversity", "Fairness over time: diversity factor per agent",
                  "diversity factor of each agent per episode window (seed 001 mechanism #4)", "factor",
                  "-0.2 to 0.15 (fixed axis)")
        fig, ax = _axes(plt, f"Diversity factor per agent: {run_id}", "episode", "diversity factor", (-0.2, 0.15))
        for agent, pts in sorted(diversity.items()):
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=3, label=agent)
        ax.legend(fontsize=8)
        p.png = _png(fig, plt)
        p.facts = [f"{agent}: " + _stats([v for _, v in pts]) for agent, pts in sorted(diversity.items())]
        panels.append(p)
    return panels


def tier_panel(rep: RunReport, plt) -> Panel:
    p = Panel("tiers", "Decisions per tier", "joint-action decisions per agent and tier", "decisions (count)", "")
    recorded = {a: {t: n for t, n in c.items() if t != "unknown"} for a, c in rep.tiers.items()}
    if not any(recorded.values()):
        p.value_range = "-"
        p.note = ("not recorded: this run's joint actions carry no decision tier" if rep.tiers
                  else "not recorded: no joint actions in the ledger for this run")
        return p
    agents = sorted(rep.tiers)
    totals = rep.tier_totals()
    fig, ax = _axes(plt, f"Decisions per tier: {rep.run_id}", "agent", "decisions (count)")
    bottom = [0] * len(agents)
    for tier in totals:
        counts = [rep.tiers[a].get(tier, 0) for a in agents]
        ax.bar(agents, counts, bottom=bottom, label=tier, color=TIER_COLOURS.get(tier))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.legend(fontsize=8)
    p.png = _png(fig, plt)
    n = sum(totals.values())
    p.value_range = f"0 to {max(bottom)} decisions per agent"
    p.facts = [f"{n} decisions: " + ", ".join(f"{t} {c} ({100 * c / n:.1f}%)" for t, c in totals.items())]
    p.facts += [f"{a}: " + ", ".join(f"{t} {c}" for t, c in sorted(rep.tiers[a].items())) for a in agents]
    return p


def domain_panel(rep: RunReport) -> Panel | None:
    if not rep.domain and not rep.domain_text:
        return None
    rows = []
    for name, pts in rep.domain.items():
        vals = [v for _, v in pts]
        rows.append([name, str(len(vals)), f"{vals[0]:.4g}", f"{vals[-1]:.4g}",
                     _range(vals).removeprefix("observed ")])
    for name, pts in rep.domain_text.items():
        counts: dict[str, int] = {}
        for _, t in pts:
            counts[t] = counts.get(t, 0) + 1
        rows.append([name, str(len(pts)), pts[0][1], pts[-1][1], ", ".join(f"{t} x{c}" for t, c in counts.items())])
    return Panel("domain", "The env's domain metrics per episode", "episode.summary metrics", "as the env defines",
                 "per metric", table=(["metric", "episodes", "first", "last", "range / values"], rows))


def verification_of(store: LedgerStore, run_id: str, public_key: Any = None) -> Verification:
    """``verify_ledger`` over the ledger, reported for the chains of ``run_id`` (``{run}:*``) and the
    integrity findings that name them. The verdict is VERIFIED only with no break and no finding."""
    from .verify import verify_ledger

    # PostgreSQL's analyst role reads the views only: the verdict needs the stored events' raw bytes
    missing = store.missing_privileges("read") if hasattr(store, "missing_privileges") else []
    if missing:
        return Verification("NOT CHECKED", lines=[f"this ledger role lacks {'; '.join(missing)}, which verifying "
                                                  f"the stored events needs: run `marlgrc verify --ledger "
                                                  f"--postgres DSN` as the ledger's writer or owner"])
    try:
        rep = verify_ledger(store, public_key)
    except LedgerError as exc:
        return Verification("NOT CHECKED", lines=[f"the stored events could not be read ({exc}); run "
                                                  f"`marlgrc verify --ledger` to see why"])
    mine = [c for c in rep.chains.chains if c.chain_id.startswith(f"{run_id}:")]
    findings = [f for f in rep.findings if (getattr(f, "chain_id", "") or "").startswith(f"{run_id}:")]
    rows = [[c.topic, c.chain_id, str(c.events), str(c.last_seq), str(c.signed_through_seq),
             str(c.checkpoints_verified), c.first_break.describe() if c.first_break else "ok"] for c in mine]
    broken = any(c.first_break for c in mine) or findings
    lines = [f"{sum(c.events for c in mine)} events in {len(mine)} chains of this run checked from the "
             f"ledger's stored bytes"]
    if public_key is None:
        lines.append("no public key given: checkpoint signatures were not checked")
    lines += [f"FINDING (at ingest) {f.describe()}" for f in findings]
    if not mine:
        return Verification("NOT CHECKED", rows, lines + ["no chain of this run is stored in the ledger"])
    return Verification("BROKEN" if broken else "VERIFIED", rows, lines)


# ---------------------------------------------------------------- the page
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.meta td, .chains td, .chains th, .domain td, .domain th { padding: 0.15em 0.6em; font-size: 0.85em; }
.chains, .domain { border-collapse: collapse; } .chains td:nth-child(2) { word-break: break-all; }
.chains th, .domain th { text-align: left; background: #eee; }
.verdict { font-weight: bold; padding: 0.2em 0.6em; border-radius: 4px; color: white; }
.VERIFIED { background: #2a7d2a; } .BROKEN { background: #b22222; } .NOT { background: #777; }
figure { margin: 0.5em 0; } figcaption { font-size: 0.85em; color: #444; } img { max-width: 100%; }
.note { font-style: italic; color: #666; } ul.facts { font-size: 0.85em; margin: 0.3em 0; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(cls: str, head: list[str], rows: list[list[str]]) -> str:
    return (f'<table class="{cls}"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _panel_html(p: Panel) -> str:
    out = [f'<section id="panel-{_e(p.key)}"><h2>{_e(p.title)}</h2>',
           f'<p class="axis">metric: {_e(p.metric)}; unit: {_e(p.unit)}; range: {_e(p.value_range)}</p>']
    if p.png is not None:
        data = base64.b64encode(p.png).decode("ascii")
        out.append(f'<figure><img alt="{_e(p.title)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{_e(p.metric)} ({_e(p.unit)})</figcaption></figure>")
    if p.note:
        out.append(f'<p class="note">{_e(p.note)}</p>')
    if p.facts:
        out.append('<ul class="facts">' + "".join(f"<li>{_e(f)}</li>" for f in p.facts) + "</ul>")
    if p.table is not None:
        out.append(_table("domain", *p.table))
    out.append("</section>")
    return "\n".join(out)


def render_html(run_id: str, run: dict, panels: list[Panel], verification: Verification) -> str:
    meta = [("run", run_id), ("env", f"{run.get('env_id', '?')} v{run.get('env_version', '?')}"),
            ("seed", run.get("seed", "?")), ("status", run.get("status", "not finished")),
            ("episodes", f"{run.get('episodes', '?')} of {run.get('episodes_planned', '?')} planned"),
            ("steps", run.get("steps", "?")),
            ("mean return", f"{run['mean_return']:.4g}" if isinstance(run.get("mean_return"), float) else "?")]
    v = verification
    body = [f"<h1>marlgrc run report: {_e(run_id)}</h1>",
            '<table class="meta">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(x)}</td></tr>" for k, x in meta)
            + "</table>",
            f'<section id="panel-verification"><h2>Verification</h2>'
            f'<p>verdict: <span class="verdict {_e(v.verdict)}">{_e(v.verdict)}</span></p>',
            '<ul class="facts">' + "".join(f"<li>{_e(x)}</li>" for x in v.lines) + "</ul>",
            _table("chains", ["topic", "chain", "events", "last seq", "signed through seq", "checkpoints verified",
                              "first break"], v.rows) if v.rows else "",
            "</section>"]
    body += [_panel_html(p) for p in panels]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>marlgrc report {_e(run_id)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build_panels(store: LedgerStore, rep: RunReport) -> list[Panel]:
    plt = _plt()
    panels = convergence_panels(store, rep, plt)
    panels.append(lineage_panel(store, rep.run_id))
    panels.append(credit_panel(store, rep.run_id, plt))
    panels += fairness_panels(store, rep.run_id, plt)
    panels.append(tier_panel(rep, plt))
    domain = domain_panel(rep)
    if domain is not None:
        panels.append(domain)
    return panels


def write_html_report(store: LedgerStore, run_id: str, path: Path, public_key: Any = None) -> HtmlReport:
    """Write the run's report to ``path`` (a ``.html`` file, or a folder that gets ``report.html``).
    ``public_key``: the trusted signer's key, for the verdict's signature checks. A run the ledger has
    no rows of is a ``LookupError`` saying what to check."""
    rep = collect(store, run_id)
    run = run_info(store, run_id)
    if not run and not (rep.episodes or rep.credit or rep.fairness or rep.domain or rep.domain_text):
        raise LookupError(f"the ledger has no rows for run {run_id!r}; check the run id "
                          f"(`SELECT DISTINCT run_id FROM v_runs`) and that `marlgrc ledger sync` ran")
    panels = build_panels(store, rep)
    verification = verification_of(store, run_id, public_key)
    path = Path(path)
    if path.suffix.lower() != ".html":
        path = path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(run_id, run, panels, verification), encoding="utf-8")
    return HtmlReport(run_id, path, run, rep, panels, verification)

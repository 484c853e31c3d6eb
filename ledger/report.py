"""``marlgrc report --run R``: the seeds' analyses from the ledger's views, as PNG plots and text.

Reads only the analyst views (``v_reward_convergence``, ``v_credit_per_agent``,
``v_fairness_over_time``), so it runs with the ``ledger_analyst`` role on PostgreSQL.
"""
from __future__ import annotations

from collections import defaultdict
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
        return "\n".join(lines) + "\n"


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
    return rep


def write_report(store: LedgerStore, run_id: str, out_dir: Path) -> RunReport:
    """Write reward_convergence.png, credit_per_agent.png, fairness_over_time.png and summary.txt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = collect(store, run_id)
    if not rep.episodes and not rep.credit and not rep.fairness:
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

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in sorted(rep.fairness.items()):
        ax.plot([e for e, _ in pts], [v for _, v in pts], label=name)
    if rep.fairness:
        ax.legend()
    ax.set(title=f"Fairness over time: {run_id}", xlabel="window end", ylabel="value")
    rep.files.append(_save(fig, out_dir / "fairness_over_time.png", plt))

    summary = out_dir / "summary.txt"
    summary.write_text(rep.summary())
    rep.files.append(summary)
    return rep


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""What the dashboard shows, folded from the events: pure, no I/O, no web server.

``DashboardState.apply(records)`` takes Kafka records (``eventlog.kafka.Record``) in the order they
were read (each partition in offset order, partitions interleaved) and folds them into one view per
run; ``apply_report(report)`` takes a report of the one verifier (``eventlog.verify.Report``);
``snapshot(run_id)`` returns the JSON-able state the page draws.

Every figure comes from an event, as written; nothing is recomputed here:

| shown | read from |
|---|---|
| run, status | ``run.started`` (env, agents, episodes planned), ``run.finished`` (status, reason) |
| team return per episode | ``episode.summary.episode_return`` |
| team return per update | each ``policy.update``: the mean ``episode_return`` of the episode summaries its lineage names (seqs of ``{run}:lifecycle``) |
| credit per agent | ``di.credit.shares[].credit``, summed per episode of the credit chain |
| Gini, Jain, diversity | ``fairness.metrics``: ``metrics`` gini and jain, ``agent_metrics`` diversity_factor |
| decisions per tier | ``joint.action.actions[].decision_tier`` where the writer recorded one |
| chains | every record's key and header seq; the verifier's report (signed through, first break) |
| dead letters | ``marl.dlq``'s ``dead.letter`` events (source, kind, reason) |

Episode numbers restart when a trainer starts a new batch on the same run, so per-episode series
are numbered by order (1, 2, ...), not by the events' ``episode`` field.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from eventlog.codec import Codec, DecodeError, default_codec
from eventlog.hashing import seq_and_chain
from eventlog.kafka import Record
from eventlog.verify import Report

LIFECYCLE = "marl.run.lifecycle"
# topics whose events are decoded; of the others only the header's seq is read
DECODED = frozenset({LIFECYCLE, "marl.joint.action", "marl.di.credit", "marl.fairness.metrics",
                     "marl.policy.update", "marl.dlq"})
MAX_POINTS = 2000      # per series in a snapshot: longer series are thinned (every k-th point and the last)
DEAD_LETTERS_KEPT = 200


def _num(x: float) -> float | None:
    """A number JSON can carry (NaN and infinities become null)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _thin(points: list, limit: int = MAX_POINTS) -> list:
    if len(points) <= limit:
        return points
    step = math.ceil(len(points) / limit)
    return points[::step] + ([points[-1]] if (len(points) - 1) % step else [])


@dataclass
class ChainView:
    """One chain as read so far: (topic, Kafka key)."""

    topic: str
    chain_id: str
    events: int = 0
    last_seq: int = -1
    partition: int = -1
    last_offset: int = -1


@dataclass
class EpisodeSummary:
    seq: int            # on {run}:lifecycle
    episode: int
    steps: int
    team_return: float
    at: int             # produced_at, µs


@dataclass
class CreditSeries:
    """One credit chain's shares, summed per agent per episode (segments: a new one where the
    events' episode number changes)."""

    agents: list[str] = field(default_factory=list)
    segments: list[dict[str, float]] = field(default_factory=list)
    episode: int | None = None
    credits: int = 0

    def add(self, episode: int, shares: list[dict]) -> None:
        if episode != self.episode or not self.segments:
            self.segments.append({})
            self.episode = episode
        seg = self.segments[-1]
        for s in shares:
            a = s["agent_id"]
            if a not in self.agents:
                self.agents.append(a)
            seg[a] = seg.get(a, 0.0) + float(s["credit"])
        self.credits += 1


@dataclass
class FairnessSeries:
    """One fairness chain's windows: (x, gini, jain, {agent: diversity_factor}) per window kind; x is
    the window's number for episode windows, the credits counted at its end for sliding ones."""

    episode: list[tuple] = field(default_factory=list)
    sliding: list[tuple] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)

    def add(self, rec: dict) -> None:
        m = {x["name"]: x["value"] for x in rec["metrics"]}
        div: dict[str, float] = {}
        for am in rec["agent_metrics"]:
            if am["name"] == "diversity_factor":
                div[am["agent_id"]] = am["value"]
                if am["agent_id"] not in self.agents:
                    self.agents.append(am["agent_id"])
        if rec["window"] == "episode":
            self.episode.append((len(self.episode) + 1, m.get("gini"), m.get("jain"), div))
        else:
            self.sliding.append((rec["window_end"] + 1, m.get("gini"), m.get("jain"), div))


@dataclass
class PolicyUpdate:
    policy_version: str
    algorithm: str
    env_steps: int
    optimizer_steps: int
    policy_updated: bool
    verified: bool
    lifecycle_seqs: list[tuple[int, int]]   # the {run}:lifecycle seq ranges its lineage names
    at: int


@dataclass
class RunView:
    run_id: str
    env_id: str = ""
    env_version: str = ""
    seed: int = 0
    agents: list[str] = field(default_factory=list)
    episodes_planned: int = 0
    batches: int = 0                # run.started events (a trainer starts one per batch)
    status: str = "unknown"         # running | completed | failed | interrupted | unknown (no run.started read)
    reason: str = ""
    started_at: int = 0
    finished_at: int = 0
    last_event_at: int = 0
    steps: int = 0                  # joint actions read
    episodes: list[EpisodeSummary] = field(default_factory=list)
    credits: dict[str, CreditSeries] = field(default_factory=dict)
    fairness: dict[str, FairnessSeries] = field(default_factory=dict)
    updates: dict[str, list[PolicyUpdate]] = field(default_factory=dict)
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)   # tier -> agent -> decisions

    def update_returns(self, updates: list[PolicyUpdate]) -> list[tuple[float | None, int]]:
        """Per update: (mean team return, episodes) of the episode summaries its lineage names. The
        summaries are on one chain, read in order, so their seqs grow."""
        seqs = [e.seq for e in self.episodes]
        out = []
        for u in updates:
            rets: list[float] = []
            for a, b in u.lifecycle_seqs:
                lo, hi = bisect.bisect_left(seqs, a), bisect.bisect_right(seqs, b)
                rets.extend(e.team_return for e in self.episodes[lo:hi])
            out.append(((sum(rets) / len(rets)) if rets else None, len(rets)))
        return out


@dataclass
class DeadLetter:
    at: int
    chain_id: str
    seq: int
    source_topic: str
    source_partition: int
    source_offset: int
    source_key: str
    error_kind: str
    reason: str
    consumer: str

    def to_json(self, run_ids: Iterable[str]) -> dict:
        run = next((r for r in run_ids if self.source_key.startswith(f"{r}:")), None)
        return {"at": self.at, "chain_id": self.chain_id, "seq": self.seq, "source_topic": self.source_topic,
                "source_partition": self.source_partition, "source_offset": self.source_offset,
                "source_key": self.source_key, "run_id": run, "error_kind": self.error_kind,
                "reason": self.reason, "consumer": self.consumer}


@dataclass
class Verification:
    """The last report of the verifier over the topics: per chain, what it checked."""

    chains: dict[tuple[str, str], dict]
    notes: list[str]
    at: float               # when it finished (epoch seconds)
    seconds: float          # how long it took


class DashboardState:
    """The fold. Not thread-safe: the adapter holds a lock around ``apply``, ``apply_report`` and
    ``snapshot``. ``version`` grows with every change, so a server pushes only when it moved."""

    def __init__(self, codec: Codec | None = None):
        self.codec = codec or default_codec()
        self.runs: dict[str, RunView] = {}
        self.chains: dict[tuple[str, str], ChainView] = {}
        self.dead_letters: deque[DeadLetter] = deque(maxlen=DEAD_LETTERS_KEPT)
        self.dead_letter_count = 0
        self.records = 0
        self.undecodable: dict[str, int] = {}
        self.verification: Verification | None = None
        self.version = 0

    # --- folding -----------------------------------------------------------------------------
    def apply(self, records: Iterable[Record]) -> int:
        """Fold records in; returns how many."""
        n = 0
        for r in records:
            self._apply_one(r)
            n += 1
        if n:
            self.records += n
            self.version += 1
        return n

    def _apply_one(self, r: Record) -> None:
        key = (r.topic, r.key)
        ch = self.chains.get(key)
        if ch is None:
            ch = self.chains[key] = ChainView(r.topic, r.key)
        ch.events += 1
        ch.partition, ch.last_offset = r.partition, r.offset
        if r.topic not in DECODED:
            try:
                ch.last_seq = seq_and_chain(r.value)[0]
            except (ValueError, UnicodeDecodeError, TypeError):
                self.undecodable[r.topic] = self.undecodable.get(r.topic, 0) + 1
            return
        try:
            name, rec = self.codec.decode(r.value)
        except (DecodeError, TypeError):
            self.undecodable[r.topic] = self.undecodable.get(r.topic, 0) + 1
            return
        ch.last_seq = rec["seq"]
        self.fold_event(r.key, name, rec)

    def fold_event(self, key: str, name: str, rec: dict) -> None:
        """Fold one decoded event (schema ``name``, read under Kafka key ``key``) into its run."""
        if name == "dead_letter":
            self._dead_letter(rec)
            return
        if not rec["run_id"]:
            return
        run = self._run(rec["run_id"])
        run.last_event_at = max(run.last_event_at, rec["produced_at"])
        fold = _FOLDS.get(name)
        if fold is not None:
            fold(self, run, key, rec)

    def _run(self, run_id: str) -> RunView:
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = RunView(run_id)
        return run

    def _run_started(self, run: RunView, key: str, rec: dict) -> None:
        run.env_id, run.env_version, run.seed = rec["env_id"], rec["env_version"], rec["seed"]
        run.agents = [a["agent_id"] for a in rec["agents"]]
        run.episodes_planned += rec["episodes_planned"]
        run.batches += 1
        run.status, run.reason = "running", ""
        run.started_at = min(run.started_at, rec["produced_at"]) if run.started_at else rec["produced_at"]

    def _run_finished(self, run: RunView, key: str, rec: dict) -> None:
        run.status, run.reason, run.finished_at = rec["status"], rec["reason"], rec["produced_at"]

    def _episode_summary(self, run: RunView, key: str, rec: dict) -> None:
        run.episodes.append(EpisodeSummary(rec["seq"], rec["episode"], rec["steps"], rec["episode_return"],
                                           rec["produced_at"]))

    def _joint_action(self, run: RunView, key: str, rec: dict) -> None:
        run.steps += 1
        for a in rec["actions"]:
            # recorded by writers that know it (joint_action's decision_tier); empty or absent in older events
            tier = a.get("decision_tier") or a.get("tier")
            if tier:
                per_agent = run.tiers.setdefault(str(tier), {})
                per_agent[a["agent_id"]] = per_agent.get(a["agent_id"], 0) + 1

    def _credit(self, run: RunView, key: str, rec: dict) -> None:
        series = run.credits.get(key)
        if series is None:
            series = run.credits[key] = CreditSeries()
        series.add(rec["episode"], rec["shares"])

    def _fairness(self, run: RunView, key: str, rec: dict) -> None:
        series = run.fairness.get(key)
        if series is None:
            series = run.fairness[key] = FairnessSeries()
        series.add(rec)

    def _policy_update(self, run: RunView, key: str, rec: dict) -> None:
        lifecycle = f"{run.run_id}:lifecycle"
        seqs = [(lr["first_seq"], lr["last_seq"]) for lr in rec["lineage"]
                if lr["topic"] == LIFECYCLE and lr["chain_id"] == lifecycle]
        run.updates.setdefault(key, []).append(PolicyUpdate(
            rec["policy_version"], rec["algorithm"], rec["env_steps"], rec["optimizer_steps"],
            rec["policy_updated"], rec["verified"], seqs, rec["produced_at"]))

    def _dead_letter(self, rec: dict) -> None:
        self.dead_letter_count += 1
        self.dead_letters.append(DeadLetter(
            rec["produced_at"], rec["chain_id"], rec["seq"], rec["source_topic"], rec["source_partition"],
            rec["source_offset"], bytes(rec["source_key"]).decode("utf-8", "backslashreplace"),
            rec["error_kind"], rec["reason"], rec["consumer"]))

    def apply_report(self, report: Report, *, at: float, seconds: float) -> None:
        """Keep the verifier's latest word on every chain it read."""
        chains = {}
        for c in report.chains:
            b = c.first_break
            chains[(c.topic, c.chain_id)] = {
                "events": c.events, "last_seq": c.last_seq, "signed_through_seq": c.signed_through_seq,
                "checkpoints_verified": c.checkpoints_verified,
                "break_kind": b.kind.value if b else None, "break": b.describe() if b else None}
        self.verification = Verification(chains, list(report.notes), at, seconds)
        self.version += 1

    # --- the views ---------------------------------------------------------------------------
    def run_of(self, chain_id: str) -> str | None:
        """The run a chain belongs to (chain ids are ``{run}:...``), or None (dead letters, deletions, ...)."""
        run, sep, _ = chain_id.partition(":")
        return run if sep and run in self.runs else None

    def chain_groups(self) -> dict[str | None, list[dict]]:
        """Every chain, live and as last verified, grouped by run (None: chains of no run), each group
        sorted by (topic, chain id); one pass over the chains."""
        ver = self.verification.chains if self.verification else {}
        groups: dict[str | None, list[dict]] = {}
        for key in sorted(set(self.chains) | set(ver)):
            groups.setdefault(self.run_of(key[1]), []).append(self._chain_row(key, self.chains.get(key), ver.get(key)))
        return groups

    def chain_rows(self, run_id: str | None) -> list[dict]:
        """The chains of ``run_id`` (None: those of no run)."""
        return self.chain_groups().get(run_id, [])

    @staticmethod
    def _chain_row(key: tuple[str, str], live: ChainView | None, v: dict | None) -> dict:
        last = max(live.last_seq if live else -1, v["last_seq"] if v else -1)
        row = {"topic": key[0], "chain_id": key[1], "events": live.events if live else v["events"],
               "last_seq": last, "verified_last_seq": v["last_seq"] if v else None,
               "signed_through_seq": v["signed_through_seq"] if v else None,
               "status": "unverified", "detail": "not verified yet"}
        if v is not None:
            if v["break_kind"]:
                row["status"], row["detail"] = "broken", v["break"]
            else:
                unsigned = v["last_seq"] - v["signed_through_seq"]
                row["status"] = "ok"
                row["detail"] = (f"{unsigned} event(s) not yet covered by a signed checkpoint" if unsigned > 0
                                 else "signed through its head")
            pending = last - v["last_seq"]
            if pending > 0 and not v["break_kind"]:
                row["detail"] += f"; {pending} newer event(s) not verified yet"
        return row

    @staticmethod
    def verdict(rows: list[dict]) -> dict:
        """``verified`` (no chain broken as of the last verification), ``broken`` or ``pending`` (none
        of the chains verified yet); ``pending_events``: events read since."""
        broken = [r for r in rows if r["status"] == "broken"]
        checked = [r for r in rows if r["verified_last_seq"] is not None]
        pending = sum(r["last_seq"] - (r["verified_last_seq"] if r["verified_last_seq"] is not None else -1)
                      for r in rows)
        status = "broken" if broken else "verified" if checked else "pending"
        return {"status": status, "broken_chains": len(broken), "chains": len(rows),
                "events": sum(r["events"] for r in rows), "pending_events": pending,
                "first_break": broken[0]["detail"] if broken else None}

    def run_summary(self, run: RunView, rows: list[dict]) -> dict:
        """A run's line in the runs list; ``rows``: its chains (``chain_groups``)."""
        last = run.episodes[-1].team_return if run.episodes else None
        return {"run_id": run.run_id, "env_id": run.env_id, "status": run.status, "reason": run.reason,
                "episodes": len(run.episodes), "episodes_planned": run.episodes_planned, "steps": run.steps,
                "batches": run.batches, "last_return": _num(last) if last is not None else None,
                "started_at": run.started_at, "finished_at": run.finished_at, "last_event_at": run.last_event_at,
                "verdict": self.verdict(rows)}

    def runs_list(self, groups: dict | None = None) -> list[dict]:
        """Every run, newest first."""
        groups = self.chain_groups() if groups is None else groups
        order = sorted(self.runs.values(), key=lambda r: (r.started_at or r.last_event_at), reverse=True)
        return [self.run_summary(r, groups.get(r.run_id, [])) for r in order]

    def run_detail(self, run_id: str, groups: dict | None = None) -> dict | None:
        """One run: its summary, its series, its chains and its verdict."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        rows = (self.chain_groups() if groups is None else groups).get(run_id, [])
        out = self.run_summary(run, rows)
        out.update({
            "agents": run.agents, "env_version": run.env_version, "seed": run.seed,
            "returns": _thin([[i + 1, _num(e.team_return)] for i, e in enumerate(run.episodes)]),
            "updates": self._updates(run),
            "credits": self._credits(run),
            "fairness": self._fairness_view(run),
            "tiers": self._tiers(run),
            "chains": rows,
            "verdict": self.verdict(rows),
        })
        return out

    def _updates(self, run: RunView) -> list[dict]:
        out = []
        for chain_id, updates in sorted(run.updates.items()):
            points = []
            for i, (u, (mean, n)) in enumerate(zip(updates, run.update_returns(updates))):
                points.append({"x": i + 1, "y": _num(mean) if mean is not None else None, "episodes": n,
                               "policy_version": u.policy_version, "env_steps": u.env_steps,
                               "optimizer_steps": u.optimizer_steps, "policy_updated": u.policy_updated,
                               "verified": u.verified})
            out.append({"chain_id": chain_id, "algorithm": updates[-1].algorithm if updates else "",
                        "points": _thin(points)})
        return out

    @staticmethod
    def _pick(chains: dict, preferred: str):
        """The chain to draw: the live processor's own (``preferred``) if present, else the first."""
        if not chains:
            return None, None
        key = preferred if preferred in chains else sorted(chains)[0]
        return key, chains[key]

    def _credits(self, run: RunView) -> dict | None:
        key, s = self._pick(run.credits, f"{run.run_id}:credit")
        if s is None:
            return None
        series = {a: _thin([[i + 1, _num(seg[a])] for i, seg in enumerate(s.segments) if a in seg])
                  for a in s.agents}
        return {"chain_id": key, "chains": sorted(run.credits), "agents": s.agents, "credits": s.credits,
                "series": series}

    def _fairness_view(self, run: RunView) -> dict | None:
        key, s = self._pick(run.fairness, f"{run.run_id}:fairness")
        if s is None:
            return None
        kind, windows = ("episode", s.episode) if s.episode else ("sliding", s.sliding)

        def col(i):
            return _thin([[w[0], _num(w[i])] for w in windows if w[i] is not None])
        return {"chain_id": key, "chains": sorted(run.fairness), "window": kind, "windows": len(windows),
                "gini": col(1), "jain": col(2), "agents": s.agents,
                "diversity": {a: _thin([[w[0], _num(w[3][a])] for w in windows if a in w[3]]) for a in s.agents}}

    @staticmethod
    def _tiers(run: RunView) -> dict | None:
        if not run.tiers:
            return None
        agents = sorted({a for per in run.tiers.values() for a in per}, key=lambda a: (
            run.agents.index(a) if a in run.agents else len(run.agents), a))
        return {"tiers": sorted(run.tiers), "agents": agents,
                "counts": {t: dict(per) for t, per in run.tiers.items()},
                "totals": {t: sum(per.values()) for t, per in run.tiers.items()}}

    def snapshot(self, run_id: str | None = None) -> dict:
        """What the page draws: every run's summary, the chosen run's detail (default: the newest),
        the chains of no run, the dead letters and the last verification's notes."""
        groups = self.chain_groups()
        runs = self.runs_list(groups)
        chosen = run_id if run_id in self.runs else (runs[0]["run_id"] if runs else None)
        v = self.verification
        other = groups.get(None, [])
        return {
            "version": self.version,
            "records": self.records,
            "undecodable": dict(self.undecodable),
            "runs": runs,
            "run": self.run_detail(chosen, groups) if chosen else None,
            "other_chains": other,
            "other_verdict": self.verdict(other),
            "dead_letters": {"total": self.dead_letter_count,
                             "recent": [d.to_json(self.runs) for d in reversed(self.dead_letters)]},
            "verification": None if v is None else {"at": v.at, "seconds": round(v.seconds, 3),
                                                    "chains": len(v.chains), "notes": v.notes[:50],
                                                    "more_notes": max(0, len(v.notes) - 50)},
        }


_FOLDS = {
    "run_started": DashboardState._run_started,
    "run_finished": DashboardState._run_finished,
    "episode_summary": DashboardState._episode_summary,
    "joint_action": DashboardState._joint_action,
    "credit_assignment": DashboardState._credit,
    "fairness_metrics": DashboardState._fairness,
    "policy_update": DashboardState._policy_update,
}

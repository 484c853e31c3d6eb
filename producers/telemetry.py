"""Sandbox telemetry (seed 002's JSON format) to a 30-feature state vector in [0, 1], and a producer
that replays recorded telemetry into ``env.state`` events.

Nothing crashes on bad input: a missing field gets its default and the flag ``defaulted:<field>``;
a field of the wrong type, or not finite, gets its default and ``malformed:<field>``; a number
outside its range is clipped and flagged ``clipped:<field>``; a record that is not a JSON object is
read as an empty one and flagged ``malformed:record``.

Features (``FEATURES``): the 13 raw fields min-max scaled (``RANGES``), 7 counts on a log scale,
and 10 derived features (file I/O ratio, network intensity, exfiltration ratio, syscalls per child
process, CPU x memory pressure, behaviour flag count, log I/O total, high CPU, many children, and
the fraction of raw fields that were defaulted or malformed).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# numeric field -> (default, max); min is 0
RANGES: dict[str, tuple[float, float]] = {
    "severity": (0.0, 1.0),
    "syscall_count": (0.0, 1000.0),
    "file_read_count": (0.0, 500.0),
    "file_write_count": (0.0, 500.0),
    "network_connections": (0.0, 100.0),
    "bytes_sent": (0.0, 1e7),
    "bytes_received": (0.0, 1e7),
    "child_processes": (0.0, 50.0),
    "cpu_usage": (0.0, 100.0),
    "memory_usage": (0.0, 4096.0),
}
BOOLEANS = ("registry_modification", "privilege_escalation_attempt", "code_injection_detected")
RAW_FIELDS = (*RANGES, *BOOLEANS)
LOG_FIELDS = ("syscall_count", "file_read_count", "file_write_count", "network_connections", "bytes_sent",
              "bytes_received", "child_processes")
DERIVED = ("file_io_ratio", "network_intensity", "exfiltration_ratio", "syscalls_per_child", "cpu_memory_pressure",
           "behaviour_flag_count", "log_io_total", "high_cpu", "many_children", "missing_fraction")
FEATURES: tuple[str, ...] = (*RAW_FIELDS, *(f"log_{f}" for f in LOG_FIELDS), *DERIVED)
FEATURE_DIM = len(FEATURES)
assert FEATURE_DIM == 30


@dataclass
class Telemetry:
    """One normalized telemetry record: the state vector, its flags and its metadata."""

    vector: np.ndarray
    flags: list[str] = field(default_factory=list)
    is_malicious: bool = False
    episode: int = 0
    step: int = 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _log_scaled(x: float, hi: float) -> float:
    return math.log1p(x) / math.log1p(hi)


def _clip01(x: float) -> float:
    return 0.0 if not x > 0.0 else (1.0 if x > 1.0 else x)


def _int_or(v: Any, default: int) -> int:
    return int(v) if _is_number(v) and abs(v) < 2**62 else default


def normalize(record: Any) -> Telemetry:
    """A telemetry JSON value (any value) as a ``Telemetry``; never raises."""
    flags: list[str] = []
    if not isinstance(record, dict):
        flags.append("malformed:record")
        record = {}
    raw: dict[str, float] = {}
    bad = 0
    for name, (default, hi) in RANGES.items():
        if name not in record:
            flags.append(f"defaulted:{name}")
            raw[name], bad = default, bad + 1
            continue
        v = record[name]
        if not _is_number(v):
            flags.append(f"malformed:{name}")
            raw[name], bad = default, bad + 1
            continue
        x = float(v)
        if x < 0.0 or x > hi:
            flags.append(f"clipped:{name}")
            x = min(max(x, 0.0), hi)
        raw[name] = x
    for name in BOOLEANS:
        if name not in record:
            flags.append(f"defaulted:{name}")
            raw[name], bad = 0.0, bad + 1
        elif not isinstance(record[name], bool):
            flags.append(f"malformed:{name}")
            raw[name], bad = 0.0, bad + 1
        else:
            raw[name] = 1.0 if record[name] else 0.0
    vec = [raw[n] / RANGES[n][1] for n in RANGES] + [raw[n] for n in BOOLEANS]
    vec += [_log_scaled(raw[n], RANGES[n][1]) for n in LOG_FIELDS]
    r, w = raw["file_read_count"], raw["file_write_count"]
    sent, recv, conns = raw["bytes_sent"], raw["bytes_received"], raw["network_connections"]
    children, cpu = raw["child_processes"], raw["cpu_usage"]
    vec += [
        w / (r + w) if r + w > 0 else 0.5,
        _log_scaled((sent + recv) / (conns + 1.0), 2e7),
        sent / (sent + recv) if sent + recv > 0 else 0.5,
        _clip01(raw["syscall_count"] / (children + 1.0) / RANGES["syscall_count"][1]),
        (cpu / 100.0) * (raw["memory_usage"] / RANGES["memory_usage"][1]),
        sum(raw[n] for n in BOOLEANS) / 3.0,
        _log_scaled(r + w, 1000.0),
        1.0 if cpu > 80.0 else 0.0,
        1.0 if children > 10 else 0.0,
        bad / len(RAW_FIELDS),
    ]
    is_mal = record.get("is_malicious", False)
    if "is_malicious" in record and not isinstance(is_mal, bool):
        flags.append("malformed:is_malicious")
        is_mal = False
    vector = np.clip(np.asarray(vec, dtype=np.float32), 0.0, 1.0)
    return Telemetry(vector, flags, bool(is_mal), _int_or(record.get("episode_id"), 0), _int_or(record.get("step"), 0))


def load_records(path: Path) -> list[Any]:
    """Recorded telemetry: a JSON array of records, one JSON object, or JSON Lines.

    Lines that are not JSON are kept as ``None`` records (they become ``malformed:record`` events)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        out: list[Any] = []
        for line in text.splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    out.append(None)
        return out


@dataclass
class IngestSummary:
    run_id: str
    events: int
    flagged: int


def ingest_telemetry(records: Iterable[Any], log: Any, *, source: str, seed: int = 0) -> IngestSummary:
    """Replay recorded telemetry as a run: ``run.started``, one ``env.state`` per record on
    ``{run}:env`` (state = collapsed state = the 30 features, ``flags`` as normalized), ``run.finished``."""
    from .spaces import space_record
    from gymnasium import spaces
    from .harness import config_digest

    run = log.run_id
    config_json, config_hash = config_digest({"source": source, "features": list(FEATURES)})
    started = log.append(f"{run}:lifecycle", "run.started", {
        "env_id": "telemetry_replay_v0", "env_version": "0", "seed": seed, "config_hash": config_hash,
        "config_json": config_json, "agents": [],
        "state_space": space_record(spaces.Box(0.0, 1.0, (FEATURE_DIM,), np.float32)), "episodes_planned": 0})
    n = flagged = 0
    episodes: set[int] = set()
    for i, rec in enumerate(records):
        t = normalize(rec)
        vec = t.vector.tolist()
        log.append(f"{run}:env", "env.state", {"episode": t.episode, "step": t.step if isinstance(rec, dict) and
                                               "step" in rec else i, "state": vec, "collapsed_state": vec,
                                               "flags": t.flags})
        n += 1
        flagged += bool(t.flags)
        episodes.add(t.episode)
    heads = [{"topic": tp, "chain_id": c, "seq": h.seq, "event_hash": h.event_hash}
             for (tp, c), h in sorted(log.heads().items()) if c.startswith(f"{run}:") and h.seq >= 0]
    log.append(f"{run}:lifecycle", "run.finished", {
        "status": "completed", "reason": "", "episodes": len(episodes), "steps": n, "mean_return": 0.0,
        "chain_heads": heads}, source_event_hashes=[started.event_hash])
    return IngestSummary(run, n + 2, flagged)

"""Sandbox telemetry (seed 002's JSON format): the 30-feature state vector, strict validation of
recorded JSON lines, and their replay as a ``sandbox_v0`` run.

Two readers, for two jobs:

- ``normalize(record)`` never raises (the live env's path): a missing field gets its default and the
  flag ``defaulted:<field>``; a field of the wrong type, or not finite, gets its default and
  ``malformed:<field>``; a number outside its range is clipped and flagged ``clipped:<field>``; a
  record that is not a JSON object is read as an empty one and flagged ``malformed:record``.
- ``parse_telemetry_lines(lines)`` validates recorded telemetry (JSON Lines) strictly with pydantic
  (``TelemetryRecord``) before anything is replayed (`marlgrc ingest --telemetry`): each bad line is a
  ``BadLine`` with its line number, its kind and a one-line reason naming every wrong field, for the
  dead-letter topic; the good ones are grouped into recordings (one recorded detonation each).
  ``replay_env(recordings, n_sandboxes)`` is ``sandbox_v0`` over them: docs/PRODUCERS.md, "Recorded
  telemetry".

Features (``FEATURES``): the 13 raw fields min-max scaled (``RANGES``), 7 counts on a log scale,
and 10 derived features (file I/O ratio, network intensity, exfiltration ratio, syscalls per child
process, CPU x memory pressure, behaviour flag count, log I/O total, high CPU, many children, and
the fraction of raw fields that were defaulted or malformed).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    """A JSON number that is not a bool and not NaN or infinite (an int of any size is finite:
    ``math.isfinite`` would overflow on one beyond a float's range)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


def _as_float(v: int | float) -> float:
    """``float(v)``, with an int beyond a float's range as an infinity of its sign (then clipped)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


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
        x = _as_float(v)
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

    Lines that are not JSON, or nest deeper than Python's JSON reader can follow, are kept as
    ``None`` records (they become ``malformed:record`` events)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except (json.JSONDecodeError, RecursionError):
        out: list[Any] = []
        for line in text.splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError):
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


# ---------------------------------------------------------------- recorded telemetry, validated


class TelemetryRecord(BaseModel):
    """One line of recorded telemetry in seed 002's format ("Telemetry Format"), strictly: JSON types
    as the seed writes them (counts are integers, flags are booleans, no strings for numbers, no
    NaN), physical ranges (counts >= 0, severity in [0, 1], CPU in [0, 100] %, memory >= 0 MB), every
    field present and no unknown one. ``RANGES``' maxima are scaling bounds, not limits: a larger
    value is valid and is clipped when normalized. ``sandbox_id`` (optional) tells recordings of
    several sandboxes apart; it is used for grouping only and never written to an event.
    ``timestamp`` (optional) is accepted and not used."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    episode_id: int = Field(ge=0)
    step: int = Field(ge=0)
    is_malicious: bool
    severity: float = Field(ge=0.0, le=1.0)
    syscall_count: int = Field(ge=0)
    file_read_count: int = Field(ge=0)
    file_write_count: int = Field(ge=0)
    network_connections: int = Field(ge=0)
    bytes_sent: int = Field(ge=0)
    bytes_received: int = Field(ge=0)
    child_processes: int = Field(ge=0)
    cpu_usage: float = Field(ge=0.0, le=100.0)
    memory_usage: float = Field(ge=0.0)
    registry_modification: bool
    privilege_escalation_attempt: bool
    code_injection_detected: bool
    sandbox_id: str | None = None
    timestamp: str | float | None = None

    def as_json(self) -> dict:
        """The record as ``normalize`` reads it."""
        return self.model_dump(exclude={"sandbox_id", "timestamp"})


# dead-letter kinds (dead.letter's error_kind)
NOT_UTF8, INVALID_JSON, INVALID_TELEMETRY, DUPLICATE_STEP, LABEL_CHANGED = (
    "not_utf8", "invalid_json", "invalid_telemetry", "duplicate_step", "label_changed")


@dataclass(frozen=True)
class BadLine:
    """A line that is not valid telemetry: 1-based ``line`` number, its exact bytes, the kind and a
    reason that starts with the line number and names every problem."""

    line: int
    raw: bytes
    kind: str
    reason: str


@dataclass
class ParsedTelemetry:
    """Valid records with their line numbers, bad lines, and how many lines were blank."""

    records: list[tuple[int, TelemetryRecord]] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    blank: int = 0

    @property
    def lines(self) -> int:
        return len(self.records) + len(self.bad) + self.blank

    def recordings(self) -> list[list[TelemetryRecord]]:
        """One recording per (sandbox_id, episode_id), in order of first appearance, its records in
        step order (a gap in the steps is kept as a gap: nothing is invented)."""
        groups: dict[tuple[str | None, int], list[TelemetryRecord]] = {}
        for _, r in self.records:
            groups.setdefault((r.sandbox_id, r.episode_id), []).append(r)
        return [sorted(g, key=lambda r: r.step) for g in groups.values()]


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def describe_errors(exc: ValidationError) -> tuple[str, str]:
    """(kind, reason) of a line pydantic refused: every field's problem, in one line."""
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        msg = errors[0]["msg"].removeprefix("Invalid JSON: ").replace("at line 1 column", "at column")
        return INVALID_JSON, f"not JSON ({msg})"
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e["loc"]) or "record"
        if e["type"] == "missing":
            parts.append(f"{where}: missing")
        elif e["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field (seed 002's telemetry has no such field)")
        elif e["type"] == "model_type":
            parts.append(f"not a JSON object but {type(e['input']).__name__}")
        else:
            parts.append(f"{where}: {e['msg'][0].lower()}{e['msg'][1:]} (got {_shown(e['input'])})")
    return INVALID_TELEMETRY, "; ".join(parts)


def parse_telemetry_lines(lines: Iterable[bytes | str]) -> ParsedTelemetry:
    """Validate recorded telemetry, one JSON object per line (pure). Per line: UTF-8, JSON, a
    ``TelemetryRecord``; across lines: a (sandbox, episode, step) given once, and one label
    (``is_malicious``) per recorded episode, which is one sample's detonation. A line that fails is
    a ``BadLine``; blank lines are counted and skipped."""
    out = ParsedTelemetry()
    seen: dict[tuple, int] = {}
    labels: dict[tuple, tuple[bool, int]] = {}
    for n, raw in enumerate(lines, 1):
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        data = data.rstrip(b"\r\n")
        if not data.strip():
            out.blank += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.bad.append(BadLine(n, data, NOT_UTF8, f"line {n}: not UTF-8 text (byte {exc.start}); JSON "
                                                      f"Lines are UTF-8"))
            continue
        try:
            rec = TelemetryRecord.model_validate_json(text)
        except ValidationError as exc:
            kind, why = describe_errors(exc)
            out.bad.append(BadLine(n, data, kind, f"line {n}: {why}"))
            continue
        episode = (rec.sandbox_id, rec.episode_id)
        where = f"episode {rec.episode_id}" + (f" of sandbox {rec.sandbox_id!r}" if rec.sandbox_id else "")
        first = seen.get((*episode, rec.step))
        if first is not None:
            out.bad.append(BadLine(n, data, DUPLICATE_STEP, f"line {n}: {where} step {rec.step} was already given "
                                                            f"on line {first}; each step is recorded once"))
            continue
        label = labels.get(episode)
        if label is not None and label[0] != rec.is_malicious:
            said, now = str(label[0]).lower(), str(rec.is_malicious).lower()
            out.bad.append(BadLine(n, data, LABEL_CHANGED, f"line {n}: is_malicious is {now} but line {label[1]} of "
                                                           f"{where} says {said}; a recorded episode is one sample"))
            continue
        seen[(*episode, rec.step)] = n
        labels.setdefault(episode, (rec.is_malicious, n))
        out.records.append((n, rec))
    return out


def dead_letter_payload(bad: BadLine, source: str, consumer: str) -> dict:
    """The ``dead.letter`` payload of a bad line: the source (``telemetry:NAME``), its line number as
    the offset, the kind, the reason and the line's exact bytes with their SHA-256."""
    return {"source_topic": f"telemetry:{source}", "source_partition": 0, "source_offset": bad.line,
            "source_key": b"", "error_kind": bad.kind, "reason": bad.reason, "consumer": consumer,
            "payload": bad.raw, "payload_sha256": hashlib.sha256(bad.raw).digest()}


def replay_env(recordings: list[list[TelemetryRecord]], n_sandboxes: int = 2):
    """``sandbox_v0`` over recorded detonations instead of synthetic ones: the k-th episode (the k-th
    ``reset``) gives sandbox ``i`` recording ``(k * n_sandboxes + i) mod len(recordings)``; at step t
    the sandbox observes that recording's t-th record (normalized), its ground truth is the
    recording's ``is_malicious``, and the env's own rewards, containment and truncation apply. A
    sandbox whose recording ends before it contains is truncated there (no telemetry is invented);
    ``max_cycles`` is the longest recording. The recording cannot react to actions: isolation does
    not change what was recorded. ``len(recordings) / n_sandboxes`` episodes, rounded up, replay each
    recording at least once."""
    from .envs.sandbox_v0 import SandboxEnv

    if not recordings or any(not r for r in recordings):
        raise ValueError("replay_env needs at least one recording, none of them empty")

    class RecordedSandboxes(SandboxEnv):
        metadata = {**SandboxEnv.metadata, "name": "sandbox_v0"}

        def __init__(self) -> None:
            flat = [r.as_json() for rec in recordings for r in rec]
            super().__init__(n_sandboxes=n_sandboxes, max_cycles=max(len(r) for r in recordings), telemetry=flat)
            self.recordings = [[r.as_json() for r in rec] for rec in recordings]
            self.resets = 0
            self._now: list[list[dict]] = []

        def reset(self, seed: int | None = None, options: dict | None = None):
            k, n = self.resets, self.n_sandboxes
            self.resets += 1
            self._now = [self.recordings[(k * n + i) % len(self.recordings)] for i in range(n)]
            return super().reset(seed, options)

        def _record(self, i: int) -> dict:
            rec = self._now[i]
            return rec[min(self._t, len(rec) - 1)]

        def step(self, actions):
            obs, rewards, terms, truncs, infos = super().step(actions)
            for a in list(self.agents):  # out of telemetry: truncated, as at max_cycles
                if self._t >= len(self._now[self._index[a]]):
                    truncs[a] = True
                    self.agents.remove(a)
            return obs, rewards, terms, truncs, infos

    return RecordedSandboxes()


def replay_episodes(recordings: list, n_sandboxes: int) -> int:
    """Episodes of ``replay_env`` that replay every recording at least once."""
    return math.ceil(len(recordings) / n_sandboxes)

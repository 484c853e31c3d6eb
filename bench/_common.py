"""Shared benchmark plumbing: a broker from the launcher (or MARLGRC_BOOTSTRAP) and a ratio report."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def broker():
    given = os.environ.get("MARLGRC_BOOTSTRAP")
    if given:
        yield given
        return
    from compose import start_kafka, stop_kafka

    home = Path(tempfile.mkdtemp(prefix="marlgrc-bench-"))
    try:
        yield start_kafka(home).bootstrap
    finally:
        stop_kafka(home, remove_data=True)
        shutil.rmtree(home, ignore_errors=True)


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def best_of(n: int, fn, *args, **kwargs):
    """(fastest time, its result) of ``n`` runs: on a shared machine the fastest run is the one least
    disturbed by other processes; apply it to both sides of a ratio."""
    runs = [timed(fn, *args, **kwargs) for _ in range(n)]
    return min(runs, key=lambda r: r[0])


def report(name: str, *, events: int, seconds: float, limit_name: str, limit_seconds: float,
           min_ratio: float | None = None, min_rate: float | None = None, extra: dict | None = None) -> bool:
    """Ratio = limit's time / our time (1.0 = as fast as the limit). Prints one JSON line. A target of
    None is no target: the ratio to a loop that does no work is information."""
    rate = events / seconds
    ratio = limit_seconds / seconds
    ok = (min_ratio is None or ratio >= min_ratio) and (min_rate is None or rate >= min_rate)
    print(json.dumps({
        "bench": name, "events": events, "events_per_s": round(rate), "seconds": round(seconds, 3),
        "limit": limit_name, "limit_events_per_s": round(events / limit_seconds), "ratio": round(ratio, 3),
        "target_ratio": min_ratio, "target_events_per_s": min_rate, "pass": ok, **(extra or {}),
    }))
    return ok

"""Decode + row building per event: the C path (ledger.fastrows.decode_rows) against the Python
reference (codec decode, then ledger.tables.row_tuples_for_event), on the per-step event types of a
synthetic run (env.state, agent.observation with obs_dim 6 and 18, joint.action with 3 agents).

    ./dev python bench/bench_rowdecode.py [REPEATS]     (PYTHONPATH=. python bench/bench_rowdecode.py)

Prints one JSON line per event type: microseconds per event for both, and the speedup ratio
(reference time / C time), measured in the same run. Target: the C path >= 5x the reference on every
per-step type (exit status 1 otherwise).
"""
from __future__ import annotations

import json
import sys
import time

import _common  # noqa: F401 - puts the repository on sys.path

from eventlog.log import EventLog, MemorySink
from ledger.fastrows import NATIVE, decode_rows, decode_rows_native, py_decode_rows
from tests.synthetic import synthetic_run

REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
MIN_SPEEDUP = 5.0


def events(obs_dim: int) -> dict[str, list[tuple[str, bytes]]]:
    sink = MemorySink()
    log = EventLog(sink, run_id="bench", producer_id="bench")
    synthetic_run(log, episodes=4, steps=100, agents=3, obs_dim=obs_dim, seed=1)
    log.close()
    by_type: dict[str, list[tuple[str, bytes]]] = {}
    for topic, _key, value in sink.sent:
        by_type.setdefault(topic, []).append((topic, value))
    return by_type


def per_event(fn, batch: list[tuple[str, bytes]]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        for offset, (topic, value) in enumerate(batch):
            fn(value, topic, 0, offset)
        best = min(best, time.perf_counter() - t)
    return best / len(batch) * 1e6


def main() -> int:
    if not NATIVE:
        print(json.dumps({"bench": "rowdecode", "error": "C build unavailable: both paths are the reference"}))
        return 1
    cases = []
    for obs_dim in (6, 18):
        by_type = events(obs_dim)
        cases.append((f"agent.observation obs_dim={obs_dim}", by_type["marl.agent.observation"]))
        cases.append((f"env.state 3 agents x {obs_dim}", by_type["marl.env.state"]))
        if obs_dim == 6:
            cases.append(("joint.action 3 agents", by_type["marl.joint.action"]))
    ok = True
    for label, batch in cases:
        for offset, (topic, value) in enumerate(batch):  # same rows, and no fallback on these
            assert decode_rows_native(value, topic, 0, offset) == py_decode_rows(value, topic, 0, offset), label
        ref = per_event(py_decode_rows, batch)
        fast = per_event(decode_rows, batch)
        ratio = ref / fast
        ok &= ratio >= MIN_SPEEDUP
        print(json.dumps({"bench": "rowdecode", "event": label, "events": len(batch), "bytes": len(batch[0][1]),
                          "reference_us": round(ref, 2), "native_us": round(fast, 2), "speedup": round(ratio, 1),
                          "target_speedup": MIN_SPEEDUP, "pass": ratio >= MIN_SPEEDUP}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

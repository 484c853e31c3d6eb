"""ONNX Runtime latency of one joint decision for 5 agents (one batched call through OnnxPolicy.act),
against the limit p99 < 1 ms; torch's latency for the same decision is reported alongside.

    PYTHONPATH=. python bench/bench_onnx.py [--decisions 20000]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from learners.export import OnnxPolicy, export_onnx
from learners.mappo import MAPPO, MAPPOConfig
from learners.replay import RunSpec, SpaceSpec

LIMIT_MS = 1.0


def spec(agents: int = 5, obs_dim: int = 18, actions: int = 5) -> RunSpec:
    ids = tuple(f"agent_{i}" for i in range(agents))
    box = SpaceSpec("Box", (obs_dim,))
    return RunSpec("bench", "simple_spread_v3", "mpe2", 0, ids, {a: box for a in ids},
                   {a: SpaceSpec("Discrete", (), n=actions) for a in ids}, SpaceSpec("none", ()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decisions", type=int, default=20000)
    args = p.parse_args()
    torch.set_num_threads(1)
    s = spec()
    learner = MAPPO(s, MAPPOConfig(seed=0))
    with tempfile.TemporaryDirectory() as d:
        pol = OnnxPolicy(export_onnx(learner, Path(d) / "p.onnx"), s, learner.version)
        rng = np.random.default_rng(0)
        obs = [{a: rng.standard_normal(18).astype(np.float32) for a in s.agents} for _ in range(256)]
        for o in obs[:100]:
            pol.act(o)
        lat = np.empty(args.decisions)
        for i in range(args.decisions):
            t = time.perf_counter()
            pol.act(obs[i % 256])
            lat[i] = time.perf_counter() - t
        tl = np.empty(2000)
        for i in range(2000):
            t = time.perf_counter()
            learner.act(obs[i % 256])
            tl[i] = time.perf_counter() - t
    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
    print(f"onnxruntime joint decision, 5 agents: p50 {p50:.3f} ms, p99 {p99:.3f} ms over {args.decisions}; "
          f"limit p99 < {LIMIT_MS} ms -> ratio p99/limit {p99 / LIMIT_MS:.2f} ({'PASS' if p99 < LIMIT_MS else 'FAIL'})")
    print(f"torch (sampling) same decision: p50 {np.percentile(tl, 50) * 1e3:.3f} ms, p99 {np.percentile(tl, 99) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()

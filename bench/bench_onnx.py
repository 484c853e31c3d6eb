"""ONNX Runtime latency of one joint decision for 5 agents (one batched call through OnnxPolicy.act:
build the actor inputs, one session.run, map the actions back), against the limit p99 < 1 ms;
torch's latency for the same decision is reported alongside. The policy is exported signed and
loaded through the signature check, as `marlgrc run --policy onnx:PATH` loads it; the check's own
time (once per load) is printed too.

The session runs on the caller's thread (intra_op_num_threads=1, sequential execution, no spinning);
the timed loop runs after a warm-up with the garbage collector off. p99 on a shared machine is set
by the OS scheduler as much as by the model, so the load average is printed with the figures.

    PYTHONPATH=. python bench/bench_onnx.py [--decisions 10000]
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eventlog.checkpoint import ONNX_POLICY_KIND, Signer, read_signed_file
from learners.export import export_onnx
from learners.mappo import MAPPO, MAPPOConfig
from learners.replay import RunSpec, SpaceSpec
from producers.policies import ONNX_REMEDY, OnnxPolicy

LIMIT_MS = 1.0


def spec(agents: int = 5, obs_dim: int = 18, actions: int = 5) -> RunSpec:
    ids = tuple(f"agent_{i}" for i in range(agents))
    box = SpaceSpec("Box", (obs_dim,))
    return RunSpec("bench", "simple_spread_v3", "mpe2", 0, ids, {a: box for a in ids},
                   {a: SpaceSpec("Discrete", (), n=actions) for a in ids}, SpaceSpec("none", ()))


def timed(fn, inputs: list, n: int) -> np.ndarray:
    lat = np.empty(n)
    clock = time.perf_counter
    gc.disable()
    try:
        for i in range(n):
            x = inputs[i % len(inputs)]
            t = clock()
            fn(x)
            lat[i] = clock() - t
    finally:
        gc.enable()
    return lat * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decisions", type=int, default=10000)
    p.add_argument("--warmup", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)
    s = spec()
    learner = MAPPO(s, MAPPOConfig(seed=0))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        signer = Signer.generate()
        path = export_onnx(learner, Path(d) / "p.onnx", signer)
        t = time.perf_counter()
        for _ in range(100):
            read_signed_file(path, signer.public_key, ONNX_POLICY_KIND, ONNX_REMEDY)
        check_ms = (time.perf_counter() - t) * 10
        pol = OnnxPolicy(path, signer.public_key)
        rng = np.random.default_rng(0)
        obs = [{a: rng.standard_normal(18).astype(np.float32) for a in s.agents} for _ in range(256)]
        timed(pol.act, obs, args.warmup)
        lat = timed(pol.act, obs, args.decisions)
        timed(learner.act, obs, 200)
        tl = timed(learner.act, obs, 2000)
    load_after = os.getloadavg()
    p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
    print(f"onnxruntime joint decision, 5 agents: p50 {p50:.3f} ms, p99 {p99:.3f} ms, p99.9 {p999:.3f} ms, "
          f"max {lat.max():.3f} ms over {args.decisions} (after {args.warmup} warm-up); limit p99 < {LIMIT_MS} ms "
          f"-> ratio p99/limit {p99 / LIMIT_MS:.2f} ({'PASS' if p99 < LIMIT_MS else 'FAIL'})")
    print(f"torch (sampling) same decision: p50 {np.percentile(tl, 50):.3f} ms, p99 {np.percentile(tl, 99):.3f} ms")
    print(f"signature check before loading (read, SHA-256, Ed25519): {check_ms:.3f} ms per load")
    print(f"machine: {os.cpu_count()} CPUs, load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")


if __name__ == "__main__":
    main()

"""Both cores (issue 17, seed 002): MAPPO on simple_spread_v3 (N=3, 25 steps, 20 episodes per update)
with every event sealed, signed and sent through Kafka, by one process (``learners.online.train_online``
through ``KafkaTransport``, as ``bench/bench_training.py`` runs it) and by 2 and 4 producer processes
feeding one learner through a consumer group (``marlgrc.scaleout.train_scaleout``), each arm for the
same wall time. Target: >= 1.6x one process's env steps/s with 2 producers on this two-core machine
(the broker runs on it too). 4 producers: information.

Each arm's clock starts when it can train: the one process after a warm-up session (imports, the
deterministic mode's first use, connections), the producer processes once every producer has started
and warmed up (spawn and imports are reported apart, as "startup"). env steps/s = env steps trained
on / seconds until the last update. The rounds are synchronous, so every arm's update ``i`` trains on
the episodes of the same seeds (``20 * i ...``) with the policy of update ``i - 1``: the return curves
per env step are printed side by side, in bins of updates.

``--lag 1`` adds, for each producer count, an arm whose producers collect round ``i + 1`` with policy
``i - 1`` while the learner updates on round ``i`` (``train_scaleout(lag=1)``: the update off the
producers' time; PPO scores each round with the actor that collected it). Its update ``i`` trains on
the same seeds, acted by a policy one update older: its return curve per env step is printed beside
the synchronous ones, and its verdict against the target beside theirs.

CPU ms per env step (this process and the producer processes, startup included; the broker's
not counted) says what the arms cost beside what they reach.

The machine is shared: the load average (1 min) is printed before and after each arm; run it when
``uptime`` is lowest and report the load with the figures.

    ./dev python bench/bench_scaleout.py [--seconds 60] [--producers 2,4] [--lag 1] [--repeats 1] [--seed 1]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import _common  # noqa: F401 - puts the repository on sys.path
from eventlog.checkpoint import Signer
from eventlog.kafka import ensure_topics
from learners.mappo import MAPPOConfig
from learners.online import KafkaTransport
from marlgrc.scaleout import train_scaleout
from marlgrc.training import train_on_env
from producers.envs import make_env

TARGET = 1.6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60.0, help="wall time of each arm")
    p.add_argument("--producers", default="2,4", help="producer counts to run beside one process")
    p.add_argument("--repeats", type=int, default=1, help="arms interleaved this many times")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bin", type=int, default=10, help="updates per bin of the return curves")
    p.add_argument("--lag", type=int, default=0, help="also run each producer count with this lag (the update "
                   "overlapped with the next rounds' collection); 0: synchronous arms only")
    args = p.parse_args()
    counts = [int(x) for x in args.producers.split(",") if x]
    torch.set_num_threads(1)
    with _common.broker() as boot:
        prefix = f"benchso{uuid.uuid4().hex[:6]}."
        ensure_topics(boot, prefix)
        home = Path(tempfile.mkdtemp(prefix="marlgrc-bench-scaleout-"))
        key = home / "signing.pem"
        signer = Signer.load_or_create(key)
        env, env_id, ver = make_env("simple_spread_v3")
        transport = KafkaTransport(boot, prefix)  # once, as a training session would
        # warm-up of the one-process arm (not timed): imports, torch's deterministic mode, connections
        train_on_env(env, env_id, ver, "mappo", transport=transport, iterations=3, seed=args.seed,
                     config=MAPPOConfig(seed=args.seed), signer=signer, public_key=signer.public_key)

        def cpu_seconds() -> float:
            """CPU seconds of this process (librdkafka's threads included) and of its finished children
            (the producer processes); the broker's are not counted."""
            ch = resource.getrusage(resource.RUSAGE_CHILDREN)
            return time.process_time() + ch.ru_utime + ch.ru_stime

        def one_process() -> dict:
            res = train_on_env(env, env_id, ver, "mappo", transport=transport, iterations=10**9, seed=args.seed,
                               config=MAPPOConfig(seed=args.seed), signer=signer, public_key=signer.public_key,
                               time_budget_s=args.seconds)
            return {"curve": res.curve, "startup": 0.0}

        def producers(n: int, lag: int = 0) -> dict:
            t = time.perf_counter()
            first: list[float] = []

            def on_update(row: dict) -> None:
                if not first:
                    first.append(time.perf_counter() - t - row["seconds"])  # spawn + imports + warm-up
            res = train_scaleout("simple_spread_v3", producers=n, bootstrap=boot, prefix=prefix, algo="mappo",
                                 signing_key=key, iterations=10**9, seed=args.seed, config=MAPPOConfig(seed=args.seed),
                                 time_budget_s=args.seconds, on_update=on_update, lag=lag)
            return {"curve": res.curve, "startup": first[0] if first else float("nan")}

        arms = {"1 process": one_process, **{f"{n} producers": (lambda n=n: producers(n)) for n in counts}}
        if args.lag:
            arms.update({f"{n} prod lag {args.lag}": (lambda n=n: producers(n, args.lag)) for n in counts})
        results: dict[str, list[dict]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, arm in arms.items():
                before, cpu = os.getloadavg()[0], cpu_seconds()
                out = arm()
                out["cpu"] = cpu_seconds() - cpu
                out["load"] = (before, os.getloadavg()[0])
                last = out["curve"][-1]
                out["sps"] = last["env_steps"] / last["seconds"]
                results[name].append(out)
                out["cpu_ms"] = 1000 * out["cpu"] / last["env_steps"]  # startup included for the producer arms
                print(f"{name}: {last['env_steps']} env steps in {last['seconds']:.1f} s = {out['sps']:.0f} "
                      f"env steps/s "
                      f"({len(out['curve'])} updates; startup {out['startup']:.1f} s; {out['cpu_ms']:.2f} CPU-ms per "
                      f"env step; load average {before:.2f} -> {out['load'][1]:.2f})", flush=True)
        transport.close()

    base = float(np.median([r["sps"] for r in results["1 process"]]))
    print(f"\nMAPPO simple_spread_v3, 20 episodes x 25 steps per update, every event sealed, signed and through "
          f"Kafka, {args.seconds:.0f} s per arm, {os.cpu_count()} CPUs (the broker on the same machine):")
    for name, runs in results.items():
        sps = float(np.median([r["sps"] for r in runs]))
        ratio = sps / base
        verdict = ""
        if name.startswith("2 prod"):
            verdict = f" (target >= {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'})"
        loads = ", ".join(f"{a:.2f}->{b:.2f}" for a, b in (r["load"] for r in runs))
        cpu = float(np.median([r["cpu_ms"] for r in runs]))
        print(f"  {name:12s} {sps:6.0f} env steps/s  ratio {ratio:.2f}{verdict}  "
              f"runs {[round(r['sps']) for r in runs]}  "
              f"CPU {cpu:.2f} ms/env step  load {loads}")
    # return curves per env step: every arm's update i trained on the same env steps (500 * (i + 1))
    curves = {name: runs[0]["curve"] for name, runs in results.items()}
    n = min(len(c) for c in curves.values())
    print(f"\nmean team return per bin of {args.bin} updates ({args.bin * 500} env steps), first repeat:")
    print("  env steps      " + "  ".join(f"{name:>12s}" for name in curves))
    for lo in range(0, n, args.bin):
        hi = min(n, lo + args.bin)
        cells = "  ".join(f"{np.mean([r['charts/episodic_return'] for r in c[lo:hi]]):12.2f}" for c in curves.values())
        print(f"  {lo * 500 + 500:>6d}-{hi * 500:<7d} {cells}")


if __name__ == "__main__":
    main()

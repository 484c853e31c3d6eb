"""MAPPO's update alone, on the CPU and on CUDA: seconds per ``MAPPO.update`` over a synthetic replay.

``MAPPOConfig.device`` moves the update (the PPO epochs: forward, backward and Adam over every
minibatch) to the GPU while acting stays on the CPU; this measures what that buys for a replay of a
given size, and nothing else: no env, no events, no broker (those costs are bench_training.py's,
whose ``--device`` gives the end-to-end env steps/s). The replay is random data of the requested shape
(episodes x steps x agents, observation, state and action sizes), the same on every device.

Each device gets a fresh learner with the same seed and config, one warm-up update (not timed: the
CUDA context, cuBLAS handles and the first kernels), then ``--updates`` timed updates on the same
replay. Reported per device: the median seconds per update, agent-steps of replay per second, and
the part spent in GAE's value pass on the CPU (``MAPPO._flatten``, the same on every device); then
the speed-up of CUDA over the CPU, and how far the CUDA weights are from the CPU's after the same
updates (other arithmetic: close, not bit-identical). Without a GPU (``torch.cuda.is_available()``
false) the CUDA arm is skipped and the reason printed.

Imports only torch, numpy and this repository's ``learners`` and ``eventlog`` (no env, no producer,
no broker; ``eventlog``'s own dependencies, confluent-kafka's client library among them, must be
installed, since ``learners.replay`` imports ``eventlog.kafka``):

    ./dev python bench/bench_update_device.py [--episodes 200] [--steps 25] [--agents 8] [--hidden 64]
        [--obs-dim 32] [--state-dim 128] [--actions 5 | --continuous 3] [--epochs 5] [--minibatches 2]
        [--updates 3] [--threads 1] [--devices cpu cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, without ./dev too

from learners.mappo import MAPPO, MAPPOConfig  # noqa: E402
from learners.replay import Episode, Replay, RunSpec, SpaceSpec  # noqa: E402


def synthetic_replay(args) -> Replay:
    """Random episodes of the requested shape (seeded): observations, state, actions, rewards."""
    agents = tuple(f"agent_{i}" for i in range(args.agents))
    obs = SpaceSpec("Box", (args.obs_dim,), low=(-1.0,) * args.obs_dim, high=(1.0,) * args.obs_dim)
    if args.continuous:
        act = SpaceSpec("Box", (args.continuous,), low=(0.0,) * args.continuous, high=(1.0,) * args.continuous)
    else:
        act = SpaceSpec("Discrete", (), n=args.actions)
    state = SpaceSpec("Box", (args.state_dim,), low=(-1.0,) * args.state_dim, high=(1.0,) * args.state_dim)
    spec = RunSpec("bench-update", "synthetic_v0", "0", 1, agents, dict.fromkeys(agents, obs),
                   dict.fromkeys(agents, act), state)
    rng = np.random.default_rng(0)
    T, N = args.steps, args.agents
    episodes = []
    for ep in range(args.episodes):
        if args.continuous:  # about a fifth of them on a bound, as clipped actions are
            actions = np.clip(rng.normal(0.5, 0.4, (T, N, args.continuous)), 0.0, 1.0).astype(np.float32)
        else:
            actions = rng.integers(args.actions, size=(T, N)).astype(np.int64)
        episodes.append(Episode(0, ep, rng.uniform(-1, 1, (T, N, args.obs_dim)).astype(np.float32),
                                rng.uniform(-1, 1, (T, args.state_dim)).astype(np.float32), actions,
                                rng.normal(0, 1, (T, N)).astype(np.float32), np.ones((T, N), np.float32), False))
    return Replay(spec, episodes, [], True, None)


def time_device(device: str, replay: Replay, args) -> dict:
    config = MAPPOConfig(seed=1, hidden=args.hidden, update_epochs=args.epochs, num_minibatches=args.minibatches,
                         device=device)
    learner = MAPPO(replay.spec, config)
    sync = torch.cuda.synchronize if learner.device.type == "cuda" else (lambda: None)
    learner.update(replay)  # warm-up
    sync()
    times = []
    for _ in range(args.updates):
        t = time.perf_counter()
        learner.update(replay)
        sync()
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    learner._flatten(replay.episodes)  # GAE's value pass, on the CPU modules whatever the device
    flatten = time.perf_counter() - t
    return {"device": device, "seconds": statistics.median(times), "runs": times, "flatten": flatten,
            "learner": learner}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=200, help="episodes in the replay")
    p.add_argument("--steps", type=int, default=25, help="steps per episode")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64, help="MAPPOConfig.hidden (two layers, actor and critic)")
    p.add_argument("--obs-dim", type=int, default=32)
    p.add_argument("--state-dim", type=int, default=128)
    p.add_argument("--actions", type=int, default=5, help="Discrete(n) actions")
    p.add_argument("--continuous", type=int, default=0, metavar="DIM", help="Box(0, 1, (DIM,)) actions instead")
    p.add_argument("--epochs", type=int, default=5, help="MAPPOConfig.update_epochs")
    p.add_argument("--minibatches", type=int, default=2, help="MAPPOConfig.num_minibatches")
    p.add_argument("--updates", type=int, default=3, help="timed updates per device (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (training's default: 1)")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    args = p.parse_args()
    for name in ("episodes", "steps", "agents", "hidden", "obs_dim", "state_dim", "epochs", "minibatches", "updates",
                 "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    torch.set_num_threads(args.threads)
    replay = synthetic_replay(args)
    rows = args.episodes * args.steps * args.agents
    kind = f"Box(0, 1, ({args.continuous},))" if args.continuous else f"Discrete({args.actions})"
    print(f"replay: {args.episodes} episodes x {args.steps} steps x {args.agents} agents = {rows} agent-steps; "
          f"obs {args.obs_dim}, state {args.state_dim}, actions {kind}; hidden {args.hidden}x2; "
          f"{args.epochs} epochs x {args.minibatches} minibatches of {rows // args.minibatches}; "
          f"torch {torch.__version__}, {args.threads} CPU thread(s) of {os.cpu_count()}")
    results = []
    for device in args.devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: skipped: torch.cuda.is_available() is false (torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda}, {torch.cuda.device_count()} device(s) visible)")
            continue
        r = time_device(device, replay, args)
        name = torch.cuda.get_device_name(r["learner"].device) if device.startswith("cuda") else "CPU"
        print(f"{device} ({name}): {r['seconds']:.3f} s per update (median of {[round(x, 3) for x in r['runs']]}), "
              f"{rows / r['seconds']:.0f} agent-steps/s; of which GAE's value pass on the CPU {r['flatten']:.3f} s")
        results.append(r)
    by = {r["device"]: r for r in results}
    cpu = by.get("cpu")
    for r in results:
        if r is cpu or cpu is None:
            continue
        diff = max(float((a - b).abs().max()) for a, b in zip(cpu["learner"].actor.state_dict().values(),
                                                               r["learner"].actor.state_dict().values()))
        same = "bit-identical" if diff == 0 else "other arithmetic: close, not bit-identical"
        print(f"{r['device']} vs cpu: {cpu['seconds'] / r['seconds']:.2f}x faster per update; actor weights after "
              f"{args.updates + 1} updates differ by at most {diff:.2e} ({same})")


if __name__ == "__main__":
    main()

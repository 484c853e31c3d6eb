"""Training throughput (env steps/s) with every event through Kafka: a learner (MAPPO by default; any
of ``learners.algorithms()`` with ``--algo``) on simple_spread_v3 (N=3, max_cycles=25; another env with
``--env``, continuous actions with ``--continuous``), every step sealed, signed, sent, read back, verified and replayed by the one
training loop (``learners.online.train_online``, wired to the harness by ``marlgrc.training``).
Target for MAPPO on simple_spread_v3: >= 900 env steps/s (issue 13); other algorithms and envs: information. Beside it, in the same run, the same training with no events
written (the learner gets the episodes straight from the env): the ratio is information, not a
target. A third arm, sealed events kept in memory (no broker), splits the cost between the event
log and the broker.

The arms use the same seed and config, for the same number of iterations, in this process,
interleaved. Uses $MARLGRC_BOOTSTRAP, else starts a local broker.

    ./dev python bench/bench_training.py [--iterations 6] [--repeats 3] [--algo mappo] [--env simple_spread_v3] [--continuous]
                                         [--device cuda]

``--device`` (learners with a ``device`` config field: MAPPO, IPPO) runs every arm's update there;
acting stays on the CPU. ``bench/bench_update_device.py`` times the update alone, CPU against CUDA.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import uuid

import numpy as np
import torch

from eventlog.checkpoint import Signer
from learners import algorithm
from learners.online import KafkaTransport, MemoryTransport
from learners.networks import torch_device
from learners.replay import Episode, Replay
from marlgrc.training import spec_of, train_on_env
from producers.envs import make_env

TARGET_SPS = 900.0


def direct_episodes(env, policy, spec, episodes: int, seed: int) -> list[Episode]:
    """The same episodes the harness would write, built in memory without any event."""
    out = []
    N, D = len(spec.agents), spec.obs_dim
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        O, S, A, R = [], [], [], []
        while env.agents:
            o = np.zeros((N, D), np.float32)
            for i, a in enumerate(spec.agents):
                o[i, :obs[a].size] = obs[a]
            S.append(np.asarray(env.state(), np.float32))
            acts = policy.act({a: obs[a] for a in env.agents})
            obs, rew, term, trunc, _ = env.step({a: x[0] for a, x in acts.items()})
            O.append(o)
            A.append([acts[a][0] for a in spec.agents])
            R.append([rew[a] for a in spec.agents])
        T = len(O)
        actions = np.asarray(A, np.int64 if spec.discrete else np.float32)
        out.append(Episode(0, ep, np.stack(O), np.stack(S), actions, np.asarray(R, np.float32),
                           np.ones((T, N), np.float32), False))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--algo", default="mappo", help="a learner of learners.algorithms()")
    p.add_argument("--env", default="simple_spread_v3")
    p.add_argument("--continuous", action="store_true", help="the env's continuous-action variant")
    p.add_argument("--device", default="cpu", help="where the learner's update runs (cpu, cuda, cuda:N)")
    args = p.parse_args()
    try:  # before a broker starts: a device this machine lacks is one line
        torch_device(args.device)
    except ValueError as exc:
        p.error(f"--device: {exc}")
    torch.set_num_threads(1)
    boot = os.environ.get("MARLGRC_BOOTSTRAP")
    home = None
    if not boot:
        from compose import start_kafka

        home = tempfile.mkdtemp(prefix="marlgrc-bench-")
        boot = start_kafka(home).bootstrap
    from eventlog.kafka import ensure_topics

    prefix = f"bench{uuid.uuid4().hex[:6]}."
    ensure_topics(boot, prefix)
    env, env_id, ver = make_env(args.env, continuous=args.continuous)
    algo = args.algo
    a = algorithm(algo)
    on_device = {} if args.device == "cpu" else {"device": args.device}
    if on_device and "device" not in a.config_cls.__dataclass_fields__:
        p.error(f"--device {args.device}: {algo}'s config has no device field; use mappo or ippo, or --device cpu")
    signer = Signer.generate()  # every chain signed, as every way to train does with the home's key
    signed = {"signer": signer, "public_key": signer.public_key}

    def direct_arm() -> float:
        learner = a.learner_cls(spec_of(env, "direct", env_id, ver, 1), a.config_cls(seed=1, **on_device))
        t, c = time.perf_counter(), time.process_time()
        for it in range(args.iterations):
            E = learner.config.episodes_per_update
            eps = direct_episodes(env, learner, learner.spec, E, 1_000_003 + it * E)
            learner.update(Replay(learner.spec, eps, [], True, None))
        return learner.env_steps / (time.perf_counter() - t), learner.env_steps / (time.process_time() - c)

    def kafka_arm(transport) -> float:
        t, c = time.perf_counter(), time.process_time()
        res = train_on_env(env, env_id, ver, algo, transport=transport, iterations=args.iterations, seed=1,
                           config=a.config_cls(seed=1, **on_device), **signed)
        n = res.learner.env_steps
        return n / (time.perf_counter() - t), n / (time.process_time() - c)

    def memory_arm() -> float:
        t, c = time.perf_counter(), time.process_time()
        res = train_on_env(env, env_id, ver, algo, transport=MemoryTransport(keep=False),
                           iterations=args.iterations, seed=1, config=a.config_cls(seed=1, **on_device),
                           **signed)
        n = res.learner.env_steps
        return n / (time.perf_counter() - t), n / (time.process_time() - c)

    kafka, direct, memory = [], [], []
    transport = None
    try:
        transport = KafkaTransport(boot, prefix)  # once, as a training session would
        # warm-up, not timed, as long as one timed run: imports (torch's deterministic mode loads its
        # compiler stack on first use), the producer's and consumer's connections, and a broker this
        # bench just started (its JVM compiles the produce and fetch paths in the first seconds)
        train_on_env(env, env_id, ver, algo, transport=transport, iterations=args.iterations, seed=1,
                     config=a.config_cls(seed=1, **on_device), **signed)
        for _ in range(args.repeats):  # arms interleaved, so load changes hit both
            kafka.append(kafka_arm(transport))
            direct.append(direct_arm())
            memory.append(memory_arm())
        transport.close()
        transport = None  # its producer gone before the broker stops (else librdkafka reports the refusals)
        gc.collect()  # the producer's error callback keeps it in a reference cycle
    finally:
        if home:
            from compose import stop_kafka

            stop_kafka(home, remove_data=True)
    kafka_sps, direct_sps = float(np.median([k[0] for k in kafka])), float(np.median([d[0] for d in direct]))
    kafka_cpu, direct_cpu = float(np.median([k[1] for k in kafka])), float(np.median([d[1] for d in direct]))
    ratio, cpu_ratio = kafka_sps / direct_sps, kafka_cpu / direct_cpu
    load = os.getloadavg()[0]
    print(f"runs, wall (env steps/s): through Kafka {[round(k[0]) for k in kafka]}, no events {[round(d[0]) for d in direct]}, "
          f"sealed events kept in memory (no broker) {[round(m[0]) for m in memory]}")
    print(f"runs, per CPU-second of this process (librdkafka threads included, broker excluded): through Kafka "
          f"{[round(k[1]) for k in kafka]}, no events {[round(d[1]) for d in direct]}")
    target = (f"(target >= {TARGET_SPS:.0f}: {'PASS' if kafka_sps >= TARGET_SPS else 'FAIL'})"
              if (algo, args.env, args.continuous) == ("mappo", "simple_spread_v3", False) else "(information)")
    print(f"{algo} {env_id}{' continuous' if args.continuous else ''}, {args.iterations} iterations x "
          f"{a.config_cls().episodes_per_update} episodes: through Kafka {kafka_sps:.0f} env steps/s {target}, no events "
          f"{direct_sps:.0f} env steps/s (medians); ratio {ratio:.2f} (information); per CPU-second ratio "
          f"{cpu_ratio:.2f}; update on {args.device}; load average (1 min) {load:.2f} on {os.cpu_count()} CPUs")
    mem = float(np.median([m[0] for m in memory]))
    print(f"attribution: sealing + verifying + replaying events without a broker {mem:.0f} env steps/s "
          f"(ratio {mem / direct_sps:.2f} to no events); the broker round trip takes the rest (ratio {kafka_sps / mem:.2f})")


if __name__ == "__main__":
    main()

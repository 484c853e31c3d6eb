"""Training throughput (env steps/s) with every event through Kafka, against the same training with
no events written (the learner gets the episodes straight from the env); target ratio >= 0.8.

Both arms run MAPPO on simple_spread_v3 (N=3, max_cycles=25) with the same seed and config, for the
same number of iterations, in this process. Uses $MARLGRC_BOOTSTRAP, else starts a local broker.

    PYTHONPATH=. python bench/bench_training.py [--iterations 6]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid

import numpy as np
import torch

from learners import algorithm
from learners.replay import Episode, Replay
from marlgrc.online import KafkaTransport, make_env, spec_from_env, train_online

TARGET = 0.8


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
        out.append(Episode(0, ep, np.stack(O), np.stack(S), np.asarray(A, np.int64), np.asarray(R, np.float32),
                           np.ones((T, N), np.float32), False))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=6)
    args = p.parse_args()
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
    env, env_id, ver = make_env("simple_spread_v3")
    a = algorithm("mappo")
    try:
        t = time.perf_counter()
        res = train_online(env, env_id, ver, "mappo", transport=KafkaTransport(boot, prefix),
                           iterations=args.iterations, seed=1, config=a.config_cls(seed=1))
        kafka_sps = res.learner.env_steps / (time.perf_counter() - t)

        learner = a.learner_cls(spec_from_env(env, "direct", env_id, ver, 1), a.config_cls(seed=1))
        t = time.perf_counter()
        for it in range(args.iterations):
            eps = direct_episodes(env, learner, learner.spec, learner.config.episodes_per_update, 1_000_003 + it * 20)
            learner.update(Replay(learner.spec, eps, [], True, None))
        direct_sps = learner.env_steps / (time.perf_counter() - t)
    finally:
        if home:
            from compose import stop_kafka

            stop_kafka(home, remove_data=True)
    ratio = kafka_sps / direct_sps
    print(f"MAPPO simple_spread_v3, {args.iterations} iterations x 20 episodes: through Kafka {kafka_sps:.0f} env steps/s, "
          f"no events {direct_sps:.0f} env steps/s; ratio {ratio:.2f} (target >= {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'})")


if __name__ == "__main__":
    main()

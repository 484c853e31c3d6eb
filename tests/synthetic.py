"""A synthetic multi-agent stream: run.started, then per step the global state, each agent's
observation and the joint action, then run.finished. Deterministic for a seed.

A fixture for tests, benchmarks and ``tools/make_vectors.py`` (``marlgrc demo`` runs a real environment);
tests/vectors/hashing.json is written from it, so a change to what it writes changes the vectors."""
from __future__ import annotations

import hashlib
import json
import random
from typing import Callable

from eventlog.log import EventLog


def _space_box(n: int) -> dict:
    return {"kind": "Box", "shape": [n], "dtype": "float32", "n": 0, "start": 0, "nvec": [],
            "low": [-1.0] * n, "high": [1.0] * n}


def _space_discrete(n: int) -> dict:
    return {"kind": "Discrete", "shape": [], "dtype": "int64", "n": n, "start": 0, "nvec": [], "low": [], "high": []}


def synthetic_run(log: EventLog, *, episodes: int = 2, steps: int = 25, agents: int = 3, obs_dim: int = 6,
                  seed: int = 0, progress: Callable[[int], None] | None = None) -> dict:
    """Write one run to ``log``; returns counts. Chains: ``{run}:lifecycle``, ``{run}:env``,
    ``{run}:obs:{agent}``, ``{run}:actions``."""
    rng = random.Random(seed)
    run = log.run_id
    ids = [f"agent_{i}" for i in range(agents)]
    config = {"env": "synthetic_v0", "episodes": episodes, "steps": steps, "agents": agents, "seed": seed}
    config_json = json.dumps(config, sort_keys=True)
    started = log.append(f"{run}:lifecycle", "run.started", {
        "env_id": "synthetic_v0", "env_version": "0", "seed": seed,
        "config_hash": hashlib.sha256(config_json.encode()).hexdigest(), "config_json": config_json,
        "agents": [{"agent_id": a, "observation_space": _space_box(obs_dim), "action_space": _space_discrete(5)}
                   for a in ids],
        "state_space": _space_box(obs_dim * agents), "episodes_planned": episodes,
    })
    total_steps, returns = 0, []
    for ep in range(episodes):
        ep_return = 0.0
        for step in range(steps):
            obs = {a: [rng.uniform(-1, 1) for _ in range(obs_dim)] for a in ids}
            state = [x for a in ids for x in obs[a]]
            st = log.append(f"{run}:env", "env.state", {
                "episode": ep, "step": step, "state": state, "collapsed_state": state[:obs_dim]})
            obs_hashes = [log.append(f"{run}:obs:{a}", "agent.observation", {
                "episode": ep, "step": step, "agent_id": a, "observation": obs[a]},
                source_event_hashes=[st.event_hash]).event_hash for a in ids]
            done = step == steps - 1
            actions = [{"agent_id": a, "discrete": rng.randrange(5), "continuous": [], "log_prob": -1.6094,
                        "reward": rng.uniform(-1, 1), "terminated": False, "truncated": done} for a in ids]
            ep_return += sum(x["reward"] for x in actions)
            log.append(f"{run}:actions", "joint.action", {
                "episode": ep, "step": step, "actions": actions,
                "joint_vector": [float(x["discrete"]) for x in actions]},
                policy_version="random", source_event_hashes=[st.event_hash, *obs_hashes])
            total_steps += 1
            if progress:
                progress(1)
        returns.append(ep_return)
    heads = [{"topic": t, "chain_id": c, "seq": h.seq, "event_hash": h.event_hash}
             for (t, c), h in sorted(log.heads().items())]
    log.append(f"{run}:lifecycle", "run.finished", {
        "status": "completed", "reason": "", "episodes": episodes, "steps": total_steps,
        "mean_return": sum(returns) / len(returns) if returns else 0.0, "chain_heads": heads},
        source_event_hashes=[started.event_hash])
    return {"episodes": episodes, "steps": total_steps, "events": total_steps * (2 + agents) + 2}

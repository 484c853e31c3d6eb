"""Evaluating a policy on an env without writing events: mean team return, the security envs'
outcomes, and a learner's deterministic policy (``GreedyPolicy``, what the ONNX export runs)."""
from __future__ import annotations

from typing import Any


def evaluate(env: Any, policy: Any, episodes: int, seed: int) -> float:
    """Mean team return (all agents' rewards summed over an episode) of ``policy`` without events."""
    total = 0.0
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        while env.agents:
            acts = policy.act({a: obs[a] for a in env.agents if a in obs})
            obs, rew, _, _, _ = env.step({a: x[0] for a, x in acts.items()})
            total += sum(rew.values())
    return total / episodes


def evaluate_security(env: Any, policy: Any, episodes: int, seed: int) -> dict:
    """Mean team return and security outcomes per episode of ``policy`` (no events written).

    mailbox_v0: ``breaches`` = plain OPENs of a malicious item (the env's ``breach`` info).
    sandbox_v0: ``breaches`` = malicious samples never contained before the episode ended (missed
    detections); ``exposure_steps`` = steps a malicious sample ran on uncontained (the attack
    progressing: what a late detection costs); ``detections`` and ``false_positives`` (benign
    samples killed) from the env's infos. Ground truth is read from the env (``_malicious``).
    """
    total = breaches = detections = false_pos = exposure = 0.0
    sandbox = hasattr(env, "n_sandboxes")
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        contained: set[str] = set()
        while env.agents:
            acts = policy.act({a: obs[a] for a in env.agents if a in obs})
            if sandbox:
                mal = env._malicious
                exposure += sum(1 for a, x in acts.items()
                                if mal[env.possible_agents.index(a)] and int(x[0]) not in (2, 3))  # not contained
            obs, rew, _, _, infos = env.step({a: x[0] for a, x in acts.items()})
            total += sum(rew.values())
            if any(i.get("breach") for i in infos.values()):
                breaches += 1  # one breach per step: every agent's info reports the same item
            for a, i in infos.items():
                if i.get("detected"):
                    detections += 1
                    contained.add(a)
                false_pos += bool(i.get("false_positive"))
        if sandbox:
            breaches += sum(1 for i, a in enumerate(env.possible_agents) if env._malicious[i] and a not in contained)
    out = {"mean_return": total / episodes, "breaches_per_episode": breaches / episodes}
    if sandbox:
        out |= {"exposure_steps_per_episode": exposure / episodes, "detections_per_episode": detections / episodes,
                "false_positives_per_episode": false_pos / episodes}
    return out


class GreedyPolicy:
    """A learner's deterministic policy (argmax / Gaussian mean: what ONNX exports), as a Policy."""

    def __init__(self, learner: Any):
        self.learner = learner
        self.version = learner.version + "-greedy"

    def act(self, observations, state=None) -> dict:
        import numpy as np
        import torch

        from .export import actor_inputs

        spec = self.learner.spec
        live, x = actor_inputs(spec, observations)
        with torch.no_grad():
            acts = self.learner.greedy(torch.as_tensor(x)).numpy()
        if spec.discrete:
            start = spec.action_space.start
            return {a: (int(acts[j]) + start, 0.0) for j, a in enumerate(live)}
        low, high = np.asarray(spec.action_space.low, np.float32), np.asarray(spec.action_space.high, np.float32)
        return {a: (np.clip(acts[j], low, high), 0.0) for j, a in enumerate(live)}

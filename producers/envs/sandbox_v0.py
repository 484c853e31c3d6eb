"""sandbox_v0: containment agents watch file detonations in sandboxes and act on them (seed 002).

Each agent owns one sandbox. Every step its sandbox emits telemetry in seed 002's JSON format
(synthetic, or replayed from recorded ``telemetry`` records), normalized to the 30 features of
``producers.telemetry.FEATURES``. A malicious sample escalates (more syscalls, writes, traffic,
behaviour flags) until contained. Whether the sample is malicious is hidden from the agents.

| | |
|---|---|
| Agents | ``sandbox_0`` .. ``sandbox_{n-1}`` (``n_sandboxes``) |
| Action | Discrete(5): 0 CONTINUE_MONITORING, 1 INCREASE_ISOLATION, 2 TERMINATE_PROCESS, 3 QUARANTINE_FILE, 4 REQUEST_HUMAN_REVIEW |
| Observation | Box(0, 1, (30,)): the normalized telemetry of the agent's sandbox |
| State | Box(0, 1, (30 * n,)): every sandbox's features, in agent order |
| Rewards (detection outcomes, ``step_reward``) | ``REWARDS[action] = (benign, malicious)`` (seed 002: terminate +1.0, quarantine +1.5 on a malicious sample). Benign sample: ``REWARDS[action][0]`` every step (containing it: -1.0, a false positive, ends the episode; isolating -0.2 and review -0.3 each step). Malicious sample, contained (TERMINATE/QUARANTINE): ``REWARDS[action][1]``, once. Malicious sample, not contained this step: ``-(UNCONTAINED_COST + severity)`` whatever the action (the attack progresses), plus the INCREASE_ISOLATION (+0.5) or REQUEST_HUMAN_REVIEW (+0.3) credit **at most once per sample**. No sequence of uncontained steps pays more than containing at once |
| Termination | TERMINATE_PROCESS or QUARANTINE_FILE ends that agent's sandbox; truncation after ``max_cycles`` |
| Infos | ``flags`` (telemetry data-quality flags), ``detected`` (contained a malicious sample), ``false_positive`` (contained a benign one), ``uncontained`` (a malicious sample ran on this step) |
| Arguments | ``n_sandboxes=2``, ``max_cycles=20``, ``malicious_rate=0.5``, ``telemetry=None`` (records to replay) |

Reward version 1 (this one) replaces version 0, which paid INCREASE_ISOLATION's +0.5 on *every* step a
malicious sample was kept isolated and charged the severity only while monitoring: isolating for 20
steps (+10) beat containing (+1.5), so the reward-optimal policy never contained a malicious sample.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from producers.telemetry import FEATURE_DIM, normalize

ENV_ID = "sandbox_v0"
ENV_VERSION = "0"
REWARD_VERSION = 1

CONTINUE_MONITORING, INCREASE_ISOLATION, TERMINATE_PROCESS, QUARANTINE_FILE, REQUEST_HUMAN_REVIEW = range(5)
ACTIONS = ("continue_monitoring", "increase_isolation", "terminate_process", "quarantine_file",
           "request_human_review")
# (benign, malicious)
REWARDS = {
    CONTINUE_MONITORING: (0.1, -0.5),
    INCREASE_ISOLATION: (-0.2, 0.5),
    TERMINATE_PROCESS: (-1.0, 1.0),
    QUARANTINE_FILE: (-1.0, 1.5),
    REQUEST_HUMAN_REVIEW: (-0.3, 0.3),
}
CONTAINING = frozenset({TERMINATE_PROCESS, QUARANTINE_FILE})
# paid at most once per malicious sample (a correct suspicion, not a per-step income)
ONCE_PER_SAMPLE = frozenset({INCREASE_ISOLATION, REQUEST_HUMAN_REVIEW})
# every step a malicious sample runs on uncontained costs this plus its severity (= monitoring's miss cost)
UNCONTAINED_COST = -REWARDS[CONTINUE_MONITORING][1]


def step_reward(action: int, malicious: bool, severity: float, credited: frozenset[int] = frozenset()) -> float:
    """One agent's reward for ``action`` on its sample (pure).

    ``severity`` is the sample's observed severity in [0, 1]; ``credited`` the once-per-sample actions
    already paid on this sample. Benign: ``REWARDS[action][0]``. Malicious and contained: the
    containment reward. Malicious and not contained: ``-(UNCONTAINED_COST + severity)`` plus the
    action's credit if it is in ``ONCE_PER_SAMPLE`` and not in ``credited``.
    """
    if action not in REWARDS:
        raise ValueError(f"sandbox_v0: action {action!r} is not one of 0..4 ({', '.join(ACTIONS)})")
    if not malicious:
        return REWARDS[action][0]
    if action in CONTAINING:
        return REWARDS[action][1]
    r = -(UNCONTAINED_COST + float(severity))
    if action in ONCE_PER_SAMPLE and action not in credited:
        r += REWARDS[action][1]
    return r


def _synthetic(rng: np.random.Generator, malicious: bool, t: int, isolation: int) -> dict:
    """One telemetry record; a malicious sample escalates with time and is slowed by isolation."""
    heat = (1.0 + t) / (1.0 + isolation) if malicious else 0.3
    return {
        "episode_id": 0, "step": t, "is_malicious": malicious,
        "severity": float(min(1.0, 0.2 + 0.1 * heat)) if malicious else float(rng.uniform(0.0, 0.2)),
        "syscall_count": int(rng.poisson(80 + 40 * heat)),
        "file_read_count": int(rng.poisson(15 + 3 * heat)),
        "file_write_count": int(rng.poisson(3 + 8 * heat if malicious else 3)),
        "network_connections": int(rng.poisson(1 + 2 * heat if malicious else 1)),
        "bytes_sent": int(rng.poisson(500 + 2000 * heat if malicious else 500)),
        "bytes_received": int(rng.poisson(1500)),
        "child_processes": int(rng.poisson(0.5 + 0.8 * heat if malicious else 0.5)),
        "cpu_usage": float(min(100.0, rng.uniform(5, 30) + (10 * heat if malicious else 0))),
        "memory_usage": float(rng.uniform(100, 400) + (40 * heat if malicious else 0)),
        "registry_modification": bool(malicious and rng.uniform() < 0.2 * heat),
        "privilege_escalation_attempt": bool(malicious and rng.uniform() < 0.1 * heat),
        "code_injection_detected": bool(malicious and rng.uniform() < 0.1 * heat),
    }


class SandboxEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}

    def __init__(self, n_sandboxes: int = 2, max_cycles: int = 20, malicious_rate: float = 0.5,
                 telemetry: Sequence[Any] | None = None):
        if n_sandboxes < 1 or max_cycles < 1 or not 0.0 <= malicious_rate <= 1.0:
            raise ValueError(f"sandbox_v0 needs n_sandboxes, max_cycles >= 1 and 0 <= malicious_rate <= 1; "
                             f"got {n_sandboxes}, {max_cycles}, {malicious_rate}")
        self.n_sandboxes, self.max_cycles, self.malicious_rate = n_sandboxes, max_cycles, malicious_rate
        self._replay = list(telemetry) if telemetry is not None else None
        self.possible_agents = [f"sandbox_{i}" for i in range(n_sandboxes)]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(0.0, 1.0, (FEATURE_DIM,), np.float32)
        self._act_space = spaces.Discrete(5)
        self.state_space = spaces.Box(0.0, 1.0, (FEATURE_DIM * n_sandboxes,), np.float32)
        self._rng = np.random.default_rng()

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    def _record(self, i: int) -> dict | Any:
        if self._replay:
            rec = self._replay[self._cursor % len(self._replay)]
            self._cursor += 1
            return rec
        return _synthetic(self._rng, bool(self._malicious[i]), self._t, int(self._isolation[i]))

    def _observe(self, agents: Sequence[str]) -> dict[str, np.ndarray]:
        obs = {}
        for a in agents:
            i = self._index[a]
            t = normalize(self._record(i))
            if self._replay:
                self._malicious[i] = t.is_malicious
            self._features[i] = t.vector
            self._flags[a] = t.flags
            obs[a] = t.vector.copy()
        return obs

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        n = self.n_sandboxes
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        self._malicious = self._rng.uniform(size=n) < self.malicious_rate
        self._isolation = np.zeros(n, np.int64)
        self._credited: list[set[int]] = [set() for _ in range(n)]
        self._features = np.zeros((n, FEATURE_DIM), np.float32)
        self._flags: dict[str, list[str]] = {}
        self._cursor = int(self._rng.integers(len(self._replay))) if self._replay else 0
        self._t = 0
        self.agents = list(self.possible_agents)
        obs = self._observe(self.agents)
        return obs, {a: {"flags": self._flags[a]} for a in self.agents}

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("sandbox_v0: step() after the episode ended; call reset() first")
        rewards, terms, infos = {}, {}, {}
        for a in self.agents:
            i = self._index[a]
            act = int(actions.get(a, CONTINUE_MONITORING))
            mal = bool(self._malicious[i])
            r = step_reward(act, mal, float(self._features[i][0]), frozenset(self._credited[i]))
            if mal and act in ONCE_PER_SAMPLE:
                self._credited[i].add(act)
            if act == INCREASE_ISOLATION:
                self._isolation[i] += 1
            contained = act in CONTAINING
            rewards[a], terms[a] = float(r), contained
            infos[a] = {"detected": contained and mal, "false_positive": contained and not mal,
                        "uncontained": mal and not contained}
        self._t += 1
        truncs = {a: self._t >= self.max_cycles for a in self.agents}
        obs = self._observe(self.agents)
        for a in self.agents:
            infos[a]["flags"] = self._flags[a]
        self.agents = [a for a in self.agents if not (terms[a] or truncs[a])]
        return obs, rewards, terms, truncs, infos

    def state(self) -> np.ndarray:
        return self._features.reshape(-1).copy()

    def heuristic_action(self, agent: str, observation: np.ndarray) -> int:
        """Contain on strong behaviour signals, isolate on moderate ones, otherwise keep watching."""
        o = observation
        flags = o[10] + o[11] + o[12]           # registry, privilege escalation, code injection
        if o[12] > 0.5 or o[11] > 0.5:
            return QUARANTINE_FILE
        if flags > 0 or o[0] > 0.5:
            return TERMINATE_PROCESS
        if o[0] > 0.3 or o[20] > 0.35:          # severity, file I/O ratio (writes)
            return INCREASE_ISOLATION
        return CONTINUE_MONITORING

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> SandboxEnv:
    return SandboxEnv(**kwargs)


env = parallel_env

"""Shared pieces for the learner tests: a tiny cooperative task and replay helpers (no tests here
besides a check of the task itself)."""
from __future__ import annotations

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from eventlog.log import EventLog, MemorySink
from learners.replay import read_records_of_run, records_from_memory


class MatchTarget(ParallelEnv):
    """Each agent sees a target (one-hot of 3, or a number in [-1, 1] with ``continuous``) and is
    rewarded for naming it: 1 for the right discrete action, -|a - target| for a continuous one.
    Random play scores 1/3 (discrete) or about -0.5 to -1 (continuous) per agent-step."""

    metadata = {"name": "match_target_v0"}

    def __init__(self, n_agents: int = 2, length: int = 8, continuous: bool = False):
        self.possible_agents = [f"agent_{i}" for i in range(n_agents)]
        self.length, self.continuous = length, continuous
        self._obs_space = spaces.Box(-1.0, 1.0, (1 if continuous else 3,), np.float32)
        self._act_space = spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else spaces.Discrete(3)
        self.rng = np.random.default_rng(0)

    def observation_space(self, agent):
        return self._obs_space

    def action_space(self, agent):
        return self._act_space

    def _observe(self):
        if self.continuous:
            self.target = {a: float(self.rng.uniform(-1, 1)) for a in self.agents}
            return {a: np.array([t], np.float32) for a, t in self.target.items()}
        self.target = {a: int(self.rng.integers(3)) for a in self.agents}
        return {a: np.eye(3, dtype=np.float32)[t] for a, t in self.target.items()}

    def reset(self, seed=None, options=None):
        self.rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.t = 0
        return self._observe(), {a: {} for a in self.agents}

    def step(self, actions):
        if self.continuous:
            rew = {a: -abs(float(np.asarray(actions[a]).ravel()[0]) - self.target[a]) for a in self.agents}
        else:
            rew = {a: float(int(actions[a]) == self.target[a]) for a in self.agents}
        self.t += 1
        done = self.t >= self.length
        obs = self._observe()
        term = {a: False for a in self.agents}
        trunc = {a: done for a in self.agents}
        infos = {a: {} for a in self.agents}
        if done:
            self.agents = []
        return obs, rew, term, trunc, infos


def harness_run(env, policy, *, run_id="r1", episodes=4, seed=0, sink=None):
    from producers.harness import run_episodes

    sink = sink or MemorySink()
    log = EventLog(sink, run_id=run_id, producer_id="harness")
    run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id="match_target_v0", env_version="0",
                 config={})
    log.close()
    return sink


def replay_of(sink, run_id="r1", **kw):
    return read_records_of_run(records_from_memory(sink.sent), run_id, **kw)


def test_match_target_rewards_the_right_action():
    env = MatchTarget()
    obs, _ = env.reset(seed=3)
    right = {a: int(np.argmax(o)) for a, o in obs.items()}
    _, rew, _, _, _ = env.step(right)
    assert all(r == 1.0 for r in rew.values())

"""QMIX (Rashid et al. 2018, "QMIX: Monotonic Value Function Factorisation for Deep Multi-Agent
Reinforcement Learning"): per-agent Q-networks mixed into a team value Q_tot by a network whose weights
come from hypernetworks over the global state, and are kept non-negative so that
dQ_tot / dQ_i >= 0: each agent's greedy action on its own Q is the greedy joint action on Q_tot,
which is what lets agents act alone (decentralized execution) on what was trained together.

- Agent network: one MLP shared by the agents (parameter sharing) over the observation, zero-padded to
  the widest agent, and the agent's one-hot id; agents with fewer actions have the missing ones
  masked to -1e9 inside the network (the DQN's ``QNetwork``), so the ONNX export masks too. MLP only:
  the Policy protocol and the export map one observation to one action, with no hidden state to
  carry between steps (a recurrent agent would need one per agent and episode).
- Mixer: ``Q_tot = w2 . elu(W1 q + b1) + V(s)``, ``W1 = |hyper_w1(s)|``, ``w2 = |hyper_w2(s)|``, with
  ``s`` the run's ``env.state`` (``Episode.state``).
- Episode replay buffer: whole episodes (a FIFO of ``buffer_size`` episodes), padded to the longest
  episode of each sampled batch, with each agent's alive mask and a mask of the steps that exist.
  Filled by ``update(replay)``, so one update serves ``marlgrc train`` (a replayed run) and
  ``train-online`` (each new batch of the live stream). Batches are sampled without replacement with
  a seeded generator. Its ``BufferLineage`` makes each ``policy.update`` name every batch it holds.
- Target: TD(0) with double Q on the team reward (the sum of the agents' rewards at each step):
  ``y_t = r_t + gamma * Q_tot'(s_{t+1}, argmax_a Q_i(o_{t+1}))``, the argmax by the online agent
  network, the value by the target agent network and target mixer (both copied every
  ``target_network_frequency`` optimizer steps). An agent's Q enters the mixer only at steps where it
  is alive. Nothing is bootstrapped past an episode's last step, since no event records the
  observation after it: a terminated episode's last step has the target r_t, and a truncated
  episode's last step (a time limit, not an end) is left out of the loss rather than taught that the
  future is worth 0 (an agent that cannot see the clock could not tell that step from the others).
- Epsilon-greedy acting, epsilon linear from ``start_e`` to ``end_e`` over ``epsilon_anneal_episodes``.
- Discrete actions only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dqn import QNetwork, epsilon_greedy
from .learner import Learner
from .lineage import BufferLineage
from .networks import config_hash, seed_everything, weights_sha256
from .replay import Episode, Replay, ReplayError, RunSpec


@dataclass
class QMIXConfig:
    seed: int = 1
    """seed of torch, numpy, the buffer's sampler and epsilon-greedy"""
    learning_rate: float = 5e-4
    """Adam learning rate of the agent network and the mixer"""
    gamma: float = 0.99
    """discount factor"""
    batch_size: int = 32
    """episodes per gradient step"""
    buffer_size: int = 5000
    """replay buffer capacity in episodes"""
    learning_starts: int = 32
    """episodes in the buffer before the first gradient step"""
    train_frequency: int = 75
    """new agent-transitions (one per live agent per env step) per gradient step (75: one step per
    simple_spread_v3 episode of 3 agents x 25 steps)"""
    target_network_frequency: int = 200
    """optimizer steps between copies of the agent network and mixer into their targets"""
    double_q: bool = True
    """the next step's actions are chosen by the online agent network, valued by the target networks"""
    start_e: float = 1.0
    """initial exploration rate"""
    end_e: float = 0.05
    """final exploration rate"""
    epsilon_anneal_episodes: int = 2000
    """episodes over which epsilon falls linearly from start_e to end_e"""
    reward_scale: float = 1.0
    """the team reward is multiplied by this before the TD target"""
    max_grad_norm: float = 10.0
    """gradient clipping (agent network and mixer together)"""
    hidden_layers: tuple[int, ...] = (64, 64)
    """hidden units per layer of the agent network"""
    mixing_embed_dim: int = 32
    """width of the mixer's hidden layer"""
    hypernet_embed: int = 64
    """hidden units of the hypernetworks that produce the mixer's weights"""
    episodes_per_update: int = 20
    """episodes the producers run with the current policy between updates (online training)"""


class QMixer(nn.Module):
    """Q_tot(q_1..q_N, s), monotonic in every q_i: the weights that multiply q are absolute values."""

    def __init__(self, n_agents: int, state_dim: int, embed: int, hypernet_embed: int):
        super().__init__()
        self.n_agents, self.embed = n_agents, embed
        self.hyper_w1 = nn.Sequential(nn.Linear(state_dim, hypernet_embed), nn.ReLU(),
                                      nn.Linear(hypernet_embed, n_agents * embed))
        self.hyper_b1 = nn.Linear(state_dim, embed)
        self.hyper_w2 = nn.Sequential(nn.Linear(state_dim, hypernet_embed), nn.ReLU(),
                                      nn.Linear(hypernet_embed, embed))
        self.value = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, q: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """q [B, N], state [B, S] -> Q_tot [B]."""
        w1 = self.hyper_w1(state).abs().view(-1, self.n_agents, self.embed)
        b1 = self.hyper_b1(state).unsqueeze(1)
        hidden = F.elu(torch.bmm(q.unsqueeze(1), w1) + b1)                  # [B, 1, E]
        w2 = self.hyper_w2(state).abs().unsqueeze(-1)                        # [B, E, 1]
        return (torch.bmm(hidden, w2).squeeze(-1) + self.value(state)).squeeze(-1)


class EpisodeBuffer:
    """FIFO ring of whole episodes; ``sample`` pads a seeded batch to its longest episode.

    An episode is a dict of time-major arrays (``FIELDS``) and ``terminated`` (a bool)."""

    FIELDS = ("inputs", "state", "actions", "team_reward", "alive")

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.episodes: list[dict] = []
        self.pos = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def size(self) -> int:
        return len(self.episodes)

    def add(self, episode: dict) -> None:
        if self.size < self.capacity:
            self.episodes.append(episode)
        else:
            self.episodes[self.pos] = episode
        self.pos = (self.pos + 1) % self.capacity

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = self.rng.choice(self.size, min(n, self.size), replace=False)
        return self.batch([self.episodes[i] for i in idx])

    @staticmethod
    def batch(eps: list[dict]) -> dict[str, torch.Tensor]:
        """Pad to the longest episode T: ``FIELDS`` zero-padded, and masks [B, T]: ``step`` where the
        step exists, ``last`` at each episode's final step (nothing is bootstrapped past it), ``learn``
        where the TD target is known: every step but the last of an episode that was truncated, whose
        target needs the observation after it, which no event records. (``alive`` [B, T, N]: where
        each agent acted.)"""
        B, T = len(eps), max(len(e["team_reward"]) for e in eps)
        N, D = eps[0]["inputs"].shape[1:]
        out = {"inputs": np.zeros((B, T, N, D), np.float32),
               "state": np.zeros((B, T, eps[0]["state"].shape[1]), np.float32),
               "actions": np.zeros((B, T, N), np.int64), "team_reward": np.zeros((B, T), np.float32),
               "alive": np.zeros((B, T, N), np.float32), "step": np.zeros((B, T), np.float32),
               "last": np.zeros((B, T), np.float32), "learn": np.zeros((B, T), np.float32)}
        for b, e in enumerate(eps):
            L = len(e["team_reward"])
            for k in EpisodeBuffer.FIELDS:
                out[k][b, :L] = e[k]
            out["step"][b, :L] = 1.0
            out["last"][b, L - 1] = 1.0
            out["learn"][b, :L if e["terminated"] else L - 1] = 1.0
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def state_dict(self) -> dict:
        return {"episodes": self.episodes, "pos": self.pos, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, s: dict) -> None:
        self.episodes, self.pos = list(s["episodes"]), s["pos"]
        self.rng.bit_generator.state = s["rng"]


class QMIX(Learner):
    """Shared agent Q-network over (observation, one-hot agent id) and a state-conditioned monotonic mixer."""

    algorithm = "qmix"
    counter_names = (*Learner.counter_names, "pending_transitions")
    on_policy = False
    centralized_critic = True
    continuous_actions = False

    def __init__(self, spec: RunSpec, config: QMIXConfig | None = None):
        if not spec.discrete:
            raise ReplayError(f"run {spec.run_id}: QMIX needs a Discrete action space, the run's is "
                              f"{spec.action_space.kind}; use --algo mappo or ippo for continuous actions")
        self.spec = spec
        self.config = config or QMIXConfig()
        c = self.config
        seed_everything(c.seed)
        self.n_agents = len(spec.agents)
        self.in_dim = spec.obs_dim + self.n_agents
        self.n_own = [spec.action_spaces[a].n for a in spec.agents]  # each agent's own action count
        mask, hidden = spec.action_mask(), tuple(c.hidden_layers)
        self.agent_q = QNetwork(self.in_dim, spec.n_actions, hidden, mask)
        self.mixer = QMixer(self.n_agents, spec.state_dim, c.mixing_embed_dim, c.hypernet_embed)
        self.target_agent_q = QNetwork(self.in_dim, spec.n_actions, hidden, mask)
        self.target_mixer = QMixer(self.n_agents, spec.state_dim, c.mixing_embed_dim, c.hypernet_embed)
        self._update_targets()
        self.optimizer = torch.optim.Adam([*self.agent_q.parameters(), *self.mixer.parameters()], lr=c.learning_rate)
        self.buffer = EpisodeBuffer(c.buffer_size, c.seed)
        self.buffer_lineage = BufferLineage(c.buffer_size)  # what policy.update names: the buffer's batches
        self.explorer = np.random.Generator(np.random.PCG64(c.seed + 1))
        self._start_counters()
        self.config_hash = config_hash(self.config)
        self.version = self._version()

    @property
    def epsilon(self) -> float:
        c = self.config
        frac = min(1.0, self.episodes / max(1, c.epsilon_anneal_episodes))
        return c.start_e + frac * (c.end_e - c.start_e)

    def _version(self) -> str:
        return f"{self.algorithm}-v{self.updates}-{weights_sha256(self.agent_q).hex()[:12]}"

    def _update_targets(self) -> None:
        self.target_agent_q.load_state_dict(self.agent_q.state_dict())
        self.target_mixer.load_state_dict(self.mixer.state_dict())

    def _inputs(self, obs: np.ndarray) -> np.ndarray:
        """[T, N, obs_dim] -> [T, N, obs_dim + N]"""
        eye = np.broadcast_to(np.eye(self.n_agents, dtype=np.float32), (*obs.shape[:-1], self.n_agents))
        return np.concatenate([obs, eye], -1)

    # --- acting: the Policy protocol ---------------------------------------------------------
    @torch.no_grad()
    def act(self, observations, state=None) -> dict:
        """Epsilon-greedy on each agent's own Q; log_prob is that of the chosen action under it."""
        return epsilon_greedy(self.agent_q, self.spec, self.n_own, self.explorer, self.epsilon, observations)

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        """Each agent's argmax of its own Q (monotonic mixing makes it the joint argmax): what ONNX exports."""
        return self.agent_q(x).argmax(-1)

    # --- the update ------------------------------------------------------------------------
    def _add(self, ep: Episode) -> int:
        """Put one replayed episode in the buffer; returns its agent-transitions (live agent-steps)."""
        self.buffer.add({"inputs": self._inputs(ep.obs), "state": ep.state.astype(np.float32),
                         "actions": ep.actions.astype(np.int64), "team_reward": ep.rewards.sum(1).astype(np.float32),
                         "alive": ep.alive.astype(np.float32), "terminated": bool(ep.terminated)})
        return int((ep.alive > 0).sum())

    @torch.no_grad()
    def td_targets(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """TD(0) targets y [B, T] of a padded batch: the team reward plus gamma * Q_tot' of the next step,
        nothing after an episode's last step. Double Q: the next actions are the online agent network's
        argmax, valued by the target agent network; an agent's Q enters the mixer only where it is alive."""
        c = self.config
        B, T, N, D = b["inputs"].shape
        x, s = b["inputs"].reshape(-1, D), b["state"].reshape(B * T, -1)
        tq_all = self.target_agent_q(x).view(B, T, N, -1)
        if c.double_q:
            tq = tq_all.gather(-1, self.agent_q(x).view(B, T, N, -1).argmax(-1, keepdim=True)).squeeze(-1)
        else:
            tq = tq_all.max(-1).values
        tq_tot = self.target_mixer((tq * b["alive"]).reshape(B * T, N), s).view(B, T)
        nxt = torch.cat([tq_tot[:, 1:], torch.zeros(B, 1)], 1) * (1.0 - b["last"])  # Q_tot'(s_{t+1}) for step t
        return b["team_reward"] * c.reward_scale + c.gamma * nxt

    def td_loss(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared TD error of Q_tot over the steps whose target is known; returns (loss, mean Q_tot)."""
        B, T, N, D = b["inputs"].shape
        q = self.agent_q(b["inputs"].reshape(-1, D)).view(B, T, N, -1)
        q = q.gather(-1, b["actions"].unsqueeze(-1)).squeeze(-1) * b["alive"]          # [B, T, N]
        q_tot = self.mixer(q.reshape(B * T, N), b["state"].reshape(B * T, -1)).view(B, T)
        m = b["learn"]
        n = m.sum().clamp_min(1.0)
        loss = ((q_tot - self.td_targets(b)).pow(2) * m).sum() / n
        return loss, (q_tot.detach() * m).sum() / n

    def update(self, replay: Replay) -> dict:
        """Add the replayed episodes to the buffer, then one gradient step per ``train_frequency`` new
        agent-transitions once it holds ``learning_starts`` episodes."""
        c = self.config
        steps_before = self.optimizer_steps
        added = 0
        for ep in replay.episodes:
            self.pending_transitions += self._add(ep)
            added += 1
        self.buffer_lineage.add(replay.lineage, added)
        losses = {"losses/td": 0.0, "losses/q_values": 0.0}
        n = 0
        while self.buffer.size >= max(1, c.learning_starts) and self.pending_transitions >= c.train_frequency:
            self.pending_transitions -= c.train_frequency
            loss, q_mean = self.td_loss(self.buffer.sample(c.batch_size))
            self.optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_([*self.agent_q.parameters(), *self.mixer.parameters()], c.max_grad_norm)
            self.optimizer.step()
            self.optimizer_steps += 1
            n += 1
            losses["losses/td"] += float(loss.detach())
            losses["losses/q_values"] += float(q_mean)
            if self.optimizer_steps % c.target_network_frequency == 0:
                self._update_targets()
        if n:
            losses = {k: v / n for k, v in losses.items()}
        return self._finish_update(replay, losses, steps_before, **{"charts/epsilon": self.epsilon})

    # --- state -------------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.agent_q, self.mixer, self.target_agent_q, self.target_mixer]

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm, "config": asdict(self.config), "spec": self.spec.to_dict(),
                "agent_q": self.agent_q.state_dict(), "mixer": self.mixer.state_dict(),
                "target_agent_q": self.target_agent_q.state_dict(), "target_mixer": self.target_mixer.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": self.buffer.state_dict(),
                "buffer_lineage": self.buffer_lineage.state_dict(),
                "explorer": self.explorer.bit_generator.state,
                "counters": self.counters()}

    def load_state_dict(self, state: dict) -> None:
        for k in ("agent_q", "mixer", "target_agent_q", "target_mixer", "optimizer", "buffer", "buffer_lineage"):
            getattr(self, k).load_state_dict(state[k])
        self.explorer.bit_generator.state = state["explorer"]
        self.load_counters(state["counters"])

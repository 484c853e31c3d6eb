"""DQN as seed 002 describes it (Mnih et al. 2015): a Q-network shared by the agents (independent
Q-learning with parameter sharing), an experience replay buffer, a target network copied every
``target_network_frequency`` optimizer steps, epsilon-greedy exploration decaying exponentially per
episode from ``start_e`` to ``end_e``, MSE loss and gradient clipping. Discrete actions only.

Each replayed episode adds its per-agent transitions (o_t, a_t, r_t, o_{t+1}, done) to the buffer;
then one gradient step is taken per ``train_frequency`` new agent-transitions once the buffer holds
``learning_starts``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .learner import Learner
from .lineage import BufferLineage
from .networks import agent_dones, config_hash, mask_logits, seed_everything, weights_sha256
from .replay import Replay, ReplayError, RunSpec


@dataclass
class DQNConfig:
    seed: int = 1
    """seed of torch, numpy, the replay sampler and epsilon-greedy"""
    learning_rate: float = 1e-4
    """Adam learning rate (seed 002)"""
    gamma: float = 0.99
    """discount factor (seed 002)"""
    batch_size: int = 64
    """transitions per gradient step (seed 002)"""
    buffer_size: int = 100_000
    """replay buffer capacity in agent-transitions (seed 002)"""
    target_network_frequency: int = 1000
    """optimizer steps between copies of the Q-network into the target network (seed 002)"""
    start_e: float = 1.0
    """initial exploration rate (seed 002)"""
    end_e: float = 0.1
    """final exploration rate (seed 002)"""
    e_decay: float = 0.995
    """epsilon = max(end_e, start_e * e_decay ** episodes_seen)"""
    learning_starts: int = 1000
    """agent-transitions in the buffer before the first gradient step"""
    train_frequency: int = 4
    """new agent-transitions per gradient step"""
    max_grad_norm: float = 10.0
    """gradient clipping"""
    hidden_layers: tuple[int, ...] = (256, 256)
    """hidden units per layer (seed 002)"""
    episodes_per_update: int = 10
    """episodes the producers run with the current policy between updates (online training)"""


class QNetwork(nn.Module):
    def __init__(self, in_dim: int, n_actions: int, hidden: tuple[int, ...], action_mask=None):
        super().__init__()
        self.masked = action_mask is not None
        if self.masked:  # agents with fewer actions: their missing actions get Q = -1e9
            self.register_buffer("action_mask", torch.as_tensor(action_mask, dtype=torch.float32))
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            lin = nn.Linear(d, h)
            nn.init.xavier_uniform_(lin.weight)  # seed 002: Xavier initialisation
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.net(x)
        return mask_logits(q, x, self.action_mask) if self.masked else q


def epsilon_greedy(q_network: nn.Module, spec: RunSpec, n_own: list[int], explorer: np.random.Generator,
                   eps: float, observations) -> dict:
    """Epsilon-greedy over a Q-network shared by the agents (input: observation + one-hot agent id):
    ``{agent: (action, log_prob)}``, the log-probability of the chosen action under epsilon-greedy.
    An agent with fewer actions (``n_own``) explores among its own. DQN's and QMIX's ``act``."""
    live = [a for a in spec.agents if a in observations]
    x = np.zeros((len(live), spec.obs_dim + len(spec.agents)), np.float32)
    for j, a in enumerate(live):
        o = np.asarray(observations[a], np.float32).ravel()
        x[j, :o.shape[0]] = o
        x[j, spec.obs_dim + spec.agents.index(a)] = 1.0
    greedy = q_network(torch.as_tensor(x)).argmax(-1).numpy()
    out = {}
    for j, a in enumerate(live):
        n = n_own[spec.agents.index(a)]
        explore = explorer.random() < eps
        act = int(explorer.integers(n)) if explore else int(greedy[j])
        p = eps / n + (1.0 - eps) * (act == greedy[j])
        out[a] = (act + spec.action_space.start, float(np.log(p)))
    return out


class ReplayBuffer:
    """FIFO ring buffer of agent-transitions with seeded uniform sampling."""

    def __init__(self, capacity: int, in_dim: int, seed: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, in_dim), np.float32)
        self.next_obs = np.zeros((capacity, in_dim), np.float32)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self.pos = 0
        self.size = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def add_many(self, obs, actions, rewards, next_obs, dones) -> None:
        for i in range(len(actions)):
            p = self.pos
            self.obs[p], self.actions[p], self.rewards[p] = obs[i], actions[i], rewards[i]
            self.next_obs[p], self.dones[p] = next_obs[i], dones[i]
            self.pos = (p + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int):
        idx = self.rng.integers(0, self.size, n)
        return (torch.as_tensor(self.obs[idx]), torch.as_tensor(self.actions[idx]),
                torch.as_tensor(self.rewards[idx]), torch.as_tensor(self.next_obs[idx]),
                torch.as_tensor(self.dones[idx]))

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("obs", "next_obs", "actions", "rewards", "dones", "pos", "size")} | {
            "rng": self.rng.bit_generator.state}

    def load_state_dict(self, s: dict) -> None:
        for k in ("obs", "next_obs", "actions", "rewards", "dones", "pos", "size"):
            setattr(self, k, s[k])
        self.rng.bit_generator.state = s["rng"]


class DQN(Learner):
    """Shared Q-network over (observation, one-hot agent id), trained from replayed episodes."""

    algorithm = "dqn"
    counter_names = (*Learner.counter_names, "pending_transitions")
    on_policy = False
    centralized_critic = False
    continuous_actions = False

    def __init__(self, spec: RunSpec, config: DQNConfig | None = None):
        if not spec.discrete:
            raise ReplayError(f"run {spec.run_id}: DQN needs a Discrete action space, the run's is "
                              f"{spec.action_space.kind}; use --algo mappo or ippo for continuous actions")
        self.spec = spec
        self.config = config or DQNConfig()
        c = self.config
        seed_everything(c.seed)
        self.n_agents = len(spec.agents)
        self.in_dim = spec.obs_dim + self.n_agents
        mask = spec.action_mask()
        self.n_own = [spec.action_spaces[a].n for a in spec.agents]  # each agent's own action count
        self.q_network = QNetwork(self.in_dim, spec.n_actions, tuple(c.hidden_layers), mask)
        self.target_network = QNetwork(self.in_dim, spec.n_actions, tuple(c.hidden_layers), mask)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.optimizer = torch.optim.Adam(self.q_network.parameters(), lr=c.learning_rate)
        self.buffer = ReplayBuffer(c.buffer_size, self.in_dim, c.seed)
        self.buffer_lineage = BufferLineage(c.buffer_size)  # what policy.update names: the buffer's ranges
        self.explorer = np.random.Generator(np.random.PCG64(c.seed + 1))
        self._start_counters()
        self.config_hash = config_hash(self.config)
        self.version = self._version()

    @property
    def epsilon(self) -> float:
        c = self.config
        return max(c.end_e, c.start_e * c.e_decay ** self.episodes)

    def _version(self) -> str:
        return f"{self.algorithm}-v{self.updates}-{weights_sha256(self.q_network).hex()[:12]}"

    def _inputs(self, obs: np.ndarray) -> np.ndarray:
        """[..., N, obs_dim] -> [..., N, obs_dim + N]"""
        eye = np.broadcast_to(np.eye(self.n_agents, dtype=np.float32), (*obs.shape[:-1], self.n_agents))
        return np.concatenate([obs, eye], -1)

    # --- acting: the Policy protocol ---------------------------------------------------------
    @torch.no_grad()
    def act(self, observations, state=None) -> dict:
        """Epsilon-greedy; log_prob is that of the chosen action under the epsilon-greedy policy."""
        return epsilon_greedy(self.q_network, self.spec, self.n_own, self.explorer, self.epsilon, observations)

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_network(x).argmax(-1)

    # --- the update ------------------------------------------------------------------------
    def update(self, replay: Replay) -> dict:
        c = self.config
        steps_before = self.optimizer_steps
        added = 0
        for ep in replay.episodes:
            x = self._inputs(ep.obs)                                    # [T, N, in]
            nxt = np.concatenate([x[1:], np.zeros_like(x[:1])], 0)
            done = agent_dones(ep.alive)                                # [T, N]: each agent's last step
            T, N = ep.alive.shape
            m = ep.alive.reshape(-1) > 0
            self.buffer.add_many(x.reshape(T * N, -1)[m], ep.actions.reshape(-1)[m], ep.rewards.reshape(-1)[m],
                                 nxt.reshape(T * N, -1)[m], done.reshape(-1)[m])
            added += int(m.sum())
        self.pending_transitions += added
        self.buffer_lineage.add(replay.lineage, added)
        losses = {"losses/td": 0.0, "losses/q_values": 0.0}
        n = 0
        while self.buffer.size >= c.learning_starts and self.pending_transitions >= c.train_frequency:
            self.pending_transitions -= c.train_frequency
            obs, act, rew, nobs, dn = self.buffer.sample(c.batch_size)
            with torch.no_grad():
                target = rew + c.gamma * self.target_network(nobs).max(-1).values * (1 - dn)
            q = self.q_network(obs).gather(1, act.unsqueeze(-1)).squeeze(-1)
            loss = F.mse_loss(q, target)
            self.optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.q_network.parameters(), c.max_grad_norm)
            self.optimizer.step()
            self.optimizer_steps += 1
            n += 1
            losses["losses/td"] += float(loss.detach())
            losses["losses/q_values"] += float(q.detach().mean())
            if self.optimizer_steps % c.target_network_frequency == 0:
                self.target_network.load_state_dict(self.q_network.state_dict())
        if n:
            losses = {k: v / n for k, v in losses.items()}
        return self._finish_update(replay, losses, steps_before, **{"charts/epsilon": self.epsilon})

    # --- state -------------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.q_network, self.target_network]

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm, "config": asdict(self.config), "spec": self.spec.to_dict(),
                "q_network": self.q_network.state_dict(), "target_network": self.target_network.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": self.buffer.state_dict(),
                "buffer_lineage": self.buffer_lineage.state_dict(),
                "explorer": self.explorer.bit_generator.state,
                "counters": self.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.q_network.load_state_dict(state["q_network"])
        self.target_network.load_state_dict(state["target_network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        if "buffer_lineage" in state:  # checkpoints written before it named only the last batch
            self.buffer_lineage.load_state_dict(state["buffer_lineage"])
        self.explorer.bit_generator.state = state["explorer"]
        self.load_counters(state["counters"])

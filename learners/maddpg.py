"""MADDPG (Lowe et al. 2017, "Multi-Agent Actor-Critic for Mixed Cooperative-Competitive
Environments"): deterministic actors that act on their own observation, trained against centralized
critics that see every agent's observation and action (centralized training, decentralized execution).

- Actors: one ReLU MLP per agent (no parameter sharing: MADDPG's agents may differ in what they
  learn) over the agent's observation, zero-padded to the widest agent. The N actors (and the N
  critics) are kept as one ``MLPEnsemble``: weights stacked on an agent axis, one batched matmul for
  all of them, each agent's weights its own. Continuous (Box) actions: the output
  is squashed by tanh into the bounds, ``low + (tanh(z) + 1) / 2 * (high - low)``; acting adds Gaussian
  noise of std ``exploration_noise * (high - low) / 2`` and clips to the bounds. Discrete actions: the
  output is the logits (an agent's missing actions pushed to -1e9, ``RunSpec.action_mask``); acting
  samples the categorical (Gumbel-max), and the actor update differentiates through a straight-through
  Gumbel-softmax sample (``gumbel_softmax_st``: one-hot forward, the softmax's gradient backward).
- Critics: one per agent, ``Q_i(o_1..o_N, a_1..a_N, alive_1..alive_N)``, over every agent's
  observation and action (one-hot for discrete) and who is alive. This is the paper's choice, not
  ``env.state()``: it uses only what the agents saw and did, so it is the same for every env, with a
  state or without (retail_v0's state would add the hidden demand rates, which the agents estimate
  from what they see). The alive flags tell an absent agent (all zeros) from one that sees zeros.
- Target actors and critics, soft-updated after every gradient step:
  ``target <- tau * online + (1 - tau) * target`` (``soft_update``).
- Joint-transition replay buffer (``TransitionBuffer``): one row per env step, every agent's
  observation, action, reward, next observation, alive flags and done flags; a FIFO of
  ``buffer_size`` rows sampled uniformly with a seeded generator. Filled by ``update(replay)`` from
  the replayed episodes, so the same update serves ``marlgrc train`` and ``train-online``; its
  ``BufferLineage`` makes each ``policy.update`` name every batch the buffer still holds.
- Targets: ``y_i = r_i + gamma * (1 - done_i) * Q'_i(o', mu'_1(o'_1)..mu'_N(o'_N))`` with the target
  actors' actions (for discrete actions the one-hot of the target actor's argmax), zero for agents
  not alive at the next step. ``done_i`` is agent i's last live step (``networks.agent_dones``). The
  last step of a truncated episode is not put in the buffer: no event records the observation after
  it, and a time limit is not an end (QMIX leaves it out of its loss for the same reason).
- Actor loss of agent i: ``-Q_i(o, a_1..mu_i(o_i)..a_N)`` with the other agents' actions as recorded
  (the paper's update), averaged over the samples where agent i is alive.
- Until the buffer holds ``learning_starts`` rows, acting is uniform at random in the action space
  (CleanRL's DDPG); then one gradient step (every agent's critic, then every agent's actor) per
  ``train_frequency`` new agent-transitions, as DQN and QMIX count them.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from .learner import Learner
from .lineage import BufferLineage
from .networks import agent_dones, config_hash, seed_everything, weights_sha256
from .replay import Episode, Replay, ReplayError, RunSpec


@dataclass
class MADDPGConfig:
    seed: int = 1
    """seed of torch, numpy, the buffer's sampler, the exploration noise and the Gumbel noise"""
    learning_rate: float = 1e-3
    """Adam learning rate of the critics"""
    actor_learning_rate: float = 1e-3
    """Adam learning rate of the actors"""
    gamma: float = 0.95
    """discount factor (the paper's, on the particle envs)"""
    tau: float = 0.01
    """soft update rate of the target networks, after every gradient step (the paper's)"""
    batch_size: int = 256
    """joint transitions (env steps) per gradient step"""
    buffer_size: int = 100_000
    """replay buffer capacity in joint transitions (one per env step)"""
    learning_starts: int = 1000
    """joint transitions in the buffer before the first gradient step; until then actions are uniform at random"""
    train_frequency: int = 4
    """new agent-transitions (one per live agent per env step) per gradient step"""
    exploration_noise: float = 0.1
    """std of the Gaussian added to continuous actions, as a fraction of half the action range"""
    gumbel_temperature: float = 1.0
    """temperature of the straight-through Gumbel-softmax of discrete actions in the actor update"""
    max_grad_norm: float = 0.5
    """gradient clipping (critics together, actors together; the paper's 0.5)"""
    hidden: int = 64
    """hidden units in each of two layers, actors and critics"""
    reward_scale: float = 1.0
    """rewards are multiplied by this before the TD target"""
    episodes_per_update: int = 10
    """episodes the producers run with the current policy between updates (online training)"""


# --- shared with SAC (learners/sac.py) ------------------------------------------------------------
@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging, in place: every parameter ``t <- t + tau * (s - t) = tau * s + (1 - tau) * t``."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise log-density of N(mean, std^2) at x (torch.distributions' checks cost more per step)."""
    return -0.5 * ((x - mean) / std).pow(2) - torch.log(std) - 0.5 * float(np.log(2 * np.pi))


def bounds_of(spec: RunSpec, algo: str) -> tuple[np.ndarray, np.ndarray]:
    """The shared Box's (low, high); an algorithm that squashes actions into them needs them finite."""
    low = np.asarray(spec.action_space.low, np.float32).reshape(-1)
    high = np.asarray(spec.action_space.high, np.float32).reshape(-1)
    if low.size != spec.action_dim or high.size != spec.action_dim or not (
            np.isfinite(low).all() and np.isfinite(high).all() and (high > low).all()):
        raise ReplayError(f"run {spec.run_id}: {algo} squashes actions into the Box bounds, and the run's action "
                          f"space has bounds {low.tolist()}..{high.tolist()}; give the env finite bounds with "
                          f"low < high, or use --algo mappo")
    return low, high


class TransitionBuffer:
    """FIFO ring of joint transitions (one per env step) with seeded uniform sampling (with replacement).

    Row fields: ``obs`` and ``next_obs`` [N, obs_dim], ``actions`` [N, A] (one-hot for discrete),
    ``rewards``, ``alive``, ``next_alive`` and ``dones`` [N]. An agent absent at a step has zeros."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "alive", "next_alive", "dones")

    def __init__(self, capacity: int, n_agents: int, obs_dim: int, action_dim: int, seed: int):
        self.capacity = int(capacity)
        N, C = n_agents, self.capacity
        self.obs = np.zeros((C, N, obs_dim), np.float32)
        self.next_obs = np.zeros((C, N, obs_dim), np.float32)
        self.actions = np.zeros((C, N, action_dim), np.float32)
        self.rewards = np.zeros((C, N), np.float32)
        self.alive = np.zeros((C, N), np.float32)
        self.next_alive = np.zeros((C, N), np.float32)
        self.dones = np.zeros((C, N), np.float32)
        self.pos = 0
        self.size = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def add(self, **rows: np.ndarray) -> None:
        """Append ``n`` rows (each field [n, ...]); the oldest are overwritten once full."""
        n = len(rows["rewards"])
        if n > self.capacity:  # only the newest capacity rows would survive
            rows = {k: v[n - self.capacity:] for k, v in rows.items()}
            n = self.capacity
        idx = (self.pos + np.arange(n)) % self.capacity
        for k in self.FIELDS:
            getattr(self, k)[idx] = rows[k]
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, self.size, n)
        return {k: torch.from_numpy(getattr(self, k)[idx]) for k in self.FIELDS}

    def state_dict(self) -> dict:
        """The rows held (``[:size]``: until the ring is full they are its first rows), not the capacity."""
        return {k: getattr(self, k)[:self.size].copy() for k in self.FIELDS} | {
            "pos": self.pos, "size": self.size, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, s: dict) -> None:
        for k in self.FIELDS:
            arr = getattr(self, k)
            arr[:] = 0
            arr[:s["size"]] = s[k]
        self.pos, self.size = s["pos"], s["size"]
        self.rng.bit_generator.state = s["rng"]


def episode_transitions(ep: Episode, actions: np.ndarray) -> dict[str, np.ndarray]:
    """An episode's joint transitions for ``TransitionBuffer.add`` (``actions`` [T, N, A] as stored).
    A truncated episode's last step is left out: the observation after it is not recorded."""
    T = ep.length
    alive = (ep.alive > 0).astype(np.float32)
    keep = T if ep.terminated else T - 1
    next_obs = np.concatenate([ep.obs[1:], np.zeros_like(ep.obs[:1])], 0)
    next_alive = np.concatenate([alive[1:], np.zeros_like(alive[:1])], 0)
    rows = {"obs": ep.obs, "actions": actions * alive[..., None], "rewards": ep.rewards * alive,
            "next_obs": next_obs, "alive": alive, "next_alive": next_alive, "dones": agent_dones(alive)}
    return {k: np.ascontiguousarray(v[:max(keep, 0)], np.float32) for k, v in rows.items()}


class MLPEnsemble(nn.Module):
    """``n`` independent two-hidden-layer ReLU MLPs (no shared weights) evaluated together: input
    [n, B, in] -> [n, B, out], member k on row k. Each layer's weights are [n, in, out], so one batched
    matmul serves every member (per-agent actors and critics cost one network's Python overhead, not N).
    Orthogonal init (gain sqrt(2), the output layer ``out_std``), zero biases, per member."""

    def __init__(self, n: int, inp: int, hidden: int, out: int, out_std: float = 1.0):
        super().__init__()
        dims = [inp, hidden, hidden, out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.empty(n, i, o)
            for m in range(n):
                nn.init.orthogonal_(w[m], out_std if k == len(dims) - 2 else float(np.sqrt(2)))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n, 1, o)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.matmul(x, w) + b
            if k < last:
                x = torch.relu(x)
        return x


# --- MADDPG's own parts ------------------------------------------------------------------------------
def gumbel_softmax_st(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """A straight-through Gumbel-softmax sample: the one-hot of ``argmax(logits + g)`` forward
    (``g`` Gumbel(0, 1) noise from ``generator``), the gradient of ``softmax((logits + g) / temperature)``
    backward. The argmax is a sample of the categorical ``softmax(logits)`` (the Gumbel-max trick)."""
    u = torch.rand(logits.shape, generator=generator)
    g = -torch.log(-torch.log(u.clamp(1e-20, 1.0)) + 1e-20)
    soft = torch.softmax((logits + g) / temperature, -1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


class DeterministicActors(nn.Module):
    """Every agent's own actor (an ``MLPEnsemble`` member each): observations [N, B, obs_dim] ->
    actions in the Box bounds (continuous) or logits with each agent's missing actions at -1e9 (discrete)."""

    def __init__(self, n_agents: int, obs_dim: int, hidden: int, out_dim: int, *, discrete: bool, low=None,
                 high=None, action_mask=None):
        super().__init__()
        self.discrete = discrete
        self.body = MLPEnsemble(n_agents, obs_dim, hidden, out_dim, out_std=0.01)
        if discrete:  # [N, 1, n]: 1 for the agent's own actions, 0 for those only wider agents have
            allowed = np.ones((n_agents, out_dim)) if action_mask is None else action_mask
            self.register_buffer("allowed", torch.as_tensor(allowed, dtype=torch.float32).unsqueeze(1))
        else:
            self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        z = self.body(obs)
        if self.discrete:
            return z - (1.0 - self.allowed) * 1e9
        return self.low + (torch.tanh(z) + 1.0) * 0.5 * (self.high - self.low)


class MADDPG(Learner):
    """Per-agent deterministic actors, per-agent critics over all observations and actions."""

    algorithm = "maddpg"
    counter_names = (*Learner.counter_names, "pending_transitions")
    on_policy = False
    centralized_critic = True
    continuous_actions = True

    def __init__(self, spec: RunSpec, config: MADDPGConfig | None = None):
        self.spec = spec
        self.config = config or MADDPGConfig()
        c = self.config
        seed_everything(c.seed)
        self.n_agents = N = len(spec.agents)
        self._index = {a: i for i, a in enumerate(spec.agents)}
        self.discrete = spec.discrete
        D = spec.obs_dim
        if self.discrete:
            self.act_dim = spec.n_actions
            self.n_own = [spec.action_spaces[a].n for a in spec.agents]  # each agent's own action count
            self.actors = DeterministicActors(N, D, c.hidden, self.act_dim, discrete=True,
                                              action_mask=spec.action_mask())
        else:
            self.act_dim = spec.action_dim
            self.low, self.high = bounds_of(spec, "MADDPG")
            self.actors = DeterministicActors(N, D, c.hidden, self.act_dim, discrete=False, low=self.low,
                                              high=self.high)
            self.noise_std = torch.as_tensor(c.exploration_noise * (self.high - self.low) / 2)
        self.critic_in = N * D + N * self.act_dim + N
        self.critics = MLPEnsemble(N, self.critic_in, c.hidden, 1)   # critic i is member i
        self.target_actors = copy.deepcopy(self.actors)
        self.target_critics = copy.deepcopy(self.critics)
        self.actor_optimizer = torch.optim.Adam(self.actors.parameters(), lr=c.actor_learning_rate)
        self.critic_optimizer = torch.optim.Adam(self.critics.parameters(), lr=c.learning_rate)
        self.buffer = TransitionBuffer(c.buffer_size, N, D, self.act_dim, c.seed)
        self.buffer_lineage = BufferLineage(c.buffer_size)  # what policy.update names: the buffer's batches
        self.explorer = torch.Generator().manual_seed(c.seed + 1)  # acting: noise, samples, random actions
        self.gumbel = torch.Generator().manual_seed(c.seed + 2)    # the update's Gumbel noise
        self._start_counters()
        self.config_hash = config_hash(self.config)
        self.version = self._version()

    def _version(self) -> str:
        return f"{self.algorithm}-v{self.updates}-{weights_sha256(self.actors).hex()[:12]}"

    # --- acting: the Policy protocol ---------------------------------------------------------
    @torch.no_grad()
    def act(self, observations, state=None) -> dict:
        """Each live agent's action from its own actor with exploration: Gaussian noise clipped to the
        bounds (log_prob: the noise's density at the clipped action) or a categorical sample (its
        log-probability); uniform at random (and its log-density) before ``learning_starts``."""
        spec, c = self.spec, self.config
        live = [a for a in spec.agents if a in observations]
        idx = [self._index[a] for a in live]
        if self.buffer.size < c.learning_starts:
            if self.discrete:
                ks = [int(torch.randint(self.n_own[i], (1,), generator=self.explorer)) for i in idx]
                return {a: (k + spec.action_space.start, -float(np.log(self.n_own[i])))
                        for a, i, k in zip(live, idx, ks)}
            low, high = torch.from_numpy(self.low), torch.from_numpy(self.high)
            acts = low + torch.rand((len(live), self.act_dim), generator=self.explorer) * (high - low)
            logp = -float(torch.log(high - low).sum())
            return {a: (acts[j].numpy().copy(), logp) for j, a in enumerate(live)}
        obs = np.zeros((self.n_agents, 1, spec.obs_dim), np.float32)   # every actor on its agent's row
        for a, i in zip(live, idx):
            v = np.asarray(observations[a], np.float32).ravel()
            obs[i, 0, :v.shape[0]] = v
        out = self.actors(torch.from_numpy(obs))[idx, 0]                 # [live, A]
        if self.discrete:
            ks = gumbel_softmax_st(out, self.explorer).argmax(-1)
            logp = torch.log_softmax(out, -1).gather(-1, ks.unsqueeze(-1)).squeeze(-1)
            return {a: (int(ks[j]) + spec.action_space.start, float(logp[j])) for j, a in enumerate(live)}
        noise = torch.randn(out.shape, generator=self.explorer) * self.noise_std
        acts = torch.maximum(torch.minimum(out + noise, self.actors.high), self.actors.low)
        logp = normal_log_prob(acts, out, self.noise_std).sum(-1) if c.exploration_noise > 0 else torch.zeros(len(live))
        return {a: (acts[j].numpy().copy(), float(logp[j])) for j, a in enumerate(live)}

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic action for actor inputs [B, obs_dim + N]: each row through the actor its
        one-hot id picks (argmax of its logits, or its action): what ONNX exports."""
        D = self.spec.obs_dim
        obs, who = x[:, :D], x[:, D:]
        every = self.actors(obs.unsqueeze(0).expand(self.n_agents, *obs.shape))   # [N, B, A]
        mine = (every * who.t().unsqueeze(-1)).sum(0)
        return mine.argmax(-1) if self.discrete else mine

    # --- the update ------------------------------------------------------------------------
    def _add(self, ep: Episode) -> tuple[int, int]:
        """Put one replayed episode's joint transitions in the buffer: (rows, agent-transitions)."""
        if self.discrete:
            actions = np.eye(self.act_dim, dtype=np.float32)[ep.actions]    # [T, N, n] one-hot
        else:
            actions = ep.actions.astype(np.float32)
        rows = episode_transitions(ep, actions)
        self.buffer.add(**rows)
        return len(rows["rewards"]), int(rows["alive"].sum())

    def critic_inputs(self, obs: torch.Tensor, actions: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """[..., N, D], [..., N, A], [..., N] -> [..., N*D + N*A + N]: every agent's observation, action
        and alive flag."""
        lead = obs.shape[:-2]
        return torch.cat([obs.reshape(*lead, -1), actions.reshape(*lead, -1), alive], -1)

    def _gradient_step(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        """One step of every critic, then of every actor, then the soft target updates."""
        c, N = self.config, self.n_agents
        obs, act, alive = b["obs"], b["actions"], b["alive"]                   # [B, N, D], [B, N, A], [B, N]
        alive_t = alive.t()                                                    # [N, B]
        n_alive = alive_t.sum(1).clamp_min(1.0)                                # [N]
        with torch.no_grad():
            nobs, nalive = b["next_obs"], b["next_alive"]
            nact = self.target_actors(nobs.transpose(0, 1))                    # [N, B, A]
            if self.discrete:  # the target actor's greedy action, one-hot
                nact = torch.zeros_like(nact).scatter_(-1, nact.argmax(-1, keepdim=True), 1.0)
            nact = nact.transpose(0, 1) * nalive.unsqueeze(-1)                 # [B, N, A]
            nx = self.critic_inputs(nobs, nact, nalive)
            q_next = self.target_critics(nx.expand(N, *nx.shape)).squeeze(-1)  # [N, B]
            y = b["rewards"].t() * c.reward_scale + c.gamma * (1.0 - b["dones"].t()) * q_next
        x = self.critic_inputs(obs, act, alive)
        q = self.critics(x.expand(N, *x.shape)).squeeze(-1)                   # [N, B]: critic i on row i
        critic_loss = (((q - y).pow(2) * alive_t).sum(1) / n_alive).sum()     # each agent's mean, summed
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_(self.critics.parameters(), c.max_grad_norm)
        self.critic_optimizer.step()

        # critic i judges the recorded joint action with agent i's own replaced by its actor's
        mine = self.actors(obs.transpose(0, 1))                                # [N, B, A]
        if self.discrete:
            mine = gumbel_softmax_st(mine, self.gumbel, c.gumbel_temperature)
        mine = mine * alive_t.unsqueeze(-1)
        eye = torch.eye(N).view(N, 1, N, 1)
        joint = act.unsqueeze(0) * (1.0 - eye) + mine.unsqueeze(2) * eye       # [N, B, N, A]
        xi = self.critic_inputs(obs.expand(N, *obs.shape), joint, alive.expand(N, *alive.shape))
        self.critics.requires_grad_(False)  # the actor loss moves only the actors
        qi = self.critics(xi).squeeze(-1)                                      # [N, B]
        actor_loss = -((qi * alive_t).sum(1) / n_alive).sum()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.critics.requires_grad_(True)
        nn.utils.clip_grad_norm_(self.actors.parameters(), c.max_grad_norm)
        self.actor_optimizer.step()
        soft_update(self.target_actors, self.actors, c.tau)
        soft_update(self.target_critics, self.critics, c.tau)
        return {"losses/value": float(critic_loss.detach()), "losses/policy": float(actor_loss.detach()),
                "losses/q_values": float(((q.detach() * alive_t).sum(1) / n_alive).mean())}

    def update(self, replay: Replay) -> dict:
        """Add the replayed episodes to the buffer, then one gradient step per ``train_frequency`` new
        agent-transitions once it holds ``learning_starts`` joint transitions."""
        c = self.config
        steps_before = self.optimizer_steps
        rows = 0
        for ep in replay.episodes:
            r, n = self._add(ep)
            rows += r
            self.pending_transitions += n
        self.buffer_lineage.add(replay.lineage, rows)
        losses = {"losses/value": 0.0, "losses/policy": 0.0, "losses/q_values": 0.0}
        n = 0
        while self.buffer.size >= max(1, c.learning_starts) and self.pending_transitions >= c.train_frequency:
            self.pending_transitions -= c.train_frequency
            for k, v in self._gradient_step(self.buffer.sample(c.batch_size)).items():
                losses[k] += v
            self.optimizer_steps += 1
            n += 1
        if n:
            losses = {k: v / n for k, v in losses.items()}
        return self._finish_update(replay, losses, steps_before)

    # --- state -------------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.actors, self.critics, self.target_actors, self.target_critics]

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm, "config": asdict(self.config), "spec": self.spec.to_dict(),
                "actors": self.actors.state_dict(), "critics": self.critics.state_dict(),
                "target_actors": self.target_actors.state_dict(), "target_critics": self.target_critics.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "buffer": self.buffer.state_dict(), "buffer_lineage": self.buffer_lineage.state_dict(),
                "explorer": self.explorer.get_state(), "gumbel": self.gumbel.get_state(),
                "counters": self.counters()}

    def load_state_dict(self, state: dict) -> None:
        for k in ("actors", "critics", "target_actors", "target_critics", "actor_optimizer", "critic_optimizer",
                  "buffer", "buffer_lineage"):
            getattr(self, k).load_state_dict(state[k])
        self.explorer.set_state(state["explorer"])
        self.gumbel.set_state(state["gumbel"])
        self.load_counters(state["counters"])

"""Multi-agent SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications"), in the
manner of CleanRL's ``sac_continuous_action.py``: a squashed Gaussian policy, twin soft Q-networks
with target networks, and a temperature tuned automatically toward a target entropy. Continuous
(Box) actions only.

- Shared actor (parameter sharing, as MAPPO, IPPO and DQN here): one network for every agent over
  its observation, zero-padded to the widest agent, and its one-hot id: the export's input layout,
  and N agent-transitions per env step for one network (``networks.mlp``, two Tanh layers). It
  outputs a mean and a log-std (squashed into [-5, 2]); an action is
  ``low + (tanh(u) + 1) / 2 * (high - low)`` with ``u ~ N(mean, std)``, and its log-probability
  carries the tanh's change of variables. The deterministic action (ONNX, greedy evaluation) is the
  mean squashed the same way.
- Twin critics ``Q_1, Q_2(o_i, id_i, a_i)`` (two ReLU MLPs kept as one ``maddpg.MLPEnsemble``), also
  shared: each agent's own observation and action, not the other agents' (independent SAC with
  shared networks; ``centralized_critic = False``). The
  TD target uses the minimum of the two target critics and the entropy term:
  ``y = r + gamma * (1 - done) * (min Q'(o', a') - alpha * log pi(a' | o'))``, ``a' ~ pi(o')``.
  Targets are soft-updated (``tau``) after every gradient step (``maddpg.soft_update``).
- Temperature: ``alpha = exp(log_alpha)`` learned with ``-log_alpha * (log pi + target_entropy)``,
  target entropy ``-|A|`` (the action's dimension), so alpha falls while the policy's entropy is above
  the target and rises while it is below; ``autotune=False`` keeps ``alpha`` fixed.
- Replay: the joint-transition buffer of MADDPG (``maddpg.TransitionBuffer``), filled from replayed
  episodes by ``update(replay)``; a batch of ``batch_size`` joint transitions is split into its live
  agents' transitions (absent agents, alive 0, are left out). A truncated episode's last step is not
  stored (its next observation is not recorded); an agent's last live step is terminal for it.
  ``BufferLineage`` makes each ``policy.update`` name every batch the buffer still holds.
- Until the buffer holds ``learning_starts`` joint transitions, acting is uniform at random; then one
  critic step per ``train_frequency`` new agent-transitions, and every ``policy_frequency``-th critic
  step that many actor (and temperature) steps (CleanRL's delayed, compensated policy update).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lineage import BufferLineage
from .maddpg import MLPEnsemble, TransitionBuffer, bounds_of, episode_transitions, normal_log_prob, soft_update
from .learner import Learner
from .networks import config_hash, mlp, seed_everything, weights_sha256
from .replay import Episode, Replay, ReplayError, RunSpec

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass
class SACConfig:
    seed: int = 1
    """seed of torch, numpy, the buffer's sampler and the policy's noise"""
    learning_rate: float = 1e-3
    """Adam learning rate of the twin critics and the temperature (CleanRL's q_lr)"""
    actor_learning_rate: float = 3e-4
    """Adam learning rate of the actor (CleanRL's policy_lr)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """soft update rate of the target critics, after every gradient step"""
    batch_size: int = 256
    """joint transitions (env steps) per gradient step; each gives its live agents' transitions"""
    buffer_size: int = 100_000
    """replay buffer capacity in joint transitions (one per env step)"""
    learning_starts: int = 1000
    """joint transitions in the buffer before the first gradient step; until then actions are uniform at random"""
    train_frequency: int = 4
    """new agent-transitions (one per live agent per env step) per critic step"""
    policy_frequency: int = 2
    """critic steps per round of actor steps; each round takes this many actor steps"""
    alpha: float = 0.2
    """entropy temperature at the start (and throughout when autotune is off)"""
    autotune: bool = True
    """learn the temperature toward the target entropy -|A|"""
    max_grad_norm: float = 10.0
    """gradient clipping (critics together, actor)"""
    hidden: int = 64
    """hidden units in each of two layers, actor and critics"""
    reward_scale: float = 1.0
    """rewards are multiplied by this before the TD target"""
    episodes_per_update: int = 10
    """episodes the producers run with the current policy between updates (online training)"""


class SquashedGaussianActor(nn.Module):
    """Mean and log-std of a Gaussian over pre-squash actions, squashed by tanh into [low, high]."""

    def __init__(self, in_dim: int, hidden: int, action_dim: int, low, high):
        super().__init__()
        self.body = mlp(in_dim, hidden, 2 * action_dim, out_std=0.01)
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.body(x).chunk(2, -1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1.0)
        return mean, log_std

    def _squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.low + (torch.tanh(u) + 1.0) * 0.5 * (self.high - self.low)

    def sample(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(action, log-probability) for standard normal ``noise`` (reparameterized: differentiable)."""
        mean, log_std = self._heads(x)
        std = log_std.exp()
        u = mean + std * noise
        y = torch.tanh(u)
        # change of variables: a = low + (y + 1) * (high - low) / 2, y = tanh(u)
        logp = normal_log_prob(u, mean, std) - torch.log(0.5 * (self.high - self.low) * (1.0 - y.pow(2)) + 1e-6)
        return self._squash(u), logp.sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic action (the mean, squashed): what ONNX exports."""
        return self._squash(self._heads(x)[0])


class Temperature(nn.Module):
    """``log_alpha`` as a module, so it is in the weights hash, the checkpoint and an optimizer."""

    def __init__(self, alpha: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(float(np.log(alpha))))

    def forward(self) -> torch.Tensor:
        return self.log_alpha.exp()


class SAC(Learner):
    """A shared squashed-Gaussian actor and shared twin critics over (observation, one-hot id, action)."""

    algorithm = "sac"
    counter_names = (*Learner.counter_names, "pending_transitions")
    on_policy = False
    centralized_critic = False
    continuous_actions = True

    def __init__(self, spec: RunSpec, config: SACConfig | None = None):
        if spec.discrete:
            raise ReplayError(f"run {spec.run_id}: SAC needs a continuous (Box) action space, the run's is "
                              f"Discrete; use --algo maddpg (Gumbel-softmax), qmix, dqn or mappo for discrete actions")
        self.spec = spec
        self.config = config or SACConfig()
        c = self.config
        seed_everything(c.seed)
        self.n_agents = N = len(spec.agents)
        self._index = {a: i for i, a in enumerate(spec.agents)}
        self.low, self.high = bounds_of(spec, "SAC")
        A, D = spec.action_dim, spec.obs_dim
        self.act_dim = A
        self.actor_in = D + N
        self.actor = SquashedGaussianActor(self.actor_in, c.hidden, A, self.low, self.high)
        self.critics = MLPEnsemble(2, self.actor_in + A, c.hidden, 1)   # the twins: members 0 and 1
        self.target_critics = copy.deepcopy(self.critics)
        self.temperature = Temperature(c.alpha)
        self.target_entropy = -float(A)
        self.q_optimizer = torch.optim.Adam(self.critics.parameters(), lr=c.learning_rate)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=c.actor_learning_rate)
        self.alpha_optimizer = torch.optim.Adam(self.temperature.parameters(), lr=c.learning_rate)
        self.buffer = TransitionBuffer(c.buffer_size, N, D, A, c.seed)
        self.buffer_lineage = BufferLineage(c.buffer_size)  # what policy.update names: the buffer's batches
        self.explorer = torch.Generator().manual_seed(c.seed + 1)  # acting
        self.noise = torch.Generator().manual_seed(c.seed + 2)     # the update's reparameterization noise
        self._start_counters()
        self.config_hash = config_hash(self.config)
        self.version = self._version()

    @property
    def alpha(self) -> float:
        return float(self.temperature().detach())

    def _version(self) -> str:
        return f"{self.algorithm}-v{self.updates}-{weights_sha256(self.actor).hex()[:12]}"

    def _inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """[..., N, obs_dim] -> [..., N, obs_dim + N]: observation then one-hot agent index."""
        return torch.cat([obs, torch.eye(self.n_agents).expand(*obs.shape[:-1], self.n_agents)], -1)

    # --- acting: the Policy protocol ---------------------------------------------------------
    @torch.no_grad()
    def act(self, observations, state=None) -> dict:
        """A sample of the squashed Gaussian for each live agent, with its log-probability; uniform at
        random (and its log-density) before ``learning_starts``."""
        spec = self.spec
        live = [a for a in spec.agents if a in observations]
        low, high = torch.from_numpy(self.low), torch.from_numpy(self.high)
        if self.buffer.size < self.config.learning_starts:
            acts = low + torch.rand((len(live), self.act_dim), generator=self.explorer) * (high - low)
            logp = [-float(torch.log(high - low).sum())] * len(live)
        else:
            x = np.zeros((len(live), self.actor_in), np.float32)
            for j, a in enumerate(live):
                o = np.asarray(observations[a], np.float32).ravel()
                x[j, :o.shape[0]] = o
                x[j, spec.obs_dim + self._index[a]] = 1.0
            noise = torch.randn((len(live), self.act_dim), generator=self.explorer)
            acts, lp = self.actor.sample(torch.from_numpy(x), noise)
            acts = torch.maximum(torch.minimum(acts, high), low)
            logp = lp.tolist()
        return {a: (acts[j].numpy().copy(), float(logp[j])) for j, a in enumerate(live)}

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic action for actor inputs [B, obs_dim + N]: what ONNX exports."""
        return self.actor(x)

    # --- the update ------------------------------------------------------------------------
    def _add(self, ep: Episode) -> tuple[int, int]:
        """Put one replayed episode's joint transitions in the buffer: (rows, agent-transitions)."""
        rows = episode_transitions(ep, ep.actions.astype(np.float32))
        self.buffer.add(**rows)
        return len(rows["rewards"]), int(rows["alive"].sum())

    def agent_rows(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A batch of joint transitions as its live agents' transitions: (x, a, r, next x, done)."""
        live = b["alive"].reshape(-1) > 0
        x = self._inputs(b["obs"]).reshape(-1, self.actor_in)[live]
        nx = self._inputs(b["next_obs"]).reshape(-1, self.actor_in)[live]
        return (x, b["actions"].reshape(-1, self.act_dim)[live], b["rewards"].reshape(-1)[live], nx,
                b["dones"].reshape(-1)[live])

    @staticmethod
    def _q(critics: MLPEnsemble, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Both twins on the same (input, action) rows: [2, B]."""
        xa = torch.cat([x, a], -1)
        return critics(xa.expand(2, *xa.shape)).squeeze(-1)

    def alpha_step(self, log_pi: torch.Tensor) -> float:
        """One temperature step on the policy's log-probabilities (no gradient into the policy)."""
        alpha_loss = (-self.temperature.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()
        return float(alpha_loss.detach())

    def _gradient_step(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        c = self.config
        x, a, r, nx, done = self.agent_rows(b)
        alpha = self.temperature().detach()
        with torch.no_grad():
            na, nlogp = self.actor.sample(nx, torch.randn((nx.shape[0], self.act_dim), generator=self.noise))
            qn = self._q(self.target_critics, nx, na).min(0).values
            y = r * c.reward_scale + c.gamma * (1.0 - done) * (qn - alpha * nlogp)
        q = self._q(self.critics, x, a)
        q_loss = F.mse_loss(q[0], y) + F.mse_loss(q[1], y)
        self.q_optimizer.zero_grad()
        q_loss.backward()
        nn.utils.clip_grad_norm_(self.critics.parameters(), c.max_grad_norm)
        self.q_optimizer.step()
        out = {"losses/value": float(q_loss.detach()), "losses/q_values": float(q[0].detach().mean())}
        if (self.optimizer_steps + 1) % c.policy_frequency == 0:
            pl = al = ent = 0.0
            self.critics.requires_grad_(False)  # the actor loss moves only the actor
            for _ in range(c.policy_frequency):
                pi, log_pi = self.actor.sample(x, torch.randn((x.shape[0], self.act_dim), generator=self.noise))
                actor_loss = (self.temperature().detach() * log_pi - self._q(self.critics, x, pi).min(0).values).mean()
                self.actor_optimizer.zero_grad()
                actor_loss.backward()
                nn.utils.clip_grad_norm_(self.actor.parameters(), c.max_grad_norm)
                self.actor_optimizer.step()
                pl += float(actor_loss.detach())
                ent -= float(log_pi.detach().mean())
                if c.autotune:
                    al += self.alpha_step(log_pi)
            self.critics.requires_grad_(True)
            k = c.policy_frequency
            out |= {"losses/policy": pl / k, "losses/alpha": al / k, "losses/entropy": ent / k}
        soft_update(self.target_critics, self.critics, c.tau)
        return out

    def update(self, replay: Replay) -> dict:
        """Add the replayed episodes to the buffer, then one critic step per ``train_frequency`` new
        agent-transitions once it holds ``learning_starts`` joint transitions."""
        c = self.config
        steps_before = self.optimizer_steps
        rows = 0
        for ep in replay.episodes:
            r, n = self._add(ep)
            rows += r
            self.pending_transitions += n
        self.buffer_lineage.add(replay.lineage, rows)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        while self.buffer.size >= max(1, c.learning_starts) and self.pending_transitions >= c.train_frequency:
            self.pending_transitions -= c.train_frequency
            for k, v in self._gradient_step(self.buffer.sample(c.batch_size)).items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            self.optimizer_steps += 1
        losses = {k: sums[k] / counts[k] for k in sorted(sums)} or {"losses/value": 0.0, "losses/policy": 0.0}
        return self._finish_update(replay, losses, steps_before, **{"charts/alpha": self.alpha})

    # --- state -------------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.actor, self.critics, self.target_critics, self.temperature]

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm, "config": asdict(self.config), "spec": self.spec.to_dict(),
                "actor": self.actor.state_dict(), "critics": self.critics.state_dict(),
                "target_critics": self.target_critics.state_dict(),
                "temperature": self.temperature.state_dict(), "q_optimizer": self.q_optimizer.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "alpha_optimizer": self.alpha_optimizer.state_dict(),
                "buffer": self.buffer.state_dict(), "buffer_lineage": self.buffer_lineage.state_dict(),
                "explorer": self.explorer.get_state(), "noise": self.noise.get_state(),
                "counters": self.counters()}

    def load_state_dict(self, state: dict) -> None:
        for k in ("actor", "critics", "target_critics", "temperature", "q_optimizer",
                  "actor_optimizer", "alpha_optimizer", "buffer", "buffer_lineage"):
            getattr(self, k).load_state_dict(state[k])
        self.explorer.set_state(state["explorer"])
        self.noise.set_state(state["noise"])
        self.load_counters(state["counters"])

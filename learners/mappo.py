"""MAPPO: PPO with one shared actor over each agent's own observation and a centralized critic over
the global state (Yu et al. 2021, "The Surprising Effectiveness of PPO in Cooperative Multi-Agent
Games"). Discrete and continuous (diagonal Gaussian) actions.

Reads top to bottom: config, networks, acting (the Policy protocol), the update from replayed
episodes, state for checkpoints. Training data is a ``learners.replay.Replay``: the audited stream.
The behaviour log-probabilities are recomputed from the recorded actions with the policy as it was
before the update, so the recorded event alone must determine them.

Continuous actions: a Gaussian sample clipped into the Box, scored as a censored Gaussian
(``networks.clipped_gaussian_log_prob``, Fujita and Maeda 2018): an action at a bound has the
probability of the whole tail beyond it, ``log Phi``, an action inside the Box its density. Until
2026-12 the clipped action was scored with the density, whose gradient at a bound points the wrong
way (it rises as the mean approaches the bound from outside, while the mass clipped there rises as
the mean moves away): a bad action at the bound pushed the mean further out every update. On
resource_allocation_v0 (Box(0, 1), mean starting at the lower bound) the means fell to -1.4 in 10
updates and the tenants stopped asking for resources. Of the ways out:
- recording the unclipped sample would make ``joint.action`` say something the env did not execute
  (the env clips), and put out-of-Box values in front of every reader of the stream (the hybrid
  policy's validity check among them);
- squashing with tanh (as SAC does) records an action in the Box, but the pre-squash value is
  recovered with ``atanh`` of a float32, which saturates near the bounds: the log-probability is then
  only approximately that of what was sampled;
- the censored Gaussian needs nothing but the recorded (clipped) action, which is what the env
  executed, and recomputes its log-probability exactly; the greedy action stays the mean clipped into
  the Box, as the ONNX export has it. That is the one used.
Its known weakness, shared with tanh: a mean far outside the Box puts nearly every sample on the
bound, where the gradient fades (it no longer points the wrong way). The mean therefore starts in the
middle of a finite Box, with a std in proportion to its width (``networks.Actor``), as normalizing
actions to [-1, 1] does; before, on the usual Box(0, 1), it started on the lower bound.

``device``: the update (the actor's and critic's gradient steps over the minibatches) runs on that
device, on twins of the networks that the optimizer owns; acting and everything kept (weights hash,
version, checkpoints, ONNX export, GAE's value pass) use the CPU modules, which receive the twins'
weights after each update. On ``cpu`` there are no twins: the update is what it always was.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from .learner import Learner
from .networks import (Actor, RunningNorm, ValueNorm, agent_dones, clipped_gaussian_log_prob, config_hash, gae, mlp,
                       seed_everything, torch_device, weights_sha256)
from .replay import Episode, Replay, RunSpec


@dataclass
class MAPPOConfig:
    seed: int = 1
    """seed of torch, numpy and the action sampler"""
    learning_rate: float = 7e-4
    """Adam learning rate of actor and critic"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalized advantage estimation"""
    update_epochs: int = 5
    """passes over each batch of episodes"""
    num_minibatches: int = 2
    """minibatches per pass"""
    clip_coef: float = 0.2
    """PPO surrogate clipping"""
    ent_coef: float = 0.01
    """entropy bonus"""
    vf_coef: float = 0.5
    """value loss weight"""
    max_grad_norm: float = 10.0
    """gradient clipping (actor and critic clipped separately)"""
    hidden: int = 64
    """hidden units in each of two layers"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    reward_scale: float = 1.0
    """rewards are multiplied by this before GAE"""
    value_norm: bool = True
    """critic learns normalized targets (running mean/std of the returns, MAPPO's ValueNorm)"""
    episodes_per_update: int = 20
    """episodes the producers run with the current policy between updates (online training)"""
    anneal_lr_env_steps: int = 0
    """learning-rate annealing: before each update the Adam rate is learning_rate * max(0, 1 - env steps
    trained on so far / this), linear to 0 at this many env steps (set it to the run's budget); 0: constant"""
    obs_norm: bool = False
    """observation normalization: running mean/std (every row so far, clipped to +-10) of the actor's
    observation and of the critic's state (or observation, IPPO) columns, never of the one-hot id; each
    replayed batch is folded in before its update; kept as buffers (hash, checkpoints, ONNX)"""
    time_horizon: int = 0
    """the critic also sees the fraction of the episode's steps left, max(0, 1 - t / time_horizon), as its
    last input column (Pardo et al. 2018, "Time Limits in Reinforcement Learning"): set it to the env's
    step limit (simple_spread's max_cycles, 25) where episodes end at a fixed step the observation does
    not show; the end is then part of the state and treating it as terminal is exact. The actor is
    unchanged (acting and the ONNX export need no clock); 0: no time column"""
    device: str = "cpu"
    """where the update runs (cpu, cuda, cuda:N); acting stays on the CPU; not part of config_hash or checkpoints"""


class MAPPO(Learner):
    """A shared actor and a critic over the global state plus the agent's one-hot id."""

    algorithm = "mappo"
    on_policy = True
    centralized_critic = True
    continuous_actions = True

    def __init__(self, spec: RunSpec, config: MAPPOConfig | None = None):
        self.spec = spec
        self.config = config or MAPPOConfig()
        c = self.config
        seed_everything(c.seed)
        self.device = torch_device(c.device)
        self.n_agents = len(spec.agents)
        self._index = {a: i for i, a in enumerate(spec.agents)}
        self.actor_in = spec.obs_dim + self.n_agents
        box = {} if spec.discrete else {"low": spec.action_space.low, "high": spec.action_space.high}
        self.actor = Actor(self.actor_in, c.hidden, n_actions=spec.n_actions, action_dim=spec.action_dim,
                           action_mask=spec.action_mask(), obs_norm=spec.obs_dim if c.obs_norm else 0, **box)
        self.critic = mlp(self.critic_in_dim() + (1 if c.time_horizon > 0 else 0), c.hidden, 1, out_std=1.0)
        if c.obs_norm:  # the critic's input columns before the one-hot id, normalized first
            self.critic = nn.Sequential(RunningNorm(self.critic_in_dim() - self.n_agents), *self.critic)
        self.value_norm = ValueNorm(c.value_norm)
        # what the optimizer steps: the modules themselves on the CPU, twins on another device
        self.twins = self.device != torch.device("cpu")
        self.train_actor = copy.deepcopy(self.actor).to(self.device) if self.twins else self.actor
        self.train_critic = copy.deepcopy(self.critic).to(self.device) if self.twins else self.critic
        self.optimizer = torch.optim.Adam([*self.train_actor.parameters(), *self.train_critic.parameters()],
                                          lr=c.learning_rate, eps=1e-5)
        self.sampler = torch.Generator().manual_seed(c.seed)       # acting
        self.shuffler = torch.Generator().manual_seed(c.seed + 1)  # minibatches
        self._start_counters()
        self.config_hash = config_hash(self._kept_config())
        self.version = self._version()

    # --- inputs ----------------------------------------------------------------------------
    def critic_in_dim(self) -> int:
        return self.spec.state_dim + self.n_agents

    def actor_inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """[..., N, obs_dim] -> [..., N, obs_dim + N]: observation then one-hot agent index."""
        eye = torch.eye(self.n_agents).expand(*obs.shape[:-1], self.n_agents)
        return torch.cat([obs, eye], -1)

    def critic_inputs(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """[T, N, obs_dim], [T, S] -> [T, N, S + N]: the global state, seen by every agent with its id."""
        s = state.unsqueeze(-2).expand(*state.shape[:-1], self.n_agents, state.shape[-1])
        eye = torch.eye(self.n_agents).expand(*s.shape[:-1], self.n_agents)
        return torch.cat([s, eye], -1)

    def critic_features(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One episode's critic rows [T, N, ...]: ``critic_inputs``, then, with ``time_horizon``, the
        fraction of the steps left at each step t (the episode's first recorded step is t = 0)."""
        cx = self.critic_inputs(obs, state)
        H = self.config.time_horizon
        if H <= 0:
            return cx
        t = torch.arange(cx.shape[0], dtype=cx.dtype)
        left = (1.0 - t / H).clamp_min(0.0).reshape(-1, *([1] * (cx.dim() - 1))).expand(*cx.shape[:-1], 1)
        return torch.cat([cx, left], -1)

    # --- acting: the Policy protocol ---------------------------------------------------------
    def _version(self) -> str:
        return f"{self.algorithm}-v{self.updates}-{weights_sha256(self.actor).hex()[:12]}"

    @torch.no_grad()
    def act(self, observations, state=None) -> dict:
        """Sample an action for each live agent; returns {agent: (action, log_prob)}."""
        spec = self.spec
        live = [a for a in spec.agents if a in observations]
        xn = np.zeros((len(live), self.actor_in), np.float32)
        D = spec.obs_dim
        for j, a in enumerate(live):
            o = np.asarray(observations[a], np.float32).ravel()
            xn[j, :o.shape[0]] = o
            xn[j, D + self._index[a]] = 1.0
        x = torch.from_numpy(xn)
        if spec.discrete:  # the categorical by hand: torch.distributions' checks cost more than the net
            logp_all = torch.log_softmax(self.actor.logits(x), -1)
            # inverse-CDF sampling with the seeded generator
            u = torch.rand((len(live), 1), generator=self.sampler)
            cdf = logp_all.exp().cumsum(-1)
            acts = (cdf < u).sum(-1, keepdim=True).clamp_max(cdf.shape[-1] - 1)
            logp = logp_all.gather(-1, acts).squeeze(-1).tolist()
            start = spec.action_space.start
            return {a: (int(k) + start, logp[j]) for j, (a, k) in enumerate(zip(live, acts.squeeze(-1).tolist()))}
        d = self.actor.dist(x)
        noise = torch.randn(d.mean.shape, generator=self.sampler)
        acts = self.actor.clip(d.mean + d.stddev * noise)  # what the env executes and the event records
        logp = clipped_gaussian_log_prob(d.mean, d.stddev, acts, self.actor.low, self.actor.high)
        return {a: (acts[j].numpy().copy(), float(logp[j])) for j, a in enumerate(live)}

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic action for actor inputs [B, obs_dim + N] (argmax, or the Gaussian mean, which the
        export and ``GreedyPolicy`` clip into the Box): what ONNX exports."""
        return self.actor(x)

    # --- the update ------------------------------------------------------------------------
    def _flatten(self, episodes: list[Episode]):
        """Every live agent-step of the episodes as rows: actor inputs, critic inputs, actions,
        advantages, returns. The critic values each episode on its own; GAE runs once over all the
        episodes of one length side by side (elementwise: the same numbers as one episode at a time)."""
        c = self.config
        xs, cs, acts, masks, terms = [], [], [], [], []
        with torch.no_grad():
            for ep in episodes:
                obs = torch.as_tensor(ep.obs)
                x = self.actor_inputs(obs)
                cx = self.critic_features(obs, torch.as_tensor(ep.state))
                values = self.value_norm.denormalize(self.critic(cx).squeeze(-1))  # [T, N]
                rewards = torch.as_tensor(ep.rewards) * c.reward_scale
                # the episode's end (or an agent's early exit) is its end: no final observation is recorded
                dones = torch.as_tensor(agent_dones(ep.alive))
                terms.append((rewards, values, dones))
                xs.append(x.reshape(-1, x.shape[-1]))
                cs.append(cx.reshape(-1, cx.shape[-1]))
                a = torch.as_tensor(ep.actions)
                acts.append(a.reshape(-1, *a.shape[2:]))
                masks.append(torch.as_tensor(ep.alive).reshape(-1) > 0)
            advs: list = [None] * len(episodes)
            rets: list = [None] * len(episodes)
            by_length: dict[int, list[int]] = {}
            for i, (rewards, _, _) in enumerate(terms):
                by_length.setdefault(rewards.shape[0], []).append(i)
            for group in by_length.values():  # [T, E, N]
                rewards, values, dones = (torch.stack([terms[i][k] for i in group], 1) for k in range(3))
                adv, ret = gae(rewards, values, dones, torch.zeros(len(group), self.n_agents), c.gamma, c.gae_lambda)
                for j, i in enumerate(group):
                    advs[i], rets[i] = adv[:, j].reshape(-1), ret[:, j].reshape(-1)
        m = torch.cat(masks)
        return (torch.cat(xs)[m], torch.cat(cs)[m], torch.cat(acts)[m], torch.cat(advs)[m], torch.cat(rets)[m])

    @torch.no_grad()
    def _update_obs_norm(self, episodes: list[Episode]) -> None:
        """Fold the batch's live agent-steps into the actor's and the critic's RunningNorm (on the CPU
        modules and, when the update runs elsewhere, their twins), before GAE's values, the old
        log-probabilities and the epochs: all of this update sees one normalization. The batch was
        acted with the previous statistics; PPO's clipped ratio absorbs the (small, shrinking) shift."""
        rows, crows = [], []
        for ep in episodes:
            obs = torch.as_tensor(ep.obs)
            live = torch.as_tensor(ep.alive).reshape(-1) > 0
            rows.append(obs.reshape(-1, obs.shape[-1])[live])
            cx = self.critic_features(obs, torch.as_tensor(ep.state))
            crows.append(cx.reshape(-1, cx.shape[-1])[live])
        self.actor.obs_norm.update(torch.cat(rows))
        self.critic[0].update(torch.cat(crows))
        if self.twins:
            self.train_actor.obs_norm.load_state_dict(self.actor.obs_norm.state_dict())
            self.train_critic[0].load_state_dict(self.critic[0].state_dict())

    def update(self, replay: Replay, behaviour: nn.Module | None = None) -> dict:
        """PPO epochs over the replayed episodes. Returns losses and the optimizer steps taken.

        ``behaviour``: the actor (a CPU module) that collected the episodes, where it is not this
        learner's own (a learner one round ahead of its producers); PPO's old log-probabilities are
        then its, not the current actor's. None: the current actor, as it is before the epochs.

        GAE's value pass runs on the CPU modules; the epochs on ``config.device``, whose twins' weights
        are then copied back to the CPU modules (no twins, nothing copied on the CPU)."""
        c = self.config
        episodes = replay.episodes
        steps_before = self.optimizer_steps
        names = ("losses/policy", "losses/value", "losses/entropy", "losses/approx_kl")
        losses = dict.fromkeys(names, 0.0)
        if c.anneal_lr_env_steps > 0:  # by the env steps trained on before this batch: the first update at full rate
            lr = c.learning_rate * max(0.0, 1.0 - self.env_steps / c.anneal_lr_env_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if episodes and c.obs_norm:
            self._update_obs_norm(episodes)
        if episodes:
            x, cx, a, adv, ret = self._flatten(episodes)
            self.value_norm.update(ret)
            ret = self.value_norm.normalize(ret)  # the critic's target scale
            dev = self.device
            x, cx, a, adv, ret = (t.to(dev) for t in (x, cx, a, adv, ret))
            actor, critic = self.train_actor, self.train_critic
            with torch.no_grad():
                old_logp = actor.log_prob_entropy(x, a)[0] if behaviour is None else \
                    behaviour.log_prob_entropy(x.cpu(), a.cpu())[0].to(dev)
            B = x.shape[0]
            mb = max(1, B // c.num_minibatches)
            n = 0
            # float64 sums of the float32 losses, as Python floats would add them, kept on the device
            # (one transfer at the end instead of a synchronization per minibatch)
            sums = torch.zeros(len(names), dtype=torch.float64, device=dev)
            for _ in range(c.update_epochs):
                # drawn by the CPU generator: the same minibatches on every device
                perm = torch.randperm(B, generator=self.shuffler).to(dev)
                for start in range(0, B, mb):
                    idx = perm[start:start + mb]
                    logp, ent = actor.log_prob_entropy(x[idx], a[idx])
                    ratio = (logp - old_logp[idx]).exp()
                    madv = adv[idx]
                    if c.norm_adv and madv.numel() > 1:
                        madv = (madv - madv.mean()) / (madv.std() + 1e-8)
                    pg_loss = torch.max(-madv * ratio, -madv * ratio.clamp(1 - c.clip_coef, 1 + c.clip_coef)).mean()
                    v_loss = 0.5 * (critic(cx[idx]).squeeze(-1) - ret[idx]).pow(2).mean()
                    entropy = ent.mean()
                    loss = pg_loss - c.ent_coef * entropy + c.vf_coef * v_loss
                    self.optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(actor.parameters(), c.max_grad_norm)
                    nn.utils.clip_grad_norm_(critic.parameters(), c.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer_steps += 1
                    n += 1
                    with torch.no_grad():
                        kl = ((ratio - 1) - (logp - old_logp[idx])).mean()
                        for i, v in enumerate((pg_loss, v_loss, entropy, kl)):
                            sums[i] += v.double()
            losses = {k: v / n for k, v in zip(names, sums.tolist())}
            if self.twins:  # acting and everything kept read the CPU modules
                self.actor.load_state_dict(actor.state_dict())
                self.critic.load_state_dict(critic.state_dict())
        return self._finish_update(replay, losses, steps_before)

    # --- state -------------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        """The CPU modules: what acts, is hashed, checkpointed and exported, on any update device."""
        return [self.actor, self.critic, self.value_norm]

    def _kept_config(self) -> dict:
        """The config as hashed and checkpointed: without ``device``, which says where the update ran,
        not what was learned; a GPU session's checkpoint loads on a CPU-only machine (on the CPU). Fields
        added after the first checkpoints (``_LATER_FIELDS``) are left out at their defaults, so a config
        that does not use them keeps the hash it had before they existed."""
        return {k: v for k, v in asdict(self.config).items()
                if k != "device" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}

    def state_dict(self) -> dict:
        optimizer = self.optimizer.state_dict()
        if self.twins:  # the Adam moments live beside the twins: kept on the CPU like everything else
            optimizer = _on_cpu(optimizer)
        return {"algorithm": self.algorithm, "config": self._kept_config(), "spec": self.spec.to_dict(),
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "value_norm": self.value_norm.state_dict(),
                "optimizer": optimizer, "sampler": self.sampler.get_state(),
                "shuffler": self.shuffler.get_state(),
                "counters": self.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.value_norm.load_state_dict(state["value_norm"])
        if self.twins:
            self.train_actor.load_state_dict(self.actor.state_dict())
            self.train_critic.load_state_dict(self.critic.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])  # moved to its parameters' device by torch
        self.sampler.set_state(state["sampler"])
        self.shuffler.set_state(state["shuffler"])
        self.load_counters(state["counters"])


# config fields added after checkpoints existed, with the default that means "as before"
_LATER_FIELDS = {"anneal_lr_env_steps": 0, "obs_norm": False, "time_horizon": 0}


def _on_cpu(obj):
    """A copy of a nested state (dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj

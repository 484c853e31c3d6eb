"""What the learners truly share: seeding, the update device, layer initialisation, the actor heads, GAE
and the weights hash.

Policies are shared across agents (parameter sharing); an agent's input is its observation, padded
to the widest agent, followed by a one-hot of its index, so one network serves heterogeneous ids.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import asdict, fields, is_dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical, Normal


def seed_everything(seed: int) -> None:
    """The same seeding block in every learner: random, numpy, torch, deterministic algorithms on."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def config_hash(config) -> str:
    """SHA-256 hex of a config dataclass as canonical JSON (sorted keys)."""
    import json

    data = asdict(config) if is_dataclass(config) else dict(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def config_doc(config_cls) -> dict[str, str]:
    """Field name -> its one-line docstring (read from the class source), for docs and `--help`."""
    import inspect

    lines = inspect.getsource(config_cls).splitlines()
    out: dict[str, str] = {}
    names = {f.name for f in fields(config_cls)}
    for i, line in enumerate(lines[:-1]):
        name = line.strip().split(":")[0]
        if name in names and lines[i + 1].strip().startswith('"""'):
            out[name] = lines[i + 1].strip().strip('"')
    return out


def weights_sha256(*modules: nn.Module) -> bytes:
    """SHA-256 over every tensor of the modules' state dicts (name, dtype, shape, raw bytes), in order."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.digest()


def torch_device(name: str) -> torch.device:
    """The device a learner's update runs on (``cpu``, ``cuda``, ``cuda:N``); a clear ValueError when
    this machine cannot give it. For CUDA, cuBLAS gets the workspace setting that deterministic
    algorithms require (set before the first CUDA matrix product of the process)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: torch.cuda.is_available() is false on this machine (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: the learners run on cpu or cuda only")
    return device


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(inp: int, hidden: int, out: int, out_std: float = 1.0, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = inp
    for _ in range(layers):
        mods += [layer_init(nn.Linear(d, hidden)), nn.Tanh()]
        d = hidden
    mods.append(layer_init(nn.Linear(d, out), std=out_std))
    return nn.Sequential(*mods)


class Actor(nn.Module):
    """Shared policy: categorical over ``n_actions`` (discrete) or a diagonal Gaussian (continuous).

    Continuous actions are sampled from the Gaussian and clipped to the Box ``[low, high]``; the
    clipped action is what the env executes and what ``joint.action`` records. Its probability is
    that of a censored Gaussian (``clipped_gaussian_log_prob``): an action at a bound carries the
    Gaussian's whole tail beyond it, an action inside the Box its density. The bounds are kept as
    non-persistent buffers: they come from the run's spec, not from training, so they are neither in
    the state dict nor in the weights hash.
    """

    def __init__(self, in_dim: int, hidden: int, *, n_actions: int = 0, action_dim: int = 0,
                 action_mask=None, low=None, high=None, obs_norm: int = 0):
        super().__init__()
        self.discrete = n_actions > 0
        # obs_norm > 0: the first obs_norm input columns (the observation, not the one-hot id) pass
        # through a RunningNorm first; 0 (the default) adds no module, so the state dict is unchanged
        self.obs_norm = RunningNorm(obs_norm) if obs_norm else None
        out = n_actions if self.discrete else action_dim
        self.body = mlp(in_dim, hidden, out, out_std=0.01)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((action_dim,), -0.5))
            inf = torch.full((action_dim,), float("inf"))
            low = -inf if low is None else torch.as_tensor(low, dtype=torch.float32).reshape(action_dim)
            high = inf if high is None else torch.as_tensor(high, dtype=torch.float32).reshape(action_dim)
            self.register_buffer("low", low, persistent=False)
            self.register_buffer("high", high, persistent=False)
            # start in the middle of the Box, with a spread in proportion to its width (on [-1, 1]: mean
            # 0, std 0.61, as before), which is what normalizing actions to [-1, 1] does; a mean at a
            # bound (0 for the usual Box(0, 1)) starts with half of every action clipped there
            finite = torch.isfinite(low) & torch.isfinite(high)
            with torch.no_grad():
                self.body[-1].bias.copy_(torch.where(finite, (low + high) / 2, 0.0))
                self.log_std.add_(torch.where(finite, ((high - low) / 2).log(), 0.0))
        self.masked = action_mask is not None
        if self.masked:  # agents with fewer actions than the widest: [N, n_actions], chosen by the one-hot id
            self.register_buffer("action_mask", torch.as_tensor(action_mask, dtype=torch.float32))

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.obs_norm is None else self.obs_norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self._in(x))
        if self.masked:
            out = mask_logits(out, x, self.action_mask)
        return out

    def dist(self, x: torch.Tensor):
        """The categorical, or the Gaussian before clipping."""
        if self.discrete:
            return Categorical(logits=self.logits(x))
        out = self.body(self._in(x))
        return Normal(out, self.log_std.exp().expand_as(out))

    def clip(self, raw: torch.Tensor) -> torch.Tensor:
        """A Gaussian sample (or the mean) clipped into the Box: the action the env executes."""
        return torch.maximum(torch.minimum(raw, self.high), self.low)

    def log_prob_entropy(self, x: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of recorded actions and the entropy bonus (continuous: the unclipped
        Gaussian's entropy, the usual PPO bonus; the censored distribution, part point masses and
        part density, has no entropy of its own)."""
        d = self.dist(x)
        if self.discrete:
            return d.log_prob(actions.long()), d.entropy()
        return clipped_gaussian_log_prob(d.mean, d.stddev, actions, self.low, self.high), d.entropy().sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The greedy action (argmax, or the Gaussian mean; the export clips it into the Box): what ONNX exports."""
        return self.logits(x).argmax(-1) if self.discrete else self.body(self._in(x))


def clipped_gaussian_log_prob(mean: torch.Tensor, std: torch.Tensor, actions: torch.Tensor, low: torch.Tensor,
                              high: torch.Tensor) -> torch.Tensor:
    """Log-probability of clipped actions ``clip(mean + std * noise, low, high)`` under the censored
    Gaussian, summed over the action's dimensions (Fujita and Maeda 2018, "Clipped Action Policy
    Gradient"): ``log Phi((low - mean) / std)`` where the action sits at ``low`` (every sample at or
    below it was clipped there), ``log (1 - Phi((high - mean) / std))`` at ``high``, and the Gaussian
    density inside. The density at a bound, which is what clipped actions used to be scored with, has
    the wrong gradient there: it rises as the mean moves toward the bound, whereas the probability of
    being clipped rises as the mean moves past it, so a bad action at the bound pushed the mean out of
    the Box, further each update.

    A recorded action is exactly a bound when it was clipped: the clipped action and the bounds are
    float32 (as the event and ``run.started`` carry them), and a sample landing on a bound has
    probability 0. Infinite bounds never match."""
    z = (actions - mean) / std  # at a bound, this is the bound's z
    density = -0.5 * z.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)
    logp = torch.where(actions <= low, torch.special.log_ndtr(z),
                       torch.where(actions >= high, torch.special.log_ndtr(-z), density))
    return logp.sum(-1)


def mask_logits(out: torch.Tensor, x: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Push the logits (or Q-values) of actions an agent does not have to -1e9. The agent is read from
    the one-hot id at the end of the input ``x`` (last N columns), so ONNX exports the mask too."""
    n_agents = action_mask.shape[0]
    allowed = x[..., -n_agents:] @ action_mask
    return out - (1.0 - allowed) * 1e9


def merge_moments(stats: nn.Module, b_mean: torch.Tensor, b_var: torch.Tensor, b_n: float) -> None:
    """Fold a batch's mean, (population) variance and size into ``stats``' ``mean``, ``var`` and
    ``count`` buffers in place: the exact running estimate over every value seen (Chan et al.'s
    parallel update)."""
    n = stats.count + b_n
    delta = b_mean - stats.mean
    m2 = stats.var * stats.count + b_var * b_n + delta.pow(2) * stats.count * b_n / n
    stats.mean.copy_(stats.mean + delta * b_n / n)
    stats.var.copy_(m2 / n)
    stats.count.copy_(n)


class ValueNorm(nn.Module):
    """Running mean and variance of the value targets (MAPPO's ValueNorm, here an exact running
    estimate over every target seen). The critic predicts normalized values; GAE works on
    ``denormalize(critic(x))``. Kept as buffers, so it is part of the weights hash and checkpoints."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if not self.enabled or x.numel() == 0:
            return
        x = x.double().reshape(-1)
        merge_moments(self, x.mean(), x.var(unbiased=False), float(x.numel()))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return ((x.double() - self.mean) / self.var.clamp_min(1e-8).sqrt()).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x.double() * self.var.clamp_min(1e-8).sqrt() + self.mean).to(x.dtype)


class RunningNorm(nn.Module):
    """Observation normalization: the first ``dim`` columns of the input become ``(x - mean) / std``
    of every row seen so far (an exact running estimate, per column, in float64), clipped to
    ``[-clip, clip]``; later columns (the one-hot agent id) pass through. Before any ``update`` it is
    the identity on those columns (mean 0, var 1). The statistics are buffers: part of the weights
    hash, checkpoints and the ONNX graph, so the exported policy normalizes as the learner does."""

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        if dim < 1:
            raise ValueError(f"RunningNorm needs at least one column to normalize, got dim={dim}")
        self.dim, self.clip, self.eps = int(dim), float(clip), float(eps)
        self.register_buffer("mean", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(self.dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Fold rows [B, >= dim] (only their first ``dim`` columns) into the running mean and variance."""
        if rows.numel() == 0:
            return
        x = rows[..., :self.dim].double().reshape(-1, self.dim)
        merge_moments(self, x.mean(0), x.var(0, unbiased=False), float(x.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dim
        z = (x[..., :d] - self.mean.to(x.dtype)) / (self.var.to(x.dtype) + self.eps).sqrt()
        return torch.cat([z.clamp(-self.clip, self.clip), x[..., d:]], -1)


def agent_dones(alive: np.ndarray) -> np.ndarray:
    """[T, N] 1.0 at each agent's last live step: the episode's end, or where the agent left it early
    (e.g. a sandbox agent that contained its sample); nothing is bootstrapped past it."""
    alive = np.asarray(alive) > 0
    nxt = np.concatenate([alive[1:], np.zeros_like(alive[:1])], 0)
    return (alive & ~nxt).astype(np.float32)


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_values: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over time-major tensors [T, ...].

    ``dones[t]`` is 1 where the episode ended at step t (no bootstrap past it); ``last_values`` is
    V(s_T) for a trajectory cut short, zeros where every episode ended."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        nxt = last_values if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nxt * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values

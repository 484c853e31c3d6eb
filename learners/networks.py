"""What the learners truly share: seeding, layer initialisation, the actor heads, GAE and the weights hash.

Policies are shared across agents (parameter sharing); an agent's input is its observation, padded
to the widest agent, followed by a one-hot of its index, so one network serves heterogeneous ids.
"""
from __future__ import annotations

import hashlib
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

    Continuous actions are sampled unbounded and clipped to [low, high] when sent to the env; the
    log-probability is of the recorded (clipped) action, recomputed by the learner before updating.
    """

    def __init__(self, in_dim: int, hidden: int, *, n_actions: int = 0, action_dim: int = 0,
                 action_mask=None):
        super().__init__()
        self.discrete = n_actions > 0
        out = n_actions if self.discrete else action_dim
        self.body = mlp(in_dim, hidden, out, out_std=0.01)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((action_dim,), -0.5))
        self.masked = action_mask is not None
        if self.masked:  # agents with fewer actions than the widest: [N, n_actions], chosen by the one-hot id
            self.register_buffer("action_mask", torch.as_tensor(action_mask, dtype=torch.float32))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.masked:
            out = mask_logits(out, x, self.action_mask)
        return out

    def dist(self, x: torch.Tensor):
        if self.discrete:
            return Categorical(logits=self.logits(x))
        out = self.body(x)
        return Normal(out, self.log_std.exp().expand_as(out))

    def log_prob_entropy(self, x: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dist(x)
        if self.discrete:
            return d.log_prob(actions.long()), d.entropy()
        return d.log_prob(actions).sum(-1), d.entropy().sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The greedy action (argmax, or the Gaussian mean): what ONNX exports."""
        return self.logits(x).argmax(-1) if self.discrete else self.body(x)


def mask_logits(out: torch.Tensor, x: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Push the logits (or Q-values) of actions an agent does not have to -1e9. The agent is read from
    the one-hot id at the end of the input ``x`` (last N columns), so ONNX exports the mask too."""
    n_agents = action_mask.shape[0]
    allowed = x[..., -n_agents:] @ action_mask
    return out - (1.0 - allowed) * 1e9


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
        b_mean, b_var, b_n = x.mean(), x.var(unbiased=False), float(x.numel())
        n = self.count + b_n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * b_n + delta.pow(2) * self.count * b_n / n
        self.mean.copy_(self.mean + delta * b_n / n)
        self.var.copy_(m2 / n)
        self.count.copy_(n)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return ((x.double() - self.mean) / self.var.clamp_min(1e-8).sqrt()).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x.double() * self.var.clamp_min(1e-8).sqrt() + self.mean).to(x.dtype)


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

"""IPPO: independent PPO (de Witt et al. 2020, "Is Independent Learning All You Need in the StarCraft
Multi-Agent Challenge?"). Everything as in MAPPO, except that each agent's critic sees only what the
agent itself sees: its own observation and its id, never the global state. Discrete and continuous
actions (clipped Gaussian samples scored as a censored Gaussian), the update on ``config.device``:
both as MAPPO's docstring describes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .mappo import MAPPO, MAPPOConfig


@dataclass
class IPPOConfig(MAPPOConfig):
    """The same hyperparameters as MAPPO (see MAPPOConfig for each field's meaning)."""


class IPPO(MAPPO):
    """A shared actor and a shared decentralized critic over the agent's own observation and id."""

    algorithm = "ippo"
    centralized_critic = False

    def __init__(self, spec, config: IPPOConfig | None = None):
        super().__init__(spec, config or IPPOConfig())

    def critic_in_dim(self) -> int:
        return self.spec.obs_dim + len(self.spec.agents)

    def critic_inputs(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.actor_inputs(obs)  # the agent's own view only

"""The Policy protocol through which environments are driven: observations in, actions out.

Learners implement it structurally (they never import producers/); ``marlgrc`` hands a learner's
policy to the harness.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import numpy as np


class Policy(Protocol):
    version: str
    """Recorded as ``policy_version`` on every joint.action it chose."""

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> Mapping[str, tuple[Any, float]]:
        """For each agent: (action, log-probability of that action under this policy)."""
        ...

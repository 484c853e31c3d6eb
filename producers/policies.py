"""Built-in policies: ``random`` (uniform over each agent's action space) and ``heuristic`` (the
env's own rule, ``env.heuristic_action(agent, observation)``), and ``OnnxPolicy``: a policy exported
by ``marlgrc train --onnx``, used only after its signature checks out. All satisfy
``producers.policy.Policy``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from gymnasium import spaces

from eventlog.checkpoint import ONNX_POLICY_KIND, read_signed_file


class RandomPolicy:
    """Uniform random actions, seeded; log-probabilities are exact for Discrete/MultiDiscrete/
    MultiBinary and bounded Boxes (0.0 for an unbounded Box, which has no uniform density)."""

    version = "random-v1"

    def __init__(self, env: Any, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._space = {a: env.action_space(a) for a in env.possible_agents}
        self._logp = {a: self._log_prob(s) for a, s in self._space.items()}
        self._n = {a: (int(s.n), int(s.start)) for a, s in self._space.items() if isinstance(s, spaces.Discrete)}

    @staticmethod
    def _log_prob(s: Any) -> float:
        if isinstance(s, spaces.Discrete):
            return -math.log(int(s.n))
        if isinstance(s, spaces.MultiDiscrete):
            return -float(np.log(s.nvec.astype(np.float64)).sum())
        if isinstance(s, spaces.MultiBinary):
            return -math.log(2) * int(np.prod(s.shape))
        if isinstance(s, spaces.Box) and s.is_bounded():
            width = (s.high.astype(np.float64) - s.low.astype(np.float64))
            return -float(np.log(np.where(width > 0, width, 1.0)).sum())
        return 0.0

    def _sample(self, agent: str) -> Any:
        n = self._n.get(agent)
        if n is not None:
            return int(self._rng.integers(n[0])) + n[1]
        s = self._space[agent]
        if isinstance(s, spaces.MultiDiscrete):
            return (self._rng.random(s.nvec.shape) * s.nvec).astype(s.dtype)
        if isinstance(s, spaces.MultiBinary):
            return self._rng.integers(0, 2, size=s.shape, dtype=s.dtype)
        low = np.where(np.isfinite(s.low), s.low, -1.0)
        high = np.where(np.isfinite(s.high), s.high, 1.0)
        return self._rng.uniform(low, high).astype(s.dtype)

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> dict[str, tuple[Any, float]]:
        return {a: (self._sample(a), self._logp[a]) for a in observations}


class HeuristicPolicy:
    """Deterministic rule from the env (``heuristic_action(agent, observation)``); log-prob 0.0."""

    version = "heuristic-v1"

    def __init__(self, env: Any):
        rule = getattr(env, "heuristic_action", None)
        if rule is None:
            raise ValueError(f"env {type(env).__name__} has no heuristic_action(agent, observation); "
                             f"use --policy random, or give the env such a method")
        self._rule = rule

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> dict[str, tuple[Any, float]]:
        return {a: (self._rule(a, o), 0.0) for a, o in observations.items()}


BUILTIN = ("random", "heuristic")


def builtin_policy(name: str, env: Any, seed: int = 0):
    if name == "random":
        return RandomPolicy(env, seed)
    if name == "heuristic":
        return HeuristicPolicy(env)
    raise ValueError(f"unknown policy {name!r}; built in: {', '.join(BUILTIN)}")


ONNX_PREFIX = "onnx:"
ONNX_REMEDY = ("use an ONNX file together with the .sig.json that `marlgrc train --onnx PATH` wrote beside it, "
               "or export the policy again with `marlgrc train --run RUN --onnx PATH`")


class PolicyFileError(ValueError):
    """An exported policy file cannot drive this env (another env's agents or spaces, or not a model
    ONNX Runtime can run). Signature failures are ``eventlog.checkpoint.SignedFileError``."""


class OnnxPolicy:
    """The Policy protocol over a signed ONNX export: greedy actions, one ONNX Runtime call per joint
    decision, log-probability 0.0.

    The only way an exported policy is loaded: ``read_signed_file`` checks the signature beside
    ``path`` against ``public_key`` (the trusted key: the home's signing key unless told otherwise) and
    the bytes' SHA-256, and ONNX Runtime is given exactly the bytes that were checked. The signed
    statement says how to call the model (agents, observation width, action space), so nothing of the
    learners is needed here. ``env``, when given, must have the model's agents and fitting spaces.
    """

    def __init__(self, path: Path, public_key: Ed25519PublicKey, env: Any = None):
        data, statement = read_signed_file(path, public_key, ONNX_POLICY_KIND, ONNX_REMEDY)
        self.path = Path(path)
        self.statement = statement
        ctx = statement["context"]
        io = ctx["io"]
        self.agents: list[str] = list(io["agents"])
        self.obs_dim = int(io["obs_dim"])
        self.discrete = bool(io["discrete"])
        self.start = int(io.get("action_start", 0))
        self.version: str = ctx["policy_version"]
        self._index = {a: i for i, a in enumerate(self.agents)}
        if env is not None:
            self._check_env(env, ctx)
        import onnxruntime as ort

        # one decision is a few small matmuls: run them on the caller's thread, in order, with no
        # thread pool to wake (or spin) and every graph optimization applied
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors have no common base worth naming
            raise PolicyFileError(f"{path}: its signature checks out, but ONNX Runtime cannot load it "
                                  f"({str(exc).splitlines()[0][:200]}); {ONNX_REMEDY}") from None
        self._in = io.get("input", "obs")
        self._out = [io.get("output", "action")]

    def _check_env(self, env: Any, ctx: dict) -> None:
        what = f"{self.path} is {ctx.get('algorithm', '?')} policy {self.version} for env {ctx.get('env_id', '?')}"
        if set(env.possible_agents) != set(self.agents):
            raise PolicyFileError(f"{what} with agents {self.agents}; this env has {list(env.possible_agents)}: "
                                  f"run it on the env it was trained on")
        for a in env.possible_agents:
            obs, act = env.observation_space(a), env.action_space(a)
            width = int(np.prod(obs.shape)) if obs.shape is not None else 0
            if width > self.obs_dim:
                raise PolicyFileError(f"{what}, whose observations are at most {self.obs_dim} wide; agent {a!r} "
                                      f"here sees {width}: run it on the env it was trained on")
            if self.discrete:
                ok = isinstance(act, spaces.Discrete) and int(act.start) == self.start and int(act.n) <= int(
                    ctx["io"]["n_actions"])
            else:
                ok = isinstance(act, spaces.Box) and list(act.shape) == list(ctx["io"]["action_shape"])
            if not ok:
                raise PolicyFileError(f"{what}; agent {a!r} here acts in {act}, which its actions do not fit: "
                                      f"run it on the env it was trained on")

    def inputs(self, observations: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
        """The model's input for the live agents (in the model's agent order): observation zero-padded
        to ``obs_dim``, then the agent's one-hot index."""
        live = [a for a in self.agents if a in observations]
        x = np.zeros((len(live), self.obs_dim + len(self.agents)), np.float32)
        for j, a in enumerate(live):
            o = np.asarray(observations[a], np.float32).ravel()
            x[j, :o.shape[0]] = o
            x[j, self.obs_dim + self._index[a]] = 1.0
        return live, x

    def actions(self, x: np.ndarray) -> np.ndarray:
        """Raw model output for a batch of inputs: action indices from 0 (discrete) or clipped actions."""
        return self.session.run(self._out, {self._in: x})[0]

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> dict[str, tuple[Any, float]]:
        live, x = self.inputs(observations)
        out = self.actions(x)
        if self.discrete:
            return {a: (int(out[j]) + self.start, 0.0) for j, a in enumerate(live)}
        return {a: (out[j], 0.0) for j, a in enumerate(live)}

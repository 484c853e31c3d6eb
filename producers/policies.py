"""Built-in policies: ``random`` (uniform over each agent's action space) and ``heuristic`` (the
env's own rule, ``env.heuristic_action(agent, observation)``), ``OnnxPolicy``: a policy exported by
``marlgrc train --onnx``, used only after its signature checks out, and ``HybridPolicy``: seed 001's
three-tier decision (a model, else the env's heuristic, else random). All satisfy
``producers.policy.Policy``.

Decision tiers. Every joint.action records, per agent, which tier decided (``decision_tier``:
``policy``, ``heuristic`` or ``random``; empty in events written before the field existed). A policy
says so through an optional attribute ``last_tiers``: a mapping from agent to tier for the latest
``act()`` call, read by the harness right after each call. ``RandomPolicy`` and ``HeuristicPolicy``
give a constant one; ``HybridPolicy`` a new one each call; a policy without the attribute (a learner,
``OnnxPolicy``) is the ``policy`` tier. ``act()`` itself is unchanged: (action, log-probability) per
agent.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from gymnasium import spaces

from eventlog.checkpoint import ONNX_POLICY_KIND, read_signed_file

POLICY_TIER, HEURISTIC_TIER, RANDOM_TIER = "policy", "heuristic", "random"
TIERS = frozenset((POLICY_TIER, HEURISTIC_TIER, RANDOM_TIER))
"""The values of joint.action's ``decision_tier`` (seed 001 Innovation #5's decision hierarchy)."""

_log = logging.getLogger(__name__)


class RandomPolicy:
    """Uniform random actions, seeded; log-probabilities are exact for Discrete/MultiDiscrete/
    MultiBinary and bounded Boxes (0.0 for an unbounded Box, which has no uniform density)."""

    version = "random-v1"

    def __init__(self, env: Any, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._space = {a: env.action_space(a) for a in env.possible_agents}
        self.last_tiers = dict.fromkeys(env.possible_agents, RANDOM_TIER)
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
        self.last_tiers = dict.fromkeys(env.possible_agents, HEURISTIC_TIER)

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> dict[str, tuple[Any, float]]:
        return {a: (self._rule(a, o), 0.0) for a, o in observations.items()}


HYBRID = "hybrid"
HYBRID_ONNX_PREFIX = "hybrid:onnx:"
BUILTIN = ("random", "heuristic", HYBRID, HYBRID_ONNX_PREFIX + "PATH")


def builtin_policy(name: str, env: Any, seed: int = 0, *, explore_rate: float | None = None,
                   public_key: Ed25519PublicKey | None = None):
    """The policy ``name`` names: ``random``, ``heuristic``, ``hybrid`` (no model: the heuristic tier
    and random exploration) or ``hybrid:onnx:PATH`` (a signed ONNX export as the policy tier, checked
    against ``public_key``; a PATH that does not exist is a missing model, logged, and the run goes on
    at the lower tiers). ``explore_rate`` is the hybrid's (default ``HybridPolicy.EXPLORE_RATE``).
    Raises ``ValueError`` for a name or rate it cannot use; a model file that is there but fails its
    signature raises ``eventlog.checkpoint.SignedFileError``, one that cannot drive this env
    ``PolicyFileError``: a file that was tampered with is refused, never silently replaced."""
    if name == HYBRID or name.startswith(HYBRID + ":"):
        rate = HybridPolicy.EXPLORE_RATE if explore_rate is None else explore_rate
        if name == HYBRID:
            return HybridPolicy(env, None, explore_rate=rate, seed=seed)
        if not name.startswith(HYBRID_ONNX_PREFIX) or not name[len(HYBRID_ONNX_PREFIX):]:
            raise ValueError(f"policy {name!r}: a hybrid's model is named as {HYBRID_ONNX_PREFIX}PATH (an ONNX file "
                             f"exported by `marlgrc train --onnx`), or use plain {HYBRID!r} for no model")
        path = Path(name[len(HYBRID_ONNX_PREFIX):])
        if not path.exists():
            return HybridPolicy(env, None, explore_rate=rate, seed=seed, model_path=path)
        if public_key is None:
            raise ValueError(f"policy {name!r}: checking the model's signature needs the trusted public key")
        return HybridPolicy(env, OnnxPolicy(path, public_key, env), explore_rate=rate, seed=seed, model_path=path)
    if explore_rate is not None:
        raise ValueError(f"an explore rate applies to --policy {HYBRID} or {HYBRID_ONNX_PREFIX}PATH, not to {name!r}")
    if name == "random":
        return RandomPolicy(env, seed)
    if name == "heuristic":
        return HeuristicPolicy(env)
    raise ValueError(f"unknown policy {name!r}; built in: {', '.join(BUILTIN)}")


def action_check(space: Any) -> Callable[[Any], bool]:
    """Whether a value is an action in ``space`` that a joint.action can hold: for ``Discrete`` an
    integer (Python or numpy, not a bool or a float) in range; for ``Box`` numbers of the space's
    shape, finite and within its bounds; for any other space what ``space.contains`` says of the
    value as an array of the space's dtype. Never raises."""
    if isinstance(space, spaces.Discrete):
        lo, hi = int(space.start), int(space.start) + int(space.n)

        def discrete(a: Any) -> bool:
            if isinstance(a, np.ndarray) and a.shape == ():
                a = a[()]
            return isinstance(a, (int, np.integer)) and not isinstance(a, bool) and lo <= a < hi
        return discrete
    if isinstance(space, spaces.Box):
        low, high, shape = space.low.astype(np.float64), space.high.astype(np.float64), space.shape

        def box(a: Any) -> bool:
            if isinstance(a, (str, bytes)):
                return False
            try:
                x = np.asarray(a, dtype=np.float64)
            except (TypeError, ValueError):
                return False
            return x.shape == shape and bool(np.isfinite(x).all() and (x >= low).all() and (x <= high).all())
        return box

    def other(a: Any) -> bool:
        try:
            return bool(space.contains(np.asarray(a, dtype=space.dtype)))
        except Exception:  # noqa: BLE001 - a value the space cannot even compare is not an action of it
            return False
    return other


class HybridPolicy:
    """Seed 001's three-tier decision (Innovation #5, its ``HybridBidder``), per agent and step:

    1. ``policy``: the model's action (any Policy: an ``OnnxPolicy``, a learner), if there is a model,
       its ``act()`` returned, and the agent's action is valid (``action_check``: in the agent's space,
       the right shape, no NaN) with a finite log-probability;
    2. otherwise ``heuristic``: the env's ``heuristic_action(agent, observation)``, with probability
       ``1 - explore_rate``, when the env has one and it returns a valid action;
    3. otherwise ``random``: uniform over the agent's space (``RandomPolicy``), for discovery.

    As in the seed, exploration takes the place of the heuristic only: an agent the model decided for
    is not explored. With no model (``model=None``: missing, not trained yet) the run is heuristic with
    ``explore_rate`` of random decisions. A model that raises (any ``Exception``) sends every agent of
    that step down; an invalid action only that agent. ``last_tiers`` says which tier decided each
    agent of the latest call; ``fallbacks`` counts the decisions that fell from a tier, by reason
    (each reason is logged once, as a warning, with the exception's type only).

    Log-probabilities are those of the deciding tier: the model's, 0.0 for the (deterministic)
    heuristic, the uniform one for random; not of the mixture, so a learner reading these events
    should select by ``decision_tier``. ``seed`` seeds the tier draws and the random actions (two
    streams). ``model_path`` is only reported: the file the model came, or was missing, from.
    """

    EXPLORE_RATE = 0.1
    """The seed's ``exploration_rate``."""

    def __init__(self, env: Any, model: Any = None, *, explore_rate: float = EXPLORE_RATE, seed: int = 0,
                 model_path: Path | None = None):
        rate = float(explore_rate)
        if not 0.0 <= rate <= 1.0:  # NaN fails too
            raise ValueError(f"explore rate {explore_rate!r} is not a share of decisions: give a number from 0 to 1")
        self.model = model
        self.model_path = model_path
        self.explore_rate = rate
        self._rule = getattr(env, "heuristic_action", None)
        self._random = RandomPolicy(env, seed)
        self._draws = np.random.default_rng([seed, 1])  # a stream apart from the random actions'
        self._check = {a: action_check(env.action_space(a)) for a in env.possible_agents}
        self.version = f"hybrid-v1:{model.version if model is not None else 'no-model'}"
        self.last_tiers: dict[str, str] = {}
        self.fallbacks: Counter[str] = Counter()
        self._missing = "no model" + (f" ({model_path} does not exist)" if model_path is not None else "")
        if model is None:
            _log.warning("hybrid policy: %s; deciding with the %s", self._missing,
                         "env's heuristic" if self._rule is not None else "random tier (the env has no heuristic)")

    def run_config(self) -> dict:
        """What ``run.started``'s config records of this policy."""
        model = self.model.run_config() if hasattr(self.model, "run_config") else (
            {"policy_version": self.model.version} if self.model is not None else None)
        return {"hybrid": self.version, "explore_rate": self.explore_rate, "model": model,
                "model_missing": str(self.model_path) if self.model is None and self.model_path is not None else ""}

    def _fell(self, reason: str, n: int) -> None:
        if not self.fallbacks[reason]:
            _log.warning("hybrid policy %s: %s; falling to the next tier", self.version, reason)
        self.fallbacks[reason] += n

    def act(self, observations: Mapping[str, np.ndarray], state: np.ndarray | None = None
            ) -> dict[str, tuple[Any, float]]:
        out: dict[str, tuple[Any, float]] = {}
        tiers: dict[str, str] = {}
        rest = list(observations)
        if self.model is None:
            self.fallbacks[self._missing] += len(rest)
        else:
            try:
                chosen = self.model.act(observations, state)
            except Exception as exc:  # noqa: BLE001 - a failing model is what the lower tiers are for
                self._fell(f"the model raised {type(exc).__name__}", len(rest))
            else:
                left = []
                check = self._check
                for a in rest:
                    c = chosen.get(a) if isinstance(chosen, Mapping) else None
                    try:
                        ok = check[a](c[0]) and math.isfinite(logp := float(c[1]))
                    except (TypeError, ValueError, IndexError, KeyError):
                        ok = False
                    if ok:
                        out[a] = (c[0], logp)
                        tiers[a] = POLICY_TIER
                    else:
                        left.append(a)
                if left:
                    self._fell("the model gave no valid action", len(left))
                rest = left
        if rest:
            rule, rate, rnd = self._rule, self.explore_rate, self._random
            for a, u in zip(rest, self._draws.random(len(rest)).tolist()):
                if u >= rate and rule is not None:
                    try:
                        h = rule(a, observations[a])
                    except Exception as exc:  # noqa: BLE001 - as for the model: fall to random
                        self._fell(f"the heuristic raised {type(exc).__name__}", 1)
                    else:
                        if self._check[a](h):
                            out[a] = (h, 0.0)
                            tiers[a] = HEURISTIC_TIER
                            continue
                        self._fell("the heuristic gave no valid action", 1)
                elif u >= rate:
                    self._fell("the env has no heuristic_action", 1)
                out[a] = (rnd._sample(a), rnd._logp[a])
                tiers[a] = RANDOM_TIER
        self.last_tiers = tiers
        return out


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
        try:  # signed, so written by an export; still read defensively: a field missing is an error, not a crash
            ctx = statement["context"]
            io = ctx["io"]
            self.agents: list[str] = [str(a) for a in io["agents"]]
            self.obs_dim = int(io["obs_dim"])
            self.discrete = bool(io["discrete"])
            self.start = int(io.get("action_start", 0))
            self.version: str = str(ctx["policy_version"])
            if self.discrete:
                int(io["n_actions"])
            else:
                [int(d) for d in io["action_shape"]]
            if not 0 <= self.obs_dim <= 1 << 20 or not self.agents or len(set(self.agents)) != len(self.agents):
                raise ValueError(f"obs_dim {self.obs_dim} and agents {self.agents[:8]} do not describe a policy")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise PolicyFileError(f"{path}: its signature checks out, but its signed statement does not say how to "
                                  f"call the model ({type(exc).__name__}: {str(exc)[:200]}); {ONNX_REMEDY}") from None
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

    def run_config(self) -> dict:
        """What ``run.started``'s config records of this policy: the file, its signature's key and
        what it was trained on (a run id names no path)."""
        st = self.statement
        return {"onnx": str(self.path), "file_sha256": st["file_sha256"], "signer_key_id": st["key_id"],
                "policy_version": self.version, "trained_on_run": st["context"].get("run_id")}

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

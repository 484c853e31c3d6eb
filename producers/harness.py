"""The harness: run any PettingZoo ``ParallelEnv`` with a ``Policy`` and write every step as events.

Per run: ``run.started`` and ``run.finished`` on ``{run}:lifecycle``. Per step:

- ``env.state`` on ``{run}:env``: ``env.state()`` where the env has one, the collapsed state (no PII),
  and the step's data-subject fields as ``protected_fields`` (pseudonym + AES-GCM ciphertext);
- one ``agent.observation`` per live agent on ``{run}:obs:{agent}``, naming the state event;
- one ``joint.action`` on ``{run}:actions``: every agent's action, log-probability, raw reward,
  termination and truncation, the late-fusion joint vector and ``policy_version``, naming the state
  and observation events it acted on.

Environments that handle personal data expose ``subject_fields(agent: str | None)`` returning
``eventlog.privacy.ProtectedValue`` items (``agent=None``: the global state's); the harness protects
them with a ``eventlog.privacy.FieldProtector`` and never writes them in the clear. Such an env
refuses to run without a protector. Optional hooks: ``collapsed_state()`` (state without PII),
``state_flags()`` (privileged strings for env.state's ``flags``, e.g. ``label:malicious``: ground
truth hidden from the agents, for centralized critics and the decision interpreter only; never put
into an observation) and ``action_mask`` in an agent's ``infos``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from eventlog.log import EventLog
from eventlog.privacy import FieldProtector

from .policy import Policy
from .spaces import action_encoder, flat_floats, space_record

STATE_TOPIC = "marl.env.state"
OBS_TOPIC = "marl.agent.observation"
_EMPTY: dict = {}


class HarnessError(RuntimeError):
    """The env or policy broke the harness's expectations; the message says which and how to fix it."""


@dataclass
class RunSummary:
    run_id: str
    episodes: int
    steps: int
    events: int
    mean_return: float
    episode_returns: list[float] = field(default_factory=list)
    status: str = "completed"
    started_hash: bytes = b""
    finished_hash: bytes = b""


def config_digest(config: Mapping[str, Any]) -> tuple[str, str]:
    """(canonical JSON, SHA-256 hex) of a run's config."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"run config is not plain JSON ({exc}); pass str/int/float/bool/list/dict values") from None
    return text, hashlib.sha256(text.encode()).hexdigest()


def _state_space(env: Any) -> Any:
    try:
        return getattr(env, "state_space", None)
    except (AttributeError, NotImplementedError):
        return None


def _has_state(env: Any) -> bool:
    try:
        env.state()
        return True
    except (AttributeError, NotImplementedError):
        return False


def run_episodes(env: Any, policy: Policy, log: EventLog, *, episodes: int, seed: int, env_id: str,
                 env_version: str, config: Mapping[str, Any], progress: Callable[[int], None] | None = None,
                 protector: FieldProtector | None = None, max_steps: int | None = None) -> RunSummary:
    """Run ``episodes`` episodes (episode ``i`` reset with ``seed + i``) and write them to ``log``.

    ``progress(n)`` is called after each step with 1. ``max_steps`` caps an episode for envs that
    never end on their own (the last step is then marked truncated for every live agent).
    """
    if episodes < 0:
        raise HarnessError(f"episodes must be >= 0, got {episodes}")
    has_subjects = hasattr(env, "subject_fields")
    if has_subjects and protector is None:
        raise HarnessError(f"env {env_id} carries personal data (it has subject_fields()) and needs a "
                           f"FieldProtector: open a key store (eventlog.privacy.LocalKeyStore) and pass "
                           f"protector=FieldProtector(keys)")
    run = log.run_id
    agent_ids = list(env.possible_agents)
    state_space = _state_space(env)
    full_config = {"env_id": env_id, "env_version": env_version, "episodes": episodes, "seed": seed,
                   "policy_version": policy.version, **dict(config)}
    config_json, config_hash = config_digest(full_config)
    started = log.append(f"{run}:lifecycle", "run.started", {
        "env_id": env_id, "env_version": env_version, "seed": int(seed), "config_hash": config_hash,
        "config_json": config_json,
        "agents": [{"agent_id": a, "observation_space": space_record(env.observation_space(a)),
                    "action_space": space_record(env.action_space(a))} for a in agent_ids],
        "state_space": space_record(state_space), "episodes_planned": int(episodes),
    })
    n_events = 1
    encode = {a: action_encoder(env.action_space(a)) for a in agent_ids}
    state_chain, action_chain = f"{run}:env", f"{run}:actions"
    obs_chain = {a: f"{run}:obs:{a}" for a in agent_ids}
    state_writer = log.writer(STATE_TOPIC, state_chain)
    obs_writer = {a: log.writer(OBS_TOPIC, obs_chain[a]) for a in agent_ids}
    collapsed_fn = getattr(env, "collapsed_state", None)
    flags_fn = getattr(env, "state_flags", None)
    policy_version = policy.version
    append = log.append
    total_steps, returns = 0, []
    status, reason = "completed", ""
    try:
        for ep in range(episodes):
            observations, infos = env.reset(seed=seed + ep)
            has_state = state_space is not None or _has_state(env)
            ep_return, step = 0.0, 0
            while True:
                agents = env.agents  # one attribute read per step: wrappers forward it through __getattr__
                if not agents:
                    break
                live = [a for a in agents if a in observations]
                state = env.state() if has_state else None
                state_list = flat_floats(state) if state is not None else []
                collapsed = flat_floats(collapsed_fn()) if collapsed_fn is not None else state_list
                st_payload = {"episode": ep, "step": step, "state": state_list, "collapsed_state": collapsed}
                if flags_fn is not None:
                    st_payload["flags"] = [str(f) for f in flags_fn()]
                if has_subjects:
                    st_payload["protected_fields"] = protector.protect(
                        state_chain, state_writer.head.seq + 1, env.subject_fields(None))
                st_hash = append(state_chain, "env.state", st_payload).event_hash
                sources = [st_hash]
                for a in live:
                    payload = {"episode": ep, "step": step, "agent_id": a, "observation": flat_floats(observations[a])}
                    mask = infos.get(a, _EMPTY).get("action_mask") if infos else None
                    if mask is not None:
                        payload["action_mask"] = [bool(m) for m in np.asarray(mask).ravel()]
                    if has_subjects:
                        payload["protected_fields"] = protector.protect(
                            obs_chain[a], obs_writer[a].head.seq + 1, env.subject_fields(a))
                    sources.append(append(obs_chain[a], "agent.observation", payload,
                                          source_event_hashes=[st_hash]).event_hash)
                chosen = policy.act(observations if len(live) == len(observations) else
                                    {a: observations[a] for a in live}, state)
                try:
                    actions = {a: chosen[a][0] for a in live}
                except KeyError as exc:
                    raise HarnessError(f"policy {policy_version!r} gave no action for agent {exc.args[0]!r} "
                                       f"at episode {ep} step {step}; act() must answer every live agent") from None
                observations, rewards, terms, truncs, infos = env.step(actions)
                cut = max_steps is not None and step + 1 >= max_steps
                records, joint = [], []
                for a in live:
                    d, c = encode[a](actions[a])
                    r = float(rewards.get(a, 0.0))
                    ep_return += r
                    records.append({"agent_id": a, "discrete": d, "continuous": c, "log_prob": float(chosen[a][1]),
                                    "reward": r, "terminated": bool(terms.get(a, False)),
                                    "truncated": bool(truncs.get(a, False)) or cut})
                    if c:
                        joint.extend(c)
                    else:
                        joint.append(float(d))
                append(action_chain, "joint.action", {"episode": ep, "step": step, "actions": records,
                                                      "joint_vector": joint},
                       policy_version=policy_version, source_event_hashes=sources)
                n_events += 2 + len(live)
                step += 1
                total_steps += 1
                if progress is not None:
                    progress(1)
                if cut:
                    break
            returns.append(ep_return)
    except KeyboardInterrupt:
        status, reason = "interrupted", "KeyboardInterrupt"
        raise
    except BaseException as exc:
        # the type only: an env's exception text may quote the personal data it was handling
        status, reason = "failed", type(exc).__name__
        raise
    finally:
        heads = [{"topic": t, "chain_id": c, "seq": h.seq, "event_hash": h.event_hash}
                 for (t, c), h in sorted(log.heads().items()) if c.startswith(f"{run}:") and h.seq >= 0]
        mean = sum(returns) / len(returns) if returns else 0.0
        finished = log.append(f"{run}:lifecycle", "run.finished", {
            "status": status, "reason": reason, "episodes": len(returns), "steps": total_steps,
            "mean_return": mean, "chain_heads": heads}, source_event_hashes=[started.event_hash])
        n_events += 1
    return RunSummary(run, len(returns), total_steps, n_events, mean, returns, status,
                      started.event_hash, finished.event_hash)

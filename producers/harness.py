"""The harness: run any PettingZoo ``ParallelEnv`` with a ``Policy`` and write every step as events.

Per run: ``run.started`` and ``run.finished`` on ``{run}:lifecycle``, and between them one
``episode.summary`` per finished episode (steps, returns, the env's ``metrics()``). Per step:

- ``env.state`` on ``{run}:env``: ``env.state()`` where the env has one, the collapsed state (no PII),
  and the step's data-subject fields as ``protected_fields`` (pseudonym + AES-GCM ciphertext);
- one ``agent.observation`` per live agent on ``{run}:obs:{agent}``, naming the state event;
- one ``joint.action`` on ``{run}:actions``: every agent's action, log-probability, raw reward,
  termination, truncation and ``decision_tier`` (which tier decided it: the policy's ``last_tiers``
  read after each ``act()``, ``policy`` for a policy without it; see ``producers.policies``), the
  late-fusion joint vector and ``policy_version``, naming the state and observation events it acted on.

A step's env.state and observations are sealed before the policy acts, its joint.action after the
env stepped; ``step_functions`` is the step recorder that builds those payloads and seals them. For
an env with personal data, the step's events are instead captured during the step (their data
copied, ``produced_at`` read from the log's clock at that moment) and sealed in order a few steps
later, in one batch (``SEAL_BATCH_STEPS`` steps or ``SEAL_BATCH_MICROS``, whichever comes first,
across episodes, and at the run's end): the same bytes as sealing each at once with the same clock
readings, and the batch's new data subjects get their keys in one key store transaction (committed
before any event naming them exists) rather than one each. Personal data is protected as its event
is sealed. If a step fails, what it captured before the failure is sealed, then ``run.finished``.

Environments that handle personal data expose ``subject_fields(agent: str | None)`` returning
``eventlog.privacy.ProtectedValue`` items (``agent=None``: the global state's); the harness protects
them with a ``eventlog.privacy.FieldProtector`` and never writes them in the clear. Such an env
refuses to run without a protector. Optional hooks: ``collapsed_state()`` (state without PII),
``state_flags()`` (privileged strings for env.state's ``flags``, e.g. ``label:malicious``: ground
truth hidden from the agents, for centralized critics and the decision interpreter only; never put
into an observation), ``metrics()`` (the episode's domain metrics, read once when it ends, for its
``episode.summary``: ``domain_metrics``) and ``action_mask`` in an agent's ``infos``.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from gymnasium.spaces import Discrete

from eventlog.log import EventLog
from eventlog.privacy import FieldProtector

from .policies import POLICY_TIER, TIERS
from .policy import Policy
from .spaces import action_encoder, flat_floats, space_record

STATE_TOPIC = "marl.env.state"
OBS_TOPIC = "marl.agent.observation"
_EMPTY: dict = {}
# with personal data, a step's events are captured during the step and sealed (protected, encoded,
# hashed, sent) together with those of the next steps: after at most this many steps or this long
# (µs of the log's clock), and at the end of the run. One key store transaction covers the new data
# subjects of a batch (a transaction costs about 1 ms; mailbox_v0 meets 13 new subjects an episode).
SEAL_BATCH_STEPS = 16
SEAL_BATCH_MICROS = 20_000


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


def env_spaces(env: Any) -> dict:
    """The spaces ``run.started`` describes: ``agents`` (id, observation and action space records, in
    ``possible_agents`` order) and ``state_space``. A learner builds its networks from these alone."""
    return {"agents": [{"agent_id": a, "observation_space": space_record(env.observation_space(a)),
                        "action_space": space_record(env.action_space(a))} for a in env.possible_agents],
            "state_space": space_record(_state_space(env))}


def _has_state(env: Any) -> bool:
    try:
        env.state()
        return True
    except (AttributeError, NotImplementedError):
        return False


def _seal_after_failure(seal_pending: Callable[[], None], exc: BaseException) -> None:
    """Seal what was captured before a failure (the failing step's state and observations, as when
    each event was sealed at once); a second failure while sealing is noted on the first."""
    try:
        seal_pending()
    except Exception as second:
        exc.add_note(f"the events captured before this failure could not all be sealed: {type(second).__name__}")


def domain_metrics(metrics: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """An env's ``metrics()`` as episode.summary's two arrays, in the env's order: ``metrics``
    ({name, value}: numbers, numpy scalars and booleans as floats) and ``text_metrics`` ({name, text}:
    strings). A list, tuple or array becomes ``name[i]`` entries and a nested mapping ``name.key``
    entries; anything else (None, bytes, objects) is a ``HarnessError`` naming the metric."""
    values: list[dict] = []
    texts: list[dict] = []

    def add(name: str, v: Any) -> None:
        if isinstance(v, str):
            texts.append({"name": name, "text": v})
        elif isinstance(v, (numbers.Real, np.bool_)):  # bool, int, float, numpy scalars
            values.append({"name": name, "value": float(v)})
        elif isinstance(v, Mapping):
            for k, x in v.items():
                add(f"{name}.{k}", x)
        elif isinstance(v, (list, tuple, np.ndarray)):
            for i, x in enumerate(np.asarray(v).ravel().tolist() if isinstance(v, np.ndarray) else v):
                add(f"{name}[{i}]", x)
        else:
            raise HarnessError(f"env metrics()[{name!r}] is a {type(v).__name__}; metrics() must give numbers, "
                               f"booleans, strings, or lists/dicts of them")

    if not isinstance(metrics, Mapping):
        raise HarnessError(f"env metrics() returned a {type(metrics).__name__}; it must return a dict of "
                           f"name -> number or string")
    for k, v in metrics.items():
        add(str(k), v)
    return values, texts


def summary_payload(ep: int, steps: int, ep_return: float, agent_returns: Mapping[str, float],
                    metrics: Mapping[str, Any] | None) -> dict:
    """An episode.summary payload: the episode's length and returns (per agent in ``agent_returns``'
    order) and the env's domain metrics (``domain_metrics``; none when ``metrics`` is None)."""
    values, texts = domain_metrics(metrics) if metrics is not None else ([], [])
    return {"episode": ep, "steps": steps, "episode_return": float(ep_return),
            "agent_returns": [{"agent_id": a, "return": float(r)} for a, r in agent_returns.items()],
            "metrics": values, "text_metrics": texts}


def state_payload(ep: int, step: int, state_vec: Any, collapsed: Any, flags: list | None) -> dict:
    """An env.state payload (``flags`` left out when None: the schema's default)."""
    payload = {"episode": ep, "step": step, "state": state_vec, "collapsed_state": collapsed}
    if flags is not None:
        payload["flags"] = flags
    return payload


def observation_payload(ep: int, step: int, agent: str, vec: Any, infos: Mapping) -> dict:
    """An agent.observation payload, with the agent's ``action_mask`` from ``infos`` where it has one."""
    payload = {"episode": ep, "step": step, "agent_id": agent, "observation": vec}
    if infos:
        mask = infos.get(agent, _EMPTY).get("action_mask")
        if mask is not None:
            payload["action_mask"] = np.asarray(mask).ravel().tolist()  # truthiness as bool(m)
    return payload


def step_functions(append_state: Callable, append_obs: Mapping[str, Callable], discrete: Mapping[str, bool],
                   encode: Mapping[str, Callable]) -> tuple[Callable, Callable]:
    """The step recorder, two functions over one chain's appenders each:

    - ``observe(ep, step, state_vec, collapsed, flags, live, observations, infos)`` seals the step's
      env.state, then each live agent's observation naming it; returns their hashes, the joint
      action's sources;
    - ``joint_action(ep, step, live, actions, chosen, rewards, terms, truncs, cut, ep_return,
      agent_returns=None, tiers=None)`` builds the joint.action payload (it seals nothing: a bad action,
      reward, log-probability or decision tier raises here, before the event exists); returns it and
      ``ep_return`` plus the step's rewards, and adds each agent's reward to ``agent_returns[agent]``
      when given. ``tiers``: each live agent's decision tier (None: all ``policy``).
    """
    def observe(ep: int, step: int, state_vec: Any, collapsed: Any, flags: list | None, live: list,
                observations: Mapping, infos: Mapping) -> list[bytes]:
        st_hash = append_state(state_payload(ep, step, state_vec, collapsed, flags), ()).event_hash
        sources, st_sources = [st_hash], (st_hash,)
        for a in live:
            payload = observation_payload(ep, step, a, flat_floats(observations[a]), infos)
            sources.append(append_obs[a](payload, st_sources).event_hash)
        return sources

    def joint_action(ep: int, step: int, live: list, actions: Mapping, chosen: Mapping, rewards: Mapping,
                     terms: Mapping, truncs: Mapping, cut: bool, ep_return: float,
                     agent_returns: dict | None = None, tiers: Mapping | None = None) -> tuple[dict, float]:
        records, joint = [], []
        tier = POLICY_TIER
        for a in live:
            r = float(rewards.get(a, 0.0))
            ep_return += r
            if agent_returns is not None:
                agent_returns[a] = agent_returns.get(a, 0.0) + r
            if tiers is not None:
                tier = tiers.get(a)
                if tier not in TIERS:
                    raise HarnessError(f"the policy's last_tiers gives agent {a!r} the decision tier {tier!r} at "
                                       f"episode {ep} step {step}; give each agent it acted for one of "
                                       f"{', '.join(sorted(TIERS))}")
            # booleans go in as the env gave them: the encoder writes their truth value
            if discrete[a]:  # "continuous" left out: its schema default [] is written
                d = int(actions[a])
                records.append({"agent_id": a, "discrete": d, "log_prob": float(chosen[a][1]), "reward": r,
                                "terminated": terms.get(a, False), "truncated": truncs.get(a, False) or cut,
                                "decision_tier": tier})
                joint.append(float(d))
                continue
            d, c = encode[a](actions[a])
            records.append({"agent_id": a, "discrete": d, "continuous": c, "log_prob": float(chosen[a][1]),
                            "reward": r, "terminated": terms.get(a, False), "truncated": truncs.get(a, False) or cut,
                            "decision_tier": tier})
            if c:
                joint.extend(c)
            else:
                joint.append(float(d))
        return {"episode": ep, "step": step, "actions": records, "joint_vector": joint}, ep_return

    return observe, joint_action


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
        "config_json": config_json, **env_spaces(env), "episodes_planned": int(episodes),
    })
    n_events = 1
    encode = {a: action_encoder(env.action_space(a)) for a in agent_ids}
    discrete = {a: isinstance(env.action_space(a), Discrete) for a in agent_ids}
    state_chain, action_chain = f"{run}:env", f"{run}:actions"
    obs_chain = {a: f"{run}:obs:{a}" for a in agent_ids}
    state_writer = log.writer(STATE_TOPIC, state_chain)
    obs_writer = {a: log.writer(OBS_TOPIC, obs_chain[a]) for a in agent_ids}
    # one appender per chain and event type: the header's constant parts are encoded once
    append_state = log.appender(state_chain, "env.state")
    append_obs = {a: log.appender(obs_chain[a], "agent.observation") for a in agent_ids}
    append_action = log.appender(action_chain, "joint.action", policy_version=policy.version)
    clock = state_writer.clock
    observe, joint_action = step_functions(append_state, append_obs, discrete, encode)
    # seq of the next event of each chain, for the protected fields' associated data: the steps'
    # events are sealed in batches, after they were captured
    state_seq = state_writer.next_seq
    obs_seq = {a: obs_writer[a].next_seq for a in agent_ids}
    # an env with personal data has its steps sealed in batches: the batch's new data subjects get
    # their keys in one key store transaction; any other env's events are sealed as they happen
    collapsed_fn = getattr(env, "collapsed_state", None)
    flags_fn = getattr(env, "state_flags", None)
    metrics_fn = getattr(env, "metrics", None)
    append_summary = log.appender(f"{run}:lifecycle", "episode.summary")
    started_sources = (started.event_hash,)
    policy_version = policy.version
    total_steps, returns = 0, []
    status, reason = "completed", ""
    # captured steps not sealed yet (an env with personal data): [state payload, its produced_at,
    # [(appender, obs payload, produced_at)], joint.action payload (None until the env stepped), its
    # produced_at, the personal data of the state and of each observation, protected as each
    # event is sealed: [(chain, seq, ProtectedValue items)] in that order, and the episode.summary
    # payloads captured after the step with their produced_at: [(payload, produced_at)]]
    pending: list[list] = []

    def seal_pending() -> None:
        """Seal the captured steps' events in order, each with the time its data was captured."""
        if not pending:
            return
        try:
            try:  # every new subject of the batch in one key store transaction
                protector.prepare([v for captured in pending for _, _, values in captured[5] for v in values])
            except Exception:
                pass  # met again by protect() below, at the event it belongs to
            for st_payload, st_time, obs_items, act_payload, act_time, subjects, summaries in pending:
                st_payload["protected_fields"] = protector.protect(*subjects[0])
                st_hash = append_state(st_payload, (), st_time).event_hash
                sources, st_sources = [st_hash], (st_hash,)
                for (append_one, payload, obs_time), subject in zip(obs_items, subjects[1:]):
                    payload["protected_fields"] = protector.protect(*subject)
                    sources.append(append_one(payload, st_sources, obs_time).event_hash)
                if act_payload is not None:
                    append_action(act_payload, sources, act_time)
                for payload, at in summaries:
                    append_summary(payload, started_sources, at)
        finally:
            pending.clear()  # after a failure the rest is dropped, as if the loop had stopped there

    try:
        for ep in range(episodes):
            observations, infos = env.reset(seed=seed + ep)
            has_state = state_space is not None or _has_state(env)
            ep_return, step = 0.0, 0
            agent_returns = dict.fromkeys(agent_ids, 0.0)
            while True:
                agents = env.agents  # one attribute read per step: wrappers forward it through __getattr__
                if not agents:
                    break
                live = [a for a in agents if a in observations]
                state = env.state() if has_state else None
                state_vec = flat_floats(state) if state is not None else []
                collapsed = flat_floats(collapsed_fn()) if collapsed_fn is not None else state_vec
                flags = [str(f) for f in flags_fn()] if flags_fn is not None else None
                if has_subjects:  # the events' data is copied now (the env may reuse its arrays), sealed later
                    st_payload = state_payload(ep, step, state_vec, collapsed, flags)
                    subjects = [(state_chain, state_seq, list(env.subject_fields(None)))]
                    state_seq += 1
                    obs_items = []
                    captured = [st_payload, clock(), obs_items, None, 0, subjects, []]
                    pending.append(captured)
                    for a in live:
                        payload = observation_payload(ep, step, a, flat_floats(observations[a]), infos)
                        subjects.append((obs_chain[a], obs_seq[a], list(env.subject_fields(a))))
                        obs_seq[a] += 1
                        obs_items.append((append_obs[a], payload, clock()))
                else:  # sealed now: state, then each observation naming it
                    sources = observe(ep, step, state_vec, collapsed, flags, live, observations, infos)
                chosen = policy.act(observations if len(live) == len(observations) else
                                    {a: observations[a] for a in live}, state)
                try:
                    actions = {a: chosen[a][0] for a in live}
                except KeyError as exc:
                    raise HarnessError(f"policy {policy_version!r} gave no action for agent {exc.args[0]!r} "
                                       f"at episode {ep} step {step}; act() must answer every live agent") from None
                observations, rewards, terms, truncs, infos = env.step(actions)
                cut = max_steps is not None and step + 1 >= max_steps
                act_payload, ep_return = joint_action(ep, step, live, actions, chosen, rewards, terms, truncs,
                                                      cut, ep_return, agent_returns,
                                                      getattr(policy, "last_tiers", None))
                if has_subjects:
                    captured[3] = act_payload
                    captured[4] = now = clock()
                    if len(pending) >= SEAL_BATCH_STEPS or now - pending[0][1] >= SEAL_BATCH_MICROS:
                        seal_pending()
                else:
                    append_action(act_payload, sources)
                n_events += 2 + len(live)
                step += 1
                total_steps += 1
                if progress is not None:
                    progress(1)
                if cut:
                    break
            # once per episode: its summary with the env's domain metrics, on the lifecycle chain (an
            # env whose metrics cannot be written fails the run before the episode is counted)
            summary = summary_payload(ep, step, ep_return, agent_returns,
                                      metrics_fn() if metrics_fn is not None else None)
            returns.append(ep_return)
            if pending:  # sealed after the episode's captured steps, in order, with this moment's time
                pending[-1][6].append((summary, clock()))
            else:
                append_summary(summary, started_sources)
            n_events += 1
        seal_pending()
    except KeyboardInterrupt as exc:
        status, reason = "interrupted", "KeyboardInterrupt"
        _seal_after_failure(seal_pending, exc)
        raise
    except BaseException as exc:
        # the type only: an env's exception text may quote the personal data it was handling
        status, reason = "failed", type(exc).__name__
        _seal_after_failure(seal_pending, exc)
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

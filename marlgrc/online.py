"""On-policy training through the event log: the producers act with the current policy, every
transition is written as events, the learner reads exactly those offsets back, verifies and trains
on them, and writes ``policy.update``. The training data is the audited stream and nothing else.

    loop:  mark offsets -> harness.run_episodes(env, learner, log) -> flush -> mark offsets
           -> RunReader.add(records in [start, end)) -> learner.update -> policy.update event

Two transports: ``KafkaTransport`` (the real thing) and ``MemoryTransport`` (the same sealed event
bytes kept in process; for unit tests and for CPU-only learning curves when no broker runs).

Reproduce the learning curve in docs/results.md:
    python -m marlgrc.online --env simple_spread_v3 --algo mappo --minutes 30 --out results/mappo.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from eventlog.kafka import EventProducer
from eventlog.log import EventLog, MemorySink
from learners import algorithm
from learners.lineage import emit_policy_update
from learners.replay import RUN_TOPICS, Replay, RunReader, RunSpec, records_from_memory
from producers.harness import run_episodes
from producers.spaces import space_record

MPE_DEFAULTS = {"N": 3, "max_cycles": 25, "local_ratio": 0.5}


def make_env(name: str, *, continuous: bool = False, **kwargs) -> tuple[Any, str, str]:
    """(env, env_id, env_version) for a versioned name: MPE2's ``simple_spread_v3`` or a built-in env."""
    if name == "simple_spread_v3":
        from mpe2 import simple_spread_v3

        return (simple_spread_v3.parallel_env(**{**MPE_DEFAULTS, **kwargs}, continuous_actions=continuous),
                name, "mpe2")
    from producers.envs import BUILTIN_ENVS

    if name not in BUILTIN_ENVS:
        raise SystemExit(f"unknown env {name!r}; choose simple_spread_v3 or one of {sorted(BUILTIN_ENVS)}")
    mod, fn = BUILTIN_ENVS[name].split(":")
    return getattr(importlib.import_module(mod), fn)(**kwargs), name, name.rsplit("_v", 1)[-1]


def spec_from_env(env: Any, run_id: str, env_id: str, env_version: str, seed: int) -> RunSpec:
    """The RunSpec the harness's run.started will carry (same space records), to build the first policy."""
    try:
        state_space = getattr(env, "state_space", None)
    except (AttributeError, NotImplementedError):
        state_space = None
    return RunSpec.from_run_started(run_id, {
        "env_id": env_id, "env_version": env_version, "seed": seed, "config_hash": "",
        "agents": [{"agent_id": a, "observation_space": space_record(env.observation_space(a)),
                    "action_space": space_record(env.action_space(a))} for a in env.possible_agents],
        "state_space": space_record(state_space)})


class KafkaTransport:
    """Events through the broker; batches are read back by offsets [start, end) per partition.

    Per-batch fixed costs are kept small: topic metadata is read once, one consumer lives as long as
    the transport (each read assigns the batch's partitions at their start offsets and consumes
    exactly up to the end offsets: no poll timeout is waited for), the end offsets of every
    partition come from one ListOffsets request, and a batch starts where the previous read ended
    (what was written in between, the learner's ``policy.update`` and checkpoints, is on topics the
    reader does not train on; its checkpoints are skipped, see ``RunReader.add``).
    """

    def __init__(self, bootstrap: str, prefix: str = "", *, timeout: float = 30.0):
        from confluent_kafka.admin import AdminClient

        from eventlog.kafka import _consumer, partitions_of

        self.bootstrap, self.prefix, self.timeout = bootstrap, prefix, timeout
        self.sink = EventProducer(bootstrap, prefix=prefix)
        self._tps = partitions_of(bootstrap, RUN_TOPICS, prefix)
        self._admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
        self._consumer = _consumer(bootstrap)
        self._carry: dict[tuple[str, int], int] | None = None

    def _end_offsets(self) -> dict[tuple[str, int], int]:
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import OffsetSpec

        from eventlog.topics import logical

        from confluent_kafka import KafkaError, KafkaException

        request = {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in self._tps}
        for attempt in range(40):
            try:
                futures = self._admin.list_offsets(request, request_timeout=self.timeout)
                return {(logical(self.prefix, tp.topic), tp.partition): fut.result().offset
                        for tp, fut in futures.items()}
            except KafkaException as exc:
                # a just-created topic may have no leader yet (NOT_LEADER_FOR_PARTITION, LEADER_NOT_AVAILABLE)
                err = exc.args[0]
                if attempt == 39 or not (err.retriable() or err.code() in (KafkaError.NOT_LEADER_FOR_PARTITION,
                                                                             KafkaError.LEADER_NOT_AVAILABLE,
                                                                             KafkaError.UNKNOWN_TOPIC_OR_PART)):
                    raise
                time.sleep(0.25)
        raise AssertionError("unreachable")

    def mark(self) -> dict[tuple[str, int], int]:
        if self._carry is not None:  # a batch starts where the last read ended
            out, self._carry = self._carry, None
            return out
        return self._end_offsets()

    def flush(self) -> None:
        self.sink.flush()

    def read(self, start, end):
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        from eventlog.kafka import BrokerUnavailable, Record

        pre = self.prefix
        todo = {(pre + t, p): e for (t, p), e in end.items() if start.get((t, p), e) < e}
        self._carry = dict(end)
        if not todo:
            return []
        c = self._consumer
        c.assign([TopicPartition(t, p, start[(t[len(pre):], p)]) for (t, p) in todo])
        expected = sum(e - start[(t[len(pre):], p)] for (t, p), e in todo.items())
        out: list = []
        idle_since = time.monotonic()
        try:
            while todo:
                # ask for exactly what is still missing: consume() returns as soon as it has it
                msgs = c.consume(max(1, min(expected - len(out), 10000)), 0.2)
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise KafkaException(err)
                    t, p, o = m.topic(), m.partition(), m.offset()
                    if o >= todo.get((t, p), -1):
                        continue
                    k = m.key()
                    out.append(Record(t[len(pre):], p, o, k.decode() if k is not None else "", m.value(),
                                      m.timestamp()[1]))
                if msgs:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.timeout:
                    raise BrokerUnavailable(f"no data from {self.bootstrap} for {self.timeout:.0f}s while reading "
                                            f"{sorted(todo)}; is the broker up (`marlgrc status`)?")
                # the position, not the last offset seen, says when a partition is done (control records)
                for tp in c.position([TopicPartition(t, p) for (t, p) in todo]):
                    if tp.offset >= todo[(tp.topic, tp.partition)]:
                        del todo[(tp.topic, tp.partition)]
        finally:
            c.unassign()
        return out

    def close(self) -> None:
        self.sink.flush()
        self._consumer.close()


class MemoryTransport:
    """The same sealed events kept in memory; offsets are positions per topic (partition 0)."""

    def __init__(self):
        self.sink = MemorySink()

    def mark(self) -> int:
        return len(self.sink.sent)

    def flush(self) -> None:
        pass

    def read(self, start: int, end: int):
        before = records_from_memory(self.sink.sent[:start])
        base: dict[str, int] = {}
        for r in before:
            base[r.topic] = r.offset + 1
        out = []
        for r in records_from_memory(self.sink.sent[start:end]):
            out.append(r._replace(offset=r.offset + base.get(r.topic, 0)))
        return out


@dataclass
class OnlineResult:
    learner: Any
    run_id: str
    curve: list[dict] = field(default_factory=list)   # per update: env_steps, episodic_return, losses, ...
    update_hashes: list[bytes] = field(default_factory=list)
    replays: list[Replay] = field(default_factory=list)


def train_online(env: Any, env_id: str, env_version: str, algo: str, *, transport, iterations: int,
                 seed: int = 1, run_id: str | None = None, config: Any = None, signer=None, public_key=None,
                 learner: Any = None, episodes_per_update: int | None = None, keep_replays: bool = False,
                 time_budget_s: float | None = None, on_update: Callable[[dict], None] | None = None,
                 protector: Any = None) -> OnlineResult:
    """Run ``iterations`` of {act with the current policy -> events -> read back -> update}.

    ``protector`` (an ``eventlog.privacy.FieldProtector``) is required for envs with personal data
    (``subject_fields()``, e.g. mailbox_v0): the harness refuses to write them in the clear."""
    run_id = run_id or f"{env_id}__{algo}__{seed}__{int(time.time())}-{uuid.uuid4().hex[:6]}"
    a = algorithm(algo)
    if learner is None:
        spec = spec_from_env(env, run_id, env_id, env_version, seed)
        learner = a.learner_cls(spec, config or a.config_cls(seed=seed))
    E = episodes_per_update or learner.config.episodes_per_update
    log = EventLog(transport.sink, run_id=run_id, producer_id="harness", signer=signer)
    learner_log = EventLog(transport.sink, run_id=run_id, producer_id=f"learner-{algo}", signer=signer)
    reader = RunReader(run_id, public_key=public_key)
    result = OnlineResult(learner, run_id)
    t0 = time.monotonic()
    for it in range(iterations):
        start = transport.mark()
        run_episodes(env, learner, log, episodes=E, seed=seed * 1_000_003 + it * E, env_id=env_id,
                     env_version=env_version, config={"algorithm": algo, "iteration": it}, protector=protector)
        transport.flush()
        end = transport.mark()
        replay = reader.add(transport.read(start, end))
        if replay.spec.agents != learner.spec.agents or replay.spec.action_spaces != learner.spec.action_spaces:
            raise RuntimeError(f"run {run_id}: run.started's agents/spaces differ from the env the policy was built for")
        parent = learner.version
        out = learner.update(replay)
        ev = emit_policy_update(learner_log, learner, out, replay, parent_version=parent)
        transport.flush()
        result.update_hashes.append(ev.event_hash)
        if keep_replays:
            result.replays.append(replay)
        row = {"iteration": it, "env_steps": learner.env_steps, "episodes": learner.episodes,
               "charts/episodic_return": out["charts/episodic_return"], "optimizer_steps": learner.optimizer_steps,
               "seconds": round(time.monotonic() - t0, 2), **out["losses"]}
        result.curve.append(row)
        if on_update:
            on_update(row)
        if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
            break
    log.close()
    learner_log.close()
    return result


def evaluate(env: Any, policy: Any, episodes: int, seed: int) -> float:
    """Mean team return (all agents' rewards summed over an episode) of ``policy`` without events."""
    total = 0.0
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        while env.agents:
            acts = policy.act({a: obs[a] for a in env.agents if a in obs})
            obs, rew, _, _, _ = env.step({a: x[0] for a, x in acts.items()})
            total += sum(rew.values())
    return total / episodes


def evaluate_security(env: Any, policy: Any, episodes: int, seed: int) -> dict:
    """Mean team return and security outcomes per episode of ``policy`` (no events written).

    mailbox_v0: ``breaches`` = plain OPENs of a malicious item (the env's ``breach`` info).
    sandbox_v0: ``breaches`` = malicious samples never contained before the episode ended (missed
    detections); ``exposure_steps`` = steps a malicious sample ran on uncontained (the attack
    progressing: what a late detection costs); ``detections`` and ``false_positives`` (benign
    samples killed) from the env's infos. Ground truth is read from the env (``_malicious``).
    """
    total = breaches = detections = false_pos = exposure = 0.0
    sandbox = hasattr(env, "n_sandboxes")
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        contained: set[str] = set()
        while env.agents:
            acts = policy.act({a: obs[a] for a in env.agents if a in obs})
            if sandbox:
                mal = env._malicious
                exposure += sum(1 for a, x in acts.items()
                                if mal[env.possible_agents.index(a)] and int(x[0]) not in (2, 3))  # not contained
            obs, rew, _, _, infos = env.step({a: x[0] for a, x in acts.items()})
            total += sum(rew.values())
            if any(i.get("breach") for i in infos.values()):
                breaches += 1  # one breach per step: every agent's info reports the same item
            for a, i in infos.items():
                if i.get("detected"):
                    detections += 1
                    contained.add(a)
                false_pos += bool(i.get("false_positive"))
        if sandbox:
            breaches += sum(1 for i, a in enumerate(env.possible_agents) if env._malicious[i] and a not in contained)
    out = {"mean_return": total / episodes, "breaches_per_episode": breaches / episodes}
    if sandbox:
        out |= {"exposure_steps_per_episode": exposure / episodes, "detections_per_episode": detections / episodes,
                "false_positives_per_episode": false_pos / episodes}
    return out


def parse_overrides(config_cls, items: list[str]) -> dict:
    """``["update_epochs=10", ...]`` -> typed values of the config's fields."""
    from dataclasses import fields

    types = {f.name: f.default for f in fields(config_cls)}
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        if k not in types:
            raise SystemExit(f"--set {item}: {config_cls.__name__} has no field {k!r}; fields: {sorted(types)}")
        d = types[k]
        out[k] = (v.lower() in ("1", "true", "yes")) if isinstance(d, bool) else \
            tuple(int(x) for x in v.split(",")) if isinstance(d, tuple) else type(d)(v)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="On-policy training through the event log; writes a learning curve.")
    p.add_argument("--env", default="simple_spread_v3")
    p.add_argument("--algo", default="mappo", choices=["mappo", "ippo", "dqn"])
    p.add_argument("--continuous", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--iterations", type=int, default=10**9)
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap; without it events stay in memory")
    p.add_argument("--prefix", default="")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set update_epochs=10")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--keystore", type=Path, default=None,
                   help="subject key store for envs with personal data (default: a temporary one)")
    args = p.parse_args(argv)
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    a = algorithm(args.algo)
    config = a.config_cls(seed=args.seed, **parse_overrides(a.config_cls, args.set))
    env, env_id, ver = make_env(args.env, continuous=args.continuous)
    transport = KafkaTransport(args.bootstrap, args.prefix) if args.bootstrap else MemoryTransport()
    protector = None
    if hasattr(env, "subject_fields"):  # mailbox_v0: personal data is written only pseudonymized + encrypted
        from eventlog.privacy import FieldProtector, LocalKeyStore

        ks = args.keystore or Path(tempfile.mkdtemp(prefix="marlgrc-keys-")) / "subjects.db"
        protector = FieldProtector(LocalKeyStore(ks))
    from producers.policies import HeuristicPolicy, RandomPolicy

    n_eval = args.eval_episodes
    baselines = {"random": evaluate_security(env, RandomPolicy(env, seed=args.seed), n_eval, seed=10_000)}
    if hasattr(env, "heuristic_action"):
        baselines["heuristic"] = evaluate_security(env, HeuristicPolicy(env), n_eval, seed=10_000)
    random_return = baselines["random"]["mean_return"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def dump(row: dict) -> None:
        rows.append(row)
        if isinstance(transport, MemoryTransport):
            transport.sink.sent.clear()  # the reader keeps what it needs; free the bytes already read
        args.out.write_text(json.dumps({"env": args.env, "algo": args.algo, "seed": args.seed,
                                        "transport": "kafka" if args.bootstrap else "memory",
                                        "random_return": random_return, "curve": rows}, indent=1))
        print(json.dumps(row), flush=True)

    res = train_online(env, env_id, ver, args.algo, transport=_ClearingTransport(transport), iterations=args.iterations,
                       seed=args.seed, config=config, time_budget_s=args.minutes * 60, on_update=dump,
                       protector=protector)
    learner = res.learner
    if args.algo == "dqn":
        learner.episodes = 10**9  # evaluate at the final epsilon, not the one of the last batch
    final = evaluate(env, learner, n_eval, seed=10_000)
    baselines["learned (sampled)"] = evaluate_security(env, learner, n_eval, seed=10_000)
    baselines["learned (greedy)"] = evaluate_security(env, GreedyPolicy(learner), n_eval, seed=10_000)
    args.out.write_text(json.dumps({"env": args.env, "algo": args.algo, "seed": args.seed,
                                    "transport": "kafka" if args.bootstrap else "memory",
                                    "config": asdict(config), "random_return": random_return,
                                    "final_eval_return": final, "policies": baselines, "curve": rows},
                                   indent=1))
    print(f"random {random_return:.2f} -> trained {final:.2f} (mean team return over {n_eval} episodes)")
    for name, row in baselines.items():
        print(f"{name:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


class GreedyPolicy:
    """A learner's deterministic policy (argmax / Gaussian mean: what ONNX exports), as a Policy."""

    def __init__(self, learner: Any):
        self.learner = learner
        self.version = learner.version + "-greedy"

    def act(self, observations, state=None) -> dict:
        import numpy as np
        import torch

        from learners.export import actor_inputs

        spec = self.learner.spec
        live, x = actor_inputs(spec, observations)
        with torch.no_grad():
            acts = self.learner.greedy(torch.as_tensor(x)).numpy()
        if spec.discrete:
            start = spec.action_space.start
            return {a: (int(acts[j]) + start, 0.0) for j, a in enumerate(live)}
        low, high = np.asarray(spec.action_space.low, np.float32), np.asarray(spec.action_space.high, np.float32)
        return {a: (np.clip(acts[j], low, high), 0.0) for j, a in enumerate(live)}


class _ClearingTransport:
    """Memory transport whose offsets keep growing while read bytes are dropped (long runs)."""

    def __init__(self, inner):
        self.inner = inner
        self.sink = inner.sink
        self._base = 0
        self._offsets: dict[str, int] = {}

    def mark(self):
        if not isinstance(self.inner, MemoryTransport):
            return self.inner.mark()
        return len(self.sink.sent)

    def flush(self):
        self.inner.flush()

    def read(self, start, end):
        if not isinstance(self.inner, MemoryTransport):
            return self.inner.read(start, end)
        out = []
        for r in records_from_memory(self.sink.sent[start:end]):
            o = self._offsets.get(r.topic, 0)
            self._offsets[r.topic] = o + 1
            out.append(r._replace(offset=o))
        return out


if __name__ == "__main__":
    main()

"""Wiring of on-policy training: the producers' harness collects, the learners' loop trains.

``train_on_env`` binds an env to ``learners.online.train_online``: the first policy is built from the
spaces the harness will write into ``run.started`` (``producers.harness.env_spaces``), and each batch
is collected by ``producers.harness.run_episodes``. ``run_training`` is what the commands run
(`marlgrc train-online`, `marlgrc run --algo`): settings, the home's signing key and key store, a
transport, the loop, a signed checkpoint, and optionally an evaluation and a learning-curve file.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from learners.online import MemoryTransport, OnlineResult, Transport, train_online
from learners.replay import RunSpec
from producers.harness import env_spaces, run_episodes

from .config import Settings
from .curriculum_wiring import CurriculumEnvError, StagedCollect, curriculum_for, curriculum_summary
from .errors import fail
from .metrics import HarnessMetrics, LearnerMetrics, TappedSink, exporter
from .progress import progress_bar

MEMORY = "memory"  # --bootstrap memory: the sealed events stay in this process


def spec_of(env: Any, run_id: str, env_id: str, env_version: str, seed: int) -> RunSpec:
    """The RunSpec the harness's run.started will carry (the same space records)."""
    return RunSpec.from_run_started(run_id, {"env_id": env_id, "env_version": env_version, "seed": seed,
                                             "config_hash": "", **env_spaces(env)})


def new_run_id(env_id: str, algo: str, seed: int) -> str:
    return f"{env_id}__{algo}__{seed}__{int(time.time())}-{uuid.uuid4().hex[:6]}"


def evaluate_baselines(e: Any, episodes: int, *, seed: int, progress: bool = False) -> dict[str, dict]:
    """``env.metrics()`` means of the fixed policies over ``episodes`` evaluation episodes (reset seeds
    10000, 10001, ...): random (seeded with the training seed) and the env's heuristic where it has one."""
    from learners.evaluate import evaluate_security
    from producers.policies import HeuristicPolicy, RandomPolicy

    fixed = [("random", RandomPolicy(e, seed=seed))]
    if hasattr(e, "heuristic_action"):
        fixed.append(("heuristic", HeuristicPolicy(e)))
    out: dict[str, dict] = {}
    with progress_bar(f"evaluating {' and '.join(n for n, _ in fixed)} over {episodes} episodes",
                      len(fixed), unit="policies", enabled=progress) as bar:
        for name, pol in fixed:
            out[name] = evaluate_security(e, pol, episodes, seed=10_000)
            bar.advance()
    return out


def evaluate_learned(e: Any, learner: Any, episodes: int, *, progress: bool = False) -> tuple[float, dict[str, dict]]:
    """(mean team return, ``env.metrics()`` means of the sampled and the greedy policy) of a trained
    learner over the same evaluation episodes as :func:`evaluate_baselines`."""
    from learners.evaluate import GreedyPolicy, evaluate, evaluate_security

    if learner.algorithm in ("dqn", "qmix"):
        learner.episodes = 10**9  # evaluate at the final epsilon, not the one of the last batch
    with progress_bar(f"evaluating the trained policy over {episodes} episodes", 3, unit="passes",
                      enabled=progress) as bar:
        final = evaluate(e, learner, episodes, seed=10_000)
        bar.advance()
        policies = {"learned (sampled)": evaluate_security(e, learner, episodes, seed=10_000)}
        bar.advance()
        policies["learned (greedy)"] = evaluate_security(e, GreedyPolicy(learner), episodes, seed=10_000)
        bar.advance()
    return final, policies


def say_evaluation(say: Callable[[str], None], random_return: float, final: float, policies: dict[str, dict],
                   episodes: int) -> None:
    say(f"random {random_return:.2f} -> trained {final:.2f} (mean team return over {episodes} episodes)")
    for name, row in policies.items():
        say(f"{name:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


def train_on_env(env: Any, env_id: str, env_version: str, algo: str, *, transport: Transport, iterations: int,
                 seed: int = 1, run_id: str | None = None, protector: Any = None, max_steps: int | None = None,
                 progress: Callable[[int], None] | None = None, curriculum: Any = None, **loop: Any) -> OnlineResult:
    """``learners.online.train_online`` on ``env``, collected by the harness. ``protector`` (an
    ``eventlog.privacy.FieldProtector``) is required for envs with personal data (``subject_fields()``,
    e.g. mailbox_v0): the harness refuses to write them in the clear. ``progress``: the harness's
    (``n`` env steps taken). ``curriculum`` (a ``learners.curriculum.Curriculum`` over the env's
    stages): each batch is played at its stage, and its stage changes are ``curriculum.stage`` events
    (``marlgrc.curriculum_wiring``). ``loop``: the loop's other keyword arguments (config, signer,
    public_key, time_budget_s, on_update, ...)."""
    spec = spec_of(env, run_id or new_run_id(env_id, algo, seed), env_id, env_version, seed)

    def collect(policy: Any, log: Any, *, episodes: int, seed: int, config: dict) -> Any:
        return run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id=env_id, env_version=env_version,
                            config=config, protector=protector, max_steps=max_steps, progress=progress)

    if curriculum is not None:
        collect = staged = StagedCollect(env, curriculum, collect)
        on_update = loop.get("on_update")
        loop["on_update"] = lambda row: on_update(staged.annotate(row)) if on_update else staged.annotate(row)
    return train_online(spec, algo, collect=collect, transport=transport, iterations=iterations, seed=seed, **loop)


def run_training(s: Settings, *, env: str, algo: str, seed: int = 1, iterations: int | None = None,
                 minutes: float | None = None, continuous: bool = False, env_args: dict | None = None,
                 max_steps: int | None = None, overrides: list[str] = (), out: Path | None = None,
                 checkpoint: Path | None = None, eval_episodes: int = 0, threads: int = 1,
                 say: Callable[[str], None] = print, progress: bool = False,
                 metrics_port: int | None = None, online: Any = None, curriculum: Any = None) -> OnlineResult:
    """Train ``algo`` on-policy on ``env`` with every transition through the event log, signed with the
    home's key. ``s.bootstrap == "memory"`` keeps the events in this process (learning curves without a
    broker); otherwise they go through Kafka (the given broker, or the one `marlgrc up` started).
    ``out`` gets the learning curve (JSON, rewritten after every update) and, with ``eval_episodes``,
    the evaluation of random, heuristic and learned policies. Ends with a signed checkpoint.
    ``progress``: bars on an interactive stderr (``marlgrc.progress``); ``metrics_port``: the harness's
    and the learner's Prometheus metrics on 127.0.0.1 (``marlgrc.metrics``). ``online`` (a
    ``learners.safety.GateConfig``): update every K decisions behind the safety gate, its pre-update
    checkpoint at ``HOME/checkpoints/RUN/pre-update``, judged in a second instance of the env.
    ``curriculum`` (a ``learners.curriculum.CurriculumConfig``): play the env's stages from the easiest,
    promoted and regressed by its ``CURRICULUM`` (``marlgrc.curriculum_wiring``); the evaluation is then
    at the hardest stage reached, after training, baselines included."""
    import torch

    from eventlog.checkpoint import KeyFileError, Signer
    from eventlog.kafka import BrokerUnavailable, DeliveryError, ensure_topics
    from eventlog.privacy import FieldProtector, LocalKeyStore, PrivacyError
    from learners import algorithm, config_overrides
    from learners.checkpoint import CheckpointError, load_signing_key, save_checkpoint
    from learners.online import KafkaTransport
    from learners.replay import ReplayError
    from producers.envs import EnvError, make_env
    from producers.harness import HarnessError

    torch.set_num_threads(threads)
    try:
        a = algorithm(algo)
        config = a.config_cls(seed=seed, **config_overrides(a.config_cls, list(overrides)))
        if getattr(config, "device", "cpu") != "cpu":  # a device this machine lacks: one line, before any work
            from learners.networks import torch_device

            torch_device(config.device)
        e, env_id, ver = make_env(env, continuous=continuous, **(env_args or {}))
    except (KeyError, ValueError, EnvError) as exc:
        fail(str(exc).strip("'\""))
    cur = None
    if curriculum is not None:
        if online is not None:
            fail("--curriculum and --online cannot be combined yet (the safety gate re-runs its window at one "
                 "stage); drop one of them")
        try:
            cur = curriculum_for(e, env_id, curriculum)
        except CurriculumEnvError as exc:
            fail(str(exc))
    memory = s.bootstrap == MEMORY
    registry = exporter(metrics_port)  # first: a port in use stops it before anything is opened
    harness = learning = None
    if registry is not None:
        harness, learning = HarnessMetrics(registry), LearnerMetrics(registry)
    if iterations is None:
        iterations = 10**9 if minutes is not None else 10
    try:
        signer = Signer.load_or_create(s.signing_key)
        key = load_signing_key(s.signing_key)
    except KeyFileError as exc:
        fail(str(exc))
    boot = None
    if not memory:
        boot = s.resolve_bootstrap()
        try:
            ensure_topics(boot, s.prefix)
        except BrokerUnavailable as exc:
            fail(str(exc))
    keys = protector = scratch = None
    if hasattr(e, "subject_fields"):  # an env with personal data runs only behind a key store
        # through Kafka, the home's; in memory the events end with the process, and so do their keys
        if memory:
            scratch = Path(tempfile.mkdtemp(prefix="marlgrc-keys-"))
        path = scratch / "subjects.db" if scratch else s.keystore
        try:
            keys = LocalKeyStore(path)
        except PrivacyError as exc:
            fail(str(exc))
        protector = FieldProtector(keys)

    baselines: dict[str, dict] = {}

    if eval_episodes and cur is None:  # with a curriculum: after training, at the hardest stage reached
        baselines.update(evaluate_baselines(e, eval_episodes, seed=seed, progress=progress))
    head = {"env": env, "algo": algo, "seed": seed, "transport": MEMORY if memory else "kafka",
            "random_return": baselines.get("random", {}).get("mean_return")}
    rows: list[dict] = []

    def write(**more: Any) -> None:
        if out is not None:
            out.write_text(json.dumps({**head, **more, "curve": rows}, indent=1))

    def on_update(row: dict) -> None:
        rows.append(row)
        write()
        if learning is not None:
            learning.update(row)
        if minutes is not None:
            bar.update(completed=min(row["seconds"], minutes * 60))
        else:
            bar.advance()
        say(json.dumps(row) if out is not None else
            f"update {row['iteration']}: env steps {row['env_steps']}, return {row['charts/episodic_return']:.2f}"
            + (f"; {row['gate']} (reward per decision: window {row['gate_baseline']:.4f}, updated policy "
               f"{row['gate_candidate']:.4f})" if "gate" in row else "")
            + (f"; stage {row['stage']}" if "stage" in row else "")
            + "".join(f"; {c}" for c in row.get("stage_changes", ())))

    run_id, gated = new_run_id(env_id, algo, seed), {}
    if online is not None:  # the safety gate judges each update in an env of its own
        from learners.safety import SafetyGate

        try:
            gate = SafetyGate(make_env(env, continuous=continuous, **(env_args or {}))[0],
                              checkpoint=s.checkpoints / run_id / "pre-update", key=key, window=online.window,
                              ratio=online.ratio, max_steps=max_steps)
        except ValueError as exc:
            fail(str(exc))
        gated = {"gate": gate, "decisions_per_update": online.update_every}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    transport = MemoryTransport(keep=False) if memory else KafkaTransport(boot, s.prefix)
    if harness is not None:  # every event the session sends, counted on its way to the transport's sink
        transport.sink = TappedSink(transport.sink, harness.sent)
    doing = f"training {algo} on {env_id} ({MEMORY if memory else 'through Kafka'})"
    try:
        with progress_bar(doing, minutes * 60 if minutes is not None else iterations,
                          unit="s of the budget" if minutes is not None else "updates", enabled=progress) as bar:
            res = train_on_env(e, env_id, ver, algo, transport=transport, iterations=iterations, seed=seed,
                               protector=protector, max_steps=max_steps, config=config, signer=signer,
                               public_key=signer.public_key, time_budget_s=None if minutes is None else minutes * 60,
                               on_update=on_update, progress=None if harness is None else harness.step,
                               run_id=run_id, curriculum=cur, **gated)
            bar.finish()
    except (BrokerUnavailable, DeliveryError, HarnessError, ReplayError, CheckpointError, CurriculumEnvError) as exc:
        fail(str(exc))
    finally:
        transport.close()
        if keys is not None:
            keys.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    base = checkpoint or s.checkpoints / res.run_id / "policy"
    save_checkpoint(base, res.learner, key)
    if cur is not None:
        head["curriculum"] = curriculum_summary(cur)
        say(f"curriculum: {len(cur.history)} stage change(s) (curriculum.stage events on {res.run_id}:curriculum); "
            f"final stage {cur.stage}, hardest reached {cur.stages[cur.highest]}")
        if eval_episodes:
            e.set_stage(cur.stages[cur.highest])
            baselines.update(evaluate_baselines(e, eval_episodes, seed=seed, progress=progress))
            head["random_return"] = baselines["random"]["mean_return"]
            head["eval_stage"] = cur.stages[cur.highest]
    if eval_episodes:
        final, learned = evaluate_learned(e, res.learner, eval_episodes, progress=progress)
        baselines.update(learned)
        write(config=asdict(config), final_eval_return=final, policies=baselines)
        say_evaluation(say, head["random_return"], final, baselines, eval_episodes)
    else:
        write(config=asdict(config))
    if online is not None:
        say(f"safety gate: {len(res.rollback_hashes)} of {len(res.update_hashes)} updates rolled back "
            f"(policy.rollback events on {res.run_id}:policy:{algo})")
    say(f"run {res.run_id}: {res.learner.version}; checkpoint {base}.pt")
    return res

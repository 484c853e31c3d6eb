"""Many producer processes feeding one learner through Kafka (seed 002; `marlgrc train-online
--producers N`): the process wiring of ``learners.distributed``.

The learner runs in this process. Each producer is an OS process of its own (multiprocessing,
spawn) that builds the env, loads the home's signing key and runs
``learners.distributed.produce_rounds`` with ``producers.harness.run_episodes`` as its collector,
writing run ``{G}.p{k}``. Between the processes: Kafka (every event; the learner reads them through
the consumer group ``marlgrc-learner-{G}``) and a policy directory (the signed checkpoint of each
round, ``learners.distributed.PolicyBoard``), nothing else: no episode crosses a pipe.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from eventlog.checkpoint import Signer
from eventlog.kafka import EventProducer, OffsetReader
from learners import algorithm
from learners.checkpoint import load_signing_key
from learners.distributed import (ROUND_TOPICS, DistributedError, GroupSource, PolicyBoard, group_config,
                                  produce_rounds, producer_run_id, train_distributed)
from learners.online import LINGER_MS, OnlineResult
from producers.envs import make_env
from producers.harness import config_digest, env_spaces, run_episodes

from .training import evaluate_baselines, evaluate_learned, new_run_id, say_evaluation, spec_of


class ScaleoutError(RuntimeError):
    """A producer process failed, or the session cannot run with many producers."""


@dataclass(frozen=True)
class ProducerJob:
    """Everything a producer process needs (picklable: it crosses the spawn)."""

    producer: int
    producers: int
    group_run: str
    bootstrap: str
    prefix: str
    env: str
    algo: str
    seed: int
    episodes_per_round: int
    signing_key: str
    board: str
    env_args: dict = field(default_factory=dict)
    continuous: bool = False
    max_steps: int | None = None
    threads: int = 1


def _error_file(board: str | Path, producer: int) -> Path:
    return Path(board) / f"producer-{producer}.error"


def _ready_file(board: str | Path, producer: int) -> Path:
    return Path(board) / f"producer-{producer}.started"


def producer_main(job: ProducerJob) -> None:
    """A producer process: collect the rounds the learner publishes until it stops. A failure is
    written to ``producer-{k}.error`` in the policy directory (the learner reports it) and the
    process exits with code 1."""
    import torch

    torch.set_num_threads(job.threads)
    try:
        env, env_id, ver = make_env(job.env, continuous=job.continuous, **job.env_args)
        signer = Signer.load(Path(job.signing_key))
        sink = EventProducer(job.bootstrap, prefix=job.prefix, client_id=f"marlgrc-producer-{job.producer}",
                             **{"linger.ms": LINGER_MS})

        def collect(policy: Any, log: Any, *, episodes: int, seed: int, config: dict) -> Any:
            return run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id=env_id, env_version=ver,
                                config=config, max_steps=job.max_steps)

        # warm up before saying ready: a learner of this algorithm acts once (torch's first use of its
        # deterministic mode loads much), and the producer connects, so round 0 measures the work
        warm = algorithm(job.algo).learner_cls(spec_of(env, job.group_run, env_id, ver, job.seed))
        warm.act(env.reset(seed=0)[0], None)
        sink.flush()
        _ready_file(job.board, job.producer).write_text("ready\n")
        produce_rounds(job.group_run, job.producer, job.producers, collect=collect, sink=sink,
                       board=PolicyBoard(Path(job.board)), public_key=signer.public_key, signer=signer,
                       episodes_per_round=job.episodes_per_round, seed=job.seed, algo=job.algo)
        sink.close()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the learner through the error file
        line = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _error_file(job.board, job.producer).write_text(line + "\n")
        print(f"producer {job.producer}: {line}", file=sys.stderr)
        code = 1
    # everything is flushed (events acknowledged, the error written): skip the interpreter's teardown
    # of torch and the Kafka client, which takes seconds on a busy machine and delays the learner's end
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_producers(procs: list, runs: list[str], board: PolicyBoard) -> None:
    """Raise where a producer process (``exitcode``: None while it runs) ended before its time: with an
    error, or cleanly before the learner wrote ``stop``. A clean exit after it is a producer done with
    its last round: with a lag, the learner writes ``stop`` when it publishes no more rounds and still
    trains on the rounds in flight, whose producers may have ended by then (their events flushed)."""
    for k, p in enumerate(procs):
        if p.exitcode is None or (p.exitcode == 0 and board.stopped()):
            continue
        err = _error_file(board.directory, k)
        why = err.read_text().strip() if err.exists() else "no error was written"
        raise ScaleoutError(f"producer {k} (run {runs[k]}) exited with code {p.exitcode} before the "
                            f"learner stopped: {why}")


def train_scaleout(env_name: str, *, producers: int, bootstrap: str, prefix: str, algo: str, signing_key: Path,
                   iterations: int, seed: int = 1, config: Any = None, env_args: dict | None = None,
                   continuous: bool = False, max_steps: int | None = None, run_id: str | None = None,
                   time_budget_s: float | None = None, on_update: Callable[[dict], None] | None = None,
                   board_dir: Path | None = None, threads: int = 1, round_timeout_s: float = 120.0,
                   lag: int = 0) -> OnlineResult:
    """Train ``algo`` on ``env_name`` with ``producers`` producer processes and this process as the
    learner, every event through Kafka at ``bootstrap`` and signed with the key file ``signing_key``.
    ``board_dir``: the policy directory (default: a temporary one, removed at the end). ``lag``: round
    ``r`` is collected with policy ``max(0, r - lag)``, so with 1 the producers collect the next round
    while the learner updates (``learners.distributed``; recorded in run.started's config). Returns the
    learner's result (its ``run_id`` is the learner run ``G``; producer ``k`` wrote ``G.p{k}``)."""
    a = algorithm(algo)
    config = config or a.config_cls(seed=seed)
    env_args = dict(env_args or {})
    env, env_id, ver = make_env(env_name, continuous=continuous, **env_args)
    if hasattr(env, "subject_fields"):
        raise ScaleoutError(f"env {env_id} carries personal data; its producers would need one shared key store, "
                            f"which many producer processes do not have yet: train it with --producers 1")
    group = run_id or new_run_id(env_id, algo, seed)
    runs = [producer_run_id(group, k) for k in range(producers)]
    E = config.episodes_per_update
    signer = Signer.load(Path(signing_key))
    key = load_signing_key(Path(signing_key))
    cfg = {**group_config(algo, config, runs, E, seed, lag), "env": env_name, "env_args": env_args,
           "continuous": continuous, "max_steps": max_steps}
    config_json, config_hash = config_digest(cfg)
    run_started = {"env_id": env_id, "env_version": ver, "seed": int(seed), "config_hash": config_hash,
                   "config_json": config_json, **env_spaces(env),
                   "episodes_planned": E * iterations if time_budget_s is None and iterations < 10**6 else 0}
    marks = OffsetReader(bootstrap, ROUND_TOPICS, prefix)
    try:
        start = marks.end_offsets()  # before any producer exists: every record of theirs is after it
    finally:
        marks.close()
    scratch = None
    if board_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="marlgrc-policies-"))
    board = PolicyBoard(board_dir or scratch)
    jobs = [ProducerJob(k, producers, group, bootstrap, prefix, env_name, algo, seed, E, str(signing_key),
                        str(board.directory), env_args, continuous, max_steps, threads) for k in range(producers)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=producer_main, args=(job,), name=f"marlgrc-producer-{job.producer}", daemon=True)
             for job in jobs]
    source = GroupSource(bootstrap, prefix, f"marlgrc-learner-{group}", start)
    sink = EventProducer(bootstrap, prefix=prefix, client_id="marlgrc-learner", **{"linger.ms": LINGER_MS})

    def alive() -> None:
        check_producers(procs, runs, board)

    try:
        for p in procs:
            p.start()
        # the session's clock (and time budget) starts when every producer is up: spawning, imports
        # and connections are not training time
        deadline = time.monotonic() + round_timeout_s
        while not all(_ready_file(board.directory, k).exists() for k in range(producers)):
            alive()
            if time.monotonic() > deadline:
                raise ScaleoutError(f"producers not up after {round_timeout_s:.0f}s: "
                                    f"{[k for k in range(producers) if not _ready_file(board.directory, k).exists()]}")
            time.sleep(0.05)
        return train_distributed(spec_of(env, group, env_id, ver, seed), algo, runs=runs, source=source, sink=sink,
                                 board=board, signing_key=key, signer=signer, public_key=signer.public_key,
                                 iterations=iterations, seed=seed, config=config, run_started=run_started,
                                 time_budget_s=time_budget_s, on_update=on_update, alive=alive,
                                 round_timeout_s=round_timeout_s, lag=lag)
    finally:
        board.stop(-1, "learner ended")  # a no-op after a clean stop; else the producers end at their next wait
        for p in procs:
            if p.pid is not None:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        source.close()
        sink.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run_scaleout(s: Any, *, env: str, algo: str, producers: int, seed: int = 1, iterations: int | None = None,
                 minutes: float | None = None, continuous: bool = False, env_args: dict | None = None,
                 max_steps: int | None = None, overrides: list[str] = (), out: Path | None = None,
                 checkpoint: Path | None = None, threads: int = 1, lag: int = 0, eval_episodes: int = 0,
                 say: Callable[[str], None] = print) -> OnlineResult:
    """What `marlgrc train-online --producers N` runs: settings, the home's signing key, topics, the
    session (``train_scaleout``), the learning curve in ``out``, a signed checkpoint at the end and,
    with ``eval_episodes``, the evaluation of random, heuristic and learned policies (in this process,
    without events, as `train-online` in one process: ``marlgrc.training.evaluate_baselines``)."""
    import json

    import torch

    from eventlog.checkpoint import KeyFileError
    from eventlog.kafka import BrokerUnavailable, DeliveryError, ensure_topics
    from learners import config_overrides
    from learners.checkpoint import save_checkpoint
    from learners.replay import ReplayError
    from producers.envs import EnvError
    from producers.harness import HarnessError

    from .errors import fail
    from .training import MEMORY

    torch.set_num_threads(threads)
    if s.bootstrap == MEMORY:
        fail("--producers N sends every event through Kafka (the producers are other processes); give a broker "
             "with --bootstrap HOST:PORT, or train with --producers 1 to keep events in memory")
    try:
        a = algorithm(algo)
        config = a.config_cls(seed=seed, **config_overrides(a.config_cls, list(overrides)))
    except (KeyError, ValueError) as exc:
        fail(str(exc).strip("'\""))
    try:
        Signer.load_or_create(s.signing_key)
        key = load_signing_key(s.signing_key)
    except KeyFileError as exc:
        fail(str(exc))
    boot = s.resolve_bootstrap()
    try:
        ensure_topics(boot, s.prefix)
    except BrokerUnavailable as exc:
        fail(str(exc))
    rows: list[dict] = []
    head = {"env": env, "algo": algo, "seed": seed, "transport": "kafka", "producers": producers, "lag": lag}

    def on_update(row: dict) -> None:
        rows.append(row)
        if out is not None:
            out.write_text(json.dumps({**head, "curve": rows}, indent=1))
        say(json.dumps(row) if out is not None else
            f"update {row['iteration']}: env steps {row['env_steps']} from {producers} producers, "
            f"return {row['charts/episodic_return']:.2f}")

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = train_scaleout(env, producers=producers, bootstrap=boot, prefix=s.prefix, algo=algo,
                             signing_key=s.signing_key, iterations=iterations or (10**9 if minutes else 10),
                             seed=seed, config=config, env_args=env_args, continuous=continuous, max_steps=max_steps,
                             time_budget_s=None if minutes is None else minutes * 60, on_update=on_update,
                             threads=threads, lag=lag)
    except (EnvError, BrokerUnavailable, DeliveryError, HarnessError, ReplayError, DistributedError,
            ScaleoutError) as exc:
        fail(str(exc))
    more: dict = {"config": asdict(config)}
    if out is not None:
        out.write_text(json.dumps({**head, **more, "curve": rows}, indent=1))
    base = checkpoint or s.checkpoints / res.run_id / "policy"
    save_checkpoint(base, res.learner, key)
    say(f"run {res.run_id}: {res.learner.version}, {res.learner.env_steps} env steps from producer runs "
        f"{', '.join(producer_run_id(res.run_id, k) for k in range(producers))}; checkpoint {base}.pt")
    if eval_episodes:
        e = make_env(env, continuous=continuous, **(env_args or {}))[0]
        policies = evaluate_baselines(e, eval_episodes, seed=seed)
        final, learned = evaluate_learned(e, res.learner, eval_episodes)
        policies.update(learned)
        head["random_return"] = policies["random"]["mean_return"]
        if out is not None:
            out.write_text(json.dumps({**head, **more, "final_eval_return": final, "policies": policies,
                                       "curve": rows}, indent=1))
        say_evaluation(say, head["random_return"], final, policies, eval_episodes)
    return res

"""CLI commands of the producers: ``marlgrc run`` (an env + policy to Kafka) and ``marlgrc forget``
(crypto-shred one data subject and publish a ``compliance.deletion`` event)."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from eventlog.chain import ChainHead
from eventlog.checkpoint import KeyFileError, Signer
from eventlog.privacy import FieldProtector, LocalKeyStore, PrivacyError, deletion_payload

from .config import BootOpt, HomeOpt, PrefixOpt, Settings, parse_env_args
from .errors import fail
from .metrics import HarnessMetrics, TappedSink, exporter, metrics_port_option
from .progress import ProgressOpt, console, progress_bar

DELETIONS_TOPIC = "marl.compliance.deletions"
DELETIONS_CHAIN = "compliance:deletions"


def _ledger_steps(s: Settings, ledger: Optional[Path], key_file: Optional[Path], pg: Optional[str], schema: str,
                  requester: str) -> list[tuple[str, Callable]]:
    """The ledgers' part of an erasure, one step per ledger: the SQLCipher ledger (``ledger`` or the
    home's, when it exists) and the PostgreSQL ledger at ``pg``, each opened now (a wrong key fails
    before anything is changed). A step deletes the subject's rows in one transaction with a tombstone."""
    from ledger.lifecycle import erase_subject

    from .commands_ledger import open_ledger

    targets = []
    path = ledger or s.ledger_file
    if path.exists():
        targets.append((f"ledger:{path}", "ledger",
                        lambda: open_ledger(s, path, key_file, None, "ledger", need="erase")))
    elif ledger is not None:
        fail(f"no ledger at {ledger}; nothing was changed", 2)
    if pg:
        targets.append((f"ledger:postgres:{schema}", "ledger.postgres",
                        lambda: open_ledger(s, None, None, pg, schema, need="erase")))
    for _, _, opener in targets:
        _close(opener())

    def step(prefix: str, opener: Callable) -> Callable:
        def run(request, _results) -> dict:
            store = opener()
            try:
                summary = erase_subject(store, request.subject_ref, request.request_id, requester,
                                        request.legal_basis)
            finally:
                _close(store)
            return {f"{prefix}.{table}": n for table, n in sorted(summary.counts.items())}
        return run
    return [(name, step(prefix, opener)) for name, prefix, opener in targets]


def _close(store) -> None:
    close = getattr(store, "close", None)
    if close:
        close()


def publish_step(s: Settings, bootstrap: str) -> tuple[str, Callable]:
    """The erasure step that appends its ``compliance.deletion`` event (every count of the steps before
    it) to the deletions chain, resuming from the chain's head on Kafka."""
    def publish(request, results) -> dict:
        from eventlog.kafka import EventProducer, chain_head_from_topic, ensure_topics
        from eventlog.log import EventLog

        ensure_topics(bootstrap, s.prefix)
        seq, head = chain_head_from_topic(bootstrap, DELETIONS_TOPIC, DELETIONS_CHAIN, s.prefix)
        signer = Signer.load_or_create(s.signing_key)
        producer = EventProducer(bootstrap, prefix=s.prefix, client_id="marlgrc-forget")
        # a producer id of its own, so this invocation's checkpoint chain starts fresh without forking another's
        log = EventLog(producer, run_id="compliance", producer_id=f"forget-{uuid.uuid4().hex[:12]}", signer=signer)
        log.writer(DELETIONS_TOPIC, DELETIONS_CHAIN, head=ChainHead(seq, head))
        event = log.append(DELETIONS_CHAIN, "compliance.deletion", deletion_payload(request, results))
        log.close()
        return {"seq": event.seq, "event_hash": event.event_hash.hex()}
    return "kafka.compliance_deletion", publish


def _onnx_policy(s: Settings, path: str, public_key: Optional[Path], env: Any):
    """``--policy onnx:PATH``: the exported policy, after its signature checks out against ``public_key``
    (default: the home's signing key's public key); any failure stops the command with one line, exit 2."""
    from eventlog.checkpoint import SignedFileError, load_public_key
    from producers.policies import OnnxPolicy, PolicyFileError

    if not path:
        fail("--policy onnx:PATH needs the path of an ONNX file exported by `marlgrc train --onnx`")
    try:
        key = load_public_key(public_key) if public_key else Signer.load_or_create(s.signing_key).public_key
        return OnnxPolicy(Path(path), key, env)
    except (SignedFileError, KeyFileError, PolicyFileError) as exc:
        fail(str(exc))


def _named_policy(s: Settings, name: str, public_key: Optional[Path], env: Any, seed: int,
                  explore_rate: Optional[float]):
    """``--policy random | heuristic | hybrid | hybrid:onnx:PATH``: a hybrid's model file, when there
    is one, only after its signature checks out (as for onnx:PATH); a failure stops with one line."""
    from eventlog.checkpoint import SignedFileError, load_public_key
    from producers.policies import HYBRID_ONNX_PREFIX, PolicyFileError, builtin_policy

    try:
        key = None
        if name.startswith(HYBRID_ONNX_PREFIX) and Path(name[len(HYBRID_ONNX_PREFIX):]).exists():
            key = load_public_key(public_key) if public_key else Signer.load_or_create(s.signing_key).public_key
        return builtin_policy(name, env, seed, explore_rate=explore_rate, public_key=key)
    except (SignedFileError, KeyFileError, PolicyFileError, ValueError) as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        env: str = typer.Option(..., "--env", help="mailbox_v0 | sandbox_v0 | simple_spread_v3 | module:factory"),
        policy: str = typer.Option("random", "--policy", help="random | heuristic | onnx:PATH (a policy exported "
                                   "by `marlgrc train --onnx`, used only if its signature checks out) | hybrid | "
                                   "hybrid:onnx:PATH (that policy, else the env's heuristic, else random, per "
                                   "agent; a missing PATH decides without it)"),
        explore_rate: Optional[float] = typer.Option(None, "--explore-rate", min=0.0, max=1.0,
                                                     help="with --policy hybrid: of the decisions the policy tier "
                                                     "does not take, the share taken at random instead of by the "
                                                     "heuristic (default 0.1, seed 001)"),
        policy_key: Optional[Path] = typer.Option(None, "--public-key", help="with --policy [hybrid:]onnx:PATH: the "
                                                  "trusted Ed25519 public key (PEM) its signature must verify with "
                                                  "(default: the home's signing key)"),
        episodes: int = typer.Option(1, "--episodes", min=0),
        seed: int = typer.Option(0, "--seed"),
        env_arg: list[str] = typer.Option([], "--env-arg", help="factory argument name=value (repeatable)"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="cap per episode"),
        bootstrap: Optional[str] = BootOpt,
        prefix: Optional[str] = PrefixOpt,
        home: Optional[Path] = HomeOpt,
        progress: bool = ProgressOpt,
        metrics_port: Optional[int] = metrics_port_option("harness"),
        algo: Optional[str] = typer.Option(None, "--algo", help="train on-policy through Kafka with this learner "
                                           "(mappo | ippo | dqn) instead of running a fixed policy"),
        iterations: int = typer.Option(10, "--iterations", min=1, help="with --algo: act/read-back/update rounds"),
        online: bool = typer.Option(False, "--online", help="with --algo: online learning behind a safety gate "
                                    "(seed 001): a signed checkpoint before each update, the updated policy judged "
                                    "on the recent window and rolled back if it falls below the --gate-ratio rule"),
        update_every: int = typer.Option(1000, "--update-every", min=1, help="with --online: agent decisions "
                                         "between updates (rounded up to whole episodes)"),
        window: int = typer.Option(100, "--window", min=1, help="with --online: the last decisions an update is "
                                   "judged on"),
        gate_ratio: float = typer.Option(0.8, "--gate-ratio", help="with --online: refuse an update scoring below "
                                         "baseline - (1 - ratio) * |baseline| (80 percent of a positive baseline)"),
        overrides: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE", help="with --algo: override a "
                                            "learner config field, e.g. --set learning_rate=3e-4 (repeatable)"),
        curriculum: bool = typer.Option(False, "--curriculum", help="with --algo: play the env's stages from the "
                                        "easiest, promoted and regressed by its CURRICULUM criteria over a window "
                                        "of episodes (seed 004; curriculum.stage events on RUN:curriculum)"),
        curriculum_window: int = typer.Option(20, "--curriculum-window", min=3, help="with --curriculum: episodes "
                                              "at a stage, and in the window, before it is judged"),
    ) -> None:
        """Run an environment with a policy for N episodes and write every step to Kafka; prints the run id.
        With --algo, the policy is a learner trained from the events it reads back from the broker."""
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        try:
            kwargs = parse_env_args(env_arg)
        except ValueError as exc:
            fail(str(exc))
        if online and algo is None:
            fail("--online trains a learner as the policy acts: give --algo (e.g. --algo mappo)")
        if curriculum and algo is None:
            fail("--curriculum changes the stage as a learner succeeds or struggles: give --algo (e.g. --algo mappo)")
        if algo is not None:
            from .training import MEMORY, run_training

            if s.bootstrap == MEMORY:
                fail("`marlgrc run` writes to Kafka; for events kept in memory use `marlgrc train-online "
                     "--bootstrap memory`")
            from learners.curriculum import CurriculumConfig
            from learners.safety import GateConfig

            gate = GateConfig(update_every, window, gate_ratio) if online else None
            staged = CurriculumConfig(curriculum_window, curriculum_window) if curriculum else None
            res = run_training(s, env=env, algo=algo, seed=seed, iterations=iterations, env_args=kwargs,
                               max_steps=max_steps, say=lambda line: typer.echo(line, err=True), progress=progress,
                               metrics_port=metrics_port, overrides=overrides, online=gate, curriculum=staged)
            typer.echo(res.run_id)
            return
        from eventlog.kafka import BrokerUnavailable, DeliveryError, EventProducer, ensure_topics
        from eventlog.log import EventLog
        from producers.envs import EnvError, resolve_env
        from producers.harness import HarnessError, run_episodes
        from producers.policies import HYBRID, ONNX_PREFIX

        try:
            spec = resolve_env(env)
            the_env = spec.factory(**kwargs)
            if policy.startswith(ONNX_PREFIX):
                if explore_rate is not None:
                    fail(f"--explore-rate applies to --policy {HYBRID} or {HYBRID}:{policy}, not to {policy}")
                the_policy = _onnx_policy(s, policy[len(ONNX_PREFIX):], policy_key, the_env)
            else:
                the_policy = _named_policy(s, policy, policy_key, the_env, seed, explore_rate)
        except (EnvError, ValueError, TypeError) as exc:
            fail(str(exc))
        registry = exporter(metrics_port)  # before the key store opens: a port in use stops it first
        harness = HarnessMetrics(registry) if registry is not None else None
        protector, keys = None, None
        try:
            if hasattr(the_env, "subject_fields"):
                keys = LocalKeyStore(s.keystore)
                protector = FieldProtector(keys)
            signer = Signer.load_or_create(s.signing_key)
        except (PrivacyError, KeyFileError) as exc:
            fail(str(exc))
        label, policy_config = policy, policy
        if policy.startswith((ONNX_PREFIX, HYBRID)):  # a run id names no path; run.started names the file
            label = HYBRID if policy.startswith(HYBRID) else "onnx"
            policy_config = the_policy.run_config()
        run_id = f"{spec.env_id}__{label}__{seed}__{int(time.time())}__{uuid.uuid4().hex[:6]}"
        try:
            boot = s.resolve_bootstrap()
            ensure_topics(boot, s.prefix)
            producer = EventProducer(boot, prefix=s.prefix, client_id="marlgrc-run")
            sink = producer if harness is None else TappedSink(producer, harness.sent)
            log = EventLog(sink, run_id=run_id, producer_id=f"harness-{uuid.uuid4().hex[:8]}", signer=signer)
            steps_hint = getattr(the_env, "max_cycles", None) or getattr(the_env, "inbox_size", None)
            with progress_bar(f"{spec.env_id}: {episodes} episodes, {policy} policy",
                              episodes * steps_hint if steps_hint else None, unit="steps", enabled=progress) as bar:
                step = bar.advance if harness is None else lambda n: (bar.advance(n), harness.step(n))
                summary = run_episodes(the_env, the_policy, log, episodes=episodes, seed=seed, env_id=spec.env_id,
                                       env_version=spec.env_version,
                                       config={"env_spec": spec.spec, "env_args": kwargs, "policy": policy_config,
                                               "max_steps": max_steps},
                                       progress=step, protector=protector, max_steps=max_steps)
                bar.finish()  # episodes end early in some envs: the hint was an upper bound
            log.close()
            producer.close()
        except (BrokerUnavailable, DeliveryError) as exc:
            fail(str(exc))
        except HarnessError as exc:  # the env or the policy failed mid-run: what was written still verifies
            fail(str(exc), 1)
        finally:
            if keys is not None:
                keys.close()
        console.print(f"run {run_id}: {summary.episodes} episodes, {summary.steps} steps, {summary.events} events, "
                      f"mean return {summary.mean_return:.3f}")
        fallbacks = getattr(the_policy, "fallbacks", None)
        if fallbacks:  # a hybrid's decisions that fell from a tier, by reason
            console.print("decisions that fell to a lower tier: "
                          + ", ".join(f"{r}: {n}" for r, n in fallbacks.items()))
        typer.echo(run_id)

    @app.command("forget")
    def forget_cmd(
        subject: str = typer.Option(..., "--subject", help="the data subject's raw identifier"),
        namespace: str = typer.Option(..., "--namespace", help="e.g. user, sender"),
        request_id: str = typer.Option(..., "--request-id"),
        legal_basis: str = typer.Option(..., "--legal-basis", help="e.g. GDPR Art. 17(1)(b)"),
        requester: str = typer.Option("", "--requester"),
        bootstrap: Optional[str] = BootOpt,
        prefix: Optional[str] = PrefixOpt,
        home: Optional[Path] = HomeOpt,
        ledger: Optional[Path] = typer.Option(None, "--ledger", help="SQLCipher ledger to erase from too "
                                              "(default HOME/ledger/ledger.db when it exists)"),
        ledger_key_file: Optional[Path] = typer.Option(None, "--ledger-key-file"),
        ledger_pg: Optional[str] = typer.Option(None, "--ledger-postgres", envvar="MARLGRC_LEDGER_PG_DSN",
                                                help="PostgreSQL ledger to erase from too"),
        schema: str = typer.Option("ledger", "--schema", help="PostgreSQL schema of that ledger"),
    ) -> None:
        """Erase one data subject: delete its ledger rows (with a tombstone) in every ledger, shred its
        key and blind-index row, then publish a compliance.deletion event. The request is recorded
        first; a re-run with the same --request-id completes whatever an interrupted run left."""
        from eventlog.kafka import BrokerUnavailable, DeliveryError
        from eventlog.privacy import run_erasure, shred_step

        who = requester or os.environ.get("USER", "")
        if not who.strip():
            fail("an erasure names who asked for it: pass --requester (or set $USER); nothing was changed", 2)
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        path = s.keystore
        if not path.exists():
            fail(f"no key store at {path}; pass the --home the producers ran with; nothing was changed", 2)
        # everything that can refuse is checked before anything changes: the broker, the ledgers' keys
        boot = s.resolve_bootstrap()
        ledgers = _ledger_steps(s, ledger, ledger_key_file, ledger_pg, schema, who)
        try:
            with LocalKeyStore(path) as keys:
                request = keys.open_erasure(request_id, namespace, subject, requester=who, legal_basis=legal_basis)
                if request is None:
                    fail(f"no key for this subject in namespace {namespace!r} and no request {request_id!r} on "
                         f"record (never seen, another namespace, or erased under another request id); "
                         f"nothing was changed", 2)
                before, results = run_erasure(keys, request, [*ledgers, shred_step(keys), publish_step(s, boot)])
        except PrivacyError as exc:
            fail(str(exc), 2)
        except (BrokerUnavailable, DeliveryError, KeyFileError) as exc:
            fail(f"request {request_id}: publishing its compliance.deletion event failed ({exc}); every step "
                 f"before it is done and recorded: run the same command again once Kafka is up", 2)
        if before:
            typer.echo(f"resumed request {request_id}: already done: {', '.join(before)}")
        counts = ", ".join(f"{t}={n}" for r in results.values() for t, n in r.items() if t not in ("seq", "event_hash"))
        event = results["kafka.compliance_deletion"]
        typer.echo(f"erased subject {request.subject_ref.hex()} in namespace {namespace!r} ({counts}); "
                   f"compliance.deletion seq {event['seq']} {event['event_hash']}")

"""CLI commands of the producers: ``marlgrc run`` (an env + policy to Kafka) and ``marlgrc forget``
(crypto-shred one data subject and publish a ``compliance.deletion`` event)."""
from __future__ import annotations

import importlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

from eventlog.chain import ChainHead
from eventlog.checkpoint import KeyFileError, Signer
from eventlog.privacy import FieldProtector, LocalKeyStore, PrivacyError, Shredded, deletion_payload

DELETIONS_TOPIC = "marl.compliance.deletions"
DELETIONS_CHAIN = "compliance:deletions"


def default_bootstrap() -> str:
    return os.environ.get("MARLGRC_BOOTSTRAP", "127.0.0.1:9092")


def default_prefix() -> str:
    return os.environ.get("MARLGRC_TOPIC_PREFIX", "")


def default_home() -> Path:
    return Path(os.environ.get("MARLGRC_HOME", Path.home() / ".local" / "state" / "marlgrc"))


def keystore_path(home: Path) -> Path:
    return Path(home) / "keys" / "subjects.db"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@dataclass(frozen=True)
class EnvSpec:
    factory: Callable[..., Any]
    env_id: str
    env_version: str
    spec: str


def resolve_env(spec: str) -> EnvSpec:
    """A built-in env name (``mailbox_v0``) or ``module:factory`` of any installed PettingZoo env."""
    from producers.envs import BUILTIN_ENVS

    target = BUILTIN_ENVS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--env {spec!r} is neither a built-in env ({', '.join(BUILTIN_ENVS)}) nor "
                         f"module:factory (e.g. mpe2.simple_spread_v3:parallel_env)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--env {spec!r}: cannot import {module_name} ({exc.__class__.__name__}: {exc}); "
                         f"is the package installed in this environment?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--env {spec!r}: {module_name} has no callable {attr!r}")
    name = spec if spec in BUILTIN_ENVS else getattr(module, "ENV_ID", None) or module_name.rsplit(".", 1)[-1]
    m = re.search(r"_v(\d+)$", name)
    version = getattr(module, "ENV_VERSION", None) or (m.group(1) if m else "0")
    return EnvSpec(factory, name, str(version), spec)


def parse_env_args(pairs: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env-arg {pair!r} must look like name=value (value as JSON, e.g. N=3)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _erase_from_ledger(subject_ref: bytes, home: Path, ledger: Optional[Path], key_file: Optional[Path],
                       pg: Optional[str], request_id: str, requester: str, legal_basis: str) -> list[tuple[str, int]]:
    """The ledger's part of an erasure (when a ledger is configured): rows deleted in one transaction
    with a tombstone. Returns (target, count) pairs for the compliance.deletion event."""
    from ledger.lifecycle import erase_subject

    from .commands_ledger import _open
    from .config import Settings

    s = Settings.load(home=home)
    path = ledger or s.home / "ledger" / "ledger.db"
    if not pg and not path.exists():
        return []
    store = _open(s, path, key_file, pg, "ledger")
    try:
        summary = erase_subject(store, subject_ref, request_id, requester, legal_basis)
    finally:
        close = getattr(store, "close", None)
        if close:
            close()
    return [(f"ledger.{table}", n) for table, n in sorted(summary.counts.items())]


def publish_deletion(shredded: Shredded, *, bootstrap: str, prefix: str, home: Path, request_id: str,
                     legal_basis: str, requester: str, extra_actions: Iterable[tuple[str, int]] = ()):
    """Append one ``compliance.deletion`` event to the deletions chain, resuming from its head on Kafka."""
    from eventlog.kafka import EventProducer, chain_head_from_topic, ensure_topics
    from eventlog.log import EventLog

    ensure_topics(bootstrap, prefix)
    seq, head = chain_head_from_topic(bootstrap, DELETIONS_TOPIC, DELETIONS_CHAIN, prefix)
    signer = Signer.load_or_create(Path(home) / "keys" / "signing.pem")
    producer = EventProducer(bootstrap, prefix=prefix, client_id="marlgrc-forget")
    # a producer id of its own, so this invocation's checkpoint chain starts fresh without forking another's
    log = EventLog(producer, run_id="compliance", producer_id=f"forget-{uuid.uuid4().hex[:12]}", signer=signer)
    log.writer(DELETIONS_TOPIC, DELETIONS_CHAIN, head=ChainHead(seq, head))
    event = log.append(DELETIONS_CHAIN, "compliance.deletion",
                       deletion_payload(shredded, request_id=request_id, requester=requester,
                                        legal_basis=legal_basis, extra_actions=extra_actions))
    log.close()
    return event


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        env: str = typer.Option(..., "--env", help="mailbox_v0 | sandbox_v0 | module:factory"),
        policy: str = typer.Option("random", "--policy", help="random | heuristic"),
        episodes: int = typer.Option(1, "--episodes", min=0),
        seed: int = typer.Option(0, "--seed"),
        env_arg: list[str] = typer.Option([], "--env-arg", help="factory argument name=value (repeatable)"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="cap per episode"),
        bootstrap: str = typer.Option(default_bootstrap, "--bootstrap", help="Kafka bootstrap servers"),
        prefix: str = typer.Option(default_prefix, "--prefix", help="topic prefix"),
        home: Path = typer.Option(default_home, "--home", help="state directory (keys)"),
        progress_bar: bool = typer.Option(True, "--progress/--no-progress"),
        algo: Optional[str] = typer.Option(None, "--algo", help="train on-policy through Kafka with this learner "
                                           "(mappo | ippo | dqn) instead of running a fixed policy"),
        iterations: int = typer.Option(10, "--iterations", help="with --algo: act/read-back/update rounds"),
    ) -> None:
        """Run an environment with a policy for N episodes and write every step to Kafka; prints the run id.
        With --algo, the policy is a learner trained from the events it reads back from the broker."""
        if algo is not None:
            from .commands_learners import train_online_main

            train_online_main(env=env, algo=algo, iterations=iterations, seed=seed, home=home,
                              bootstrap=bootstrap, prefix=prefix)
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from eventlog.kafka import BrokerUnavailable, DeliveryError, EventProducer, ensure_topics
        from eventlog.log import EventLog
        from producers.harness import HarnessError, run_episodes
        from producers.policies import builtin_policy

        try:
            spec = resolve_env(env)
            kwargs = parse_env_args(env_arg)
            the_env = spec.factory(**kwargs)
            the_policy = builtin_policy(policy, the_env, seed)
        except (ValueError, TypeError) as exc:
            raise _fail(str(exc)) from None
        protector, keys = None, None
        try:
            if hasattr(the_env, "subject_fields"):
                keys = LocalKeyStore(keystore_path(home))
                protector = FieldProtector(keys)
            signer = Signer.load_or_create(Path(home) / "keys" / "signing.pem")
        except (PrivacyError, KeyFileError) as exc:
            raise _fail(str(exc)) from None
        run_id = f"{spec.env_id}__{policy}__{seed}__{int(time.time())}__{uuid.uuid4().hex[:6]}"
        console = Console(stderr=True)
        try:
            ensure_topics(bootstrap, prefix)
            producer = EventProducer(bootstrap, prefix=prefix, client_id="marlgrc-run")
            log = EventLog(producer, run_id=run_id, producer_id=f"harness-{uuid.uuid4().hex[:8]}", signer=signer)
            steps_hint = getattr(the_env, "max_cycles", None) or getattr(the_env, "inbox_size", None)
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, disable=not progress_bar) as bar:
                task = bar.add_task(f"{spec.env_id} steps", total=episodes * steps_hint if steps_hint else None)
                summary = run_episodes(the_env, the_policy, log, episodes=episodes, seed=seed, env_id=spec.env_id,
                                       env_version=spec.env_version,
                                       config={"env_spec": spec.spec, "env_args": kwargs, "policy": policy,
                                               "max_steps": max_steps},
                                       progress=lambda n: bar.advance(task, n), protector=protector,
                                       max_steps=max_steps)
            log.close()
        except (BrokerUnavailable, DeliveryError, HarnessError) as exc:
            raise _fail(str(exc)) from None
        finally:
            if keys is not None:
                keys.close()
        console.print(f"run {run_id}: {summary.episodes} episodes, {summary.steps} steps, {summary.events} events, "
                      f"mean return {summary.mean_return:.3f}")
        typer.echo(run_id)

    @app.command("forget")
    def forget_cmd(
        subject: str = typer.Option(..., "--subject", help="the data subject's raw identifier"),
        namespace: str = typer.Option(..., "--namespace", help="e.g. user, sender"),
        request_id: str = typer.Option(..., "--request-id"),
        legal_basis: str = typer.Option(..., "--legal-basis", help="e.g. GDPR Art. 17(1)(b)"),
        requester: str = typer.Option("", "--requester"),
        bootstrap: str = typer.Option(default_bootstrap, "--bootstrap"),
        prefix: str = typer.Option(default_prefix, "--prefix"),
        home: Path = typer.Option(default_home, "--home"),
        ledger: Optional[Path] = typer.Option(None, "--ledger", help="SQLCipher ledger to erase from too "
                                              "(default HOME/ledger/ledger.db when it exists)"),
        ledger_key_file: Optional[Path] = typer.Option(None, "--ledger-key-file"),
        ledger_pg: Optional[str] = typer.Option(None, "--ledger-postgres", envvar="MARLGRC_LEDGER_PG_DSN",
                                                help="PostgreSQL ledger to erase from too"),
    ) -> None:
        """Erase one data subject: shred its key and blind-index row, delete its ledger rows (with a
        tombstone), publish a compliance.deletion event."""
        from eventlog.kafka import BrokerUnavailable, DeliveryError

        path = keystore_path(home)
        if not path.exists():
            raise _fail(f"no key store at {path}; pass the --home the producers ran with")
        try:
            with LocalKeyStore(path) as keys:
                shredded = keys.shred(namespace, subject)
        except PrivacyError as exc:
            raise _fail(str(exc)) from None
        if shredded is None:
            raise _fail(f"no key for this subject in namespace {namespace!r} (already erased, never seen, or "
                        f"another namespace); nothing was deleted", 2)
        who = requester or os.environ.get("USER", "")
        ledger_counts = _erase_from_ledger(shredded.subject_ref, home, ledger, ledger_key_file, ledger_pg,
                                           request_id, who, legal_basis)
        try:
            event = publish_deletion(shredded, bootstrap=bootstrap, prefix=prefix, home=home,
                                     request_id=request_id, legal_basis=legal_basis, requester=who,
                                     extra_actions=ledger_counts)
        except (BrokerUnavailable, DeliveryError, KeyFileError) as exc:
            raise _fail(f"the key of subject {shredded.subject_ref.hex()} was shredded but the deletion event for "
                        f"request {request_id} was not published ({exc}); publish it again once Kafka is up") from None
        typer.echo(f"erased subject {shredded.subject_ref.hex()} in namespace {namespace!r}: "
                   f"{shredded.keys_deleted} key, {shredded.index_rows_deleted} blind-index row; "
                   f"compliance.deletion seq {event.seq} {event.event_hash.hex()}")

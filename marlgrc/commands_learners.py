"""`marlgrc train`: train a learner from a run's topics (or an auditor's bundle), with lineage,
signed checkpoints and ONNX export; `marlgrc train-online`: on-policy through Kafka."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .config import Settings

console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    @app.command()
    def train(run: Optional[str] = typer.Option(None, "--run", help="run id to train from"),
              algo: str = typer.Option("mappo", "--algo", help="mappo | ippo | dqn"),
              allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                                    help="train even if a chain fails verification (lineage says so)"),
              seed: int = typer.Option(1, "--seed"),
              updates: int = typer.Option(1, "--updates", help="updates over the replayed episodes"),
              resume: Optional[Path] = typer.Option(None, "--resume", help="signed checkpoint to resume from"),
              onnx: Optional[Path] = typer.Option(None, "--onnx", help="also export the policy to this ONNX file"),
              out: Optional[Path] = typer.Option(None, "--out", help="checkpoint path (default HOME/checkpoints/RUN__ALGO__SEED)"),
              bundle: Optional[Path] = typer.Option(None, "--bundle", help="read an exported bundle instead of Kafka"),
              public_key: Optional[Path] = typer.Option(None, "--public-key", help="trusted Ed25519 public key (PEM)"),
              home: Optional[Path] = typer.Option(None, "--home"),
              bootstrap: Optional[str] = typer.Option(None, "--bootstrap"),
              prefix: Optional[str] = typer.Option(None, "--prefix")) -> None:
        """Train ALGO from the events of run RUN: verified replay, policy.update lineage, signed checkpoint."""
        from eventlog.checkpoint import KeyFileError, Signer, load_public_key
        from eventlog.kafka import BrokerUnavailable, EventProducer
        from eventlog.log import EventLog, MemorySink
        from learners import algorithm
        from learners.checkpoint import CheckpointError, learner_from_checkpoint, load_signing_key, save_checkpoint
        from learners.export import export_onnx
        from learners.offline import train_offline
        from learners.replay import ReplayError, read_bundle_run, read_kafka

        try:
            algorithm(algo)
        except KeyError as exc:
            _fail(str(exc.args[0]))
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        try:
            signer = Signer.load_or_create(s.signing_key)
            key = load_signing_key(s.signing_key)
            pk = load_public_key(public_key) if public_key else None
        except KeyFileError as exc:
            _fail(str(exc))
        try:
            if bundle is not None:
                replay = read_bundle_run(bundle, run, public_key=pk, allow_unverified=allow_unverified)
                boot = s.bootstrap
            else:
                if run is None:
                    _fail("name the run to train from with --run (or give --bundle)")
                boot = s.resolve_bootstrap()
                replay = read_kafka(boot, run, prefix=s.prefix, public_key=pk or signer.public_key,
                                    allow_unverified=allow_unverified)
        except (ReplayError, BrokerUnavailable, KeyError) as exc:
            _fail(str(exc))
        if not replay.episodes:
            _fail(f"run {replay.spec.run_id}: no complete episode in its topics; nothing to train on")
        if not replay.verified:
            console.print("[yellow]warning:[/] training on a stream that failed verification; lineage says verified=false")
        learner = None
        if resume is not None:
            try:
                learner = learner_from_checkpoint(resume, signer.public_key if pk is None else pk)
            except CheckpointError as exc:
                _fail(str(exc))
        sink = EventProducer(boot, prefix=s.prefix) if boot else MemorySink()
        log = EventLog(sink, run_id=replay.spec.run_id, producer_id=f"learner-{algo}", signer=signer)
        try:
            learner, events = train_offline(replay, algo, log=log, seed=seed, updates=updates, learner=learner)
        except ReplayError as exc:
            _fail(str(exc))
        log.close()
        base = out or s.home / "checkpoints" / f"{replay.spec.run_id}__{algo}__{seed}" / "policy"
        save_checkpoint(base, learner, key)
        if isinstance(sink, MemorySink):
            from eventlog.bundle import write_bundle
            from eventlog.checkpoint import public_key_pem
            from learners.replay import records_from_memory

            write_bundle(Path(str(base) + ".updates"), records_from_memory(sink.sent),
                         public_key_pem=public_key_pem(signer.public_key))
        if onnx is not None:
            export_onnx(learner, onnx)
        typer.echo(f"run {replay.spec.run_id}: {len(replay.episodes)} episodes, {replay.env_steps} steps "
                   f"(verified={replay.verified}); {algo} {learner.version}, {learner.optimizer_steps} optimizer steps; "
                   f"{len(events)} policy.update event(s); checkpoint {base}.pt"
                   + (f"; onnx {onnx}" if onnx else ""))

    @app.command("train-online")
    def train_online_cmd(env: str = typer.Option("simple_spread_v3", "--env"),
                         algo: str = typer.Option("mappo", "--algo", help="mappo | ippo | dqn"),
                         iterations: int = typer.Option(10, "--iterations", help="act/read/update rounds"),
                         seed: int = typer.Option(1, "--seed"),
                         continuous: bool = typer.Option(False, "--continuous"),
                         out: Optional[Path] = typer.Option(None, "--out", help="checkpoint path"),
                         home: Optional[Path] = typer.Option(None, "--home"),
                         bootstrap: Optional[str] = typer.Option(None, "--bootstrap"),
                         prefix: Optional[str] = typer.Option(None, "--prefix")) -> None:
        """On-policy training through Kafka: act with the current policy, read the events back, update."""
        train_online_main(env=env, algo=algo, iterations=iterations, seed=seed, continuous=continuous, out=out,
                          home=home, bootstrap=bootstrap, prefix=prefix)


def train_online_main(*, env: str, algo: str, iterations: int, seed: int, continuous: bool = False,
                      out: Optional[Path] = None, home: Optional[Path] = None, bootstrap: Optional[str] = None,
                      prefix: Optional[str] = None) -> None:
    """`train-online`, and `run --env E --algo A`: every transition goes through the broker and the
    learner reads its data back from it."""
    from eventlog.checkpoint import Signer
    from eventlog.kafka import ensure_topics
    from learners.checkpoint import load_signing_key, save_checkpoint

    from .online import KafkaTransport, make_env, train_online

    s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
    boot = s.resolve_bootstrap()
    ensure_topics(boot, s.prefix)
    signer = Signer.load_or_create(s.signing_key)
    e, env_id, ver = make_env(env, continuous=continuous)
    keys = protector = None
    if hasattr(e, "subject_fields"):  # an env with personal data runs only behind the key store
        from eventlog.privacy import FieldProtector, LocalKeyStore

        from .commands_producers import keystore_path

        keys = LocalKeyStore(keystore_path(s.home))
        protector = FieldProtector(keys)
    transport = KafkaTransport(boot, s.prefix)
    try:
        res = train_online(e, env_id, ver, algo, transport=transport, iterations=iterations, protector=protector,
                           seed=seed, signer=signer, public_key=signer.public_key,
                           on_update=lambda r: typer.echo(f"update {r['iteration']}: env steps {r['env_steps']}, "
                                                          f"return {r['charts/episodic_return']:.2f}"))
    finally:
        close = getattr(transport, "close", None)
        if close:
            close()
        if keys is not None:
            keys.close()
    base = out or s.home / "checkpoints" / f"{res.run_id}" / "policy"
    save_checkpoint(base, res.learner, load_signing_key(s.signing_key))
    typer.echo(f"run {res.run_id}: {res.learner.version}; checkpoint {base}.pt")
    typer.echo(res.run_id)

"""The marlgrc command line: the only place that wires the parts together."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import BootOpt, HomeOpt, PrefixOpt, Settings
from .errors import Commands, fail
from .progress import Backlog, ProgressOpt, console, counted, progress_bar

app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True,
                  help="Event-sourced, audit-first multi-agent RL on Apache Kafka.")
out = Console() if Console().is_terminal else Console(width=160)


# ---------------------------------------------------------------- services
@app.command()
def up(home: Optional[Path] = HomeOpt, port: Optional[int] = typer.Option(None, help="Kafka port (default: free)"),
       postgres: bool = typer.Option(False, "--postgres/--no-postgres", help="also start PostgreSQL 15"),
       brokers: int = typer.Option(1, "--brokers", help="1: one broker; 3: a 3-node KRaft cluster (topics "
                                   "then get replication factor 3, min.insync.replicas=2)"),
       prefix: Optional[str] = PrefixOpt) -> None:
    """Start a local Kafka broker or a 3-broker cluster (and optionally PostgreSQL) and create the
    marl.* topics. The services keep running after `up` until `down`; an `up` interrupted (Ctrl-C,
    SIGTERM, SIGHUP) before it finished stops those it had started, and exits 130."""
    from compose import ServiceError, kafka_status, postgres_status, start_kafka, start_postgres
    from compose.services import raise_on_stop_signals, restore_handlers
    from eventlog.kafka import ensure_topics

    s = Settings.load(home=home, prefix=prefix)
    starting: list[str] = []   # the services this `up` starts (not running before it): stopped if interrupted
    already: list[str] = []    # those that ran before it: left running
    handlers = raise_on_stop_signals()   # SIGTERM/SIGHUP unwind like Ctrl-C instead of ending the process at once
    try:
        (starting if kafka_status(s.home) is None else already).append("kafka")
        with console.status("starting Kafka (first run fetches its jars from Maven Central)…"):
            broker = start_kafka(s.home, port, brokers=brokers)
        created = ensure_topics(broker.bootstrap, s.prefix)
        pids = ", ".join(str(n.pid) for n in broker.nodes) if hasattr(broker, "nodes") else broker.pid
        out.print(f"kafka {broker.bootstrap} (pid {pids}); topics created: {len(created)}")
        if postgres:
            (starting if postgres_status(s.home) is None else already).append("postgres")
            with console.status("starting PostgreSQL…"):
                pg = start_postgres(s.home)
            out.print(f"postgres {pg.dsn} (pid {pg.pid})")
    except ServiceError as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:
        _stop_started(s.home, starting)
        typer.echo(f"interrupted ({exc or 'SIGINT'}): stopped what this `up` had started "
                   f"({', '.join(starting) or 'nothing'})"
                   + (f"; left running what ran before it ({', '.join(already)})" if already else ""),
                   err=True)
        raise typer.Exit(130) from None
    finally:
        restore_handlers(handlers)


def _stop_started(home: Path, services: list[str]) -> None:
    """Stop ``services`` (kafka, postgres) of ``home``, last started first, with signals held (a second
    Ctrl-C cannot cut the stop short). A ``start_*`` interrupted while it waited has already stopped
    its process; this catches the rest (a service that answered before the interrupt)."""
    from compose import stop_kafka, stop_postgres
    from compose.services import signals_held

    with signals_held():
        for name in reversed(services):
            (stop_postgres if name == "postgres" else stop_kafka)(home)


@app.command()
def down(home: Optional[Path] = HomeOpt,
         purge: bool = typer.Option(False, "--purge", help="also delete the broker's and database's data")) -> None:
    """Stop the local services started by `up` (Ctrl-C and SIGTERM wait until they are stopped)."""
    from compose import stop_kafka, stop_postgres
    from compose.services import signals_held

    s = Settings.load(home=home)
    with signals_held():
        k = stop_kafka(s.home, remove_data=purge)
        p = stop_postgres(s.home, remove_data=purge)
    out.print(f"kafka {'stopped' if k else 'was not running'}; postgres {'stopped' if p else 'was not running'}")


@app.command()
def status(home: Optional[Path] = HomeOpt) -> None:
    """Show the local services."""
    from compose import kafka_status, postgres_status

    s = Settings.load(home=home)
    k, p = kafka_status(s.home), postgres_status(s.home)
    pids = (", ".join(str(n.pid) for n in k.nodes) if hasattr(k, "nodes") else k.pid) if k else None
    out.print(f"kafka: {f'{k.bootstrap} pid {pids}' if k else 'not running'}")
    out.print(f"postgres: {f'{p.dsn} pid {p.pid}' if p else 'not running'}")
    if k is None:
        raise typer.Exit(1)


# ---------------------------------------------------------------- demo
@app.command()
def demo(home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt,
         episodes: int = typer.Option(20, min=1, help="mailbox_v0 episodes of each run (random behaviour, "
                                      "then trained)"),
         updates: int = typer.Option(5, min=1, help="DQN updates over the behaviour run's replayed episodes"),
         seed: int = typer.Option(0)) -> None:
    """The main job end to end: start Kafka if needed; run mailbox_v0 with a random policy through the
    producers and a stream processor worker; retrain DQN from the run's topics (verified replay,
    lineage, signed checkpoint); act with the trained policy in a second run; materialize both into the
    encrypted ledger; verify everything; print where to look and the return before and after training."""
    from compose import ServiceError, start_kafka
    from eventlog.kafka import BrokerUnavailable, DeliveryError

    from .main_job import run_main_job, summary_lines, where_to_look

    s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
    boot = s.bootstrap
    if boot is None:
        try:
            with console.status("starting Kafka (the first run fetches its jars from Maven Central)…"):
                boot = start_kafka(s.home).bootstrap
        except ServiceError as exc:
            fail(str(exc))
    try:
        result = run_main_job(s, boot, episodes=episodes, seed=seed, updates=updates,
                              say=lambda line: out.print(line, highlight=False))
    except (BrokerUnavailable, DeliveryError) as exc:
        fail(str(exc))
    for line in [*result.lines, *where_to_look(result, s, boot), *summary_lines(result)]:
        out.print(line, highlight=False)
    for run in result.runs:
        out.print(f"verdict: {'VERIFIED' if result.run_ok(run) else 'BROKEN'} (run {run.run_id})")
    if not result.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------- audit
def _print_report(report) -> None:
    table = Table("topic", "chain", "events", "last seq", "signed through", "first break")
    for c in report.chains:
        table.add_row(c.topic, c.chain_id, str(c.events), str(c.last_seq), str(c.signed_through_seq),
                      c.first_break.describe() if c.first_break else "-")
    out.print(table)
    for n in report.notes:
        console.print(f"[yellow]note:[/] {n}")


def _verify_and_print(boot: str, prefix: str, run_id: str | None, public_key, trusted=None):
    from eventlog.audit import verify_kafka

    report, _ = verify_kafka(boot, prefix=prefix, run_id=run_id, public_key=public_key, trusted=trusted)
    _print_report(report)
    return report.ok


def _public_key(path: Optional[Path], s: Settings, bundle: Optional[Path] = None):
    from eventlog.bundle import bundle_public_key
    from eventlog.checkpoint import KeyFileError, Signer, load_public_key

    try:
        if path is not None:
            return load_public_key(path)
        if bundle is not None and bundle_public_key(bundle) is not None:
            console.print("[yellow]note:[/] trusting the public key shipped in the bundle; pin your own with --public-key")
            return load_public_key(bundle_public_key(bundle))
        if s.signing_key.exists():
            return Signer.load(s.signing_key).public_key
    except KeyFileError as exc:
        fail(str(exc))
    return None


@app.command()
def verify(run: Optional[str] = typer.Option(None, "--run", help="only the chains of this run"),
           bundle: Optional[Path] = typer.Option(None, "--bundle", help="verify an exported bundle instead of Kafka"),
           public_key: Optional[Path] = typer.Option(None, "--public-key", help="trusted Ed25519 public key (PEM)"),
           trusted: Optional[Path] = typer.Option(None, "--trusted", help="trusted-state file: checked, then extended"),
           as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
           ledger: bool = typer.Option(False, "--ledger", help="verify the ledger's stored events instead "
                                       "(purged and erased ranges bridged by their evidence)"),
           ledger_file: Optional[Path] = typer.Option(None, "--ledger-file", help="SQLCipher ledger (default HOME/ledger/ledger.db)"),
           ledger_key_file: Optional[Path] = typer.Option(None, "--ledger-key-file"),
           ledger_pg: Optional[str] = typer.Option(None, "--ledger-postgres", envvar="MARLGRC_LEDGER_PG_DSN"),
           schema: str = typer.Option("ledger", "--schema", help="PostgreSQL schema of the --ledger-postgres ledger"),
           require_signed: Optional[bool] = typer.Option(
               None, "--require-signed/--allow-unsigned",
               help="every event must be covered by a signed checkpoint (default: with --bundle and --public-key; "
                    "otherwise only a finished run's events must be)"),
           progress: bool = ProgressOpt,
           home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Verify hash chains and signed checkpoints, of Kafka topics, a bundle or the ledger. Exit 1 on any break
    (a damaged bundle too); exit 2 when it could not read what it was asked to verify."""
    from eventlog.audit import DATA_TOPICS, verify_bundle, verify_kafka
    from eventlog.bundle import BundleError, NotABundle, read_manifest
    from eventlog.kafka import BrokerUnavailable
    from eventlog.verify import TrustedState

    s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
    key = _public_key(public_key, s, bundle)
    if ledger:
        from ledger.verify import verify_ledger

        from .commands_ledger import open_ledger

        store = open_ledger(s, ledger_file, ledger_key_file, ledger_pg, schema)
        lrep = verify_ledger(store, key)
        for line in lrep.lines():
            out.print(line, highlight=False)
        if not lrep.ok:
            raise typer.Exit(1)
        return
    state = TrustedState.load(trusted) if trusted else None
    try:
        with progress_bar("verifying", unit="events", enabled=progress) as bar:
            if bundle is not None:
                try:  # the data events; the progress callback does not count the checkpoints, read first
                    manifest = read_manifest(bundle)
                    total = manifest["events"] - manifest["topics"].get("marl.audit.checkpoints", 0)
                except BundleError:
                    total = None  # verify_bundle says what is wrong with it
                bar.update(what=f"verifying bundle {bundle}", total=None if run else total)
                # a key given with --public-key is pinned: the manifest must be signed with it
                report, verifier = verify_bundle(bundle, public_key=key, pinned=public_key is not None,
                                                 require_signed=require_signed, trusted=state, run_id=run,
                                                 progress=bar.advance)
            else:
                boot = s.resolve_bootstrap()
                if run is None and bar.shown:  # whole topics: every offset is read, so the ends are the total
                    backlog = Backlog(boot, DATA_TOPICS, s.prefix)
                    bar.update(total=backlog.total())
                    backlog.close()
                bar.update(what=f"verifying {f'run {run}' if run else 'every chain'} on {boot}")
                report, verifier = verify_kafka(boot, prefix=s.prefix, run_id=run, public_key=key,
                                                trusted=state, require_signed=bool(require_signed),
                                                progress=bar.advance)
            bar.finish()
    except NotABundle as exc:
        fail(str(exc))
    except BundleError as exc:  # damaged or incomplete: it does not verify
        fail(f"the bundle does not verify: {exc}", 1)
    except (BrokerUnavailable, KeyError) as exc:
        fail(str(exc).strip("'\""))
    if as_json:
        out.print_json(report.to_json())
    else:
        _print_report(report)
        out.print(f"{report.events} events in {len(report.chains)} chains: "
                  f"{'no break' if report.ok else f'{len(report.breaks)} chain(s) broken'}")
    if trusted and report.ok:
        verifier.trusted_after().save(trusted)
    if not report.ok:
        raise typer.Exit(1)


@app.command("export")
def export(out_dir: Path = typer.Option(..., "--out", help="bundle folder to write"),
           run: Optional[str] = typer.Option(None, "--run", help="only this run's chains (default: whole topics)"),
           progress: bool = ProgressOpt,
           home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Export topics (or one run) to an auditor's bundle: exact event bytes, checkpoints, public key."""
    from eventlog.audit import DATA_TOPICS
    from eventlog.bundle import write_bundle
    from eventlog.checkpoint import Signer, public_key_pem
    from eventlog.kafka import Record, record_batches
    from eventlog.verify import CHECKPOINT_TOPIC

    s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
    boot = s.resolve_bootstrap()
    signer = Signer.load(s.signing_key) if s.signing_key.exists() else None
    key = signer.public_key if signer else None
    topics = [CHECKPOINT_TOPIC, *DATA_TOPICS]
    with progress_bar(f"reading {'run ' + run if run else 'every topic'} from {boot}", unit="events",
                      enabled=progress) as bar:
        if bar.shown:  # every offset is read (a run's chains are picked out of whole topics)
            backlog = Backlog(boot, topics, s.prefix)
            bar.update(total=backlog.total())
            backlog.close()

        def records():
            for batch in record_batches(boot, topics, prefix=s.prefix, timestamps=True):
                bar.advance(len(batch))
                for r in map(Record._make, batch):
                    if run is None or r.key.startswith(f"{run}:"):
                        yield r
        manifest = write_bundle(out_dir, records(), public_key_pem=public_key_pem(key) if key else None,
                                meta={"run_id": run, "source": boot, "prefix": s.prefix}, signer=signer)
        bar.finish()
    out.print(f"bundle {out_dir}: {manifest['events']} events ({', '.join(f'{t}={n}' for t, n in manifest['topics'].items())})")


@app.command("import")
def import_bundle(bundle: Path = typer.Argument(..., help="bundle folder written by `marlgrc export`"),
                  progress: bool = ProgressOpt,
                  home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt,
                  prefix: Optional[str] = PrefixOpt) -> None:
    """Produce a bundle's events back to Kafka, byte for byte, keyed by chain id."""
    from eventlog.bundle import BundleError, read_bundle, read_manifest
    from eventlog.kafka import EventProducer, ensure_topics

    s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
    boot = s.resolve_bootstrap()
    try:
        manifest = read_manifest(bundle)
        ensure_topics(boot, s.prefix)
        producer = EventProducer(boot, prefix=s.prefix, client_id="marlgrc-import")
        with progress_bar(f"importing {bundle} into {boot}", manifest["events"], unit="events",
                          enabled=progress) as bar:
            for r in counted(read_bundle(bundle), bar):
                producer.send(r.topic, r.key, r.value)
            n = int(bar.completed)
            bar.update(what=f"waiting for {boot} to acknowledge")
            producer.flush()
    except BundleError as exc:
        fail(str(exc))
    out.print(f"imported {n} events into {boot} (prefix {s.prefix!r})")


@app.command()
def prove(topic: str = typer.Option(..., help="logical topic, e.g. marl.joint.action"),
          chain: str = typer.Option(..., help="chain id (the Kafka key)"),
          seq: int = typer.Option(..., help="the event's seq"),
          bundle: Optional[Path] = typer.Option(None, "--bundle"),
          public_key: Optional[Path] = typer.Option(None, "--public-key"),
          home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Print (and check) the inclusion proof of one event against the signed checkpoint covering it."""
    from eventlog.audit import ProofError, prove_inclusion, records_for_proof

    s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
    key = _public_key(public_key, s, bundle)
    boot = None if bundle is not None else s.resolve_bootstrap()
    try:
        proof = prove_inclusion(records_for_proof(boot, bundle, topic, chain, s.prefix), topic, chain, seq, key)
    except ProofError as exc:
        fail(str(exc))
    out.print_json(json.dumps(proof.to_json()))


@app.command("public-key")
def public_key_cmd(home: Optional[Path] = HomeOpt) -> None:
    """Print the checkpoint signer's public key (PEM), for auditors to pin."""
    from eventlog.checkpoint import Signer, public_key_pem

    s = Settings.load(home=home)
    sys.stdout.write(public_key_pem(Signer.load_or_create(s.signing_key).public_key).decode())


# ---------------------------------------------------------------- the other parts' commands
from . import commands_dashboard, commands_ingest, commands_learners, commands_ledger  # noqa: E402
from . import commands_processors, commands_producers  # noqa: E402

commands_producers.register(app)
commands_ledger.register(app)
commands_learners.register(app)
commands_processors.register(app)
commands_dashboard.register(app)
commands_ingest.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""CLI commands of the ledger: ``marlgrc ledger sync|purge|verify|rebuild|erase|keygen`` and
``marlgrc report --run R``. Wired into ``marlgrc.cli`` with ``register(app)``."""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from .config import BootOpt, HomeOpt, PrefixOpt, Settings
from .errors import fail
from .metrics import LedgerSyncMetrics, exporter, metrics_port_option
from .progress import Backlog, ProgressOpt, progress_bar

LedgerOpt = typer.Option(None, "--ledger", help="SQLCipher ledger file (default HOME/ledger/ledger.db)")
KeyOpt = typer.Option(None, "--key-file", help="ledger key file, 64 hex chars, mode 0600 "
                                               "(default: $MARLGRC_LEDGER_KEY, else HOME/keys/ledger.key)")
PgOpt = typer.Option(None, "--postgres", envvar="MARLGRC_LEDGER_PG_DSN",
                     help="use the PostgreSQL ledger at this DSN instead of SQLCipher")
SchemaOpt = typer.Option("ledger", "--schema", help="PostgreSQL schema of the ledger")


def _key_provider(s: Settings, key_file: Optional[Path], create: bool):
    from ledger.keys import ENV_VAR, EnvKey, KeyFile

    if key_file is not None:
        return KeyFile(key_file)
    if os.environ.get(ENV_VAR):
        return EnvKey()
    default = s.ledger_key
    if not default.exists() and create:
        typer.echo(f"created ledger key file {default} (mode 0600); back it up: without it the ledger is unreadable",
                   err=True)
        return KeyFile.create(default)
    return KeyFile(default)


def _ledger_path(s: Settings, ledger: Optional[Path]) -> Path:
    return ledger or s.ledger_file


def _command_name() -> str:
    """The running command as a user typed it (`marlgrc ledger verify`), for error messages."""
    import importlib

    for module in ("typer._click.globals", "click.globals"):  # typer >= 0.16 carries its own click
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None:
            names = []
            while ctx.parent is not None:  # the root's name is however the program was started
                names.append(ctx.info_name)
                ctx = ctx.parent
            return "`" + " ".join(["marlgrc", *reversed(names)]) + "`"
    return "this command"


def open_ledger(s: Settings, ledger: Optional[Path], key_file: Optional[Path], pg: Optional[str], schema: str,
                *, create: bool = False, install: bool = False, need: str = "read"):
    """The ledger a command works on: PostgreSQL at ``pg``, else the SQLCipher file (default under home)
    with its key (``key_file``, ``$MARLGRC_LEDGER_KEY``, else the home's key file).

    On PostgreSQL the connection's role is checked first for what the command needs (``need``: read,
    sync, purge, erase, install; ``ledger.postgres.NEEDS``), so a role without a privilege gets one line
    saying which, instead of a refusal halfway through. Every failure here exits 2."""
    from ledger import LedgerError, LedgerKeyError, SqliteLedger

    try:
        if pg:
            from ledger.postgres import PostgresLedger, install as pg_install

            if install:
                pg_install(pg, schema)
            store = PostgresLedger(pg, schema)
            try:
                store.require(need, _command_name())
            except BaseException:
                store.close()
                raise
            return store
        path = _ledger_path(s, ledger)
        if not path.exists():
            if not create:
                fail(f"no ledger at {path}; create it with `marlgrc ledger sync`")
            # the file first (empty, mode 0600: a new ledger), so a path that cannot be written fails
            # before a key is made for it
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        new = path.stat().st_size == 0
        return SqliteLedger(path, _key_provider(s, key_file, create=create and new))
    except (LedgerKeyError, LedgerError) as exc:
        fail(str(exc))
    except ValueError as exc:  # a schema name PostgreSQL would not take
        fail(f"{exc}; pass --schema with such a name")
    except OSError as exc:
        fail(f"cannot open the ledger file {exc.filename or _ledger_path(s, ledger)}: {exc.strerror}; "
             f"pass --ledger with a path this user can create and write")


@contextmanager
def ledger_errors(store=None, doing: str = "") -> Iterator[None]:
    """Turn what the ledger or its database raises mid-command into one line and exit 2: the
    ledger's own errors, and a database's refusal (a role without a privilege, a server gone)
    as ``store.explain`` words it."""
    from ledger import LedgerError, LedgerKeyError

    try:
        yield
    except (LedgerError, LedgerKeyError) as exc:
        fail(f"{doing}{exc}")
    except (KeyboardInterrupt, SystemExit, typer.Exit):
        raise
    except Exception as exc:  # noqa: BLE001 - only what the store recognizes as its database's
        explain = getattr(store, "explain", None)
        message = explain(exc) if explain is not None else None
        if message is None:
            raise
        fail(f"{doing}{message}")


def register(app: typer.Typer) -> None:
    ledger_app = typer.Typer(no_args_is_help=True, help="The encrypted ledger: sync, purge, erase, verify, rebuild.")
    app.add_typer(ledger_app, name="ledger")

    @ledger_app.command("keygen")
    def keygen(key_file: Path = typer.Option(..., "--key-file", help="where to write the new key (mode 0600)")) -> None:
        """Create a new random ledger key file (never printed)."""
        from ledger.keys import KeyFile, LedgerKeyError

        try:
            KeyFile.create(key_file)
        except LedgerKeyError as exc:
            fail(str(exc))
        typer.echo(f"wrote {key_file} (mode 0600)")

    @ledger_app.command("sync")
    def sync_cmd(follow: bool = typer.Option(False, "--follow", help="keep reading new events until interrupted"),
                 batch: int = typer.Option(5000, "--batch", min=1, help="events per transaction"),
                 poll: float = typer.Option(1.0, "--poll", help="seconds between polls in --follow mode"),
                 install: bool = typer.Option(True, "--install/--no-install",
                                              help="PostgreSQL: create schema, roles and grants (needs a superuser)"),
                 progress: bool = ProgressOpt,
                 metrics_port: Optional[int] = metrics_port_option("ledger"),
                 home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                 key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt, schema: str = SchemaOpt,
                 bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt) -> None:
        """Materialize every marl.* topic into the ledger (one-shot, or --follow)."""
        import schemas
        from eventlog.kafka import BrokerUnavailable
        from ledger import sync

        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        registry = exporter(metrics_port)  # first: a port in use stops it before a ledger is created
        syncing = LedgerSyncMetrics(registry) if registry is not None else None
        store = open_ledger(s, ledger, key_file, postgres, schema, create=True, install=install, need="sync")
        stop = {"now": False}

        def _stop(*_):
            stop["now"] = True

        old = signal.signal(signal.SIGTERM, _stop)
        try:
            with ledger_errors(store), progress_bar(f"{'following' if follow else 'reading'} the marl.* topics into "
                                                    f"the ledger", unit="offsets", enabled=progress) as bar:
                boot = s.resolve_bootstrap()
                # the topics' end offsets against the ledger's: how far along, and the consumer lag
                backlog = Backlog(boot, schemas.TOPICS, s.prefix) if bar.shown or syncing else None
                start: dict = {}

                def at(positions: dict) -> None:
                    if backlog is None:
                        return
                    start.setdefault("offsets", positions)  # the first call: where this sync began
                    lag = backlog.lag(positions)
                    if syncing is not None:
                        syncing.set_lag(lag)
                    total = backlog.total(start["offsets"])
                    bar.update(total=total, completed=total - sum(lag.values()))

                stats = sync(store, boot, prefix=s.prefix, follow=follow, poll_interval=poll,
                             commit_every=batch, should_stop=lambda: stop["now"],
                             on_batch=None if syncing is None else syncing.batch, on_position=at)
                bar.finish()
                if backlog is not None:
                    backlog.close()
        except KeyboardInterrupt:
            typer.echo("interrupted; every committed batch is kept, the next sync resumes from there", err=True)
            raise typer.Exit(130) from None
        except (BrokerUnavailable, KeyError) as exc:
            fail(str(exc).strip("'\""))
        finally:
            signal.signal(signal.SIGTERM, old)
            store.close()
        typer.echo(f"ingested {stats.records} events in {stats.batches} transactions "
                   f"({stats.rate:,.0f} events/s); {len(stats.findings)} integrity findings")
        if stats.deletions or stats.erased_rows:
            typer.echo(f"applied {len(stats.deletions)} compliance.deletion events"
                       f"{' (' + ', '.join(dict.fromkeys(stats.deletions)) + ')' if stats.deletions else ''}; "
                       f"{stats.erased_rows} rows of erased subjects deleted with evidence")
        for f in stats.findings[:20]:
            typer.echo(f"FINDING {f.describe()}")
        if stats.findings:
            raise typer.Exit(1)

    @ledger_app.command("purge")
    def purge_cmd(now: Optional[int] = typer.Option(None, "--now", help="cutoff in UTC microseconds (default: now)"),
                  home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                  key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt,
                  schema: str = SchemaOpt) -> None:
        """Delete rows past their retention_expiry in one transaction, with evidence in deletion_events."""
        from ledger import purge_expired

        s = Settings.load(home=home)
        store = open_ledger(s, ledger, key_file, postgres, schema, need="purge")
        try:
            with ledger_errors(store, "purge refused: "):  # e.g. a future cutoff on PostgreSQL
                summary = purge_expired(store, now)
        finally:
            store.close()
        typer.echo(f"purged {summary.total} rows in {len(summary.evidence)} chain ranges: "
                   + ", ".join(f"{t}={n}" for t, n in sorted(summary.counts.items()) if n))

    @ledger_app.command("erase")
    def erase_cmd(subject_ref: str = typer.Option(..., "--subject-ref", help="the subject's pseudonym, 64 hex chars"),
                  request_id: str = typer.Option(..., "--request-id"),
                  requester: str = typer.Option(..., "--requester"),
                  legal_basis: str = typer.Option(..., "--legal-basis"),
                  home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                  key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt,
                  schema: str = SchemaOpt) -> None:
        """Delete a data subject's rows (by pseudonym) in one transaction, with a tombstone.
        `marlgrc forget` shreds the subject's key; this is the ledger's part."""
        from ledger import erase_subject

        try:
            ref = bytes.fromhex(subject_ref)
            if len(ref) != 32:
                raise ValueError
        except ValueError:
            fail("--subject-ref must be 64 hex characters (the HMAC-SHA256 pseudonym)")
        for name, value in (("--request-id", request_id), ("--requester", requester), ("--legal-basis", legal_basis)):
            if not value.strip():
                fail(f"an erasure names its {name[2:].replace('-', ' ')}: pass a non-empty {name}; nothing was changed")
        s = Settings.load(home=home)
        store = open_ledger(s, ledger, key_file, postgres, schema, need="erase")
        try:
            with ledger_errors(store):
                summary = erase_subject(store, ref, request_id, requester, legal_basis)
        finally:
            store.close()
        counts = ", ".join(f"{t}={n}" for t, n in sorted(summary.counts.items()) if n) or "none held"
        if summary.repeated:
            typer.echo(f"request {request_id} was already applied to this ledger: its tombstone stands "
                       f"({summary.total} rows of subject {subject_ref[:12]}…: {counts}); no second tombstone; "
                       f"{summary.late} rows of the subject stored since deleted under it")
        else:
            typer.echo(f"erased {summary.total} rows of subject {subject_ref[:12]}… (request {request_id}): {counts}")

    @ledger_app.command("verify")
    def verify_cmd(public_key: Optional[Path] = typer.Option(None, "--public-key",
                                                             help="trusted Ed25519 public key (PEM)"),
                   home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                   key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt,
                   schema: str = SchemaOpt) -> None:
        """Re-verify the ledger from its stored bytes; purged ranges are bridged by their evidence. Exit 1 on a break."""
        from eventlog.checkpoint import KeyFileError, Signer, load_public_key
        from ledger import verify_ledger

        s = Settings.load(home=home)
        try:
            key = load_public_key(public_key) if public_key else (
                Signer.load(s.signing_key).public_key if s.signing_key.exists() else None)
        except KeyFileError as exc:
            fail(str(exc))
        store = open_ledger(s, ledger, key_file, postgres, schema, need="read")
        try:
            with ledger_errors(store):
                report = verify_ledger(store, key)
        finally:
            store.close()
        for line in report.lines():
            typer.echo(line)
        if not report.ok:
            raise typer.Exit(1)

    @ledger_app.command("rebuild")
    def rebuild_cmd(yes: bool = typer.Option(False, "--yes", help="confirm dropping the ledger"),
                    batch: int = typer.Option(5000, "--batch", min=1),
                    home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                    key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt, schema: str = SchemaOpt,
                    bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt) -> None:
        """Drop the ledger and materialize it again from the topics; prints the content hash before and after."""
        from ledger import SqliteLedger, drop_sqlite, rebuild

        if not yes:
            fail("rebuild drops the ledger and reads every topic again; pass --yes to confirm")
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        old = open_ledger(s, ledger, key_file, postgres, schema, need="install" if postgres else "read")
        try:
            with ledger_errors(old):
                before = old.content_hash()
        finally:
            old.close()

        def open_empty():
            if postgres:
                from ledger.postgres import PostgresLedger, drop, install

                drop(postgres, schema)
                install(postgres, schema)
                return PostgresLedger(postgres, schema)
            path = _ledger_path(s, ledger)
            drop_sqlite(path)
            return SqliteLedger(path, _key_provider(s, key_file, create=False))

        from eventlog.kafka import BrokerUnavailable, check_broker

        try:
            boot = s.resolve_bootstrap()
            check_broker(boot)  # before anything is dropped
            with ledger_errors():
                store, stats = rebuild(open_empty, boot, prefix=s.prefix, commit_every=batch)
        except (BrokerUnavailable, KeyError) as exc:
            fail(str(exc).strip("'\""))
        try:
            with ledger_errors(store):
                after = store.content_hash()
        finally:
            store.close()
        typer.echo(f"rebuilt from {stats.records} events; content hash before {before}, after {after}: "
                   f"{'equal' if before == after else 'DIFFERENT (purged or erased rows differ from the topics)'}")
        if stats.deletions or stats.erased_rows:
            typer.echo(f"applied {len(stats.deletions)} compliance.deletion events; "
                       f"{stats.erased_rows} rows of erased subjects deleted with evidence")

    @app.command("report")
    def report_cmd(run: str = typer.Option(..., "--run", help="run id"),
                   out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for report.html, the PNGs "
                                                                            "and summary.txt (default HOME/reports/RUN)"),
                   public_key: Optional[Path] = typer.Option(None, "--public-key", help="trusted Ed25519 public key "
                                                             "(PEM) for the verdict (default: the home's signing key)"),
                   home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                   key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt,
                   schema: str = SchemaOpt) -> None:
        """Plot reward convergence, credit per agent, fairness over time and the env's domain metrics per
        episode (episode summaries) for a run, from the ledger; report.html holds every panel (one metric
        each, PNGs embedded) with the run's verification verdict and chain table."""
        from eventlog.checkpoint import KeyFileError, Signer, load_public_key
        from ledger.report import write_report
        from ledger.report_html import write_html_report

        s = Settings.load(home=home)
        try:
            key = load_public_key(public_key) if public_key else (
                Signer.load(s.signing_key).public_key if s.signing_key.exists() else None)
        except KeyFileError as exc:
            fail(str(exc))
        store = open_ledger(s, ledger, key_file, postgres, schema, need="views")
        target = out_dir or s.reports / run
        try:
            with ledger_errors(store):
                rep = write_report(store, run, target)
                page = write_html_report(store, run, target / "report.html", key)
        except LookupError as exc:
            fail(str(exc).strip("'\""))
        finally:
            store.close()
        sys.stdout.write(rep.summary())
        for f in rep.files:
            typer.echo(f"wrote {f}")
        typer.echo(f"wrote {page.path} (verification: {page.verification.verdict})")

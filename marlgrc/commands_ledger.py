"""CLI commands of the ledger: ``marlgrc ledger sync|purge|verify|rebuild|erase|keygen`` and
``marlgrc report --run R``. Wired into ``marlgrc.cli`` with ``register(app)``."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import BootOpt, HomeOpt, PrefixOpt, Settings
from .errors import fail

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


def open_ledger(s: Settings, ledger: Optional[Path], key_file: Optional[Path], pg: Optional[str], schema: str,
                *, create: bool = False, install: bool = False):
    """The ledger a command works on: PostgreSQL at ``pg``, else the SQLCipher file (default under home)
    with its key (``key_file``, ``$MARLGRC_LEDGER_KEY``, else the home's key file)."""
    from ledger import LedgerError, LedgerKeyError, SqliteLedger

    try:
        if pg:
            from ledger.postgres import PostgresLedger, install as pg_install

            if install:
                pg_install(pg, schema)
            return PostgresLedger(pg, schema)
        path = _ledger_path(s, ledger)
        if not path.exists() and not create:
            fail(f"no ledger at {path}; create it with `marlgrc ledger sync`")
        return SqliteLedger(path, _key_provider(s, key_file, create=create and not path.exists()))
    except (LedgerKeyError, LedgerError) as exc:
        fail(str(exc))


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
                 home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                 key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt, schema: str = SchemaOpt,
                 bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt) -> None:
        """Materialize every marl.* topic into the ledger (one-shot, or --follow)."""
        from eventlog.kafka import BrokerUnavailable
        from ledger import LedgerError, sync

        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        store = open_ledger(s, ledger, key_file, postgres, schema, create=True, install=install)
        stop = {"now": False}

        def _stop(*_):
            stop["now"] = True

        old = signal.signal(signal.SIGTERM, _stop)
        try:
            stats = sync(store, s.resolve_bootstrap(), prefix=s.prefix, follow=follow, poll_interval=poll,
                         commit_every=batch, should_stop=lambda: stop["now"])
        except KeyboardInterrupt:
            typer.echo("interrupted; every committed batch is kept, the next sync resumes from there", err=True)
            raise typer.Exit(130) from None
        except (BrokerUnavailable, KeyError, LedgerError) as exc:
            fail(str(exc).strip("'\""))
        finally:
            signal.signal(signal.SIGTERM, old)
            store.close()
        typer.echo(f"ingested {stats.records} events in {stats.batches} transactions "
                   f"({stats.rate:,.0f} events/s); {len(stats.findings)} integrity findings")
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
        from ledger import LedgerError, purge_expired

        s = Settings.load(home=home)
        store = open_ledger(s, ledger, key_file, postgres, schema)
        try:
            summary = purge_expired(store, now)
        except LedgerError as exc:
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - the database's refusal, e.g. a future cutoff on PostgreSQL
            fail(f"purge refused: {str(exc).strip()}")
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
        s = Settings.load(home=home)
        store = open_ledger(s, ledger, key_file, postgres, schema)
        try:
            summary = erase_subject(store, ref, request_id, requester, legal_basis)
        finally:
            store.close()
        typer.echo(f"erased {summary.total} rows of subject {subject_ref[:12]}… (request {request_id}): "
                   + (", ".join(f"{t}={n}" for t, n in sorted(summary.counts.items()) if n) or "none held"))

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
        store = open_ledger(s, ledger, key_file, postgres, schema)
        try:
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
        from ledger import LedgerError, SqliteLedger, drop_sqlite, rebuild

        if not yes:
            fail("rebuild drops the ledger and reads every topic again; pass --yes to confirm")
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        old = open_ledger(s, ledger, key_file, postgres, schema)
        before = old.content_hash()
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

        try:
            store, stats = rebuild(open_empty, s.resolve_bootstrap(), prefix=s.prefix, commit_every=batch)
        except LedgerError as exc:
            fail(str(exc))
        after = store.content_hash()
        store.close()
        typer.echo(f"rebuilt from {stats.records} events; content hash before {before}, after {after}: "
                   f"{'equal' if before == after else 'DIFFERENT (purged or erased rows differ from the topics)'}")

    @app.command("report")
    def report_cmd(run: str = typer.Option(..., "--run", help="run id"),
                   out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for PNGs and summary.txt "
                                                                            "(default HOME/reports/RUN)"),
                   home: Optional[Path] = HomeOpt, ledger: Optional[Path] = LedgerOpt,
                   key_file: Optional[Path] = KeyOpt, postgres: Optional[str] = PgOpt,
                   schema: str = SchemaOpt) -> None:
        """Plot reward convergence, credit per agent and fairness over time for a run, from the ledger."""
        from ledger.report import write_report

        s = Settings.load(home=home)
        store = open_ledger(s, ledger, key_file, postgres, schema)
        try:
            rep = write_report(store, run, out_dir or s.reports / run)
        except LookupError as exc:
            fail(str(exc).strip("'\""))
        finally:
            store.close()
        sys.stdout.write(rep.summary())
        for f in rep.files:
            typer.echo(f"wrote {f}")

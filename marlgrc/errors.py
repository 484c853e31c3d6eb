"""The one way a command stops on an error: one line on stderr, then its exit code."""
from __future__ import annotations

from typing import NoReturn

import typer
from typer.core import TyperGroup


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr (not wrapped) and exit with ``code``.

    Codes: 2 when the command could not do its work (bad input, no broker, a wrong or missing key,
    a damaged file); 1 when it did and found something wrong (a break, a finding) or was refused.
    """
    typer.echo(f"{typer.style('error:', fg='red', bold=True)} {message}", err=True)
    raise typer.Exit(code)


def known_errors() -> tuple[type[BaseException], ...]:
    """The parts' errors whose message already says what failed and what to do: a command that lets
    one escape still ends with one line and exit code 2, never a traceback."""
    from eventlog.bundle import BundleError
    from eventlog.checkpoint import KeyFileError, SignedFileError
    from eventlog.kafka import BrokerUnavailable, DeliveryError
    from eventlog.privacy import PrivacyError
    from eventlog.verify import TrustedStateError
    from learners.checkpoint import CheckpointError
    from learners.replay import ReplayError
    from ledger.keys import LedgerKeyError
    from ledger.store import LedgerError

    from .config import SettingsError

    return (BrokerUnavailable, DeliveryError, KeyFileError, SignedFileError, BundleError, PrivacyError, LedgerError,
            LedgerKeyError, ReplayError, CheckpointError, TrustedStateError, SettingsError)


class Commands(TyperGroup):
    """The CLI's command group: turns a known error that a command did not handle into ``fail``."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except known_errors() as exc:
            fail(str(exc).strip("'\""))

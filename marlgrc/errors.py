"""The one way a command stops on an error: one line on stderr, then its exit code."""
from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr (not wrapped) and exit with ``code``.

    Codes: 2 when the command could not do its work (bad input, no broker, a wrong or missing key,
    a damaged file); 1 when it did and found something wrong (a break, a finding) or was refused.
    """
    typer.echo(f"{typer.style('error:', fg='red', bold=True)} {message}", err=True)
    raise typer.Exit(code)

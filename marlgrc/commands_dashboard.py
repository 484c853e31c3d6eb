"""CLI: ``marlgrc dashboard [--port N]``, the live web page over the topics (``marlgrc/dashboard/``)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer

from .config import BootOpt, HomeOpt, PrefixOpt, Settings
from .errors import fail

DEFAULT_PORT = 8787


def register(app: typer.Typer) -> None:
    @app.command()
    def dashboard(
        port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65535, help="port to serve on (0: a free one)"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind; the default serves this machine only"),
        public_key: Optional[Path] = typer.Option(
            None, "--public-key",
            help="trusted Ed25519 public key (PEM) the audit panel checks signatures with (default: the home's signing key)"),
        home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt,
    ) -> None:
        """Serve a live page of the runs in the topics: returns per episode and per update, credit per agent,
        fairness, decisions per tier, and the audit trail (chains, signatures, dead letters), until Ctrl-C.
        Read-only: it never writes to Kafka or the ledger."""
        from eventlog.kafka import BrokerUnavailable, probe

        from .cli import _public_key
        from .dashboard.app import serve
        from .dashboard.feed import Feed

        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        boot = s.resolve_bootstrap()
        try:
            probe(boot)
        except BrokerUnavailable as exc:
            fail(str(exc))
        key = _public_key(public_key, s)
        feed = Feed(boot, s.prefix, key).start()

        def ready(url: str) -> None:
            typer.echo(f"dashboard on {url} (reading {s.prefix or ''}marl.* from {boot}; Ctrl-C to stop)")

        try:
            asyncio.run(serve(feed, host, port, ready))
        except OSError as exc:
            fail(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pick another with --port")
        except KeyboardInterrupt:
            pass
        finally:
            feed.stop()

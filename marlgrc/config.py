"""Settings, read once at the edge (environment and CLI options) into a typed object: the one place
that knows the default home, where each file lives under it, and how a command finds its broker."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import typer

from .errors import fail

HomeOpt = typer.Option(None, "--home", help="state directory (default $MARLGRC_HOME or ~/.local/state/marlgrc)")
BootOpt = typer.Option(None, "--bootstrap", help="Kafka bootstrap (default $MARLGRC_BOOTSTRAP or the broker `up` started)")
PrefixOpt = typer.Option(None, "--prefix", help="topic prefix of this deployment (default $MARLGRC_TOPIC_PREFIX)")


def parse_env_args(pairs: Iterable[str]) -> dict[str, Any]:
    """``--env-arg name=value`` pairs as the env factory's keyword arguments (values as JSON where
    they parse, e.g. ``N=3``, ``fair_reward=false``; else the string)."""
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


class SettingsError(ValueError):
    """A setting from the environment or an option that cannot be used; the message names it."""


def _expanded(path: str | Path, where: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; a SettingsError when there is no such home."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # ~user of a user this machine does not have, or no $HOME for ~
        raise SettingsError(f"{where} {str(path)!r}: cannot expand its '~' (no such user or no home directory "
                            f"here); give an absolute path") from None


def default_home() -> Path:
    """``$MARLGRC_HOME``, else ``~/.local/state/marlgrc``."""
    env = os.environ.get("MARLGRC_HOME")
    return _expanded(env, "$MARLGRC_HOME") if env else _expanded("~", "the home directory") / ".local" / "state" / "marlgrc"


@dataclass(frozen=True)
class Settings:
    home: Path
    bootstrap: str | None
    prefix: str

    @property
    def signing_key(self) -> Path:
        """The Ed25519 key every command signs its chains' checkpoints (and checkpoints, bundles) with."""
        return self.home / "keys" / "signing.pem"

    @property
    def keystore(self) -> Path:
        """The data subjects' key store (SQLCipher)."""
        return self.home / "keys" / "subjects.db"

    @property
    def ledger_key(self) -> Path:
        return self.home / "keys" / "ledger.key"

    @property
    def ledger_file(self) -> Path:
        return self.home / "ledger" / "ledger.db"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @classmethod
    def load(cls, *, home: Path | None = None, bootstrap: str | None = None, prefix: str | None = None) -> "Settings":
        return cls(
            home=_expanded(home, "--home") if home else default_home(),
            bootstrap=bootstrap or os.environ.get("MARLGRC_BOOTSTRAP") or None,
            prefix=prefix if prefix is not None else os.environ.get("MARLGRC_TOPIC_PREFIX", ""),
        )

    def resolve_bootstrap(self) -> str:
        """The given bootstrap (``--bootstrap`` or ``$MARLGRC_BOOTSTRAP``), else the broker `marlgrc up`
        started under home; with neither, the command stops with an error saying so."""
        if self.bootstrap:
            return self.bootstrap
        from compose import kafka_status

        broker = kafka_status(self.home)
        if broker is None:
            fail(f"no Kafka broker: none given (--bootstrap / MARLGRC_BOOTSTRAP) and none running under "
                 f"{self.home}. Start one with `marlgrc up`.")
        return broker.bootstrap

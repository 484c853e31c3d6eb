"""Settings, read once at the edge (environment and CLI options) into a typed object."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("MARLGRC_HOME") or Path.home() / ".local" / "state" / "marlgrc")


@dataclass(frozen=True)
class Settings:
    home: Path
    bootstrap: str | None
    prefix: str

    @property
    def signing_key(self) -> Path:
        return self.home / "keys" / "signing.pem"

    @classmethod
    def load(cls, *, home: Path | None = None, bootstrap: str | None = None, prefix: str | None = None) -> "Settings":
        return cls(
            home=Path(home) if home else default_home(),
            bootstrap=bootstrap or os.environ.get("MARLGRC_BOOTSTRAP") or None,
            prefix=prefix if prefix is not None else os.environ.get("MARLGRC_TOPIC_PREFIX", ""),
        )

    def resolve_bootstrap(self) -> str:
        """The given bootstrap, else the broker `marlgrc up` started under home."""
        if self.bootstrap:
            return self.bootstrap
        from compose import kafka_status

        broker = kafka_status(self.home)
        if broker is None:
            raise SystemExit(
                f"no Kafka broker: none given (--bootstrap / MARLGRC_BOOTSTRAP) and none running under "
                f"{self.home}. Start one with `marlgrc up`.")
        return broker.bootstrap

"""Shared fixtures: a real Kafka broker and PostgreSQL server started by the project's launcher.

Set MARLGRC_BOOTSTRAP / MARLGRC_PG_DSN to use running services instead. Under CI (CI=true) a
service that cannot start fails the tests that need it; elsewhere they are skipped with the reason.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str, exc: BaseException) -> None:
    msg = f"{what} could not start: {exc}"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@dataclass
class KafkaService:
    bootstrap: str
    home: Path | None  # None when the broker was given from outside

    def restart(self) -> None:
        from compose import restart_kafka

        if self.home is None:
            pytest.fail("cannot restart a broker given through MARLGRC_BOOTSTRAP")
        restart_kafka(self.home)


@pytest.fixture(scope="session")
def services_home():
    home = Path(tempfile.mkdtemp(prefix="marlgrc-test-"))
    os.chmod(home, 0o755)  # the postgres OS user must traverse it
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka(services_home) -> KafkaService:
    given = os.environ.get("MARLGRC_BOOTSTRAP")
    if given:
        yield KafkaService(given, None)
        return
    from compose import start_kafka, stop_kafka

    try:
        broker = start_kafka(services_home)
    except Exception as exc:  # noqa: BLE001 - reported as failure (CI) or skip
        _unavailable("Kafka", exc)
    try:
        yield KafkaService(broker.bootstrap, services_home)
    finally:
        stop_kafka(services_home, remove_data=True)


@pytest.fixture(scope="session")
def postgres(services_home):
    """A PostgreSQL server: object with ``.dsn``."""
    given = os.environ.get("MARLGRC_PG_DSN")
    if given:
        yield type("GivenPostgres", (), {"dsn": given})()
        return
    from compose import start_postgres, stop_postgres

    try:
        server = start_postgres(services_home)
    except Exception as exc:  # noqa: BLE001
        _unavailable("PostgreSQL", exc)
    try:
        yield server
    finally:
        stop_postgres(services_home, remove_data=True)


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests share one broker without seeing each other."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def topics(kafka, prefix) -> str:
    """The marl.* topics created under this test's prefix; returns the prefix."""
    from eventlog.kafka import ensure_topics

    ensure_topics(kafka.bootstrap, prefix)
    return prefix

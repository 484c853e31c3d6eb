"""Shared fixtures: a real Kafka broker and PostgreSQL server started by the project's launcher.

Set MARLGRC_BOOTSTRAP / MARLGRC_PG_DSN to use running services instead. Under CI (CI=true) a
service that cannot start fails the tests that need it; elsewhere they are skipped with the reason.

An interrupted session stops the services it started. SIGINT (Ctrl-C) already ends a pytest session
in order, running the fixtures' teardown; SIGTERM and SIGHUP would end the process at once and leave
the broker and PostgreSQL running, so for the session they raise KeyboardInterrupt too
(``compose.services.raise_on_stop_signals``). The services are stopped with those signals held, so
a second signal cannot cut the stop short; and an ``atexit`` hook stops whatever a session's teardown
did not reach (an interrupted teardown, an internal error). For SIGKILL, where no code of this process
runs, each services home has a watcher (``compose.watchdog.guard``) that stops its services and deletes
it when this process dies without releasing it. (tests/integration/test_interrupt_cleanup.py checks
all of these on a real inner pytest.)
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from compose.services import raise_on_stop_signals, restore_handlers, signals_held
from compose.watchdog import Guard, guard

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_replaced_handlers: dict = {}
_homes: dict[Path, Guard] = {}   # service homes of this session whose teardown has not finished, and their watchers


def pytest_configure(config) -> None:
    _replaced_handlers.update(raise_on_stop_signals())


def pytest_unconfigure(config) -> None:
    restore_handlers(_replaced_handlers)
    _replaced_handlers.clear()


def _stop_services(home: Path, *, kafka: bool = True, postgres: bool = True) -> None:
    """Stop this home's services (idempotent), SIGINT/SIGTERM/SIGHUP held meanwhile. Kafka is killed
    outright: its data is deleted next, so a controlled shutdown (seconds) would buy nothing."""
    from compose import kill_kafka, stop_kafka, stop_postgres

    with signals_held() as got:
        try:
            if kafka:
                kill_kafka(home)
                stop_kafka(home, remove_data=True)
        finally:
            if postgres:
                stop_postgres(home, remove_data=True)
    if got:
        print(f"marlgrc tests: {len(got)} signal(s) held while the services of {home} were stopped", file=sys.stderr)


@atexit.register
def _stop_left_behind() -> None:
    """The fallback: services of a home whose teardown did not finish."""
    for home in list(_homes):
        _remove_home(home)


def _remove_home(home: Path) -> None:
    """Stop the home's services, delete it, and release its watcher (idempotent)."""
    try:
        _stop_services(home)   # a no-op once the fixtures below have stopped theirs
    finally:
        shutil.rmtree(home, ignore_errors=True)
        watcher = _homes.pop(home, None)
        if watcher is not None:
            watcher.release()


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
    _homes[home] = guard(home, remove=True)   # before any service starts: SIGKILL of this process stops them too
    try:
        yield home
    finally:
        _remove_home(home)


@pytest.fixture(scope="session")
def kafka(services_home) -> KafkaService:
    given = os.environ.get("MARLGRC_BOOTSTRAP")
    if given:
        yield KafkaService(given, None)
        return
    from compose import start_kafka

    try:  # a KeyboardInterrupt (SIGINT/SIGTERM) mid-start: start_kafka stops its broker, and so does this
        try:
            broker = start_kafka(services_home)
        except Exception as exc:  # noqa: BLE001 - reported as failure (CI) or skip
            _unavailable("Kafka", exc)
        yield KafkaService(broker.bootstrap, services_home)
    finally:
        _stop_services(services_home, postgres=False)


@pytest.fixture(scope="session")
def postgres(services_home):
    """A PostgreSQL server: object with ``.dsn``."""
    given = os.environ.get("MARLGRC_PG_DSN")
    if given:
        yield type("GivenPostgres", (), {"dsn": given})()
        return
    from compose import start_postgres

    try:
        try:
            server = start_postgres(services_home)
        except Exception as exc:  # noqa: BLE001
            _unavailable("PostgreSQL", exc)
        yield server
    finally:
        _stop_services(services_home, kafka=False)


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

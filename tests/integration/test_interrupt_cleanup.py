"""Issue 19 fault suite: an interrupted test run or `marlgrc up` leaves no broker or PostgreSQL running.

A real inner pytest, with the project's fixtures (``-p tests.conftest``), starts its own Kafka and
PostgreSQL in a services home under its own TMPDIR (the outer session's services are not touched),
and sleeps in a test; once both answer it gets SIGTERM, SIGINT, or SIGKILL (where the services home's
watcher, ``compose.watchdog``, must stop them: no code of the killed process runs). Likewise `python -m marlgrc up
--postgres` is interrupted while it starts Kafka, and while it starts PostgreSQL. Afterwards the
processes named in the launcher's state files, and their children, are gone and their ports free;
services that ran before an interrupted `up` keep running, and so do those of a completed `up`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from compose import kafka_status, postgres_status, stop_kafka, stop_postgres
from compose.services import pid_alive, port_free

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN = 15.0   # seconds after the interrupted process exits


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MARLGRC_BOOTSTRAP", "MARLGRC_PG_DSN")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited first (code {proc.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


def _state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (PostgreSQL's checkpointer, walwriter, ...)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_bytes().rsplit(b")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _processes(kafka: dict | None, pg: dict | None) -> tuple[list[int], list[int]]:
    """The pids of the services named by their state files (with PostgreSQL's children), and their ports."""
    pids, ports = [], []
    if kafka is not None:
        pids.append(int(kafka["pid"]))
        ports += [int(kafka["port"]), int(kafka["controller_port"])]
    if pg is not None:
        pids += [int(pg["pid"]), *_children(int(pg["pid"]))]
        ports.append(int(pg["port"]))
    return pids, ports


def _assert_gone(pids: list[int], ports: list[int], what: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN
    while any(pid_alive(p) for p in pids) or not all(port_free(p) for p in ports):
        if time.monotonic() > deadline:
            alive = [p for p in pids if pid_alive(p)]
            busy = [p for p in ports if not port_free(p)]
            pytest.fail(f"{what}: still running {GONE_WITHIN:.0f} s later: pids {alive}, ports in use {busy}")
        time.sleep(0.05)


def _stop_all(home: Path) -> None:
    """Whatever a failed test left behind in ``home``."""
    stop_kafka(home, remove_data=True, timeout=5)
    stop_postgres(home, remove_data=True, timeout=5)


INNER_TEST = """
import time
from pathlib import Path


def test_sleeps(kafka, postgres):
    Path({ready!r}).write_text("ready")
    time.sleep(300)
"""

NO_TEARDOWN = """
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    raise SystemExit(3)   # ahead of pytest's own hook, which tears the session's fixtures down
"""


class InnerSession:
    """A real pytest in a directory of its own (its TMPDIR, where the project's fixtures make their
    services home), running one test that holds Kafka and PostgreSQL and sleeps."""

    def __init__(self, name: str, sig: int, *, teardown: bool = True):
        self.name, self.sig, self.teardown = name, sig, teardown
        self.base = Path(tempfile.mkdtemp(prefix="marlgrc-inner-"))
        os.chmod(self.base, 0o755)   # its services home is made inside; the postgres OS user must traverse both
        self.ready, self.log = self.base / "ready", self.base / "pytest.log"
        (self.base / "test_inner.py").write_text(INNER_TEST.format(ready=str(self.ready)))
        if not teardown:
            (self.base / "conftest.py").write_text(NO_TEARDOWN)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
                 "--rootdir", str(self.base), str(self.base / "test_inner.py")],
                cwd=ROOT, env=_env(TMPDIR=str(self.base), MARLGRC_HOME=str(self.base / "marlgrc-home"), CI="true"),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def homes(self) -> list[Path]:
        return list(self.base.glob("marlgrc-test-*"))

    def interrupt(self) -> None:
        """Once its services answer: note their processes and ports, then send the signal."""
        _wait_for(f"{self.name}: the inner test's Kafka and PostgreSQL", self.ready.exists, 150, self.proc, self.log)
        homes = self.homes()
        assert len(homes) == 1, homes
        self.home = homes[0]
        kafka = _state(self.home / "kafka" / "state.json")
        pg = _state(self.home / "postgres" / "state.json")
        assert kafka is not None and pg is not None
        self.pids, self.ports = _processes(kafka, pg)
        assert pid_alive(int(kafka["pid"])) and pid_alive(int(pg["pid"]))   # (a child may come and go)
        assert not any(port_free(p) for p in self.ports)
        os.kill(self.proc.pid, self.sig)

    def check(self) -> None:
        try:
            rc = self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        output = self.log.read_text()
        if self.sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, f"{self.name}:\n{output[-4000:]}"
        else:
            # 2: pytest's "interrupted", after its teardown; 3: the SystemExit that skipped the teardown
            assert rc == (2 if self.teardown else 3), f"{self.name}:\n{output[-4000:]}"
            assert "KeyboardInterrupt" in output, f"{self.name}:\n{output[-4000:]}"
        _assert_gone(self.pids, self.ports, f"{self.name}: the inner pytest's services")
        # the teardown, the atexit fallback or (SIGKILL) the watcher ran to its end
        deadline = time.monotonic() + GONE_WITHIN
        while self.home.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.home.exists(), self.name

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for home in self.homes():
            _stop_all(home)
        shutil.rmtree(self.base, ignore_errors=True)


def test_an_interrupted_pytest_stops_its_broker_and_postgres():
    """Three inner sessions at once (they wait mostly on their services' start-up): SIGTERM, SIGINT,
    and SIGTERM to a session whose teardown is skipped (a hook raises SystemExit first), where the
    conftest's atexit fallback must stop the services."""
    sessions: list[InnerSession] = []
    try:
        sessions.append(InnerSession("SIGTERM", signal.SIGTERM))
        sessions.append(InnerSession("SIGINT", signal.SIGINT))
        sessions.append(InnerSession("SIGTERM, no teardown", signal.SIGTERM, teardown=False))
        for session in sessions:
            session.interrupt()
        for session in sessions:
            session.check()
    finally:
        for session in sessions:
            session.cleanup()


def test_a_killed_pytest_leaves_no_broker_or_postgres():
    """SIGKILL: no handler, no teardown, no atexit. The services home's watcher sees the session's end
    (the pipe it alone held closes) and stops Kafka and PostgreSQL and deletes the home."""
    session = InnerSession("SIGKILL", signal.SIGKILL)
    try:
        session.interrupt()
        session.check()
    finally:
        session.cleanup()


def _up(home: Path, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "marlgrc", "up", "--home", str(home), *args], cwd=ROOT,
                                env=_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _interrupted(proc: subprocess.Popen, sig: int, log: Path) -> str:
    os.kill(proc.pid, sig)
    try:
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    output = log.read_text()
    assert rc == 130, output
    assert "interrupted" in output, output
    return output


def test_an_interrupted_up_stops_what_it_started_and_no_more():
    home = Path(tempfile.mkdtemp(prefix="marlgrc-up-"))
    os.chmod(home, 0o755)
    kafka_state, pg_dir = home / "kafka" / "state.json", home / "postgres"
    try:
        # 1. SIGTERM while Kafka starts (its process runs, it does not answer yet): the broker is stopped
        log = home / "up1.log"
        proc = _up(home, "--postgres", log=log)
        kafka = _wait_for("Kafka's state file", lambda: _state(kafka_state), 60, proc, log)
        output = _interrupted(proc, signal.SIGTERM, log)
        assert "kafka 127.0.0.1" not in output and "stopped what this `up` had started (kafka)\n" in output
        _assert_gone(*_processes(kafka, None), "Kafka of an `up` interrupted while it started Kafka")
        assert kafka_status(home) is None and not pg_dir.exists()

        # 2. SIGINT while PostgreSQL starts (initdb or the server), Kafka already started by this `up`
        def pg_starting():   # this `up` runs initdb (a half-made cluster of an earlier one is redone) or the server
            try:
                fresh = (pg_dir / "data.initdb-partial").stat().st_mtime >= since
            except OSError:
                fresh = False
            return fresh or (pg_dir / "state.json").exists()

        log = home / "up2.log"
        since = time.time()
        proc = _up(home, "--postgres", log=log)
        _wait_for("PostgreSQL starting", pg_starting, 90, proc, log)
        kafka, pg = _state(kafka_state), _state(pg_dir / "state.json")
        output = _interrupted(proc, signal.SIGINT, log)
        assert "kafka 127.0.0.1" in output and "postgres postgresql://" not in output
        assert "stopped what this `up` had started (kafka, postgres)\n" in output
        _assert_gone(*_processes(kafka, pg), "Kafka and PostgreSQL of an `up` interrupted while it started PostgreSQL")
        assert kafka_status(home) is None and postgres_status(home) is None

        # 3. a completed `up` leaves Kafka running; an `up --postgres` interrupted then stops PostgreSQL only
        res = subprocess.run([sys.executable, "-m", "marlgrc", "up", "--home", str(home)], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        running = kafka_status(home)
        assert running is not None
        log = home / "up3.log"
        since = time.time()
        proc = _up(home, "--postgres", log=log)
        _wait_for("PostgreSQL starting", pg_starting, 90, proc, log)
        pg = _state(pg_dir / "state.json")
        output = _interrupted(proc, signal.SIGTERM, log)
        assert "stopped what this `up` had started (postgres); left running what ran before it (kafka)" in output
        _assert_gone(*_processes(None, pg), "PostgreSQL of an `up` interrupted while it started PostgreSQL")
        assert postgres_status(home) is None
        assert kafka_status(home) == running and pid_alive(running.pid)

        res = subprocess.run([sys.executable, "-m", "marlgrc", "down", "--home", str(home)], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "kafka stopped" in res.stdout, res.stdout + res.stderr
        _assert_gone(*_processes({"pid": running.pid, "port": running.port,
                                  "controller_port": running.controller_port}, None), "Kafka after `down`")
    finally:
        _stop_all(home)
        shutil.rmtree(home, ignore_errors=True)

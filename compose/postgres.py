"""PostgreSQL 15 for marlgrc's PostgreSQL ledger, without Docker: a private cluster on 127.0.0.1.

Runs the distribution's server binaries (``/usr/lib/postgresql/15/bin``, ``$MARLGRC_PG_BINDIR``
or ``pg_config --bindir``) on a cluster initialised with ``initdb --auth=trust -U postgres``,
listening on 127.0.0.1 only, with its unix socket inside the home and a database ``marlgrc``.
Layout: ``home/postgres/{data/,run/,postgres.log,state.json}``.

:func:`start_postgres` is idempotent (a running server recorded in ``state.json`` is returned
as is) and waits until the server accepts a connection and a query. Everything that can go
wrong raises :class:`~compose.services.ServiceError` saying what failed and what to do next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compose.services import (
    HOST,
    ServiceError,
    as_user,
    docker_hint,
    forget_child,
    locked,
    pick_port,
    read_properties,
    running_service,
    send_signal,
    size,
    spawn,
    tail,
    terminate,
    wait_exit,
    wait_until_ready,
    write_atomic,
    write_state,
)

__all__ = ["PostgresServer", "postgres_status", "start_postgres", "stop_postgres"]

log = logging.getLogger(__name__)

PG_DATABASE = "marlgrc"
PG_SUPERUSER = "postgres"

_PG_BINDIRS = (Path("/usr/lib/postgresql/15/bin"),)


@dataclass(frozen=True)
class PostgresServer:
    """A running private PostgreSQL cluster started by :func:`start_postgres`.

    Attributes:
        dsn: libpq URI of the ``marlgrc`` database, e.g.
            ``"postgresql://postgres@127.0.0.1:54321/marlgrc"`` (trust authentication).
        host: ``"127.0.0.1"``.
        port: the TCP port.
        data_dir: the cluster's data directory (``home/postgres/data``).
        pid: process id of the postmaster.
        superuser: the superuser role, ``"postgres"``.
    """

    dsn: str
    host: str
    port: int
    data_dir: Path
    pid: int
    superuser: str


@dataclass(frozen=True)
class _Files:
    """Where the PostgreSQL of one home keeps its files."""

    dir: Path

    @classmethod
    def of(cls, home: Path) -> _Files:
        return cls(Path(home).expanduser().resolve() / "postgres")

    lock = property(lambda self: self.dir / ".lock")
    data = property(lambda self: self.dir / "data")
    run = property(lambda self: self.dir / "run")
    log = property(lambda self: self.dir / "postgres.log")
    state = property(lambda self: self.dir / "state.json")
    conf = property(lambda self: self.dir / "data" / "marlgrc.conf")


def _dsn(port: int, dbname: str = PG_DATABASE) -> str:
    return f"postgresql://{PG_SUPERUSER}@{HOST}:{port}/{dbname}"


# --------------------------------------------------------------------------------------------
# Binaries, OS user, cluster
# --------------------------------------------------------------------------------------------


def _bindir() -> Path:
    """Directory with PostgreSQL's ``postgres`` and ``initdb`` (15 preferred)."""
    candidates: list[Path] = []
    if os.environ.get("MARLGRC_PG_BINDIR"):
        candidates.append(Path(os.environ["MARLGRC_PG_BINDIR"]))
    candidates.extend(_PG_BINDIRS)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
            if res.returncode == 0 and res.stdout.strip():
                candidates.append(Path(res.stdout.strip()))
    for d in candidates:
        if (d / "postgres").is_file() and (d / "initdb").is_file():
            return d
    raise ServiceError(
        "PostgreSQL 15 server binaries (postgres, initdb) not found in "
        f"{', '.join(str(c) for c in candidates)}: install them (apt-get install postgresql-15), "
        f"set MARLGRC_PG_BINDIR to their directory, {docker_hint()}"
    )


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) of the ``postgres`` OS user when we are root (PostgreSQL refuses to run as
    root), else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(PG_SUPERUSER)
    except KeyError as exc:
        raise ServiceError(
            "running as root, and PostgreSQL refuses to run as root, but there is no 'postgres' "
            "OS user to run it as: install postgresql-15 (it creates that user) or "
            "create one (useradd --system --home-dir /var/lib/postgresql postgres), "
            "or run as a normal user"
        ) from exc
    return pw.pw_uid, pw.pw_gid


def _make_traversable(path: Path, uid: int, gid: int) -> None:
    """Let ``uid`` reach ``path``: add the search (x) bit for others on ancestors it cannot
    traverse (root-only homes such as /root or pytest's 0700 temp dirs). Read permission is
    not granted, so directory listings stay private."""
    import pwd

    groups = {gid} | {g for g in os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
    for d in [path, *path.parents]:
        st = d.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            log.warning("adding o+x to %s so the postgres user can reach its data directory", d)
            try:
                os.chmod(d, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            except OSError as exc:
                raise ServiceError(
                    f"the postgres OS user cannot reach {path} (no search permission on {d}) and "
                    f"chmod o+x {d} failed ({exc}): choose a home under /tmp or another directory "
                    f"the postgres user can traverse (MARLGRC_HOME)"
                ) from exc


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _initdb(files: _Files, bindir: Path, run_as: tuple[int, int] | None) -> None:
    """Create the cluster in ``data`` (via a temporary directory, so a half-made one is redone)."""
    partial = files.dir / "data.initdb-partial"
    shutil.rmtree(partial, ignore_errors=True)
    argv = [str(bindir / "initdb"), "-D", str(partial), "-U", PG_SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-instructions"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=files.dir, stdin=subprocess.DEVNULL,
                         timeout=300, env={**os.environ, "LC_ALL": "C", "LANG": "C"}, **as_user(run_as))
    if res.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ServiceError(
            f"initdb of {files.data} failed (exit {res.returncode}; command: {' '.join(argv)}): "
            f"fix the cause below (disk space, permissions of {files.dir}) and retry. Output:\n"
            f"{(res.stdout + res.stderr).strip()[-3000:]}"
        )
    # Trust, but only over the private unix socket and loopback TCP (the server listens on
    # 127.0.0.1 only).
    (partial / "pg_hba.conf").write_text(
        "# Written by marlgrc's native launcher: trust, local connections only.\n"
        "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
        "local   all       all                 trust\n"
        "host    all       all   127.0.0.1/32  trust\n"
        "local   replication all               trust\n"
        "host    replication all 127.0.0.1/32  trust\n",
        encoding="utf-8",
    )
    with open(partial / "postgresql.conf", "a", encoding="utf-8") as fh:
        fh.write("\n# marlgrc's native launcher: port, addresses, socket dir\ninclude_if_exists = 'marlgrc.conf'\n")
    if run_as:
        _chown_tree(partial, *run_as)
    os.replace(partial, files.data)


def _running(files: _Files) -> PostgresServer | None:
    """The server named by state.json if its process is alive; removes a stale state file."""

    def parse(state: dict[str, Any]) -> PostgresServer:
        port = int(state["port"])
        return PostgresServer(dsn=str(state.get("dsn") or _dsn(port)), host=str(state.get("host", HOST)),
                              port=port, data_dir=Path(state.get("data_dir", files.data)),
                              pid=int(state["pid"]), superuser=str(state.get("superuser", PG_SUPERUSER)))

    return running_service(files.state, parse, "PostgreSQL", "postgres", str(files.data))


def _previous_port(files: _Files) -> int | None:
    with contextlib.suppress(KeyError, ValueError):
        return int(read_properties(files.conf)["port"])
    return None


# --------------------------------------------------------------------------------------------
# Start, wait, stop
# --------------------------------------------------------------------------------------------


def _answers(dsn: str) -> str | None:
    """None if ``dsn`` accepts a connection and a query, else the error text."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def _ensure_database(port: int) -> None:
    import psycopg

    with psycopg.connect(_dsn(port, "postgres"), connect_timeout=5, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')


def _wait(server: PostgresServer, log_path: Path, deadline: float, log_offset: int, dsn: str) -> None:
    wait_until_ready(
        server.pid, lambda _seconds: _answers(dsn), deadline, interval=0.1,
        died=lambda: (
            f"PostgreSQL (pid {server.pid}, port {server.port}) exited during start-up: see "
            f"{log_path}; fix the cause shown below and retry (stop_postgres(home, "
            f"remove_data=True) resets a broken data dir {server.data_dir}). Log tail:\n"
            f"{tail(log_path, log_offset)}"),
        late=lambda err: (
            f"PostgreSQL (pid {server.pid}) did not accept connections on {dsn} in time "
            f"(last error: {err}): see {log_path}; retry with a larger timeout or stop it "
            f"with stop_postgres(). Log tail:\n{tail(log_path, log_offset)}"),
    )


def start_postgres(home: Path, port: int | None = None, *, timeout: float = 60) -> PostgresServer:
    """Start (or find) the private PostgreSQL of ``home`` and wait until it accepts connections.

    The first start runs ``initdb`` (trust authentication, superuser ``postgres``) into
    ``home/postgres/data`` and creates the database ``marlgrc``. The server listens on
    127.0.0.1 only, on ``port`` (None: the previous run's port if free, else a free one), with
    its unix socket in ``home/postgres/run``. Run as root, the server runs as the ``postgres``
    OS user (PostgreSQL refuses root), which then owns ``home/postgres``; directories above it
    that user cannot traverse get the o+x bit.

    Returns:
        The running server. Idempotent: a live server named in ``state.json`` is returned.

    Raises:
        ServiceError: binaries missing, port in use, or the server died or did not answer.
    """
    files = _Files.of(home)
    with locked(files.lock):
        return _start_locked(files, port, timeout)


def _start_locked(files: _Files, port: int | None, timeout: float) -> PostgresServer:
    deadline = time.monotonic() + timeout
    running = _running(files)
    if running is not None:
        if port is not None and port != running.port:
            raise ServiceError(
                f"PostgreSQL of {files.dir} already runs on port {running.port} (pid "
                f"{running.pid}), not {port}: use it, or stop_postgres() first to move it"
            )
        _wait(running, files.log, deadline, size(files.log), running.dsn)
        return running

    bindir = _bindir()
    run_as = _run_as()
    if run_as:
        _make_traversable(files.dir, *run_as)
        os.chown(files.dir, *run_as)
        os.chmod(files.dir, 0o700)
    if not (files.data / "PG_VERSION").is_file():
        if files.data.exists() and any(files.data.iterdir()):
            raise ServiceError(
                f"{files.data} exists but is not a PostgreSQL data directory (no PG_VERSION): "
                f"move it away or delete it (stop_postgres(home, remove_data=True)) and retry"
            )
        with contextlib.suppress(FileNotFoundError):
            files.data.rmdir()
        _initdb(files, bindir, run_as)

    port = pick_port(port, _previous_port(files), "PostgreSQL", set())
    sockdir = files.run
    if len(str(sockdir / f".s.PGSQL.{port}")) > 100:  # unix socket path limit (107 bytes)
        sockdir = Path("/tmp") / f"marlgrc-pg-{uuid.uuid5(uuid.NAMESPACE_URL, str(files.dir)).hex[:12]}"
    sockdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sockdir, 0o700)
    if run_as:
        os.chown(sockdir, *run_as)
    conf = (f"# Written by marlgrc's native launcher on every start.\n"
            f"listen_addresses = '{HOST}'\nport = {port}\nunix_socket_directories = '{sockdir}'\n"
            f"max_connections = 200\nlogging_collector = off\n")
    write_atomic(files.conf, conf)
    if run_as:
        os.chown(files.conf, *run_as)
    if not files.log.exists():
        files.log.touch()
    log_offset = size(files.log)

    argv = [str(bindir / "postgres"), "-D", str(files.data)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    proc = spawn(argv, cwd=files.dir, log_path=files.log, env=env, run_as=run_as)
    server = PostgresServer(dsn=_dsn(port), host=HOST, port=port, data_dir=files.data,
                            pid=proc.pid, superuser=PG_SUPERUSER)
    write_state(files.state, server, socket_dir=str(sockdir), bindir=str(bindir))
    try:
        _wait(server, files.log, deadline, log_offset, _dsn(port, "postgres"))
        _ensure_database(port)
    except BaseException as exc:
        terminate(server.pid, signal.SIGQUIT, 5)
        files.state.unlink(missing_ok=True)
        if isinstance(exc, ServiceError) or not isinstance(exc, Exception):
            raise
        raise ServiceError(f"PostgreSQL started on port {port} but creating database "
                           f"{PG_DATABASE!r} failed ({exc}): see {files.log}") from exc
    log.info("PostgreSQL started on %s:%d (pid %d, home %s)", HOST, port, server.pid, files.dir)
    return server


def stop_postgres(home: Path, *, remove_data: bool = False, timeout: float = 30) -> bool:
    """Stop the PostgreSQL of ``home``: fast shutdown (SIGINT), SIGQUIT then SIGKILL after
    ``timeout`` s. Removes ``state.json``; with ``remove_data`` also the cluster. Returns
    whether a server was running."""
    files = _Files.of(home)
    if not files.dir.is_dir():
        return False
    with locked(files.lock):
        server = _running(files)
        if server is not None:
            send_signal(server.pid, signal.SIGINT)
            if not wait_exit(server.pid, timeout):
                log.warning("PostgreSQL pid %d ignored fast shutdown for %.0f s: immediate shutdown", server.pid, timeout)
                terminate(server.pid, signal.SIGQUIT, 10)
            forget_child(server.pid)
        files.state.unlink(missing_ok=True)
        if remove_data:
            shutil.rmtree(files.data, ignore_errors=True)
    return server is not None


def postgres_status(home: Path) -> PostgresServer | None:
    """The running PostgreSQL of ``home``, or None (a stale ``state.json`` is removed)."""
    files = _Files.of(home)
    if not files.state.exists():
        return None
    with locked(files.lock):
        return _running(files)

"""What marlgrc's local services share: their home, ports, processes, state files and errors.

Each service (:mod:`compose.kafka`, :mod:`compose.postgres`) lives in its own directory under a
*home* (:func:`default_home`) with a lock file (concurrent callers, e.g. pytest-xdist workers,
start one service between them), a ``state.json`` naming the running process, and a log file.
Services run detached (their own session), so they outlive the Python process that started them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
"""Every service listens on the loopback interface only."""

COMPOSE_DIR = Path(__file__).resolve().parent
DOCKER_COMPOSE = COMPOSE_DIR / "docker-compose.yml"

# Popen objects of the services this process started: kept so that a service that exits is
# reaped (no zombie that looks alive) and Python does not warn about running subprocesses.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}

T = TypeVar("T")


class ServiceError(RuntimeError):
    """A local service could not be fetched, started, reached or stopped.

    The message says what failed, on which input (path, port, command) and what to do next.
    """


def default_home() -> Path:
    """Where services keep their state: ``$MARLGRC_HOME`` or ``~/.local/state/marlgrc``."""
    env = os.environ.get("MARLGRC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".local" / "state" / "marlgrc"


def default_cache() -> Path:
    """Download cache (Kafka jars): ``$MARLGRC_CACHE`` or ``~/.cache/marlgrc``."""
    env = os.environ.get("MARLGRC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "marlgrc"


def docker_hint() -> str:
    """The "or use Docker" half of an installation hint."""
    if shutil.which("docker"):
        return f"or start the services with Docker: docker compose -f {DOCKER_COMPOSE} up -d"
    return f"or use {DOCKER_COMPOSE} with Docker"


# --------------------------------------------------------------------------------------------
# Files: locks, state, properties
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created with its directory if missing): serialises
    start, stop and download across processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_state(path: Path, service: Any, **extra: Any) -> None:
    """Record a started ``service`` (a dataclass) and ``extra`` fields in ``state.json``."""
    state = {k: str(v) if isinstance(v, Path) else v for k, v in {**asdict(service), **extra}.items()}
    write_atomic(path, json.dumps({**state, "started_at": time.time()}, indent=2) + "\n")


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring unreadable state file %s", path)
        return None
    return data if isinstance(data, dict) else None


def running_service(state_path: Path, parse: Callable[[dict[str, Any]], T], what: str,
                    *needles: str) -> T | None:
    """The service named by ``state_path`` if its process is alive and its command line holds
    ``needles``; a stale or malformed state file is removed."""
    state = read_state(state_path)
    if state is None:
        return None
    try:
        service = parse(state)
    except (KeyError, TypeError, ValueError):
        log.warning("removing malformed %s state file %s", what, state_path)
        state_path.unlink(missing_ok=True)
        return None
    if is_our_process(service.pid, *needles):  # type: ignore[attr-defined]
        return service
    state_path.unlink(missing_ok=True)
    return None


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java properties or PostgreSQL conf file ({} if unreadable)."""
    props: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return props
    for line in lines:
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


def tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    out = "\n".join(text.splitlines()[-lines:])
    return out or "(log is empty)"


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A port on 127.0.0.1 that is free now (picked by the kernel), not in ``exclude``."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port
    raise ServiceError(f"no free TCP port on {HOST}: close some programs and retry")


def _wait_port_free(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not port_free(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def pick_port(requested: int | None, previous: int | None, what: str, exclude: set[int]) -> int:
    """The port to use: the requested one (must be free), else the previous one if it is free
    again within a few seconds (a service that just exited), else a fresh free one."""
    if requested is not None:
        if not 0 < requested < 65536:
            raise ServiceError(f"{what} port {requested} is not a TCP port: use 1-65535 or None")
        if not _wait_port_free(requested, 5.0):
            raise ServiceError(
                f"{what} port {HOST}:{requested} is already in use by another program: "
                f"stop that program, pick another port, or pass port=None for a free one"
            )
        return requested
    if previous and previous not in exclude and _wait_port_free(previous, 5.0):
        return previous
    return _free_port(exclude)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (children of ours are reaped)."""
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust kill(0)


def _cmdline(pid: int) -> str | None:
    """The command line of ``pid`` (Linux /proc), or None if unknown."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def is_our_process(pid: int, *needles: str) -> bool:
    """Alive, and (where /proc tells) its command line contains all ``needles`` (guards
    against a recycled pid in a stale state file)."""
    if not pid_alive(pid):
        return False
    cmd = _cmdline(pid)
    return cmd is None or all(n in cmd for n in needles)


def wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def send_signal(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)  # started with start_new_session: pgid == pid
        else:
            os.kill(pid, sig)


def kill(pid: int) -> None:
    """SIGKILL ``pid``'s process group and ``pid``, wait (10 s at most) and reap."""
    send_signal(pid, signal.SIGKILL, group=True)
    send_signal(pid, signal.SIGKILL)
    wait_exit(pid, 10)
    _CHILDREN.pop(pid, None)


def terminate(pid: int, first: int, timeout: float) -> None:
    """Send ``first``; after ``timeout`` s SIGKILL the whole process group and reap."""
    send_signal(pid, first)
    if not wait_exit(pid, timeout):
        log.warning("pid %d did not exit %.0f s after %s: sending SIGKILL", pid, timeout, signal.Signals(first).name)
        kill(pid)
    _CHILDREN.pop(pid, None)


def as_user(run_as: tuple[int, int] | None) -> dict[str, Any]:
    """subprocess keyword arguments that run a command as ``(uid, gid)`` (None: as ourselves)."""
    if run_as is None:
        return {}
    return {"user": run_as[0], "group": run_as[1], "extra_groups": []}


def spawn(argv: list[str], *, cwd: Path, log_path: Path, env: dict[str, str] | None = None,
          run_as: tuple[int, int] | None = None) -> subprocess.Popen[bytes]:
    """Start a detached service process (own session) appending stdout/stderr to ``log_path``."""
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True, **as_user(run_as),
            )
        except OSError as exc:
            raise ServiceError(f"cannot run {argv[0]}: {exc}: check that it is installed and executable") from exc
    _CHILDREN[proc.pid] = proc
    return proc


def forget_child(pid: int) -> None:
    """Stop tracking ``pid`` (it was stopped)."""
    _CHILDREN.pop(pid, None)


def wait_until_ready(pid: int, probe: Callable[[float], str | None], deadline: float, *,
                     died: Callable[[], str], late: Callable[[str], str], interval: float) -> None:
    """Poll ``probe(seconds)`` (None once the service answers, else why not) until it answers.

    Raises ServiceError with ``died()`` if the process exits first, or with ``late(last error)``
    once ``deadline`` (time.monotonic()) passes.
    """
    while True:
        if not pid_alive(pid):
            raise ServiceError(died())
        err = probe(min(2.0, max(deadline - time.monotonic(), 0.5)))
        if err is None:
            return
        if time.monotonic() >= deadline:
            raise ServiceError(late(err))
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Signals: an interrupted launcher stops what it started
# --------------------------------------------------------------------------------------------

STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
"""The signals that ask a process to stop: Ctrl-C, ``kill``, a closed terminal."""


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def raise_on_stop_signals() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does; returns the handlers replaced
    (for :func:`restore_handlers`).

    Python's default for SIGTERM and SIGHUP ends the process at once: no ``finally``, no ``atexit``.
    A process that starts services (``marlgrc up``, a test session) killed that way leaves its
    detached broker or database running. As a KeyboardInterrupt, the signal unwinds the stack, and
    every ``start_*`` already stops the process it was waiting for. Only the main thread can set
    handlers; elsewhere, and for a signal someone else handles or ignores (``nohup``), nothing changes.
    """
    if not _main_thread():
        return {}
    old: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        if sig != signal.SIGINT and signal.getsignal(sig) is signal.SIG_DFL:
            old[sig] = signal.signal(sig, _interrupt)
    return old


def restore_handlers(old: dict[int, Any]) -> None:
    """Put back handlers replaced by :func:`raise_on_stop_signals` (or :func:`signals_held`)."""
    if not _main_thread():
        return
    for sig, handler in old.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_held() -> Iterator[list[int]]:
    """Inside, SIGINT, SIGTERM and SIGHUP are noted (the yielded list), not acted on: a second Ctrl-C
    or ``kill`` cannot cut short the stopping of services and leave one behind. Stopping is bounded
    (SIGKILL after a timeout), so the wait is too. Main thread only; elsewhere a no-op."""
    got: list[int] = []
    if not _main_thread():
        yield got
        return
    old = {sig: signal.signal(sig, lambda s, _f: got.append(s)) for sig in STOP_SIGNALS}
    try:
        yield got
    finally:
        restore_handlers(old)

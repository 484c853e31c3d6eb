"""Native launcher for marlgrc's services on machines without Docker.

Starts, inspects and stops two local services, each in a private directory under a *home*
(``$MARLGRC_HOME`` or ``~/.local/state/marlgrc`` by default, see :func:`default_home`):

* **Apache Kafka 3.9.1** in KRaft mode: one process that is both broker and controller
  (``node.id=1``) on 127.0.0.1. The broker's jars are fetched once from Maven Central with
  ``mvn dependency:copy-dependencies`` (``compose/kafka-pom.xml``) and cached in
  ``${MARLGRC_CACHE:-~/.cache/marlgrc}/kafka-3.9.1/``; Java 11+ (17 recommended) runs them.
  Layout: ``home/kafka/{server.properties,log4j.properties,kafka.log,state.json,data/}``.
* **PostgreSQL 15** from the distribution's server binaries (``/usr/lib/postgresql/15/bin``):
  a private cluster initialised with ``initdb --auth=trust -U postgres``, listening on 127.0.0.1
  only, with its unix socket inside the home and a database ``marlgrc``.
  Layout: ``home/postgres/{data/,run/,postgres.log,state.json}``.

Every ``start_*`` is idempotent (a running, answering service recorded in ``state.json`` is
returned as is) and waits until the service answers a real client request. Services run
detached (their own session), so they outlive the Python process that started them until a
``stop_*``. Each service directory has a lock file, so concurrent callers (pytest-xdist
workers) sharing a home start one service between them.

Everything that can go wrong raises :class:`ServiceError` with what failed, on which input,
and what to do next. With Docker, ``compose/docker-compose.yml`` runs the same two services.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "PostgresServer",
    "ServiceError",
    "default_cache",
    "default_home",
    "kafka_jars",
    "kafka_status",
    "kill_kafka",
    "postgres_status",
    "restart_kafka",
    "start_kafka",
    "start_postgres",
    "stop_kafka",
    "stop_postgres",
]

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
"""The Kafka release the launcher runs (the jars named in ``compose/kafka-pom.xml``)."""

HOST = "127.0.0.1"
"""Both services listen on the loopback interface only."""

PG_DATABASE = "marlgrc"
PG_SUPERUSER = "postgres"

_COMPOSE_DIR = Path(__file__).resolve().parent
_KAFKA_POM = _COMPOSE_DIR / "kafka-pom.xml"
_DOCKER_COMPOSE = _COMPOSE_DIR / "docker-compose.yml"
_JARS_MARKER = ".complete"
_PG_BINDIRS = (Path("/usr/lib/postgresql/15/bin"),)

# Popen objects of the services this process started: kept so that a service that exits is
# reaped (no zombie that looks alive) and Python does not warn about running subprocesses.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(RuntimeError):
    """A local service could not be fetched, started, reached or stopped.

    The message says what failed, on which input (path, port, command) and what to do next.
    """


@dataclass(frozen=True)
class KafkaBroker:
    """A running single-node Kafka (KRaft broker + controller) started by :func:`start_kafka`.

    Attributes:
        bootstrap: ``bootstrap.servers`` for clients, ``"127.0.0.1:<port>"``.
        port: the PLAINTEXT client listener port.
        controller_port: the KRaft controller listener port.
        data_dir: the broker's ``log.dirs`` (``home/kafka/data``).
        pid: process id of the broker's JVM.
        log_path: the broker's log file (``home/kafka/kafka.log``).
    """

    bootstrap: str
    port: int
    controller_port: int
    data_dir: Path
    pid: int
    log_path: Path


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


# --------------------------------------------------------------------------------------------
# Homes, caches, small helpers
# --------------------------------------------------------------------------------------------


def default_home() -> Path:
    """Where services keep their state: ``$MARLGRC_HOME`` or ``~/.local/state/marlgrc``."""
    env = os.environ.get("MARLGRC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".local" / "state" / "marlgrc"


def default_cache() -> Path:
    """Download cache (Kafka jars): ``$MARLGRC_CACHE`` or ``~/.cache/marlgrc``."""
    env = os.environ.get("MARLGRC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "marlgrc"


def _docker_hint() -> str:
    """The "or use Docker" half of an installation hint."""
    if shutil.which("docker"):
        return f"or start the services with Docker: docker compose -f {_DOCKER_COMPOSE} up -d"
    return f"or use {_DOCKER_COMPOSE} with Docker"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` (serialises start/stop across processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring unreadable state file %s", path)
        return None
    return data if isinstance(data, dict) else None


def _port_free(port: int) -> bool:
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


def _pick_port(requested: int | None, previous: int | None, what: str, exclude: set[int]) -> int:
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


def _wait_port_free(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _port_free(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _pid_alive(pid: int) -> bool:
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


def _is_our_process(pid: int, *needles: str) -> bool:
    """Alive, and (where /proc tells) its command line contains all ``needles`` (guards
    against a recycled pid in a stale state file)."""
    if not _pid_alive(pid):
        return False
    cmd = _cmdline(pid)
    return cmd is None or all(n in cmd for n in needles)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)  # started with start_new_session: pgid == pid
        else:
            os.kill(pid, sig)


def _terminate(pid: int, first: int, timeout: float) -> None:
    """Send ``first``; after ``timeout`` s SIGKILL the whole process group and reap."""
    _signal(pid, first)
    if not _wait_exit(pid, timeout):
        log.warning("pid %d did not exit %.0f s after %s: sending SIGKILL", pid, timeout, signal.Signals(first).name)
        _signal(pid, signal.SIGKILL, group=True)
        _signal(pid, signal.SIGKILL)
        _wait_exit(pid, 10)
    _CHILDREN.pop(pid, None)


def _tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    out = "\n".join(text.splitlines()[-lines:])
    return out or "(log is empty)"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _spawn(argv: list[str], *, cwd: Path, log_path: Path, env: dict[str, str] | None = None,
           user: int | None = None, group: int | None = None) -> subprocess.Popen[bytes]:
    """Start a detached service process (own session) appending stdout/stderr to ``log_path``."""
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True, user=user, group=group,
                extra_groups=[] if user is not None else None,
            )
        except OSError as exc:
            raise ServiceError(f"cannot run {argv[0]}: {exc}: check that it is installed and executable") from exc
    _CHILDREN[proc.pid] = proc
    return proc


# --------------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------------


def _java() -> str:
    """The ``java`` executable (``$JAVA_HOME/bin/java`` or PATH), checked to be Java 11+."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    found = shutil.which("java")
    if found:
        candidates.append(found)
    java = next((c for c in candidates if os.access(c, os.X_OK)), None)
    if java is None:
        raise ServiceError(
            "Java 17 not found on PATH (nor in $JAVA_HOME): Kafka's broker runs on the JVM. "
            "Install OpenJDK 17 (apt-get install openjdk-17-jre-headless) "
            f"{_docker_hint()}"
        )
    try:
        res = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"cannot run {java} -version: {exc}: reinstall OpenJDK 17 "
                           "(apt-get install openjdk-17-jre-headless)") from exc
    m = re.search(r'version "(\d+)(?:\.(\d+))?', res.stderr + res.stdout)
    if m:
        major = int(m.group(1))
        if major == 1 and m.group(2):  # "1.8.0_x"
            major = int(m.group(2))
        if major < 11:
            raise ServiceError(
                f"{java} is Java {major}; Kafka {KAFKA_VERSION} needs Java 11 or newer: install "
                "OpenJDK 17 (apt-get install openjdk-17-jre-headless) and put it first on PATH "
                f"or in $JAVA_HOME, {_docker_hint()}"
            )
    return java


def kafka_jars(cache_dir: Path | None = None) -> Path:
    """The directory holding Kafka's broker jars, downloading them with Maven on first use.

    Args:
        cache_dir: the download cache (default :func:`default_cache`, i.e.
            ``${MARLGRC_CACHE:-~/.cache/marlgrc}``); the jars go to ``cache_dir/kafka-3.9.1``.

    Returns:
        ``cache_dir/kafka-3.9.1``, complete (it holds a ``.complete`` marker written after
        Maven succeeded; a directory without it, from an interrupted download, is fetched anew).

    Raises:
        ServiceError: Maven is missing or the download failed.
    """
    cache = (cache_dir or default_cache()).expanduser()
    target = cache / f"kafka-{KAFKA_VERSION}"
    if (target / _JARS_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _locked_file(cache / f"kafka-{KAFKA_VERSION}.lock"):
        if (target / _JARS_MARKER).is_file():  # another process fetched them meanwhile
            return target
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ServiceError(
                f"Apache Maven not found on PATH: it is needed once to download the Kafka "
                f"{KAFKA_VERSION} jars into {target}. Install it (apt-get install maven) and "
                f"retry, {_docker_hint()}"
            )
        if not _KAFKA_POM.is_file():
            raise ServiceError(f"{_KAFKA_POM} is missing: reinstall marlgrc (the pom ships with the compose package)")
        for stale in cache.glob(f".kafka-{KAFKA_VERSION}.partial-*"):  # interrupted downloads
            shutil.rmtree(stale, ignore_errors=True)
        partial = cache / f".kafka-{KAFKA_VERSION}.partial-{os.getpid()}"
        argv = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(_KAFKA_POM),
                "dependency:copy-dependencies", f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
        log.info("downloading Kafka %s jars with Maven into %s (first run only)", KAFKA_VERSION, target)
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise ServiceError(
                f"Maven did not finish downloading the Kafka {KAFKA_VERSION} jars in 30 min "
                f"({' '.join(argv)}): check network access to Maven Central (repo.maven.apache.org) and retry"
            ) from exc
        jars = sorted(partial.glob("*.jar")) if partial.is_dir() else []
        if res.returncode != 0 or not any(j.name == f"kafka_2.13-{KAFKA_VERSION}.jar" for j in jars):
            shutil.rmtree(partial, ignore_errors=True)
            out = "\n".join((res.stdout + res.stderr).strip().splitlines()[-30:])
            raise ServiceError(
                f"Maven failed to download the Kafka {KAFKA_VERSION} jars (exit {res.returncode}; "
                f"command: {' '.join(argv)}): check network access to Maven Central "
                f"(repo.maven.apache.org) or your proxy/mirror in ~/.m2/settings.xml, then retry. "
                f"Maven said:\n{out}"
            )
        (partial / _JARS_MARKER).write_text(f"kafka {KAFKA_VERSION}: {len(jars)} jars\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier attempt
        os.replace(partial, target)
    return target


@contextlib.contextmanager
def _locked_file(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _kafka_paths(home: Path) -> dict[str, Path]:
    kdir = Path(home).expanduser().resolve() / "kafka"
    return {
        "dir": kdir,
        "data": kdir / "data",
        "config": kdir / "server.properties",
        "log4j": kdir / "log4j.properties",
        "log": kdir / "kafka.log",
        "state": kdir / "state.json",
    }


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka's ``Uuid.randomUuid().toString()`` makes it (url-safe
    base64 of 16 bytes, unpadded, never starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _read_properties(path: Path) -> dict[str, str]:
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


def _previous_kafka_ports(paths: dict[str, Path]) -> tuple[int | None, int | None]:
    props = _read_properties(paths["config"])
    port = cport = None
    for listener in props.get("listeners", "").split(","):
        m = re.fullmatch(r"\s*(\w+)://[^:]*:(\d+)\s*", listener)
        if m and m.group(1) == "PLAINTEXT":
            port = int(m.group(2))
        elif m and m.group(1) == "CONTROLLER":
            cport = int(m.group(2))
    return port, cport


def _write_kafka_config(paths: dict[str, Path], port: int, cport: int) -> None:
    config = f"""\
# Written by marlgrc's native launcher (compose/native.py); rewritten on every start.
# Single-node KRaft: this process is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{HOST}:{cport}
listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}
advertised.listeners=PLAINTEXT://{HOST}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={paths["data"]}

# One broker: internal topics cannot have more than one replica. Without these, transactions
# (faust's exactly_once) and consumer groups cannot start.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
default.replication.factor=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0

# After a crash (SIGKILL) the restarted broker can only re-register once the controller has
# expired its previous session: 9 s by default; shorter here for quick crash-recovery tests.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000

# Topics are created explicitly (with their partitions and configs), never by a typo.
auto.create.topics.enable=false
num.partitions=3
delete.topic.enable=true
"""
    _write_atomic(paths["config"], config)
    log4j = f"""\
# Written by marlgrc's native launcher: warnings and errors only, to {paths["log"]}.
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={paths["log"]}
log4j.appender.file.Append=true
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
# Plus one line per start ("Kafka Server started"), to tell restarts apart in the log.
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""
    _write_atomic(paths["log4j"], log4j)


def _kafka_from_state(paths: dict[str, Path], state: dict[str, Any]) -> KafkaBroker:
    return KafkaBroker(
        bootstrap=str(state["bootstrap"]),
        port=int(state["port"]),
        controller_port=int(state["controller_port"]),
        data_dir=Path(state.get("data_dir", paths["data"])),
        pid=int(state["pid"]),
        log_path=Path(state.get("log_path", paths["log"])),
    )


def _kafka_running(paths: dict[str, Path]) -> KafkaBroker | None:
    """The broker named by state.json if its process is alive; removes a stale state file."""
    state = _read_state(paths["state"])
    if state is None:
        return None
    try:
        broker = _kafka_from_state(paths, state)
    except (KeyError, TypeError, ValueError):
        log.warning("removing malformed Kafka state file %s", paths["state"])
        paths["state"].unlink(missing_ok=True)
        return None
    if _is_our_process(broker.pid, "kafka.Kafka", str(paths["config"])):
        return broker
    paths["state"].unlink(missing_ok=True)
    return None


def _quiet_logger() -> logging.Logger:
    """A logger for librdkafka that swallows its connection-refused noise while we poll."""
    lg = logging.getLogger("marlgrc.compose.rdkafka")
    lg.propagate = False
    if not lg.handlers:
        lg.addHandler(logging.NullHandler())
    return lg


def _kafka_answers(bootstrap: str, timeout: float) -> bool:
    """One metadata request to ``bootstrap``; True if the broker answered with itself listed."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # cheap pre-check, no noise
        s.settimeout(min(1.0, timeout))
        if s.connect_ex((host, int(port))) != 0:
            return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet_logger(),
                         "socket.connection.setup.timeout.ms": 2000})
    try:
        md = admin.list_topics(timeout=max(0.5, timeout))
    except KafkaException:
        return False
    return bool(md.brokers)


def _wait_kafka(broker: KafkaBroker, deadline: float, log_offset: int) -> None:
    """Poll until the broker answers a metadata request; ServiceError if it dies or times out."""
    while True:
        if not _pid_alive(broker.pid):
            raise ServiceError(
                f"Kafka (pid {broker.pid}, {broker.bootstrap}) exited during start-up: see "
                f"{broker.log_path}; fix the cause shown below (a port taken, a corrupt data dir "
                f"{broker.data_dir}: stop_kafka(home, remove_data=True) resets it) and retry. "
                f"Log tail:\n{_tail(broker.log_path, log_offset)}"
            )
        left = deadline - time.monotonic()
        if _kafka_answers(broker.bootstrap, min(2.0, max(left, 0.5))):
            return
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"Kafka (pid {broker.pid}) did not answer on {broker.bootstrap} in time: see "
                f"{broker.log_path}; retry with a larger timeout (a slow first JVM start) or "
                f"stop it with stop_kafka(). Log tail:\n{_tail(broker.log_path, log_offset)}"
            )
        time.sleep(0.2)


def start_kafka(home: Path, port: int | None = None, *, timeout: float = 60) -> KafkaBroker:
    """Start (or find) the single-node KRaft Kafka of ``home`` and wait until it answers.

    Args:
        home: the service home; the broker lives in ``home/kafka``.
        port: the client (PLAINTEXT) port on 127.0.0.1. None: the port of the previous run of
            this home if it is free, else a free one. The controller port is chosen the same way.
        timeout: seconds to wait for the broker to answer a metadata request.

    Returns:
        The running broker. Idempotent: if ``home/kafka/state.json`` names a live broker it is
        returned (after it answers) instead of starting a second one.

    Raises:
        ServiceError: Java or Maven missing, a port in use, or the broker died or did not answer
            in time (the message holds the tail of ``kafka.log``).
    """
    paths = _kafka_paths(home)
    with _locked(paths["dir"]):
        return _start_kafka_locked(paths, port, None, timeout)


def _start_kafka_locked(paths: dict[str, Path], port: int | None, cport: int | None,
                        timeout: float) -> KafkaBroker:
    deadline = time.monotonic() + timeout
    running = _kafka_running(paths)
    if running is not None:
        if port is not None and port != running.port:
            raise ServiceError(
                f"Kafka of {paths['dir']} already runs on {running.bootstrap} (pid {running.pid}), "
                f"not on port {port}: use it, or stop_kafka() first to move it to port {port}"
            )
        _wait_kafka(running, deadline, _size(running.log_path))
        return running

    java = _java()
    jars = kafka_jars()
    prev_port, prev_cport = _previous_kafka_ports(paths)
    port = _pick_port(port, prev_port, "Kafka client", set())
    cport = _pick_port(cport, prev_cport, "Kafka controller", {port})
    if cport == port:
        raise ServiceError(f"Kafka client and controller ports are both {port}: give distinct ports")
    paths["data"].mkdir(parents=True, exist_ok=True)
    _write_kafka_config(paths, port, cport)
    log_offset = _size(paths["log"])
    classpath = f"{jars}/*"
    jvm_common = [f"-Dlog4j.configuration=file:{paths['log4j']}", f"-Dkafka.logs.dir={paths['dir']}",
                  "-Djava.awt.headless=true"]

    if not (paths["data"] / "meta.properties").is_file():
        argv = [java, "-Xmx256m", *jvm_common, "-cp", classpath, "kafka.tools.StorageTool",
                "format", "-t", _kafka_cluster_id(), "-c", str(paths["config"])]
        res = subprocess.run(argv, capture_output=True, text=True, cwd=paths["dir"],
                             stdin=subprocess.DEVNULL, timeout=max(timeout, 60))
        if res.returncode != 0:
            raise ServiceError(
                f"formatting Kafka storage {paths['data']} failed (exit {res.returncode}; command: "
                f"{' '.join(argv)}): if the directory holds data from another cluster, remove it "
                f"(stop_kafka(home, remove_data=True)) and retry. Output:\n"
                f"{(res.stdout + res.stderr).strip()[-3000:]}"
            )

    argv = [java, "-Xmx1g", "-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", *jvm_common, "-cp", classpath,
            "kafka.Kafka", str(paths["config"])]
    proc = _spawn(argv, cwd=paths["dir"], log_path=paths["log"])
    broker = KafkaBroker(bootstrap=f"{HOST}:{port}", port=port, controller_port=cport,
                         data_dir=paths["data"], pid=proc.pid, log_path=paths["log"])
    state = {**asdict(broker), "data_dir": str(broker.data_dir), "log_path": str(broker.log_path),
             "kafka_version": KAFKA_VERSION, "started_at": time.time()}
    _write_atomic(paths["state"], json.dumps(state, indent=2) + "\n")
    try:
        _wait_kafka(broker, deadline, log_offset)
    except BaseException:
        _terminate(broker.pid, signal.SIGKILL, 5)
        paths["state"].unlink(missing_ok=True)
        raise
    log.info("Kafka %s started on %s (pid %d, home %s)", KAFKA_VERSION, broker.bootstrap, broker.pid, paths["dir"])
    return broker


def _stop_kafka_locked(paths: dict[str, Path], sig: int, timeout: float) -> KafkaBroker | None:
    broker = _kafka_running(paths)
    if broker is not None:
        _terminate(broker.pid, sig, timeout)
    paths["state"].unlink(missing_ok=True)
    return broker


def stop_kafka(home: Path, *, remove_data: bool = False, timeout: float = 30) -> bool:
    """Stop the Kafka of ``home``: SIGTERM (controlled shutdown), SIGKILL after ``timeout`` s.

    Removes ``state.json``; with ``remove_data`` also the data directory (topics and the
    cluster id: the next start formats a fresh cluster). Returns whether a broker was running.
    """
    paths = _kafka_paths(home)
    if not paths["dir"].is_dir():
        return False
    with _locked(paths["dir"]):
        broker = _stop_kafka_locked(paths, signal.SIGTERM, timeout)
        if remove_data:
            shutil.rmtree(paths["data"], ignore_errors=True)
    if broker is not None:
        log.info("Kafka on %s stopped (pid %d)", broker.bootstrap, broker.pid)
    return broker is not None


def kill_kafka(home: Path) -> bool:
    """SIGKILL the Kafka of ``home`` (crash tests). Data and config stay, so a later
    :func:`start_kafka` recovers the log on the same ports. Returns whether one was running."""
    paths = _kafka_paths(home)
    if not paths["dir"].is_dir():
        return False
    with _locked(paths["dir"]):
        broker = _kafka_running(paths)
        if broker is not None:
            _signal(broker.pid, signal.SIGKILL, group=True)
            _signal(broker.pid, signal.SIGKILL)
            _wait_exit(broker.pid, 10)
            _CHILDREN.pop(broker.pid, None)
        paths["state"].unlink(missing_ok=True)
    return broker is not None


def kafka_status(home: Path) -> KafkaBroker | None:
    """The running Kafka of ``home``, or None (a stale ``state.json`` is removed).

    Checks the process only (alive, and it is this home's ``kafka.Kafka``); it does not wait
    for the broker to answer.
    """
    paths = _kafka_paths(home)
    if not paths["state"].exists():
        return None
    with _locked(paths["dir"]):
        return _kafka_running(paths)


def restart_kafka(home: Path, *, timeout: float = 60) -> KafkaBroker:
    """Stop the Kafka of ``home`` cleanly and start it again on the same data dir and ports.

    Clients configured with the old ``bootstrap`` reconnect by themselves. If no broker was
    running, starts one on the ports of the previous run (when free).
    """
    paths = _kafka_paths(home)
    with _locked(paths["dir"]):
        old = _stop_kafka_locked(paths, signal.SIGTERM, 30)
        port = old.port if old else None
        cport = old.controller_port if old else None
        return _start_kafka_locked(paths, port, cport, timeout)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _pg_bindir() -> Path:
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
        f"set MARLGRC_PG_BINDIR to their directory, {_docker_hint()}"
    )


def _pg_paths(home: Path) -> dict[str, Path]:
    pdir = Path(home).expanduser().resolve() / "postgres"
    return {
        "dir": pdir,
        "data": pdir / "data",
        "run": pdir / "run",
        "log": pdir / "postgres.log",
        "state": pdir / "state.json",
        "conf": pdir / "data" / "marlgrc.conf",
    }


def _pg_run_as() -> tuple[int, int] | None:
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


def _pg_dsn(port: int, dbname: str = PG_DATABASE) -> str:
    return f"postgresql://{PG_SUPERUSER}@{HOST}:{port}/{dbname}"


def _pg_from_state(paths: dict[str, Path], state: dict[str, Any]) -> PostgresServer:
    port = int(state["port"])
    return PostgresServer(dsn=str(state.get("dsn") or _pg_dsn(port)), host=str(state.get("host", HOST)),
                          port=port, data_dir=Path(state.get("data_dir", paths["data"])),
                          pid=int(state["pid"]), superuser=str(state.get("superuser", PG_SUPERUSER)))


def _pg_running(paths: dict[str, Path]) -> PostgresServer | None:
    state = _read_state(paths["state"])
    if state is None:
        return None
    try:
        server = _pg_from_state(paths, state)
    except (KeyError, TypeError, ValueError):
        log.warning("removing malformed PostgreSQL state file %s", paths["state"])
        paths["state"].unlink(missing_ok=True)
        return None
    if _is_our_process(server.pid, "postgres", str(paths["data"])):
        return server
    paths["state"].unlink(missing_ok=True)
    return None


def _previous_pg_port(paths: dict[str, Path]) -> int | None:
    props = _read_properties(paths["conf"])
    with contextlib.suppress(KeyError, ValueError):
        return int(props["port"])
    return None


def _pg_initdb(paths: dict[str, Path], bindir: Path, run_as: tuple[int, int] | None) -> None:
    """Create the cluster in ``data`` (via a temporary directory, so a half-made one is redone)."""
    partial = paths["dir"] / "data.initdb-partial"
    shutil.rmtree(partial, ignore_errors=True)
    argv = [str(bindir / "initdb"), "-D", str(partial), "-U", PG_SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-instructions"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=paths["dir"], stdin=subprocess.DEVNULL,
                         user=run_as[0] if run_as else None, group=run_as[1] if run_as else None,
                         extra_groups=[] if run_as else None, timeout=300,
                         env={**os.environ, "LC_ALL": "C", "LANG": "C"})
    if res.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ServiceError(
            f"initdb of {paths['data']} failed (exit {res.returncode}; command: {' '.join(argv)}): "
            f"fix the cause below (disk space, permissions of {paths['dir']}) and retry. Output:\n"
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
    os.replace(partial, paths["data"])


def _pg_answers(dsn: str) -> str | None:
    """None if ``dsn`` accepts a connection and a query, else the error text."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def _pg_ensure_database(port: int) -> None:
    import psycopg

    with psycopg.connect(_pg_dsn(port, "postgres"), connect_timeout=5, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')


def _wait_pg(server: PostgresServer, log_path: Path, deadline: float, log_offset: int, dsn: str) -> None:
    while True:
        if not _pid_alive(server.pid):
            raise ServiceError(
                f"PostgreSQL (pid {server.pid}, port {server.port}) exited during start-up: see "
                f"{log_path}; fix the cause shown below and retry (stop_postgres(home, "
                f"remove_data=True) resets a broken data dir {server.data_dir}). Log tail:\n"
                f"{_tail(log_path, log_offset)}"
            )
        err = _pg_answers(dsn)
        if err is None:
            return
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"PostgreSQL (pid {server.pid}) did not accept connections on {dsn} in time "
                f"(last error: {err}): see {log_path}; retry with a larger timeout or stop it "
                f"with stop_postgres(). Log tail:\n{_tail(log_path, log_offset)}"
            )
        time.sleep(0.1)


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
    paths = _pg_paths(home)
    with _locked(paths["dir"]):
        return _start_pg_locked(paths, port, timeout)


def _start_pg_locked(paths: dict[str, Path], port: int | None, timeout: float) -> PostgresServer:
    deadline = time.monotonic() + timeout
    running = _pg_running(paths)
    if running is not None:
        if port is not None and port != running.port:
            raise ServiceError(
                f"PostgreSQL of {paths['dir']} already runs on port {running.port} (pid "
                f"{running.pid}), not {port}: use it, or stop_postgres() first to move it"
            )
        _wait_pg(running, paths["log"], deadline, _size(paths["log"]), running.dsn)
        return running

    bindir = _pg_bindir()
    run_as = _pg_run_as()
    if run_as:
        _make_traversable(paths["dir"], *run_as)
        os.chown(paths["dir"], *run_as)
        os.chmod(paths["dir"], 0o700)
    if not (paths["data"] / "PG_VERSION").is_file():
        if paths["data"].exists() and any(paths["data"].iterdir()):
            raise ServiceError(
                f"{paths['data']} exists but is not a PostgreSQL data directory (no PG_VERSION): "
                f"move it away or delete it (stop_postgres(home, remove_data=True)) and retry"
            )
        with contextlib.suppress(FileNotFoundError):
            paths["data"].rmdir()
        _pg_initdb(paths, bindir, run_as)

    port = _pick_port(port, _previous_pg_port(paths), "PostgreSQL", set())
    sockdir = paths["run"]
    if len(str(sockdir / f".s.PGSQL.{port}")) > 100:  # unix socket path limit (107 bytes)
        sockdir = Path("/tmp") / f"marlgrc-pg-{uuid.uuid5(uuid.NAMESPACE_URL, str(paths['dir'])).hex[:12]}"
    sockdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sockdir, 0o700)
    if run_as:
        os.chown(sockdir, *run_as)
    conf = (f"# Written by marlgrc's native launcher on every start.\n"
            f"listen_addresses = '{HOST}'\nport = {port}\nunix_socket_directories = '{sockdir}'\n"
            f"max_connections = 200\nlogging_collector = off\n")
    _write_atomic(paths["conf"], conf)
    if run_as:
        os.chown(paths["conf"], *run_as)
    if not paths["log"].exists():
        paths["log"].touch()
    log_offset = _size(paths["log"])

    argv = [str(bindir / "postgres"), "-D", str(paths["data"])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    proc = _spawn(argv, cwd=paths["dir"], log_path=paths["log"], env=env,
                  user=run_as[0] if run_as else None, group=run_as[1] if run_as else None)
    server = PostgresServer(dsn=_pg_dsn(port), host=HOST, port=port, data_dir=paths["data"],
                            pid=proc.pid, superuser=PG_SUPERUSER)
    state = {**asdict(server), "data_dir": str(server.data_dir), "socket_dir": str(sockdir),
             "bindir": str(bindir), "started_at": time.time()}
    _write_atomic(paths["state"], json.dumps(state, indent=2) + "\n")
    try:
        _wait_pg(server, paths["log"], deadline, log_offset, _pg_dsn(port, "postgres"))
        _pg_ensure_database(port)
    except BaseException as exc:
        _terminate(server.pid, signal.SIGQUIT, 5)
        paths["state"].unlink(missing_ok=True)
        if isinstance(exc, ServiceError) or not isinstance(exc, Exception):
            raise
        raise ServiceError(f"PostgreSQL started on port {port} but creating database "
                           f"{PG_DATABASE!r} failed ({exc}): see {paths['log']}") from exc
    log.info("PostgreSQL started on %s:%d (pid %d, home %s)", HOST, port, server.pid, paths["dir"])
    return server


def stop_postgres(home: Path, *, remove_data: bool = False, timeout: float = 30) -> bool:
    """Stop the PostgreSQL of ``home``: fast shutdown (SIGINT), SIGQUIT then SIGKILL after
    ``timeout`` s. Removes ``state.json``; with ``remove_data`` also the cluster. Returns
    whether a server was running."""
    paths = _pg_paths(home)
    if not paths["dir"].is_dir():
        return False
    with _locked(paths["dir"]):
        server = _pg_running(paths)
        if server is not None:
            _signal(server.pid, signal.SIGINT)
            if not _wait_exit(server.pid, timeout):
                log.warning("PostgreSQL pid %d ignored fast shutdown for %.0f s: immediate shutdown", server.pid, timeout)
                _terminate(server.pid, signal.SIGQUIT, 10)
            _CHILDREN.pop(server.pid, None)
        paths["state"].unlink(missing_ok=True)
        if remove_data:
            shutil.rmtree(paths["data"], ignore_errors=True)
    return server is not None


def postgres_status(home: Path) -> PostgresServer | None:
    """The running PostgreSQL of ``home``, or None (a stale ``state.json`` is removed)."""
    paths = _pg_paths(home)
    if not paths["state"].exists():
        return None
    with _locked(paths["dir"]):
        return _pg_running(paths)

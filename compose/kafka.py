"""Apache Kafka 3.9.1 for marlgrc, without Docker: one single-node KRaft broker on 127.0.0.1.

One process is both broker and controller (``node.id=1``). Its jars are fetched once from Maven
Central with ``mvn dependency:copy-dependencies`` (``compose/kafka-pom.xml``) and cached in
``${MARLGRC_CACHE:-~/.cache/marlgrc}/kafka-3.9.1/``; Java 11+ (17 recommended) runs them.
Layout: ``home/kafka/{server.properties,log4j.properties,kafka.log,state.json,data/}``.

:func:`start_kafka` is idempotent (a running, answering broker recorded in ``state.json`` is
returned as is) and waits until the broker answers a metadata request. Everything that can go
wrong raises :class:`~compose.services.ServiceError` saying what failed and what to do next.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compose.services import (
    COMPOSE_DIR,
    HOST,
    ServiceError,
    default_cache,
    docker_hint,
    kill,
    locked,
    pick_port,
    read_properties,
    running_service,
    size,
    spawn,
    tail,
    terminate,
    wait_until_ready,
    write_atomic,
    write_state,
)

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "kafka_jars",
    "kafka_status",
    "kill_kafka",
    "restart_kafka",
    "start_kafka",
    "stop_kafka",
]

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
"""The Kafka release the launcher runs (the jars named in ``compose/kafka-pom.xml``)."""

_KAFKA_POM = COMPOSE_DIR / "kafka-pom.xml"
_JARS_MARKER = ".complete"


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
class _Files:
    """Where the Kafka of one home keeps its files."""

    dir: Path

    @classmethod
    def of(cls, home: Path) -> _Files:
        return cls(Path(home).expanduser().resolve() / "kafka")

    lock = property(lambda self: self.dir / ".lock")
    data = property(lambda self: self.dir / "data")
    config = property(lambda self: self.dir / "server.properties")
    log4j = property(lambda self: self.dir / "log4j.properties")
    log = property(lambda self: self.dir / "kafka.log")
    state = property(lambda self: self.dir / "state.json")


# --------------------------------------------------------------------------------------------
# Java and the broker's jars
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
            f"{docker_hint()}"
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
                f"or in $JAVA_HOME, {docker_hint()}"
            )
    return java


def kafka_jars(cache_dir: Path | None = None) -> Path:
    """The directory holding Kafka's broker jars, downloading them with Maven on first use.

    Args:
        cache_dir: the download cache (default :func:`~compose.services.default_cache`, i.e.
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
    with locked(cache / f"kafka-{KAFKA_VERSION}.lock"):
        if (target / _JARS_MARKER).is_file():  # another process fetched them meanwhile
            return target
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ServiceError(
                f"Apache Maven not found on PATH: it is needed once to download the Kafka "
                f"{KAFKA_VERSION} jars into {target}. Install it (apt-get install maven) and "
                f"retry, {docker_hint()}"
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


# --------------------------------------------------------------------------------------------
# Configuration and state
# --------------------------------------------------------------------------------------------


def _cluster_id() -> str:
    """A random cluster id as Kafka's ``Uuid.randomUuid().toString()`` makes it (url-safe
    base64 of 16 bytes, unpadded, never starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _previous_ports(files: _Files) -> tuple[int | None, int | None]:
    """The (client, controller) ports of this home's last configuration, where it has one."""
    props = read_properties(files.config)
    port = cport = None
    for listener in props.get("listeners", "").split(","):
        m = re.fullmatch(r"\s*(\w+)://[^:]*:(\d+)\s*", listener)
        if m and m.group(1) == "PLAINTEXT":
            port = int(m.group(2))
        elif m and m.group(1) == "CONTROLLER":
            cport = int(m.group(2))
    return port, cport


def _write_config(files: _Files, port: int, cport: int) -> None:
    config = f"""\
# Written by marlgrc's native launcher (compose/kafka.py); rewritten on every start.
# Single-node KRaft: this process is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{HOST}:{cport}
listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}
advertised.listeners=PLAINTEXT://{HOST}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={files.data}

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
    write_atomic(files.config, config)
    log4j = f"""\
# Written by marlgrc's native launcher: warnings and errors only, to {files.log}.
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={files.log}
log4j.appender.file.Append=true
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
# Plus one line per start ("Kafka Server started"), to tell restarts apart in the log.
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""
    write_atomic(files.log4j, log4j)


def _running(files: _Files) -> KafkaBroker | None:
    """The broker named by state.json if its process is alive; removes a stale state file."""

    def parse(state: dict[str, Any]) -> KafkaBroker:
        return KafkaBroker(
            bootstrap=str(state["bootstrap"]),
            port=int(state["port"]),
            controller_port=int(state["controller_port"]),
            data_dir=Path(state.get("data_dir", files.data)),
            pid=int(state["pid"]),
            log_path=Path(state.get("log_path", files.log)),
        )

    return running_service(files.state, parse, "Kafka", "kafka.Kafka", str(files.config))


# --------------------------------------------------------------------------------------------
# Start, wait, stop
# --------------------------------------------------------------------------------------------


def _quiet_logger() -> logging.Logger:
    """A logger for librdkafka that swallows its connection-refused noise while we poll."""
    lg = logging.getLogger("marlgrc.compose.rdkafka")
    lg.propagate = False
    if not lg.handlers:
        lg.addHandler(logging.NullHandler())
    return lg


def _answers(bootstrap: str, timeout: float) -> str | None:
    """None if one metadata request to ``bootstrap`` lists a broker, else why not."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # cheap pre-check, no noise
        s.settimeout(min(1.0, timeout))
        if s.connect_ex((host, int(port))) != 0:
            return "connection refused"
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet_logger(),
                         "socket.connection.setup.timeout.ms": 2000})
    try:
        md = admin.list_topics(timeout=max(0.5, timeout))
    except KafkaException as exc:
        return str(exc)
    return None if md.brokers else "no broker in the metadata"


def _wait(broker: KafkaBroker, deadline: float, log_offset: int) -> None:
    """Poll until the broker answers a metadata request; ServiceError if it dies or times out."""
    wait_until_ready(
        broker.pid, lambda seconds: _answers(broker.bootstrap, seconds), deadline, interval=0.2,
        died=lambda: (
            f"Kafka (pid {broker.pid}, {broker.bootstrap}) exited during start-up: see "
            f"{broker.log_path}; fix the cause shown below (a port taken, a corrupt data dir "
            f"{broker.data_dir}: stop_kafka(home, remove_data=True) resets it) and retry. "
            f"Log tail:\n{tail(broker.log_path, log_offset)}"),
        late=lambda _err: (
            f"Kafka (pid {broker.pid}) did not answer on {broker.bootstrap} in time: see "
            f"{broker.log_path}; retry with a larger timeout (a slow first JVM start) or "
            f"stop it with stop_kafka(). Log tail:\n{tail(broker.log_path, log_offset)}"),
    )


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
    files = _Files.of(home)
    with locked(files.lock):
        return _start_locked(files, port, None, timeout)


def _start_locked(files: _Files, port: int | None, cport: int | None, timeout: float) -> KafkaBroker:
    deadline = time.monotonic() + timeout
    running = _running(files)
    if running is not None:
        if port is not None and port != running.port:
            raise ServiceError(
                f"Kafka of {files.dir} already runs on {running.bootstrap} (pid {running.pid}), "
                f"not on port {port}: use it, or stop_kafka() first to move it to port {port}"
            )
        _wait(running, deadline, size(running.log_path))
        return running

    java = _java()
    jars = kafka_jars()
    prev_port, prev_cport = _previous_ports(files)
    port = pick_port(port, prev_port, "Kafka client", set())
    cport = pick_port(cport, prev_cport, "Kafka controller", {port})
    if cport == port:
        raise ServiceError(f"Kafka client and controller ports are both {port}: give distinct ports")
    files.data.mkdir(parents=True, exist_ok=True)
    _write_config(files, port, cport)
    log_offset = size(files.log)
    classpath = f"{jars}/*"
    jvm_common = [f"-Dlog4j.configuration=file:{files.log4j}", f"-Dkafka.logs.dir={files.dir}",
                  "-Djava.awt.headless=true"]

    if not (files.data / "meta.properties").is_file():
        argv = [java, "-Xmx256m", *jvm_common, "-cp", classpath, "kafka.tools.StorageTool",
                "format", "-t", _cluster_id(), "-c", str(files.config)]
        res = subprocess.run(argv, capture_output=True, text=True, cwd=files.dir,
                             stdin=subprocess.DEVNULL, timeout=max(timeout, 60))
        if res.returncode != 0:
            raise ServiceError(
                f"formatting Kafka storage {files.data} failed (exit {res.returncode}; command: "
                f"{' '.join(argv)}): if the directory holds data from another cluster, remove it "
                f"(stop_kafka(home, remove_data=True)) and retry. Output:\n"
                f"{(res.stdout + res.stderr).strip()[-3000:]}"
            )

    argv = [java, "-Xmx1g", "-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", *jvm_common, "-cp", classpath,
            "kafka.Kafka", str(files.config)]
    proc = spawn(argv, cwd=files.dir, log_path=files.log)
    broker = KafkaBroker(bootstrap=f"{HOST}:{port}", port=port, controller_port=cport,
                         data_dir=files.data, pid=proc.pid, log_path=files.log)
    write_state(files.state, broker, kafka_version=KAFKA_VERSION)
    try:
        _wait(broker, deadline, log_offset)
    except BaseException:
        terminate(broker.pid, signal.SIGKILL, 5)
        files.state.unlink(missing_ok=True)
        raise
    log.info("Kafka %s started on %s (pid %d, home %s)", KAFKA_VERSION, broker.bootstrap, broker.pid, files.dir)
    return broker


def _stop_locked(files: _Files, sig: int, timeout: float) -> KafkaBroker | None:
    broker = _running(files)
    if broker is not None:
        terminate(broker.pid, sig, timeout)
    files.state.unlink(missing_ok=True)
    return broker


def stop_kafka(home: Path, *, remove_data: bool = False, timeout: float = 30) -> bool:
    """Stop the Kafka of ``home``: SIGTERM (controlled shutdown), SIGKILL after ``timeout`` s.

    Removes ``state.json``; with ``remove_data`` also the data directory (topics and the
    cluster id: the next start formats a fresh cluster). Returns whether a broker was running.
    """
    files = _Files.of(home)
    if not files.dir.is_dir():
        return False
    with locked(files.lock):
        broker = _stop_locked(files, signal.SIGTERM, timeout)
        if remove_data:
            shutil.rmtree(files.data, ignore_errors=True)
    if broker is not None:
        log.info("Kafka on %s stopped (pid %d)", broker.bootstrap, broker.pid)
    return broker is not None


def kill_kafka(home: Path) -> bool:
    """SIGKILL the Kafka of ``home`` (crash tests). Data and config stay, so a later
    :func:`start_kafka` recovers the log on the same ports. Returns whether one was running."""
    files = _Files.of(home)
    if not files.dir.is_dir():
        return False
    with locked(files.lock):
        broker = _running(files)
        if broker is not None:
            kill(broker.pid)
        files.state.unlink(missing_ok=True)
    return broker is not None


def kafka_status(home: Path) -> KafkaBroker | None:
    """The running Kafka of ``home``, or None (a stale ``state.json`` is removed).

    Checks the process only (alive, and it is this home's ``kafka.Kafka``); it does not wait
    for the broker to answer.
    """
    files = _Files.of(home)
    if not files.state.exists():
        return None
    with locked(files.lock):
        return _running(files)


def restart_kafka(home: Path, *, timeout: float = 60) -> KafkaBroker:
    """Stop the Kafka of ``home`` cleanly and start it again on the same data dir and ports.

    Clients configured with the old ``bootstrap`` reconnect by themselves. If no broker was
    running, starts one on the ports of the previous run (when free).
    """
    files = _Files.of(home)
    with locked(files.lock):
        old = _stop_locked(files, signal.SIGTERM, 30)
        port = old.port if old else None
        cport = old.controller_port if old else None
        return _start_locked(files, port, cport, timeout)

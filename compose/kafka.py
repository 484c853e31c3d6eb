"""Apache Kafka 3.9.1 for marlgrc, without Docker: a KRaft broker on 127.0.0.1, or a cluster of three.

By default one process is both broker and controller (``node.id=1``). ``start_kafka(home,
brokers=3)`` starts a cluster instead: three such combined nodes (``node.id`` 1-3) forming one
controller quorum, each with its own client and controller ports, data directory and a small heap
(``-Xmx384m``); internal topics are replicated three times with ``min.insync.replicas=2``.
The jars are fetched once from Maven Central with ``mvn dependency:copy-dependencies``
(``compose/kafka-pom.xml``) and cached in ``${MARLGRC_CACHE:-~/.cache/marlgrc}/kafka-3.9.1/``;
Java 11+ (17 recommended) runs them.
Layout: ``home/kafka/{server.properties,log4j.properties,kafka.log,state.json,data/}``; a cluster
lives in ``home/kafka-cluster/{cluster.json,node-1/,node-2/,node-3/}``, each ``node-N/`` laid out
like ``home/kafka/``. One home runs one or the other.

:func:`start_kafka` is idempotent (a running, answering broker recorded in ``state.json`` is
returned as is; for a cluster, the nodes that are not running are started and the others kept)
and waits until the broker (every node, all registered) answers a metadata request. Everything
that can go wrong raises :class:`~compose.services.ServiceError` saying what failed and what to do.
"""

from __future__ import annotations

import base64
import json
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
from typing import Any, Literal, overload

from compose.services import (
    COMPOSE_DIR,
    HOST,
    ServiceError,
    default_cache,
    docker_hint,
    forget_child,
    kill,
    locked,
    pick_port,
    pid_alive,
    read_properties,
    read_state,
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

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaCluster",
    "KafkaNode",
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
class KafkaNode(KafkaBroker):
    """One running node of a cluster (:func:`start_kafka` with ``brokers=3``): a
    :class:`KafkaBroker` whose ``bootstrap`` is this node's own listener, with its ``node_id``."""

    node_id: int


@dataclass(frozen=True)
class KafkaCluster:
    """A KRaft cluster of combined broker+controller nodes started by ``start_kafka(home, brokers=3)``.

    Attributes:
        bootstrap: ``bootstrap.servers`` for clients: every node's listener, comma-separated, in
            node id order (a client needs any one of them alive).
        nodes: the nodes running now, by node id (all of them after a start).
        size: how many nodes the cluster has (3).
        ports: ``{node id: (client port, controller port)}`` of every node, running or not.
    """

    bootstrap: str
    nodes: tuple[KafkaNode, ...]
    size: int
    ports: dict[int, tuple[int, int]]

    @property
    def down(self) -> tuple[int, ...]:
        """Node ids of the nodes not running."""
        up = {n.node_id for n in self.nodes}
        return tuple(i for i in sorted(self.ports) if i not in up)

    def node(self, node_id: int) -> KafkaNode | None:
        """The running node ``node_id``, or None."""
        return next((n for n in self.nodes if n.node_id == node_id), None)


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


_SINGLE = """\
# One broker: internal topics cannot have more than one replica. Without these, transactions
# (faust's exactly_once) and consumer groups cannot start.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
default.replication.factor=1
min.insync.replicas=1
"""

_REPLICATED = """\
# Three copies of everything; a write with acks=all needs two of them in sync, so one node can be
# lost without losing an acknowledged event, and a write is refused rather than kept on one copy.
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
# A local cluster: fewer internal partitions and threads than a server's defaults (50 and 8),
# three JVMs share a laptop's cores.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
num.io.threads=2
num.network.threads=2
num.replica.fetchers=1
background.threads=4
"""


def _write_config(files: _Files, node_id: int, ports: dict[int, tuple[int, int]]) -> None:
    """``server.properties`` (and the log4j file) of node ``node_id`` of a KRaft quorum whose nodes
    listen on ``ports`` (``{node id: (client port, controller port)}``): the single broker is node 1
    of a quorum of one; a cluster's nodes replicate everything three times."""
    voters = ",".join(f"{i}@{HOST}:{c}" for i, (_, c) in sorted(ports.items()))
    port, cport = ports[node_id]
    single = len(ports) == 1
    role = ("Single-node KRaft: this process is both broker and controller." if single else
            f"Node {node_id} of a {len(ports)}-node KRaft cluster: every node is both broker and controller, "
            "and the\n# controllers form one quorum.")
    config = f"""\
# Written by marlgrc's launcher (compose/kafka.py); rewritten on every start.
# {role}
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}
advertised.listeners=PLAINTEXT://{HOST}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={files.data}

{_SINGLE if single else _REPLICATED}group.initial.rebalance.delay.ms=0

# After a crash (SIGKILL) the controller fences the dead node (a restarted broker can re-register)
# once its session expires: 9 s by default; shorter here, for quick crash-recovery tests.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000

# Topics are created explicitly (with their partitions and configs), never by a typo.
auto.create.topics.enable=false
num.partitions=3
delete.topic.enable=true
"""
    write_atomic(files.config, config)
    _write_log4j(files)


def _write_log4j(files: _Files) -> None:
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


def _answers(bootstrap: str, timeout: float, brokers: int = 1) -> str | None:
    """None if one metadata request to ``bootstrap`` lists ``brokers`` brokers, else why not."""
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
    if len(md.brokers) < brokers:
        return f"{len(md.brokers)} of {brokers} brokers in the metadata" if md.brokers else "no broker in the metadata"
    return None


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


@overload
def start_kafka(home: Path, port: int | None = None, *, timeout: float | None = None,
                brokers: Literal[1] = 1) -> KafkaBroker: ...


@overload
def start_kafka(home: Path, port: int | None = None, *, timeout: float | None = None,
                brokers: int) -> KafkaBroker | KafkaCluster: ...


def start_kafka(home: Path, port: int | None = None, *, timeout: float | None = None,
                brokers: int = 1) -> KafkaBroker | KafkaCluster:
    """Start (or find) the KRaft Kafka of ``home`` and wait until it answers.

    Args:
        home: the service home; a single broker lives in ``home/kafka``, a cluster in
            ``home/kafka-cluster``.
        port: the client (PLAINTEXT) port on 127.0.0.1. None: the port of the previous run of
            this home if it is free, else a free one. The controller port is chosen the same way.
            For a cluster, node N listens on ``port + N - 1``.
        timeout: seconds to wait for the broker to answer a metadata request (default 60; for a
            cluster 180, until every node answers and all are registered).
        brokers: 1 (default): the single-node broker, returned as a :class:`KafkaBroker`.
            3: a :class:`KafkaCluster` of three combined broker+controller nodes (one quorum);
            nodes of a running cluster that are down (killed) are started again, on their ports.

    Returns:
        The running broker or cluster. Idempotent: if ``home/kafka/state.json`` names a live broker
        it is returned (after it answers) instead of starting a second one; likewise the nodes of
        a cluster.

    Raises:
        ServiceError: Java or Maven missing, a port in use, the other kind (single or cluster)
            already running in this home, or the broker died or did not answer in time (the
            message holds the tail of the log).
    """
    if brokers == 1:
        files = _Files.of(home)
        cluster = _cluster_status(home)
        if cluster is not None:
            raise ServiceError(f"a Kafka cluster ({cluster.bootstrap}) already runs in {home}; stop it first "
                               f"(`marlgrc down`, or stop_kafka(home)) to start a single broker there, or use "
                               f"another home")
        with locked(files.lock):
            return _start_locked(files, port, None, 60 if timeout is None else timeout)
    if brokers != CLUSTER_SIZE:
        raise ServiceError(f"brokers={brokers}: the launcher runs 1 broker or a cluster of {CLUSTER_SIZE}; "
                           f"pass 1 or {CLUSTER_SIZE}")
    single = _running(_Files.of(home)) if _Files.of(home).state.exists() else None
    if single is not None:
        raise ServiceError(f"a single Kafka broker ({single.bootstrap}) already runs in {home}; stop it first "
                           f"(`marlgrc down`, or stop_kafka(home)) to start a {CLUSTER_SIZE}-broker cluster there, "
                           f"or use another home")
    cluster = _ClusterFiles.of(home)
    with locked(cluster.lock):
        return _start_cluster_locked(cluster, port, 180 if timeout is None else timeout)


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
    _write_config(files, 1, {1: (port, cport)})
    log_offset = size(files.log)
    _format(files, java, jars, _cluster_id(), timeout)
    proc = _spawn_broker(files, java, jars, ["-Xmx1g", "-Xms256m"])
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


def _jvm_common(files: _Files) -> list[str]:
    return [f"-Dlog4j.configuration=file:{files.log4j}", f"-Dkafka.logs.dir={files.dir}",
            "-Djava.awt.headless=true"]


def _format(files: _Files, java: str, jars: Path, cluster_id: str, timeout: float) -> None:
    """Format ``files.data`` for cluster ``cluster_id`` unless it is formatted already."""
    if (files.data / "meta.properties").is_file():
        return
    argv = [java, "-Xmx256m", *_jvm_common(files), "-cp", f"{jars}/*", "kafka.tools.StorageTool",
            "format", "-t", cluster_id, "-c", str(files.config)]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=files.dir,
                         stdin=subprocess.DEVNULL, timeout=max(timeout, 60))
    if res.returncode != 0:
        raise ServiceError(
            f"formatting Kafka storage {files.data} failed (exit {res.returncode}; command: "
            f"{' '.join(argv)}): if the directory holds data from another cluster, remove it "
            f"(stop_kafka(home, remove_data=True)) and retry. Output:\n"
            f"{(res.stdout + res.stderr).strip()[-3000:]}"
        )


def _spawn_broker(files: _Files, java: str, jars: Path, heap: list[str]) -> subprocess.Popen[bytes]:
    argv = [java, *heap, "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", *_jvm_common(files), "-cp", f"{jars}/*",
            "kafka.Kafka", str(files.config)]
    return spawn(argv, cwd=files.dir, log_path=files.log)


def _stop_locked(files: _Files, sig: int, timeout: float) -> KafkaBroker | None:
    broker = _running(files)
    if broker is not None:
        terminate(broker.pid, sig, timeout)
    files.state.unlink(missing_ok=True)
    return broker



# --------------------------------------------------------------------------------------------
# A cluster of three combined broker+controller nodes
# --------------------------------------------------------------------------------------------

CLUSTER_SIZE = 3
"""Nodes of the launcher's cluster: the smallest quorum that survives the loss of one."""

_NODE_HEAP = ["-Xmx384m", "-Xms128m"]
"""Each node's JVM heap: three of them share a developer's machine."""


@dataclass(frozen=True)
class _ClusterFiles:
    """Where the cluster of one home keeps its files: ``cluster.json`` (cluster id, node ports)
    and one :class:`_Files` directory per node."""

    dir: Path

    @classmethod
    def of(cls, home: Path) -> _ClusterFiles:
        return cls(Path(home).expanduser().resolve() / "kafka-cluster")

    lock = property(lambda self: self.dir / ".lock")
    spec = property(lambda self: self.dir / "cluster.json")

    def node(self, node_id: int) -> _Files:
        return _Files(self.dir / f"node-{node_id}")


def _read_spec(cf: _ClusterFiles) -> tuple[str, dict[int, tuple[int, int]]] | None:
    """(cluster id, {node id: (client port, controller port)}) of the cluster's last start."""
    spec = read_state(cf.spec)
    try:
        return str(spec["cluster_id"]), {int(n["node_id"]): (int(n["port"]), int(n["controller_port"]))
                                         for n in spec["nodes"]}
    except (TypeError, KeyError, ValueError):
        return None


def _running_node(files: _Files) -> KafkaNode | None:
    def parse(state: dict[str, Any]) -> KafkaNode:
        return KafkaNode(bootstrap=str(state["bootstrap"]), port=int(state["port"]),
                         controller_port=int(state["controller_port"]),
                         data_dir=Path(state.get("data_dir", files.data)), pid=int(state["pid"]),
                         log_path=Path(state.get("log_path", files.log)), node_id=int(state["node_id"]))

    return running_service(files.state, parse, "Kafka node", "kafka.Kafka", str(files.config))


def _cluster_of(cf: _ClusterFiles) -> KafkaCluster | None:
    """The cluster as recorded, with the nodes whose processes are alive (None: none recorded)."""
    spec = _read_spec(cf)
    if spec is None:
        return None
    _, ports = spec
    nodes = tuple(n for n in (_running_node(cf.node(i)) for i in sorted(ports)) if n is not None)
    return KafkaCluster(bootstrap=",".join(f"{HOST}:{p}" for _, (p, _) in sorted(ports.items())),
                        nodes=nodes, size=len(ports), ports=ports)


def _cluster_status(home: Path) -> KafkaCluster | None:
    """The cluster of ``home`` if any of its nodes runs, else None."""
    cf = _ClusterFiles.of(home)
    if not cf.spec.exists():
        return None
    with locked(cf.lock):
        cluster = _cluster_of(cf)
    return cluster if cluster is not None and cluster.nodes else None


def _cluster_answers(cluster: KafkaCluster, timeout: float) -> str | None:
    """None if every node answers a metadata request listing all ``size`` brokers, else why not."""
    for node in cluster.nodes:
        err = _answers(node.bootstrap, timeout, brokers=cluster.size)
        if err is not None:
            return f"node {node.node_id} ({node.bootstrap}): {err}"
    return None


def _start_cluster_locked(cf: _ClusterFiles, port: int | None, timeout: float) -> KafkaCluster:
    deadline = time.monotonic() + timeout
    spec = _read_spec(cf)
    if spec is not None and len(spec[1]) != CLUSTER_SIZE:
        raise ServiceError(f"{cf.dir} holds a {len(spec[1])}-node cluster, not {CLUSTER_SIZE}: remove its data "
                           f"(`marlgrc down --purge`) to start a new one")
    before = _cluster_of(cf) if spec is not None else None
    running = {n.node_id: n for n in before.nodes} if before is not None else {}
    if port is not None and running and before is not None and before.ports[1][0] != port:
        raise ServiceError(f"the Kafka cluster of {cf.dir} already runs on {before.bootstrap}, not from port "
                           f"{port}: use it, or stop it first to move it")
    java = _java()
    jars = kafka_jars()
    cluster_id = spec[0] if spec is not None else _cluster_id()
    ports = _cluster_ports(spec[1] if spec is not None else {}, running, port)
    write_atomic(cf.spec, json.dumps({
        "cluster_id": cluster_id, "kafka_version": KAFKA_VERSION,
        "nodes": [{"node_id": i, "port": p, "controller_port": c} for i, (p, c) in sorted(ports.items())],
    }, indent=2) + "\n")

    started: list[KafkaNode] = []
    offsets: dict[int, int] = {}
    try:
        for i in sorted(ports):
            if i in running:
                continue
            files = cf.node(i)
            files.data.mkdir(parents=True, exist_ok=True)
            _write_config(files, i, ports)
            offsets[i] = size(files.log)
            _format(files, java, jars, cluster_id, timeout)
        for i in sorted(offsets):  # all at once: a node waits for a quorum of the others
            files = cf.node(i)
            proc = _spawn_broker(files, java, jars, _NODE_HEAP)
            node = KafkaNode(bootstrap=f"{HOST}:{ports[i][0]}", port=ports[i][0], controller_port=ports[i][1],
                             data_dir=files.data, pid=proc.pid, log_path=files.log, node_id=i)
            write_state(files.state, node, kafka_version=KAFKA_VERSION)
            started.append(node)
        cluster = KafkaCluster(bootstrap=",".join(f"{HOST}:{p}" for _, (p, _) in sorted(ports.items())),
                               nodes=tuple(sorted([*running.values(), *started], key=lambda n: n.node_id)),
                               size=len(ports), ports=ports)
        _wait_cluster(cluster, cf, deadline, offsets)
        if not running:  # a cold start: create the internal topics while every node is there
            _create_internal_topics(cluster.bootstrap, max(deadline - time.monotonic(), 30))
    except BaseException:
        for node in started:
            terminate(node.pid, signal.SIGKILL, 5)
            cf.node(node.node_id).state.unlink(missing_ok=True)
        raise
    if started:
        log.info("Kafka %s cluster on %s: started nodes %s", KAFKA_VERSION, cluster.bootstrap,
                 [n.node_id for n in started])
    return cluster


def _cluster_ports(previous: dict[int, tuple[int, int]], running: dict[int, KafkaNode],
                   port: int | None) -> dict[int, tuple[int, int]]:
    """Every node's (client, controller) ports. While some nodes run, the quorum's addresses are
    fixed: the others come back on their recorded ports. From cold, the previous ports where free,
    else fresh ones (node N on ``port + N - 1`` when ``port`` is given)."""
    if running:
        for i, (p, c) in previous.items():
            if i not in running:
                pick_port(p, None, f"Kafka node {i} client", set())
                pick_port(c, None, f"Kafka node {i} controller", set())
        return dict(previous)
    ports: dict[int, tuple[int, int]] = {}
    taken: set[int] = set()
    for i in range(1, CLUSTER_SIZE + 1):
        prev_p, prev_c = previous.get(i, (None, None))
        p = pick_port(None if port is None else port + i - 1, None if port is not None else prev_p,
                      f"Kafka node {i} client", taken)
        taken.add(p)
        c = pick_port(None, prev_c, f"Kafka node {i} controller", taken)
        taken.add(c)
        ports[i] = (p, c)
    return ports


def _wait_cluster(cluster: KafkaCluster, cf: _ClusterFiles, deadline: float, offsets: dict[int, int]) -> None:
    """Poll until every node answers with all nodes registered; ServiceError if one dies or time runs out."""
    while True:
        for node in cluster.nodes:
            if not pid_alive(node.pid):
                raise ServiceError(
                    f"Kafka node {node.node_id} (pid {node.pid}, {node.bootstrap}) exited during start-up: see "
                    f"{node.log_path}; fix the cause shown below (a port taken, a data dir of another "
                    f"cluster: `marlgrc down --purge` resets it) and retry. Log tail:\n"
                    f"{tail(node.log_path, offsets.get(node.node_id, 0))}")
        err = _cluster_answers(cluster, min(2.0, max(deadline - time.monotonic(), 0.5)))
        if err is None:
            return
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- node {n.node_id} ({n.log_path}):\n{tail(n.log_path, offsets.get(n.node_id, 0), 15)}"
                             for n in cluster.nodes)
            raise ServiceError(
                f"the Kafka cluster in {cf.dir} did not answer in time ({err}): retry with a larger timeout "
                f"(three JVMs starting on few cores) or stop it with `marlgrc down`. Log tails:\n{logs}")
        time.sleep(0.3)


def _create_internal_topics(bootstrap: str, timeout: float) -> None:
    """Create ``__consumer_offsets`` and ``__transaction_state`` now, with three replicas, so that a
    consumer group or a transaction first used while a node is down does not find too few brokers
    to create them."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

    quiet = {"bootstrap.servers": bootstrap, "logger": _quiet_logger()}
    deadline = time.monotonic() + timeout
    consumer = Consumer({**quiet, "group.id": "marlgrc-launcher", "enable.auto.commit": False})
    try:
        while True:  # the first request finds no coordinator until the new topic has loaded: retry
            try:
                consumer.committed([TopicPartition("__consumer_offsets", 0)], timeout=max(1.0, deadline - time.monotonic()))
                break
            except KafkaException as exc:
                if not exc.args[0].retriable() and exc.args[0].code() not in (
                        KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
                        KafkaError.COORDINATOR_LOAD_IN_PROGRESS) or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        Producer({**quiet, "transactional.id": "marlgrc-launcher"}).init_transactions(
            max(10.0, deadline - time.monotonic()))
    except KafkaException as exc:
        raise ServiceError(f"the Kafka cluster on {bootstrap} could not create its internal topics ({exc}): "
                           f"see the nodes' kafka.log files, then retry") from exc
    finally:
        consumer.close()


def _stop_cluster_locked(cf: _ClusterFiles, sig: int, timeout: float, node_ids: list[int] | None = None
                         ) -> list[KafkaNode]:
    """Signal the running nodes (``node_ids``, default all) at once, SIGKILL those still alive after
    ``timeout`` s; returns the nodes that were running."""
    cluster = _cluster_of(cf)
    if cluster is None:
        return []
    nodes = [n for n in cluster.nodes if node_ids is None or n.node_id in node_ids]
    for n in nodes:
        send_signal(n.pid, sig)
    deadline = time.monotonic() + timeout
    for n in nodes:
        if not wait_exit(n.pid, max(0.0, deadline - time.monotonic())):
            log.warning("Kafka node %d (pid %d) did not exit %.0f s after %s: sending SIGKILL",
                        n.node_id, n.pid, timeout, signal.Signals(sig).name)
            kill(n.pid)
        forget_child(n.pid)
    for i in (cluster.ports if node_ids is None else node_ids):
        cf.node(i).state.unlink(missing_ok=True)
    return nodes


def stop_kafka(home: Path, *, remove_data: bool = False, timeout: float = 30) -> bool:
    """Stop the Kafka of ``home`` (the single broker, or every node of the cluster): SIGTERM
    (controlled shutdown), SIGKILL after ``timeout`` s.

    Removes ``state.json``; with ``remove_data`` also the data directories (topics and the
    cluster id: the next start formats a fresh cluster). Returns whether a broker was running.
    """
    files, cf = _Files.of(home), _ClusterFiles.of(home)
    broker = None
    nodes: list[KafkaNode] = []
    if files.dir.is_dir():
        with locked(files.lock):
            broker = _stop_locked(files, signal.SIGTERM, timeout)
            if remove_data:
                shutil.rmtree(files.data, ignore_errors=True)
    if cf.dir.is_dir():
        with locked(cf.lock):
            nodes = _stop_cluster_locked(cf, signal.SIGTERM, timeout)
            if remove_data:
                for i in range(1, CLUSTER_SIZE + 1):
                    shutil.rmtree(cf.node(i).data, ignore_errors=True)
                cf.spec.unlink(missing_ok=True)
    if broker is not None:
        log.info("Kafka on %s stopped (pid %d)", broker.bootstrap, broker.pid)
    if nodes:
        log.info("Kafka cluster nodes %s stopped", [n.node_id for n in nodes])
    return broker is not None or bool(nodes)


def kill_kafka(home: Path, node: int | None = None) -> bool:
    """SIGKILL the Kafka of ``home`` (crash tests): the single broker, or cluster node ``node``
    (default: every node). Data and config stay, so a later :func:`start_kafka` recovers the log
    on the same ports. Returns whether one was running."""
    files, cf = _Files.of(home), _ClusterFiles.of(home)
    found = False
    if files.dir.is_dir() and node in (None, 1):
        with locked(files.lock):
            broker = _running(files)
            if broker is not None:
                kill(broker.pid)
                found = True
            files.state.unlink(missing_ok=True)
    if cf.dir.is_dir():
        with locked(cf.lock):
            found = bool(_stop_cluster_locked(cf, signal.SIGKILL, 10, None if node is None else [node])) or found
    return found


def kafka_status(home: Path) -> KafkaBroker | KafkaCluster | None:
    """The running Kafka of ``home``: the single broker, the cluster (with the nodes that run; see
    :attr:`KafkaCluster.down`) if any of its nodes runs, or None (a stale ``state.json`` is removed).

    Checks the processes only (alive, and this home's ``kafka.Kafka``); it does not wait for them
    to answer.
    """
    files = _Files.of(home)
    if files.state.exists():
        with locked(files.lock):
            broker = _running(files)
        if broker is not None:
            return broker
    return _cluster_status(home)


def restart_kafka(home: Path, *, timeout: float = 60, node: int | None = None) -> KafkaBroker | KafkaCluster:
    """Stop the Kafka of ``home`` cleanly and start it again on the same data dir and ports.

    Clients configured with the old ``bootstrap`` reconnect by themselves. If no broker was
    running, starts one on the ports of the previous run (when free). For a running cluster,
    restarts node ``node``, or every node one after the other (each answers, with all nodes
    registered, before the next stops).
    """
    if _cluster_status(home) is not None:
        cf = _ClusterFiles.of(home)
        cluster = None
        with locked(cf.lock):
            for i in ([node] if node is not None else list(range(1, CLUSTER_SIZE + 1))):
                _stop_cluster_locked(cf, signal.SIGTERM, 30, [i])
                cluster = _start_cluster_locked(cf, None, max(timeout, 120))
        assert cluster is not None
        return cluster
    files = _Files.of(home)
    with locked(files.lock):
        old = _stop_locked(files, signal.SIGTERM, 30)
        port = old.port if old else None
        cport = old.controller_port if old else None
        return _start_locked(files, port, cport, timeout)

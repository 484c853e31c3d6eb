"""The service launcher (compose/kafka.py, compose/postgres.py) against real Kafka and PostgreSQL.

Each test gets its own home under /tmp (short paths: PostgreSQL's unix socket lives there) and
its own free ports, so these tests can run beside a suite that uses the shared services.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from compose import (
    ServiceError,
    kafka_jars,
    kafka_status,
    kill_kafka,
    postgres_status,
    restart_kafka,
    start_kafka,
    start_postgres,
    stop_kafka,
    stop_postgres,
)


@pytest.fixture
def home() -> Iterator[Path]:
    """A private service home; whatever a test left running there is stopped afterwards."""
    path = Path(tempfile.mkdtemp(prefix="marlgrc-launcher-"))
    try:
        yield path
    finally:
        try:
            stop_kafka(path, timeout=10)
        finally:
            stop_postgres(path, timeout=10)
            shutil.rmtree(path, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    futures[topic].result(timeout=30)


def _produce(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    errors: list[object] = []
    producer.produce(topic, key=key, value=value, on_delivery=lambda err, _msg: err and errors.append(err))
    assert producer.flush(30) == 0, "message not delivered within 30 s"
    assert not errors, errors


def _read_all(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> dict[bytes, bytes]:
    """All (key, value) pairs of the topic's 3 partitions, read from the beginning until
    ``expected`` messages arrived (assign(), no group rebalance to wait for)."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"launcher-test-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
    })
    got: dict[bytes, bytes] = {}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got[msg.key()] = msg.value()
    finally:
        consumer.close()
    return got


@pytest.mark.integration
def test_kafka_start_roundtrip_restart_kill_stop(home: Path) -> None:
    broker = start_kafka(home)
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.data_dir == home.resolve() / "kafka" / "data"
    assert (home / "kafka" / "state.json").is_file()
    assert (home / "kafka" / "server.properties").is_file()
    assert kafka_status(home) == broker
    assert start_kafka(home) == broker, "a second start returns the running broker"

    topic = f"launcher-{uuid.uuid4().hex[:8]}"
    _create_topic(broker.bootstrap, topic)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    _produce(producer, topic, b"k1", b"before restart")
    assert _read_all(broker.bootstrap, topic, 1) == {b"k1": b"before restart"}

    # A clean restart keeps ports and data; the producer reconnects by itself.
    restarted = restart_kafka(home)
    assert (restarted.port, restarted.controller_port, restarted.data_dir) == (
        broker.port, broker.controller_port, broker.data_dir)
    assert restarted.pid != broker.pid
    _produce(producer, topic, b"k2", b"after restart")
    assert _read_all(broker.bootstrap, topic, 2) == {b"k1": b"before restart", b"k2": b"after restart"}

    # A crash (SIGKILL): a later start recovers the log on the same ports.
    assert kill_kafka(home)
    assert kafka_status(home) is None
    recovered = start_kafka(home)
    assert recovered.bootstrap == broker.bootstrap
    assert _read_all(broker.bootstrap, topic, 2) == {b"k1": b"before restart", b"k2": b"after restart"}
    producer.flush(5)
    del producer

    assert stop_kafka(home)
    assert kafka_status(home) is None
    assert not (home / "kafka" / "state.json").exists()
    assert _port_free(broker.port) and _port_free(broker.controller_port)
    assert not stop_kafka(home), "nothing left to stop"
    assert stop_kafka(home, remove_data=True) is False
    assert not broker.data_dir.exists()


@pytest.mark.integration
def test_postgres_start_query_stop(home: Path) -> None:
    server = start_postgres(home)
    assert server.host == "127.0.0.1" and server.superuser == "postgres"
    assert server.dsn.endswith(f"@127.0.0.1:{server.port}/marlgrc")
    assert postgres_status(home) == server
    assert start_postgres(home) == server, "a second start returns the running server"

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("marlgrc", "postgres")
        assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("15")
        conn.execute("CREATE TABLE launcher_probe (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO launcher_probe VALUES (1, 'kept')")

    assert stop_postgres(home)
    assert postgres_status(home) is None
    assert _port_free(server.port)

    # Same data directory and port on the next start.
    again = start_postgres(home)
    assert again.port == server.port and again.data_dir == server.data_dir
    with psycopg.connect(again.dsn) as conn:
        assert conn.execute("SELECT note FROM launcher_probe WHERE id = 1").fetchone() == ("kept",)
    assert stop_postgres(home, remove_data=True)
    assert not server.data_dir.exists()
    assert not stop_postgres(home)


@pytest.mark.integration
def test_missing_java_and_maven_say_what_to_install(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)

    with pytest.raises(ServiceError, match=r"Java 17 not found") as exc:
        start_kafka(home, timeout=5)
    assert "apt-get install openjdk-17-jre-headless" in str(exc.value)
    assert "docker-compose.yml" in str(exc.value)
    assert kafka_status(home) is None

    with pytest.raises(ServiceError, match=r"Maven not found") as exc:
        kafka_jars(tmp_path / "cache")
    assert "apt-get install maven" in str(exc.value)

"""marlgrc's local services: Kafka 3.9 (KRaft, one node or a cluster of three) and PostgreSQL 15.

With Docker: ``docker compose -f compose/docker-compose.yml up -d``. Without Docker, the launcher
in this package starts them from their own distributions: :mod:`compose.kafka` fetches Kafka's
jars with Maven (cached) and runs the broker with Java 17; :mod:`compose.postgres` runs a private
PostgreSQL cluster from the distribution's binaries; :mod:`compose.services` holds what both
share (home, ports, processes, state files, :class:`ServiceError`)::

    from compose import default_home, start_kafka, start_postgres, stop_kafka, stop_postgres

    broker = start_kafka(default_home())        # broker.bootstrap == "127.0.0.1:<port>"
    pg = start_postgres(default_home())         # pg.dsn == "postgresql://postgres@127.0.0.1:<port>/marlgrc"
    ...
    stop_kafka(default_home()); stop_postgres(default_home())

    cluster = start_kafka(home, brokers=3)      # cluster.bootstrap == "127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>"
    kill_kafka(home, node=2); start_kafka(home, brokers=3)   # a crashed node, started again

Every ``start_*`` is idempotent and waits until the service answers a real client request;
services run detached and outlive the process that started them until a ``stop_*``.
"""

from compose.kafka import (
    KAFKA_VERSION,
    KafkaBroker,
    KafkaCluster,
    KafkaNode,
    kafka_jars,
    kafka_status,
    kill_kafka,
    restart_kafka,
    start_kafka,
    stop_kafka,
)
from compose.postgres import PostgresServer, postgres_status, start_postgres, stop_postgres
from compose.services import ServiceError, default_cache, default_home

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaCluster",
    "KafkaNode",
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

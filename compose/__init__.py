"""marlgrc's local services: Kafka 3.9 (KRaft, single node) and PostgreSQL 15.

With Docker: ``docker compose -f compose/docker-compose.yml up -d``. Without Docker, the native
launcher in :mod:`compose.native` fetches Kafka's jars with Maven (cached), runs the broker with
Java 17 and a private PostgreSQL cluster from the distribution's binaries::

    from compose import default_home, start_kafka, start_postgres, stop_kafka, stop_postgres

    broker = start_kafka(default_home())        # broker.bootstrap == "127.0.0.1:<port>"
    pg = start_postgres(default_home())         # pg.dsn == "postgresql://postgres@127.0.0.1:<port>/marlgrc"
    ...
    stop_kafka(default_home()); stop_postgres(default_home())
"""

from compose.native import (
    KAFKA_VERSION,
    KafkaBroker,
    PostgresServer,
    ServiceError,
    default_cache,
    default_home,
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

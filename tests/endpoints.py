"""Endpoints of the real services the tests talk to.

This is the one place tests read them from. Each constant comes from an
environment variable and defaults to what ``scripts/services.sh start`` runs on
127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Final

KAFKA_BOOTSTRAP: Final[str] = os.environ.get("SLUICE_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
"""Kafka-compatible broker (tansu), as ``bootstrap.servers``."""

POSTGRES_URL: Final[str] = os.environ.get(
    "SLUICE_POSTGRES_URL", "postgresql://postgres@127.0.0.1:55432/postgres"
)
"""PostgreSQL 15 with ``wal_level=logical``, trust authentication."""

MYSQL_URL: Final[str] = os.environ.get("SLUICE_MYSQL_URL", "mysql://root@127.0.0.1:53306/sluice")
"""MariaDB 10.11: database ``sluice``, root over TCP without a password."""

RABBITMQ_URL: Final[str] = os.environ.get(
    "SLUICE_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"
)
"""RabbitMQ, AMQP 0-9-1."""

RABBITMQ_HTTP: Final[str] = os.environ.get("SLUICE_RABBITMQ_HTTP", "http://127.0.0.1:15672")
"""RabbitMQ's management HTTP API (user guest / guest), to close connections from a test."""

PUBSUB_EMULATOR_HOST: Final[str] = os.environ.get("SLUICE_PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")
"""GCP Pub/Sub emulator, as the value of ``PUBSUB_EMULATOR_HOST``."""

PUBSUB_PROJECT: Final[str] = os.environ.get("SLUICE_PUBSUB_PROJECT", "sluice-test")
"""Project id used against the Pub/Sub emulator (any id is accepted)."""

AWS_ENDPOINT: Final[str] = os.environ.get("SLUICE_AWS_ENDPOINT", "http://127.0.0.1:5000")
"""moto server: S3 and Kinesis."""

AWS_ACCESS_KEY_ID: Final[str] = os.environ.get("SLUICE_AWS_ACCESS_KEY_ID", "test")
AWS_SECRET_ACCESS_KEY: Final[str] = os.environ.get("SLUICE_AWS_SECRET_ACCESS_KEY", "test")
AWS_REGION: Final[str] = os.environ.get("SLUICE_AWS_REGION", "us-east-1")

SCHEMA_REGISTRY_URL: Final[str] = os.environ.get(
    "SLUICE_SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081"
)
"""The test schema registry (``tests/registry_server.py``, Confluent REST API)."""

KINESIS_ENDPOINT: Final[str] = os.environ.get("SLUICE_KINESIS_ENDPOINT", "http://127.0.0.1:4568")
"""kinesis-local (kinesis-mock): Kinesis with resharding (moto keeps writing to a split parent)."""

"""Shared fixtures: one real PostgreSQL and one real Kafka-protocol broker per test session
(the embedded ones `postback up` uses), and per test a fresh database and topic namespace."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from postback.embedded import EMBEDDED_FETCH_MAX_WAIT_MS, EmbeddedKafka, EmbeddedPostgres, free_port
from postback.stack import PACKAGES
from postback_libs.db import migrate, schema_for
from postback_libs.settings import SERVICES, Settings
from postback_libs.topics import ensure_topics


@pytest.fixture(scope="session")
def infra(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedKafka]]:
    root: Path = tmp_path_factory.mktemp("infra")
    pg = EmbeddedPostgres(root / "pg", free_port(), durable=False)
    kafka = EmbeddedKafka(free_port(), root / "broker.log")
    pg.start()
    kafka.start()
    try:
        yield pg, kafka
    finally:
        kafka.stop()
        pg.stop()


@pytest.fixture
async def settings(infra: tuple[EmbeddedPostgres, EmbeddedKafka]) -> AsyncIterator[Settings]:
    """Settings for one test: its own database and its own topics."""
    pg, kafka = infra
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.create_database(name)
    s = Settings(
        kafka_bootstrap=kafka.bootstrap,
        database_url=pg.dsn(name),
        topic_prefix=f"{name}.",
        topic_partitions=3,
        operator_token="test-operator-token",  # type: ignore[arg-type]
        secret_key="test-secret-key-of-at-least-32-characters",  # type: ignore[arg-type]
        allowed_networks="127.0.0.0/8",
        retry_schedule="0,0.2,0.4,0.8",
        owner_timeout_seconds=5,
        shutdown_grace_seconds=4,
        consumer_max_records=200,
        kafka_session_timeout_ms=2000,
        kafka_fetch_max_wait_ms=EMBEDDED_FETCH_MAX_WAIT_MS,
    )
    await ensure_topics(s)
    # As `postback migrate` does before a deployment starts: every schema exists, so a service
    # that reads the read model works without projection running in the test.
    for service in SERVICES:
        await migrate(s.database_url, schema_for(service), PACKAGES[service])
    yield s


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests are marked by folder, so `-m unit` etc. select the right layer.
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, layer))


os.environ.setdefault("POSTBACK_LOG_LEVEL", "WARNING")

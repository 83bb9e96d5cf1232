"""Where each phase of the benchmark runs, and the stack of service processes it drives.

One PostgreSQL serves the whole run, with a fresh database per phase. The embedded broker keeps
its whole log in memory and its memory grows with it, so each phase gets a fresh broker: no phase
pays for the log of the one before, and the broker's memory stays bounded. With an external
broker and database (the test fixtures, a real cluster) each phase gets its own topic prefix and
database instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from postback.embedded import (
    EMBEDDED_FETCH_MAX_WAIT_MS,
    EMBEDDED_TOPIC_PARTITIONS,
    EmbeddedKafka,
    EmbeddedPostgres,
    free_port,
)
from postback.stack import LOCAL_NETWORKS, Child, Stack
from postback_libs.settings import SERVICES, Settings

# A throwaway stack on loopback, gone at the end of the run.
OPERATOR_TOKEN = "bench-operator-token"  # noqa: S105
SECRET_KEY = "bench-secret-key-of-at-least-32-characters"  # noqa: S105
# Up to 4 instances of one service plus the other five, each with a pool of 10 and a relay
# connection, plus the harness's own: more than PostgreSQL's default of 100.
MAX_CONNECTIONS = 300


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def topic_partitions(*, embedded: bool) -> int:
    """What `postback up` creates on the embedded broker; a real one keeps the default."""
    default: int = Settings.model_fields["topic_partitions"].default
    return EMBEDDED_TOPIC_PARTITIONS if embedded else default


@dataclass(frozen=True)
class Place:
    """A phase's broker, database and topic namespace."""

    name: str
    kafka_bootstrap: str
    database_url: str
    topic_prefix: str
    broker_pid: int | None
    postgres_pid: int | None

    @property
    def fetch_max_wait_ms(self) -> int:
        # What `postback up` sets on the embedded broker; a real one keeps the default.
        default: int = Settings.model_fields["kafka_fetch_max_wait_ms"].default
        return EMBEDDED_FETCH_MAX_WAIT_MS if self.broker_pid is not None else default

    @property
    def topic_partitions(self) -> int:
        return topic_partitions(embedded=self.broker_pid is not None)

    def settings(self, **over: Any) -> Settings:
        fields: dict[str, Any] = {
            "kafka_bootstrap": self.kafka_bootstrap,
            "database_url": self.database_url,
            "topic_prefix": self.topic_prefix,
            "operator_token": OPERATOR_TOKEN,
            "secret_key": SECRET_KEY,
            "allowed_networks": LOCAL_NETWORKS,
            "kafka_session_timeout_ms": 2000,
            "kafka_fetch_max_wait_ms": self.fetch_max_wait_ms,
            "topic_partitions": self.topic_partitions,
            "log_level": "WARNING",
        }
        return Settings(**{**fields, **over})


class Infra:
    def __init__(
        self, root: Path, kafka_bootstrap: str | None = None, postgres_dsn: str | None = None
    ) -> None:
        self.root = root
        self.external_kafka = kafka_bootstrap
        self.external_pg = postgres_dsn
        self.pg: EmbeddedPostgres | None = None
        self.kafka: EmbeddedKafka | None = None
        self.admin_dsn = postgres_dsn or ""
        self.places = 0

    @property
    def embedded(self) -> bool:
        return self.external_kafka is None

    async def start(self) -> None:
        if self.external_pg is None:
            # Durable, as `postback up` runs it: a call is accepted only once it is on disk.
            self.pg = EmbeddedPostgres(self.root / "pg", free_port(), durable=True)
            self.pg.start()
            self.admin_dsn = self.pg.dsn("postgres")
            conn = await asyncpg.connect(self.admin_dsn)
            try:
                current = int(await conn.fetchval("SHOW max_connections"))
                if current < MAX_CONNECTIONS:
                    await conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
            finally:
                await conn.close()
            if current < MAX_CONNECTIONS:
                self.pg.stop()
                self.pg.start()

    async def place(self, name: str) -> Place:
        """A fresh database, topic namespace and (embedded) broker for one phase."""
        self.places += 1
        tag = f"{name.replace('-', '_')}_{self.places}_{uuid.uuid4().hex[:6]}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{tag}"')
        finally:
            await conn.close()
        if self.embedded:
            if self.kafka is not None:
                self.kafka.stop()
            self.kafka = EmbeddedKafka(free_port(), self.root / "logs" / f"broker-{tag}.log")
            self.kafka.start()
            bootstrap = self.kafka.bootstrap
        else:
            assert self.external_kafka is not None
            bootstrap = self.external_kafka
        return Place(
            name=name,
            kafka_bootstrap=bootstrap,
            database_url=with_database(self.admin_dsn, tag),
            topic_prefix=f"{tag}.",
            broker_pid=self.kafka.pid if self.kafka else None,
            postgres_pid=self.pg.pid if self.pg else None,
        )

    def stop(self) -> None:
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None
        if self.pg is not None:
            self.pg.stop()
            self.pg = None


class BenchStack(Stack):
    """`postback up`'s stack (the same child processes, environment and supervision) on a
    phase's broker and database, with room for more instances of one service."""

    def __init__(self, place: Place, data_dir: Path, **env: str) -> None:
        super().__init__(data_dir, free_port(len(SERVICES)))
        self.place = place
        base = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
        self.env = {
            **base,
            # What `postback up` sets on top of the broker and database.
            "POSTBACK_KAFKA_BOOTSTRAP": place.kafka_bootstrap,
            "POSTBACK_DATABASE_URL": place.database_url,
            "POSTBACK_TOPIC_PREFIX": place.topic_prefix,
            "POSTBACK_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "POSTBACK_SECRET_KEY": SECRET_KEY,
            "POSTBACK_ALLOWED_NETWORKS": LOCAL_NETWORKS,
            "POSTBACK_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "POSTBACK_KAFKA_FETCH_MAX_WAIT_MS": str(place.fetch_max_wait_ms),
            "POSTBACK_TOPIC_PARTITIONS": str(place.topic_partitions),
            "POSTBACK_PUBLIC_URL": f"http://127.0.0.1:{self.port('ingress')}",
            "POSTBACK_CALLBACK_URL": f"http://127.0.0.1:{self.port('owner-adapter')}",
            **env,
        }

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.children[service].port}"

    def instances(self, service: str) -> list[str]:
        """The keys of every running instance of `service` (itself and its extras)."""
        return [k for k, c in self.children.items() if c.service == service]

    def spawn_extra(self, service: str, index: int) -> str:
        """One more process of `service`, on a port of its own, in the same consumer groups."""
        key = f"{service}#{index}"
        port = free_port()
        child = Child(service, port, self.data_dir / "logs" / f"{service}-{index}.log")
        self.children[key] = child
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        child.log = open(child.log_path, "ab")  # noqa: SIM115 - closed by Stack.stop
        env = {**self.env, "POSTBACK_HTTP_PORT": str(port), "POSTBACK_MIGRATE_ON_START": "false"}
        child.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "postback", "run", service],
            stdout=child.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return key

    def pids(self) -> dict[str, int]:
        return {
            key: child.proc.pid
            for key, child in self.children.items()
            if child.proc is not None and child.proc.poll() is None
        }

    def start(self, services: tuple[str, ...] = SERVICES, timeout: float = 120) -> float:
        """Topics, migrations and the service processes; returns the seconds it took."""
        started = time.monotonic()
        self.prepare()
        for service in services:
            self.spawn(service)
        self.wait_ready(timeout)
        return time.monotonic() - started

"""Postgres plumbing: one pool per service, pinned to the service's own schema, and the
migrations runner. Each service owns one schema; its migrations are the numbered `.sql` files in
its package's `migrations/` folder, applied once each, in order, under an advisory lock so that
several replicas starting together migrate once."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import asyncpg

from postback_libs.logging import get_logger

log = get_logger(__name__)

# Every service schema gets the outbox and inbox before its own migrations.
PLUMBING = """
CREATE TABLE IF NOT EXISTS outbox (
    position    bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    event_id    text        NOT NULL,
    type        text        NOT NULL,
    payload     bytea       NOT NULL,
    traceparent text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS inbox (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
"""


# The database away for now (a restart, a failover, no connection to spare): wait and try
# again, never a reason to give up on an event. Anything else a statement raises is about
# what it was asked.
UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,  # TimeoutError and ConnectionError among them
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, out of memory
)
# What says the database cannot be reached at all right now, and nothing of the request: an
# HTTP API answers it 503 "try again" (UNAVAILABLE also holds client-side errors, which are a
# request's own).
UNREACHABLE: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,  # no connection came free in time, or none could be made
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
# What a loop that simply tries again later catches: any database error.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def schema_for(service: str) -> str:
    return service.replace("-", "_")


def lock_key(name: str) -> int:
    """A stable 63-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


async def create_pool(dsn: str, schema: str, *, min_size: int = 2, max_size: int = 10) -> Any:
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": f"{schema},public", "application_name": schema},
        command_timeout=60,
        reset=_rollback_if_open,
    )


async def delete_in_chunks(
    pool: Any, table: str, where: str, *args: Any, chunk: int = 10_000
) -> int:
    """Delete the rows of `table` matching `where` (its parameters `args`), `chunk` rows per
    statement so that no transaction holds many; returns how many went. `table` and `where`
    are the caller's own SQL, never input."""
    statement = (
        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {table} WHERE {where} LIMIT {int(chunk)}))"
    )
    deleted = 0
    while True:
        result: str = await pool.execute(statement, *args)
        n = int(result.split()[-1])
        deleted += n
        if n < chunk:
            return deleted


async def _rollback_if_open(conn: Any) -> None:
    """What a pooled connection needs on its way back. asyncpg's default reset (unlock, close,
    unlisten, RESET ALL) is a round trip per release, and nothing here leaves session state:
    locks are transaction-scoped, settings `SET LOCAL`, no LISTEN on pooled connections."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _migration_files(package: str) -> list[tuple[str, str]]:
    folder = resources.files(package).joinpath("migrations")
    files = sorted((f.name, f.read_text()) for f in folder.iterdir() if f.name.endswith(".sql"))
    return files


async def migrate(dsn: str, schema: str, package: str) -> list[str]:
    """Apply the package's pending migrations to `schema`; returns the names applied."""
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", lock_key(f"migrate:{schema}"))
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET search_path TO "{schema}", public')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in [("000_plumbing.sql", PLUMBING), *_migration_files(package)]:
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_key(f"migrate:{schema}"))
    finally:
        await conn.close()
    if applied:
        log.info("migrated", schema=schema, applied=applied)
    return applied

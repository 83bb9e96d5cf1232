"""Projection: builds the queryable read model — calls and their timelines, balances and
transfers, deliveries and attempts — from the topics, and keeps it disposable: `postback
projection rebuild` replays the topics into a fresh schema and swaps it in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from postback_libs.consumer import Handlers
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_projection import calls, deliveries, ledger
from postback_projection.calls import hold_swap_lock

BATCH_RECORDS = 2000


def handler_sets(*, live: bool = True) -> list[Handlers]:
    """Every consumer group of the projection; a rebuild replays the same ones. Live batches
    hold the swap lock; the rebuild's own do not (it holds the lock while it finishes)."""
    sets = [calls.handlers(), ledger.handlers(), deliveries.handlers()]
    for handlers in sets:
        handlers.before_batch = hold_swap_lock if live else None
        handlers.records_positions = live  # how far a rebuild must replay (rebuild.py)
        # Set-based writes: a batch's fixed costs (a commit, a lock, a few round trips) spread
        # over four times the services' default; nobody waits on a single event here.
        handlers.max_records = BATCH_RECORDS
    return sets


async def purge_old_bodies(conn: Any, older_than: datetime) -> None:
    """Results and response bodies past their retention; calls keep their status and times."""
    await conn.execute(
        "UPDATE calls SET result = NULL WHERE result IS NOT NULL AND completed_at < $1",
        older_than,
    )
    await conn.execute(
        "UPDATE call_events SET data = data - 'result'"
        " WHERE type = 'call.completed' AND data ? 'result' AND time < $1",
        older_than,
    )
    await conn.execute(
        "UPDATE delivery_attempts SET response_excerpt = '', response_headers = NULL"
        " WHERE attempted_at < $1 AND response_excerpt <> ''",
        older_than,
    )


def build(settings: Settings) -> Service:
    service = Service("projection", "postback_projection", settings)
    for handlers in handler_sets():
        service.consume(handlers)

    @service.readiness
    async def caught_up() -> str | None:
        behind = max((a.lag_seconds() for a in service.appliers), default=0.0)
        if behind > settings.projection_max_lag_seconds:
            events = sum(a.events_behind for a in service.appliers)
            return f"read model {behind:.0f} s ({events} events) behind the topics"
        return None

    @service.purge
    async def forget_old_bodies() -> None:
        cutoff = datetime.now(UTC) - timedelta(days=settings.result_retention_days)
        async with service.pool.acquire() as conn:
            await purge_old_bodies(conn, cutoff)

    return service

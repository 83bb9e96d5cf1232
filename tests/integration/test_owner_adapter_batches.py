"""Owner-adapter's set-based writes against real Postgres: a batch of call events gives the same
dispatches as applying them one at a time, and outcomes written together are still decided one
call at a time (exactly one outcome wins each call; facts are kept whoever wins)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from postback_libs.db import create_pool
from postback_libs.events import CallAccepted, CallCompleted, CallDispatched, CallFailed
from postback_libs.outbox import unit_of_work
from postback_owner_adapter import intake
from postback_owner_adapter.outcomes import OutcomeWriter
from tests.helpers import call_routed, uid

SCHEMA = "owner_adapter"
REFUSED = "owner_refused"


@pytest.fixture
async def pool(settings) -> AsyncIterator[Any]:
    pool = await create_pool(settings.database_url, SCHEMA)
    yield pool
    await pool.close()


async def apply(pool, settings, *steps, claim: int = 0) -> list[str]:
    """One consumer batch: each step gathers one event, then the batch is written; returns the
    calls it made due."""
    async with unit_of_work(pool, "owner-adapter", settings) as uow:
        for step in steps:
            step(uow)
        return [r["request_id"] for r in await intake.write(uow, claim=claim)]


def routed(call):
    return lambda uow: intake.routed(uow, call, None)


def moved(request_id, to):
    return lambda uow: intake.moved(uow, request_id, to)


async def statuses(pool, *request_ids) -> list[str | None]:
    rows = await pool.fetch(
        "SELECT request_id, status FROM dispatches WHERE request_id = ANY($1)", list(request_ids)
    )
    found = {r["request_id"]: r["status"] for r in rows}
    return [found.get(r) for r in request_ids]


async def test_a_batch_applies_its_events_as_one_at_a_time_would(pool, settings):
    a, b, c = (call_routed("https://o.example/") for _ in range(3))
    lost = uid("req")
    due = await apply(
        pool,
        settings,
        routed(a),
        moved(a.request_id, "pending"),  # authorized in the batch that routed it
        moved(lost, "pending"),  # authorized before its row exists: nothing to move
        moved(b.request_id, "cancelled"),  # rejected before it was routed: finds no row
        routed(b),
        routed(c),
        moved(c.request_id, "cancelled"),
        moved(c.request_id, "pending"),  # only the first move finds it 'routed'
    )
    assert due == [a.request_id]
    assert await statuses(pool, a.request_id, lost, b.request_id, c.request_id) == [
        "pending",
        None,
        "routed",
        "cancelled",
    ]
    # A later batch: a redelivered routing inserts nothing, and only a 'routed' row moves.
    due = await apply(
        pool,
        settings,
        routed(a),
        moved(a.request_id, "cancelled"),
        moved(b.request_id, "pending"),
        moved(b.request_id, "cancelled"),
    )
    assert due == [b.request_id]
    assert await statuses(pool, a.request_id, b.request_id) == ["pending", "pending"]


async def test_a_batch_claims_what_it_has_room_for_with_a_lease(pool, settings):
    calls = [call_routed("https://o.example/") for _ in range(3)]
    async with unit_of_work(pool, "owner-adapter", settings) as uow:
        for c in calls:
            intake.routed(uow, c, None)
            intake.moved(uow, c.request_id, "pending")
        rows = await intake.write(uow, claim=2, request_cap=40)
    assert sorted(r["status"] for r in rows) == ["dispatching", "dispatching", "pending"]
    stored = await pool.fetch(
        "SELECT status, attempts, lease_until > now() AS leased FROM dispatches"
        " WHERE request_id = ANY($1) ORDER BY status",
        [c.request_id for c in calls],
    )
    assert [tuple(r) for r in stored] == [
        ("dispatching", 1, True),
        ("dispatching", 1, True),
        ("pending", 0, None),
    ]


async def open_dispatches(pool, settings, n: int) -> list[str]:
    calls = [call_routed("https://o.example/") for _ in range(n)]
    await apply(pool, settings, *(routed(c) for c in calls))
    ids = [c.request_id for c in calls]
    await pool.execute(
        "UPDATE dispatches SET status = 'dispatching', attempts = 1 WHERE request_id = ANY($1)",
        ids,
    )
    return ids


async def outbox(pool) -> list[tuple[str, str]]:
    rows = await pool.fetch("SELECT key, type FROM outbox ORDER BY position")
    return [(r["key"], r["type"]) for r in rows]


async def test_outcomes_written_together_are_each_decided_on_their_own(pool, settings):
    ids = await open_dispatches(pool, settings, 20)
    committed: list[int] = []

    def writes() -> Any:
        return unit_of_work(pool, "owner-adapter", settings, lambda: committed.append(1))

    writer = OutcomeWriter(writes)
    deadline = datetime.now(UTC) + timedelta(seconds=30)

    def answered(rid: str) -> Any:
        return writer.finish(
            rid,
            "dispatching",
            "completed",
            CallCompleted(request_id=rid, via="response", result={"ok": True}),
            digest="d",
            facts=(CallDispatched(request_id=rid, attempt=1, upstream_url="https://o.example/"),),
        )

    def accepted(rid: str) -> Any:
        return writer.finish(
            rid,
            "dispatching",
            "accepted",
            CallAccepted(request_id=rid, deadline=deadline),
            facts=(CallDispatched(request_id=rid, attempt=1, upstream_url="https://o.example/"),),
        )

    def called_back(rid: str) -> Any:
        return writer.finish(
            rid,
            ("pending", "dispatching", "accepted"),
            "failed",
            CallFailed(request_id=rid, reason="owner_refused"),
        )

    # Every call gets two competing outcomes at once: the response, then a callback.
    results = await asyncio.gather(
        *(answered(rid) for rid in ids), *(called_back(rid) for rid in ids)
    )
    assert results == [True] * len(ids) + [False] * len(ids)
    assert len(committed) < 2 * len(ids)  # written in batches, not one transaction each
    assert set(await statuses(pool, *ids)) == {"completed"}
    events = await outbox(pool)
    for rid in ids:
        mine = [t for k, t in events if k == rid]
        assert sorted(mine) == ["call.completed", "call.dispatched"]

    # The loser's facts are kept; a callback after a 202 still wins from 'accepted'.
    [late] = await open_dispatches(pool, settings, 1)
    assert await writer.finish(late, "dispatching", "failed", facts=()) is True
    assert await accepted(late) is False
    assert [t for k, t in await outbox(pool) if k == late] == ["call.dispatched"]
    [other] = await open_dispatches(pool, settings, 1)
    assert await accepted(other) is True
    assert await called_back(other) is True
    assert await statuses(pool, other) == ["failed"]


async def test_a_failed_write_fails_its_own_outcome_and_not_the_others(pool, settings):
    bad, good = await open_dispatches(pool, settings, 2)
    writer = OutcomeWriter(lambda: unit_of_work(pool, "owner-adapter", settings))
    results = await asyncio.gather(
        writer.finish(bad, "dispatching", "no-such-status"),  # the table refuses it
        writer.finish(
            good, "dispatching", "failed", CallFailed(request_id=good, reason="owner_refused")
        ),
        return_exceptions=True,
    )
    assert isinstance(results[0], Exception)
    assert results[1] is True
    assert await statuses(pool, bad, good) == ["dispatching", "failed"]
    assert [t for k, t in await outbox(pool) if k == good] == ["call.failed"]

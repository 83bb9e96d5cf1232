"""The calls batch starts messages to calls' own webhook_urls itself (decision 16), against real
Postgres: only as many as it is given room for, never a subscribed endpoint's (those go through
the claim's admission), leased as the claim leases, and handed back by `Queue.release`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from postback_delivery.outcomes import CallBatch, apply_call_batch
from postback_delivery.store import Queue
from postback_libs.db import create_pool
from postback_libs.events import CallCompleted, CallRequested, CallSettled, EventData, new_event
from postback_libs.outbox import unit_of_work
from tests.helpers import uid


@pytest.fixture
async def pool(settings) -> AsyncIterator[Any]:
    pool = await create_pool(settings.database_url, "delivery")
    yield pool
    await pool.close()


def call(hook: str | None, consumer: str) -> list[EventData]:
    rid = uid("req")
    return [
        CallRequested(request_id=rid, consumer_id=consumer, api="weather", webhook_url=hook),
        CallCompleted(request_id=rid, via="response", status_code=200, result={"t": 1}),
        CallSettled(request_id=rid, consumer_id=consumer, owner_id="o", amount=5, fee=1),
    ]


async def subscribe(pool, consumer: str) -> str:
    endpoint_id = uid("ep")
    await pool.execute(
        "INSERT INTO endpoints (endpoint_id, account_id, revision, state, event_types, enabled,"
        " deleted, fifo) VALUES ($1, $2, 1, $3, $4, true, false, false)",
        endpoint_id,
        consumer,
        '{"url": "https://hooks.example/e"}',
        ["call.completed"],
    )
    return endpoint_id


async def one_batch(pool, settings, events: list[Any], start: int):
    """One consumer batch of `events` (data, or (CloudEvent, data) to replay one)."""
    async with unit_of_work(pool, "delivery", settings) as uow:
        batch = CallBatch.of(uow)
        for e in events:
            batch.events.append(e if isinstance(e, tuple) else (new_event(e, source="test"), e))
        return await apply_call_batch(uow, start, 30.0)


async def rows(pool) -> dict[str, Any]:
    found = await pool.fetch(
        "SELECT delivery_id, endpoint_id, status, attempts, lease_until > now() AS leased"
        " FROM deliveries"
    )
    return {r["delivery_id"]: r for r in found}


async def test_a_batch_starts_webhook_url_messages_within_its_room(pool, settings):
    consumer = uid("acct_c")
    endpoint_id = await subscribe(pool, consumer)
    events = [e for _ in range(3) for e in call("https://hooks.example/c", consumer)]

    started, waiting = await one_batch(pool, settings, events, start=2)

    # Three calls, each to its webhook_url and to the subscribed endpoint: two started.
    assert (len(started), waiting) == (2, 4)
    assert all(c.endpoint_id is None and c.attempts == 1 for c in started)
    stored = await rows(pool)
    for c in started:
        assert stored[c.delivery_id]["status"] == "delivering"
        assert stored[c.delivery_id]["leased"]
    left = [r for i, r in stored.items() if i not in {c.delivery_id for c in started}]
    assert {(r["status"], r["attempts"], r["endpoint_id"] is None) for r in left} == {
        ("pending", 0, True),
        ("pending", 0, False),
    }
    assert sum(r["endpoint_id"] == endpoint_id for r in left) == 3


async def test_started_messages_are_not_claimed_and_are_handed_back_unstarted(pool, settings):
    consumer = uid("acct_c")
    started, _ = await one_batch(pool, settings, call("https://hooks.example/c", consumer), 5)
    assert len(started) == 1
    queue = Queue(pool, settings)

    assert await queue.claim(10) == []  # leased already: no replica claims it again
    await queue.release(started)
    [row] = (await rows(pool)).values()
    assert (row["status"], row["attempts"]) == ("pending", 0)
    [again] = await queue.claim(10)
    assert (again.delivery_id, again.attempts) == (started[0].delivery_id, 1)


async def test_a_replayed_batch_starts_nothing_twice(pool, settings):
    events = [(new_event(e, source="test"), e) for e in call("https://hooks.example/c", "a")]
    first, _ = await one_batch(pool, settings, events, 5)
    second, waiting = await one_batch(pool, settings, events, 5)
    assert (len(first), second, waiting) == (1, [], 0)
    assert first[0].cycle_started_at <= datetime.now(UTC)

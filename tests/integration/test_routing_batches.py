"""Routing's limits taken for a whole batch against real Postgres: a batch mixing consumers and
APIs at and over their rate limits and quotas admits exactly the calls that routing them one
transaction at a time would, and replicas' overlapping batches neither deadlock nor overspend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from postback_libs.db import create_pool
from postback_libs.events import ApiState, CallRequested, new_event
from postback_libs.outbox import unit_of_work
from postback_routing.app import Decided, admit_and_emit
from postback_routing.domain import route
from tests.helpers import api_state, uid

T0 = datetime(2026, 1, 31, 23, 59, 58, tzinfo=UTC)  # the day and the month turn mid-test


@pytest.fixture
async def pool(settings) -> AsyncIterator[Any]:
    pool = await create_pool(settings.database_url, "routing")
    yield pool
    await pool.close()


def apis() -> list[ApiState]:
    return [
        api_state(rate_limit_per_second=1, rate_limit_burst=2),
        api_state(quota_per_day=3, quota_per_month=4),
        api_state(rate_limit_per_second=2, rate_limit_burst=3, quota_per_day=4),
        api_state(),  # no limits
    ]


def calls(prefix: str, limited: list[ApiState]) -> list[tuple[str, ApiState, datetime]]:
    """(consumer, API, time) of 60 calls by three consumers, times mostly rising, some late."""
    out = []
    for i in range(60):
        at = T0 + timedelta(seconds=0.05 * i - (0.4 if i % 7 == 3 else 0))
        out.append((f"{prefix}{i % 3}", limited[(i * 5 // 3) % len(limited)], at))
    return out


def decided(consumer: str, api: ApiState, at: datetime) -> Decided:
    req = CallRequested(request_id=uid("req"), consumer_id=consumer, api=api.api_id)
    event = new_event(req, source="ingress").model_copy(update={"time": at})
    return Decided(event, req, api, route(req, api, None, default_fee_bps=0, now=at), None)


async def routed(pool, settings, batch: list[Decided]) -> list[str]:
    async with unit_of_work(pool, "routing", settings) as uow:
        uow.scratch["decided"] = batch
        await admit_and_emit(uow)
        return [e.data.get("reason", "routed") for _, e in uow.events]


async def test_a_batch_admits_the_calls_one_at_a_time_would(pool, settings):
    limited = apis()
    # Some state from earlier batches, so the batch finds rows as well as makes them.
    for consumer, api, at in calls("early", limited)[:10]:
        for prefix in ("one", "all"):
            await routed(pool, settings, [decided(prefix + consumer[-1], api, at)])

    one_at_a_time = []
    for consumer, api, at in calls("one", limited):
        one_at_a_time += await routed(pool, settings, [decided(consumer, api, at)])
    in_one_batch = await routed(
        pool, settings, [decided(c, api, at) for c, api, at in calls("all", limited)]
    )

    assert in_one_batch == one_at_a_time
    assert {"routed", "rate_limited", "quota_exceeded"} <= set(in_one_batch)


async def test_overlapping_batches_of_two_replicas_share_the_limits(pool, settings):
    api = api_state(rate_limit_per_second=0.0001, rate_limit_burst=5, quota_per_day=7)
    other = api_state(quota_per_day=2)
    consumers = [f"c{i}" for i in range(4)]
    # The same keys met in opposite orders by the two batches.
    first = [decided(c, a, T0) for c in consumers for a in (api, other) for _ in range(4)]
    second = [decided(c, a, T0) for _ in range(4) for c in consumers[::-1] for a in (other, api)]
    outcomes = await asyncio.gather(routed(pool, settings, first), routed(pool, settings, second))
    admitted = [o for batch in outcomes for o in batch if o == "routed"]
    assert len(admitted) == len(consumers) * (5 + 2)

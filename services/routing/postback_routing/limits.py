"""Rate limits and quotas in routing's schema, taken for a whole batch of calls at once.

Row locks make them hold across replicas: the same consumer's calls may be routed by several
instances at once (calls are keyed by request id). A batch locks every bucket and quota row its
calls touch, in key order (so two replicas' batches cannot deadlock), admits the calls in event
order in memory, and writes the rows back with one statement per table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from postback_libs.events import ApiState
from postback_routing.domain import BucketKey, Limits, QuotaKey, burst_of, quota_periods

# A missing row is created first so that it can be locked. A full bucket last refilled at the
# epoch reads exactly as no bucket at all: the refill since then tops it up to the burst.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

ENSURE_QUOTAS = """
INSERT INTO quota_usage (consumer_id, api_id, period)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k ORDER BY 1, 2, 3
ON CONFLICT DO NOTHING
"""
LOCK_QUOTAS = """
SELECT q.consumer_id, q.api_id, q.period, q.used FROM quota_usage q
JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(consumer_id, api_id, period)
  USING (consumer_id, api_id, period)
ORDER BY 1, 2, 3 FOR UPDATE OF q
"""
SAVE_QUOTAS = """
UPDATE quota_usage q SET used = k.used
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) AS k(consumer_id, api_id, period, used)
WHERE (q.consumer_id, q.api_id, q.period) = (k.consumer_id, k.api_id, k.period)
"""
ENSURE_BUCKETS = """
INSERT INTO rate_buckets (consumer_id, api_id, tokens, refilled_at)
SELECT k.*, $4::timestamptz FROM unnest($1::text[], $2::text[], $3::float8[]) AS k ORDER BY 1, 2
ON CONFLICT DO NOTHING
"""
LOCK_BUCKETS = """
SELECT b.consumer_id, b.api_id, b.tokens, b.refilled_at FROM rate_buckets b
JOIN unnest($1::text[], $2::text[]) AS k(consumer_id, api_id) USING (consumer_id, api_id)
ORDER BY 1, 2 FOR UPDATE OF b
"""
SAVE_BUCKETS = """
UPDATE rate_buckets b SET tokens = k.tokens, refilled_at = k.refilled_at
FROM unnest($1::text[], $2::text[], $3::float8[], $4::timestamptz[])
  AS k(consumer_id, api_id, tokens, refilled_at)
WHERE (b.consumer_id, b.api_id) = (k.consumer_id, k.api_id)
"""


async def lock(conn: Any, calls: list[tuple[str, ApiState, datetime]]) -> Limits:
    """Lock the rows the calls (consumer id, API, time) touch and read them; quotas before
    buckets, each in key order, the same in every replica."""
    quotas: set[QuotaKey] = set()
    buckets: dict[BucketKey, int] = {}
    for consumer_id, api, at in calls:
        quotas.update((consumer_id, api.api_id, p) for p, _ in quota_periods(api, at))
        if api.rate_limit_per_second is not None:
            buckets[(consumer_id, api.api_id)] = burst_of(api)
    limits = Limits()
    if quotas:
        columns = [list(c) for c in zip(*sorted(quotas), strict=True)]
        await conn.execute(ENSURE_QUOTAS, *columns)
        for r in await conn.fetch(LOCK_QUOTAS, *columns):
            limits.used[(r["consumer_id"], r["api_id"], r["period"])] = r["used"]
    if buckets:
        keys = sorted(buckets)
        ids = [[c for c, _ in keys], [a for _, a in keys]]
        await conn.execute(ENSURE_BUCKETS, *ids, [float(buckets[k]) for k in keys], EPOCH)
        for r in await conn.fetch(LOCK_BUCKETS, *ids):
            limits.buckets[(r["consumer_id"], r["api_id"])] = (r["tokens"], r["refilled_at"])
    return limits


async def save(conn: Any, limits: Limits) -> None:
    if limits.used:
        keys = list(limits.used)
        await conn.execute(
            SAVE_QUOTAS,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [limits.used[k] for k in keys],
        )
    if limits.buckets:
        keys2 = list(limits.buckets)
        await conn.execute(
            SAVE_BUCKETS,
            [k[0] for k in keys2],
            [k[1] for k in keys2],
            [limits.buckets[k][0] for k in keys2],
            [limits.buckets[k][1] for k in keys2],
        )

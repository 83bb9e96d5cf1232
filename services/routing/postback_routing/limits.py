"""Rate limits and quotas in routing's schema. Row locks make them hold across replicas: the
same consumer's calls may be routed by several instances at once (calls are keyed by request
id), and each one takes its token and quota unit under the row's lock."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from postback_libs.events import ApiState, RejectReason
from postback_routing.domain import quota_periods, take_token


async def admit(
    conn: Any, consumer_id: str, api: ApiState, at: datetime
) -> tuple[RejectReason, str] | None:
    """Take a token and a unit of each quota for one call; None if admitted, else why not.
    Nothing is taken from a refused call."""
    periods = quota_periods(api, at)
    for period, limit in periods:
        await conn.execute(
            "INSERT INTO quota_usage (consumer_id, api_id, period) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            consumer_id,
            api.api_id,
            period,
        )
        used = await conn.fetchval(
            "SELECT used FROM quota_usage WHERE consumer_id = $1 AND api_id = $2"
            " AND period = $3 FOR UPDATE",
            consumer_id,
            api.api_id,
            period,
        )
        if used >= limit:
            return "quota_exceeded", f"{limit} calls per {period.split(':')[0]} used"
    if api.rate_limit_per_second is not None:
        burst = api.rate_limit_burst or max(1, int(api.rate_limit_per_second))
        await conn.execute(
            "INSERT INTO rate_buckets (consumer_id, api_id, tokens, refilled_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            consumer_id,
            api.api_id,
            float(burst),
            at,
        )
        row = await conn.fetchrow(
            "SELECT tokens, refilled_at FROM rate_buckets WHERE consumer_id = $1"
            " AND api_id = $2 FOR UPDATE",
            consumer_id,
            api.api_id,
        )
        ok, tokens, refilled_at = take_token(
            row["tokens"], row["refilled_at"], at, api.rate_limit_per_second, burst
        )
        await conn.execute(
            "UPDATE rate_buckets SET tokens = $3, refilled_at = $4"
            " WHERE consumer_id = $1 AND api_id = $2",
            consumer_id,
            api.api_id,
            tokens,
            refilled_at,
        )
        if not ok:
            return "rate_limited", f"{api.rate_limit_per_second:g} calls/s, burst {burst}"
    for period, _ in periods:
        await conn.execute(
            "UPDATE quota_usage SET used = used + 1 WHERE consumer_id = $1 AND api_id = $2"
            " AND period = $3",
            consumer_id,
            api.api_id,
            period,
        )
    return None

"""The delivery queue in Postgres: claiming due messages within each endpoint's limits, and
recording what each attempt gave, many attempts per transaction.

Rows are claimed with `FOR UPDATE SKIP LOCKED` and a lease, as in decision 0004; an endpoint's
row is locked (SKIP LOCKED) while a replica admits work for it, so its rate limit, concurrency
cap, FIFO order and circuit breaker hold across replicas."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from postback_delivery import health
from postback_delivery.health import BreakerPolicy, Health, Limits
from postback_libs.events import DeliveryFailed, EndpointState
from postback_libs.ids import derived_id
from postback_libs.outbox import UnitOfWork
from postback_libs.settings import Settings
from postback_libs.workqueue import fits_lease, lease_for

# Due messages, oldest due first, skipping endpoints that cannot take work now. Locked rows
# belong to another replica's claim and are skipped, never waited for.
CANDIDATES = """
SELECT d.delivery_id, d.endpoint_id, d.seq, now() AS now FROM deliveries d
LEFT JOIN endpoints e ON e.endpoint_id = d.endpoint_id
WHERE d.status = 'pending' AND d.next_attempt_at <= now()
  AND (e.blocked_until IS NULL OR e.blocked_until <= now())
ORDER BY d.next_attempt_at
LIMIT $1
FOR UPDATE OF d SKIP LOCKED
"""
# `locked_at`: the clock when the row is ours, not when the transaction began, so that tokens
# are counted as close as possible to when the requests go out.
LOCK_ENDPOINTS = """
SELECT e.*, clock_timestamp() AS locked_at,
    (SELECT count(*) FROM deliveries f
      WHERE f.endpoint_id = e.endpoint_id AND f.status = 'delivering') AS in_flight,
    (SELECT min(seq) FROM deliveries h
      WHERE h.endpoint_id = e.endpoint_id AND h.status IN ('pending', 'delivering')) AS head
FROM endpoints e WHERE e.endpoint_id = ANY($1::text[])
FOR UPDATE OF e SKIP LOCKED
"""
START = """
UPDATE deliveries SET status = 'delivering', attempts = attempts + 1, held = false,
    lease_until = now() + make_interval(secs => $2), updated_at = now()
WHERE delivery_id = ANY($1::text[])
RETURNING delivery_id, message_id, request_id, account_id, endpoint_id, url, event_type, body,
    attempts, retry_base, coalesce(cycle_started_at, created_at) AS cycle_started_at, traceparent
"""
DEFER = """
UPDATE deliveries SET next_attempt_at = u.due, held = u.held
FROM unnest($1::text[], $2::timestamptz[], $3::boolean[]) AS u(id, due, held)
WHERE delivery_id = u.id
"""
# Leases run out when the replica holding them died: the message is due again at once.
REAP = """
UPDATE deliveries SET status = 'pending', next_attempt_at = now(), lease_until = NULL
WHERE delivery_id IN (SELECT delivery_id FROM deliveries
    WHERE status = 'delivering' AND lease_until < now() LIMIT 1000 FOR UPDATE SKIP LOCKED)
"""
# Only the claim this replica holds: once its lease ran out the row may be someone else's.
RELEASE_UNSTARTED = """
UPDATE deliveries d SET status = 'pending', attempts = d.attempts - 1, lease_until = NULL,
    next_attempt_at = now()
FROM unnest($1::text[], $2::int[]) AS u(id, attempts)
WHERE d.delivery_id = u.id AND d.status = 'delivering' AND d.attempts = u.attempts
"""
BUSY_HOLD_SECONDS = 30.0  # a held message is due anyway after this, should no release come
OFF_RECHECK_SECONDS = 60.0


@dataclass(frozen=True)
class Claimed:
    """A message claimed for one attempt, with its endpoint's state as of the claim."""

    delivery_id: str
    message_id: str
    request_id: str | None
    account_id: str
    endpoint_id: str | None
    url: str
    event_type: str
    body: bytes
    attempts: int
    retry_base: int
    cycle_started_at: datetime  # the retry window counts from here
    endpoint: EndpointState | None = None
    claimed_at: float = 0.0  # time.monotonic() of the claim
    traceparent: str | None = None  # of the event that made the message


def health_of(row: Any) -> Health:
    return Health(
        tokens=row["tokens"],
        tokens_at=row["tokens_at"],
        blocked_until=row["blocked_until"],
        blocked_for=row["blocked_for"],
        circuit=row["circuit"],
        opened_count=row["opened_count"],
        consecutive_failures=row["consecutive_failures"],
        failing_since=row["failing_since"],
        last_success_at=row["last_success_at"],
    )


class Queue:
    def __init__(self, pool: Any, settings: Settings) -> None:
        self.pool, self.settings = pool, settings
        self.lease = lease_for(settings.delivery_timeout_seconds)
        self._states: dict[tuple[str, int], EndpointState] = {}

    def _state(self, row: Any) -> EndpointState:
        # Parsed once per revision: claims see the same few endpoints over and over.
        key = (row["endpoint_id"], row["revision"])
        state = self._states.get(key)
        if state is None:
            if len(self._states) > 10_000:
                self._states.clear()
            raw = row["state"]
            state = EndpointState.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
            self._states[key] = state
        return state

    async def claim(self, limit: int) -> list[Claimed]:
        if limit <= 0:
            return []
        async with self.pool.acquire() as conn, conn.transaction():
            # The queue fills in bursts faster than autovacuum analyses it: planned for the
            # few rows the stale statistics promise, the claim hashed and sorted the whole
            # backlog (10 ms at 20,000 due rows, growing with it). The generic plan (LIMIT
            # unknown) walks the due index in order and stops at `limit` rows (0.1 ms).
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            candidates = await conn.fetch(CANDIDATES, limit)
            if not candidates:
                return []
            now: datetime = candidates[0]["now"]
            admitted = [c["delivery_id"] for c in candidates if c["endpoint_id"] is None]
            states: dict[str, EndpointState] = {}
            by_endpoint: dict[str, list[Any]] = {}
            for c in candidates:
                if c["endpoint_id"] is not None:
                    by_endpoint.setdefault(c["endpoint_id"], []).append(c)
            if by_endpoint:
                deferred = await self._admit(conn, by_endpoint, now, admitted, states)
                if deferred:
                    await conn.execute(DEFER, *zip(*deferred, strict=True))
            if not admitted:
                return []
            rows = await conn.fetch(START, admitted, self.lease)
        claimed_at = time.monotonic()
        return [
            Claimed(
                **{k: r[k] for k in r.keys()},  # noqa: SIM118 -- a Record, not a dict
                endpoint=states.get(r["endpoint_id"]) if r["endpoint_id"] else None,
                claimed_at=claimed_at,
            )
            for r in rows
        ]

    async def _admit(
        self,
        conn: Any,
        by_endpoint: dict[str, list[Any]],
        now: datetime,
        admitted: list[str],
        states: dict[str, EndpointState],
    ) -> list[tuple[str, datetime, bool]]:
        """Admit each endpoint's candidates within its limits; returns the (id, due, held) of
        candidates that must wait, so that claims stop meeting them while they do."""
        deferred: list[tuple[str, datetime, bool]] = []
        changed: dict[str, Health] = {}
        rows = await conn.fetch(LOCK_ENDPOINTS, sorted(by_endpoint))
        for row in rows:
            endpoint_id = row["endpoint_id"]
            waiting = sorted(by_endpoint[endpoint_id], key=lambda c: c["seq"])
            if row["deleted"] or not row["enabled"] or row["disabled_at"] is not None:
                # Queued for an endpoint that is off (a recover that raced a re-enable): wait
                # for it to come back on, which makes them due again.
                later = now + timedelta(seconds=OFF_RECHECK_SECONDS)
                deferred += [(c["delivery_id"], later, False) for c in waiting]
                continue
            state = self._state(row)
            states[endpoint_id] = state
            limits = Limits(
                rate_per_second=row["rate_limit"],
                max_in_flight=row["max_in_flight"] or self.settings.endpoint_max_in_flight,
                fifo=row["fifo"],
            )
            if limits.fifo:
                # Only the oldest open message may go; the rest wait behind it.
                head = [c for c in waiting if c["seq"] == row["head"]]
                behind = [c for c in waiting if c["seq"] != row["head"]]
                hold = now + timedelta(seconds=BUSY_HOLD_SECONDS)
                deferred += [(c["delivery_id"], hold, True) for c in behind]
                waiting = head
            before = health_of(row)
            now = row["locked_at"]
            n, after = health.admit(limits, before, row["in_flight"], len(waiting), now, self.lease)
            admitted += [c["delivery_id"] for c in waiting[:n]]
            rest = waiting[n:]
            if rest and after.blocked_for == "rate" and limits.rate_per_second:
                # Spread them over the time the bucket needs: each is due at its own slot.
                step = 1 / limits.rate_per_second
                start = after.blocked_until or now
                deferred += [
                    (c["delivery_id"], start + timedelta(seconds=i * step), False)
                    for i, c in enumerate(rest)
                ]
            elif rest and after.blocked_for == "busy":
                hold = now + timedelta(seconds=BUSY_HOLD_SECONDS)
                deferred += [(c["delivery_id"], hold, True) for c in rest]
            if after != before:
                changed[endpoint_id] = after
        # Not deferred: a half-open circuit waits only for its probe's outcome.
        await save_healths(conn, changed, defer=False)
        return deferred

    def can_start(self, claimed: Claimed) -> bool:
        """Whether an attempt started now ends (times out at worst) before the claim's lease
        runs out. A claim that waited longer behind slow endpoints must not be sent: its row
        may be due again and claimed elsewhere, and the message would go out twice at once."""
        waited = time.monotonic() - claimed.claimed_at
        return fits_lease(self.lease - waited, self.settings.delivery_timeout_seconds)

    async def release(self, claims: list[Claimed]) -> None:
        """Hand back claimed rows no attempt was made for: due again at once, their attempt
        not counted."""
        await self.pool.execute(
            RELEASE_UNSTARTED, [c.delivery_id for c in claims], [c.attempts for c in claims]
        )

    async def reap(self) -> int:
        result: str = await self.pool.execute(REAP)
        return int(result.split()[-1])


# --- recording outcomes ------------------------------------------------------------------------

FINISH = """
UPDATE deliveries d SET status = u.status, next_attempt_at = u.retry_at, last_error = u.error,
    lease_until = NULL, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int[])
    AS u(id, status, retry_at, error, attempts)
WHERE d.delivery_id = u.id AND d.status = 'delivering' AND d.attempts = u.attempts
RETURNING d.delivery_id
"""
FAIL_OPEN = """
UPDATE deliveries SET status = 'failed', last_error = $2, lease_until = NULL, held = false,
    updated_at = now()
WHERE endpoint_id = $1 AND status IN ('pending', 'delivering')
RETURNING delivery_id, message_id, request_id, attempts
"""
DEFER_ALL = """
UPDATE deliveries SET next_attempt_at = $2
WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at < $2
"""


async def fail_open(
    uow: UnitOfWork, endpoint_id: str, reason: str, cause: str | None = None
) -> int:
    """Stop every queued message of an endpoint (deleted or disabled); each stays visible as
    failed and can be recovered once the endpoint works again."""
    rows = await uow.conn.fetch(FAIL_OPEN, endpoint_id, reason)
    for r in rows:
        uow.emit(
            DeliveryFailed(
                delivery_id=r["delivery_id"],
                message_id=r["message_id"],
                request_id=r["request_id"],
                endpoint_id=endpoint_id,
                attempts=r["attempts"],
                reason=reason,
            ),
            cause=str(derived_id(cause, r["delivery_id"])) if cause else None,
        )
    return len(rows)


async def lock_endpoints(conn: Any, endpoint_ids: list[str]) -> dict[str, Any]:
    """Lock endpoint rows in a fixed order (waiting: a health update must not be lost), before
    any of their deliveries, the order every writer follows so that none deadlocks another."""
    if not endpoint_ids:
        return {}
    rows = await conn.fetch(
        "SELECT * FROM endpoints WHERE endpoint_id = ANY($1::text[])"
        " ORDER BY endpoint_id FOR UPDATE",
        sorted(endpoint_ids),
    )
    return {r["endpoint_id"]: r for r in rows}


def fold_health(
    row: Any,
    results: list[tuple[health.Result, float | None]],
    now: datetime,
    policy: BreakerPolicy,
) -> tuple[Health, Health, str | None]:
    """Pure: a batch of attempt results applied to an endpoint's health; returns (before,
    after, why the endpoint must be disabled or None)."""
    before = health_of(row)
    after, disable = before, None
    for result, retry_after in results:
        after, why = health.after_attempt(after, result, now, policy, retry_after)
        disable = disable or why
    return before, after, disable


SAVE_HEALTH_MANY = """
UPDATE endpoints e SET tokens = u.tokens, tokens_at = u.tokens_at,
    blocked_until = u.blocked_until, blocked_for = u.blocked_for, circuit = u.circuit,
    opened_count = u.opened_count, consecutive_failures = u.consecutive_failures,
    failing_since = u.failing_since, last_success_at = u.last_success_at
FROM unnest($1::text[], $2::float8[], $3::timestamptz[], $4::timestamptz[], $5::text[],
            $6::text[], $7::int[], $8::int[], $9::timestamptz[], $10::timestamptz[])
    AS u(endpoint_id, tokens, tokens_at, blocked_until, blocked_for, circuit, opened_count,
         consecutive_failures, failing_since, last_success_at)
WHERE e.endpoint_id = u.endpoint_id
"""
# An attempt finished: the next held messages of its endpoint may go, oldest first.
RELEASE_MANY = """
UPDATE deliveries SET held = false, next_attempt_at = now()
WHERE delivery_id IN (
    SELECT h.delivery_id FROM unnest($1::text[], $2::int[]) AS w(endpoint_id, n)
    CROSS JOIN LATERAL (SELECT delivery_id FROM deliveries
        WHERE endpoint_id = w.endpoint_id AND held ORDER BY seq LIMIT w.n
        FOR UPDATE SKIP LOCKED) h)
"""


async def save_healths(conn: Any, changed: dict[str, Health], defer: bool = True) -> None:
    """Write the health of several endpoints in one statement. With `defer`, an endpoint told
    to wait long (circuit opened, Retry-After) has its queued messages moved past the wait, so
    claims do not keep meeting them."""
    if not changed:
        return
    ids = list(changed)
    hs = [changed[i] for i in ids]
    await conn.execute(
        SAVE_HEALTH_MANY,
        ids,
        [h.tokens for h in hs],
        [h.tokens_at for h in hs],
        [h.blocked_until for h in hs],
        [h.blocked_for for h in hs],
        [h.circuit for h in hs],
        [h.opened_count for h in hs],
        [h.consecutive_failures for h in hs],
        [h.failing_since for h in hs],
        [h.last_success_at for h in hs],
    )
    for endpoint_id, h in changed.items() if defer else ():
        if h.blocked_until is not None and h.blocked_for in ("circuit", "retry_after"):
            await conn.execute(DEFER_ALL, endpoint_id, h.blocked_until)


async def release_held(conn: Any, counts: dict[str, int]) -> None:
    if counts:
        await conn.execute(RELEASE_MANY, list(counts), list(counts.values()))

"""The read model of webhook delivery, from `postback.deliveries`: one row per message and
destination (its status follows the latest event) and one row per attempt (test messages
included), which ingress serves as `/v1/calls/{id}/deliveries` and `/v1/webhooks/{id}/...`.

Each upsert moves a delivery only forward in its partition's order (`position`), so a replayed
or rebuilt read model reaches the same state. Handlers only gather rows; the batch is written at
its end with a few statements over arrays (`unnest`), not a round trip per event."""

from __future__ import annotations

import json
from typing import Any

from postback_libs.consumer import Handlers
from postback_libs.events import (
    DELIVERIES,
    CloudEvent,
    DeliveryAttempted,
    DeliveryExhausted,
    DeliveryFailed,
    DeliveryScheduled,
    DeliverySucceeded,
)
from postback_libs.outbox import UnitOfWork
from postback_projection.batching import columns, waves

# A batch's rows, one array per column; `status` NULL: the event does not set it. Each wave
# (see `batching`) holds a delivery at most once.
ROWS = """unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::int[], $10::int[], $11::text[], $12::timestamptz[],
    $13::timestamptz[], $14::bigint[], $15::boolean[])
AS u(delivery_id, message_id, request_id, endpoint_id, account_id, event_type, url, status,
    attempts, status_code, error, next_attempt_at, at, position, answered)"""
# A delivery not seen before. The ones that were there already (DO NOTHING) go to UPDATE:
# unlike EXCLUDED, its FROM keeps whether the event set a status, a code or an error.
INSERT = f"""
INSERT INTO deliveries (delivery_id, message_id, request_id, endpoint_id, account_id,
    event_type, url, status, attempts, last_status_code, last_error, next_attempt_at,
    created_at, updated_at, position)
SELECT delivery_id, message_id, request_id, endpoint_id, account_id, event_type, url,
    coalesce(status, 'pending'), coalesce(attempts, 0), status_code, error, next_attempt_at,
    at, at, position
FROM {ROWS}
ON CONFLICT (delivery_id) DO NOTHING RETURNING delivery_id
"""
# Each event sets the columns it knows (NULL: keep), and `status` only when it is not older
# than what the row has.
UPDATE = f"""
UPDATE deliveries AS d SET
    request_id = coalesce(d.request_id, u.request_id),
    endpoint_id = coalesce(d.endpoint_id, u.endpoint_id),
    account_id = coalesce(d.account_id, u.account_id),
    event_type = coalesce(d.event_type, u.event_type),
    url = coalesce(u.url, d.url),
    created_at = least(d.created_at, u.at),
    status = CASE WHEN u.status IS NOT NULL AND u.position >= d.position
        THEN u.status ELSE d.status END,
    attempts = greatest(d.attempts, coalesce(u.attempts, 0)),
    last_status_code = CASE WHEN u.answered THEN u.status_code ELSE d.last_status_code END,
    last_error = CASE WHEN u.answered OR u.error IS NOT NULL THEN u.error
        ELSE d.last_error END,
    next_attempt_at = CASE WHEN u.status IS NOT NULL AND u.position >= d.position
        THEN u.next_attempt_at ELSE d.next_attempt_at END,
    updated_at = greatest(d.updated_at, u.at),
    position = greatest(d.position, u.position)
FROM {ROWS}
WHERE d.delivery_id = u.delivery_id
"""
INSERT_ATTEMPTS = """
INSERT INTO delivery_attempts (event_id, delivery_id, message_id, request_id, endpoint_id, url,
    attempt, attempted_at, status_code, latency_ms, error_class, response_headers,
    response_excerpt, next_attempt_at, test)
SELECT event_id, delivery_id, message_id, request_id, endpoint_id, url, attempt, attempted_at,
    status_code, latency_ms, error_class, response_headers::jsonb, response_excerpt,
    next_attempt_at, test
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[],
    $8::timestamptz[], $9::int[], $10::float8[], $11::text[], $12::text[], $13::text[],
    $14::timestamptz[], $15::boolean[])
AS a(event_id, delivery_id, message_id, request_id, endpoint_id, url, attempt, attempted_at,
    status_code, latency_ms, error_class, response_headers, response_excerpt, next_attempt_at,
    test)
ON CONFLICT DO NOTHING
"""
DELIVERIES_ROWS, ATTEMPTS_ROWS = "deliveries.rows", "deliveries.attempts"


async def _write(uow: UnitOfWork) -> None:
    attempts: list[tuple[object, ...]] = uow.scratch.pop(ATTEMPTS_ROWS, [])
    if attempts:
        await uow.conn.execute(INSERT_ATTEMPTS, *columns(attempts, 15))
    rows: list[tuple[object, ...]] = uow.scratch.pop(DELIVERIES_ROWS, [])
    written: set[object] = set()  # deliveries an earlier wave inserted or updated
    for wave in waves(rows, key=lambda row: row[0]):
        new = [row for row in wave if row[0] not in written]
        inserted: set[object] = set()
        if new:
            found = await uow.conn.fetch(INSERT, *columns(new, 15))
            inserted = {r["delivery_id"] for r in found}
        known = [row for row in wave if row[0] not in inserted]
        if known:
            await uow.conn.execute(UPDATE, *columns(known, 15))
        written.update(row[0] for row in wave)


def handlers() -> Handlers:
    h = Handlers(
        "projection-deliveries",
        DELIVERIES.name,
        after_batch=_write,
        idempotent=True,
        background=True,
    )

    def upsert(
        uow: UnitOfWork,
        event: CloudEvent,
        d: Any,
        *,
        status: str | None,
        attempts: int | None = None,
        status_code: int | None = None,
        error: str | None = None,
        next_attempt_at: Any = None,
        answered: bool = False,
        **known: Any,
    ) -> None:
        _, offset = uow.position
        uow.scratch.setdefault(DELIVERIES_ROWS, []).append(
            (
                d.delivery_id,
                d.message_id,
                d.request_id,
                d.endpoint_id,
                known.get("account_id"),
                known.get("event_type"),
                known.get("url"),
                status,
                attempts,
                status_code,
                error,
                next_attempt_at,
                event.time,
                offset,
                answered,
            )
        )

    @h.on(DeliveryScheduled)
    async def scheduled(event: CloudEvent, d: DeliveryScheduled, uow: UnitOfWork) -> None:
        upsert(
            uow,
            event,
            d,
            status="pending",
            account_id=d.account_id,
            event_type=d.message_type,
            url=d.url,
        )

    @h.on(DeliveryAttempted)
    async def attempted(event: CloudEvent, a: DeliveryAttempted, uow: UnitOfWork) -> None:
        uow.scratch.setdefault(ATTEMPTS_ROWS, []).append(
            (
                event.id,
                a.delivery_id,
                a.message_id,
                a.request_id,
                a.endpoint_id,
                a.url,
                a.attempt,
                event.time,
                a.status_code,
                a.latency_ms,
                a.error_class,
                json.dumps(a.response_headers) if a.response_headers else None,
                a.response_excerpt,
                a.next_attempt_at,
                a.test,
            )
        )
        if a.test:
            return  # a test message is not a delivery: it only shows in the attempt log
        error = None
        if a.error_class is not None:
            error = f"{a.error_class}: {a.status_code or a.response_excerpt[:200]}"
        upsert(
            uow,
            event,
            a,
            # Still pending while a retry is scheduled; a final event follows otherwise.
            status="pending" if a.next_attempt_at else None,
            attempts=a.attempt,
            status_code=a.status_code,
            error=error,
            next_attempt_at=a.next_attempt_at,
            answered=True,
            url=a.url,
        )

    @h.on(DeliverySucceeded)
    async def succeeded(event: CloudEvent, d: DeliverySucceeded, uow: UnitOfWork) -> None:
        upsert(uow, event, d, status="succeeded", attempts=d.attempts)

    @h.on(DeliveryFailed)
    async def failed(event: CloudEvent, d: DeliveryFailed, uow: UnitOfWork) -> None:
        upsert(uow, event, d, status="failed", attempts=d.attempts, error=d.reason)

    @h.on(DeliveryExhausted)
    async def exhausted(event: CloudEvent, d: DeliveryExhausted, uow: UnitOfWork) -> None:
        upsert(uow, event, d, status="exhausted", attempts=d.attempts, error=d.last_error)

    return h

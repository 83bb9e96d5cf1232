"""The read model of webhook delivery, from `postback.deliveries`: one row per message and
destination (its status follows the latest event) and one row per attempt (test messages
included), which ingress serves as `/v1/calls/{id}/deliveries` and `/v1/webhooks/{id}/...`.

Each upsert moves a delivery only forward in its partition's order (`position`), so a replayed
or rebuilt read model reaches the same state."""

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

# One statement for every event: each sets the columns it knows (NULL: keep), and `status`
# only when it is not older than what the row has.
UPSERT = """
INSERT INTO deliveries (delivery_id, message_id, request_id, endpoint_id, account_id,
    event_type, url, status, attempts, last_status_code, last_error, next_attempt_at,
    created_at, updated_at, position)
VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8::text, 'pending'), coalesce($9::int, 0), $10,
    $11::text, $12, $13, $13, $14)
ON CONFLICT (delivery_id) DO UPDATE SET
    request_id = coalesce(deliveries.request_id, EXCLUDED.request_id),
    endpoint_id = coalesce(deliveries.endpoint_id, EXCLUDED.endpoint_id),
    account_id = coalesce(deliveries.account_id, EXCLUDED.account_id),
    event_type = coalesce(deliveries.event_type, EXCLUDED.event_type),
    url = coalesce(EXCLUDED.url, deliveries.url),
    created_at = least(deliveries.created_at, EXCLUDED.created_at),
    status = CASE WHEN $8 IS NOT NULL AND EXCLUDED.position >= deliveries.position
        THEN $8 ELSE deliveries.status END,
    attempts = greatest(deliveries.attempts, EXCLUDED.attempts),
    last_status_code = CASE WHEN $15::boolean THEN EXCLUDED.last_status_code
        ELSE deliveries.last_status_code END,
    last_error = CASE WHEN $15 OR $11 IS NOT NULL THEN EXCLUDED.last_error
        ELSE deliveries.last_error END,
    next_attempt_at = CASE WHEN $8 IS NOT NULL AND EXCLUDED.position >= deliveries.position
        THEN EXCLUDED.next_attempt_at ELSE deliveries.next_attempt_at END,
    updated_at = greatest(deliveries.updated_at, EXCLUDED.updated_at),
    position = greatest(deliveries.position, EXCLUDED.position)
"""
INSERT_ATTEMPT = """
INSERT INTO delivery_attempts (event_id, delivery_id, message_id, request_id, endpoint_id, url,
    attempt, attempted_at, status_code, latency_ms, error_class, response_headers,
    response_excerpt, next_attempt_at, test)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT DO NOTHING
"""


def handlers() -> Handlers:
    h = Handlers("projection-deliveries", DELIVERIES.name)

    async def upsert(
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
        await uow.conn.execute(
            UPSERT,
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

    @h.on(DeliveryScheduled)
    async def scheduled(event: CloudEvent, d: DeliveryScheduled, uow: UnitOfWork) -> None:
        await upsert(
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
        await uow.conn.execute(
            INSERT_ATTEMPT,
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
        if a.test:
            return  # a test message is not a delivery: it only shows in the attempt log
        error = None
        if a.error_class is not None:
            error = f"{a.error_class}: {a.status_code or a.response_excerpt[:200]}"
        await upsert(
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
        await upsert(uow, event, d, status="succeeded", attempts=d.attempts)

    @h.on(DeliveryFailed)
    async def failed(event: CloudEvent, d: DeliveryFailed, uow: UnitOfWork) -> None:
        await upsert(uow, event, d, status="failed", attempts=d.attempts, error=d.reason)

    @h.on(DeliveryExhausted)
    async def exhausted(event: CloudEvent, d: DeliveryExhausted, uow: UnitOfWork) -> None:
        await upsert(uow, event, d, status="exhausted", attempts=d.attempts, error=d.last_error)

    return h

"""Delivery: sends every call's outcome to the consumer's webhook, signed per Standard Webhooks,
retried on a schedule that survives restarts, and records every attempt as an event."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from postback_delivery import domain
from postback_libs.consumer import Handlers
from postback_libs.events import (
    CALLS,
    CallCompleted,
    CallDelivered,
    CallDeliveryFailed,
    CallFailed,
    CallRefunded,
    CallRejected,
    CallRequested,
    CallSettled,
    CallTimedOut,
    CloudEvent,
    DeliveryAttempted,
    DeliveryExhausted,
    DeliveryFailed,
    DeliverySucceeded,
    ErrorClass,
    EventData,
)
from postback_libs.ids import derived_id
from postback_libs.logging import get_logger
from postback_libs.outbound import AddressPolicy, classify_error, guarded_session, read_capped
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_libs.signing import derive_secret, webhook_headers
from postback_libs.workqueue import WorkQueue

log = get_logger(__name__)
USER_AGENT = "Postback/0.1.0"
EXCERPT_BYTES = 20_000


def build(settings: Settings) -> Service:
    service = Service("delivery", "postback_delivery", settings)
    master = settings.secret_key.get_secret_value().encode()
    schedule = settings.retry_delays
    rng = random.Random()
    handlers = Handlers("delivery", CALLS.name)
    session: dict[str, aiohttp.ClientSession] = {}

    @handlers.on(CallRequested)
    async def remember_call(event: CloudEvent, call: CallRequested, uow: UnitOfWork) -> None:
        await uow.conn.execute(
            "INSERT INTO call_context (request_id, consumer_id, api, webhook_url)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            call.request_id,
            call.consumer_id,
            call.api,
            call.webhook_url,
        )

    @handlers.on(CallCompleted, CallFailed, CallTimedOut)
    async def remember_outcome(event: CloudEvent, outcome: Any, uow: UnitOfWork) -> None:
        await uow.conn.execute(
            "UPDATE call_context SET outcome_type = $2, outcome = $3 WHERE request_id = $1"
            " AND outcome_type IS NULL",
            outcome.request_id,
            event.type,
            json.dumps(event.data),
        )

    @handlers.on(CallSettled, CallRefunded, CallRejected)
    async def send_outcome(event: CloudEvent, final: Any, uow: UnitOfWork) -> None:
        ctx = await uow.conn.fetchrow(
            "DELETE FROM call_context WHERE request_id = $1 RETURNING *", final.request_id
        )
        if ctx is None or ctx["webhook_url"] is None:
            return
        if isinstance(final, CallRejected):
            outcome_type, status = "call.rejected", "rejected"
            outcome: dict[str, Any] = {"reason": final.reason, "detail": final.detail}
        else:
            outcome_type = ctx["outcome_type"] or "call.failed"
            status = outcome_type.removeprefix("call.")
            outcome = json.loads(ctx["outcome"]) if ctx["outcome"] else {}
        cost = final.amount if isinstance(final, CallSettled) else 0
        body = domain.webhook_body(
            outcome_type,
            event.time,
            domain.outcome_data(
                request_id=final.request_id,
                api=ctx["api"],
                status=status,
                outcome=outcome,
                cost=cost,
            ),
        )
        message_id = f"msg_{derived_id(event.id, 'webhook').hex}"
        delivery_id = f"dlv_{derived_id(message_id, ctx['webhook_url']).hex}"
        await uow.conn.execute(
            "INSERT INTO deliveries (delivery_id, message_id, request_id, account_id, url,"
            " event_type, body, status, next_attempt_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', now()) ON CONFLICT DO NOTHING",
            delivery_id,
            message_id,
            final.request_id,
            ctx["consumer_id"],
            ctx["webhook_url"],
            outcome_type,
            body,
        )
        queue.wake.set()

    async def record(
        row: Any,
        status: str,
        *events: EventData,
        retry_at: datetime | None = None,
        error: str | None = None,
    ) -> None:
        async with service.unit_of_work() as uow:
            moved = await uow.conn.fetchval(
                "UPDATE deliveries SET status = $2, next_attempt_at = $3, last_error = $4,"
                " lease_until = NULL, updated_at = now()"
                " WHERE delivery_id = $1 AND status = 'delivering' AND attempts = $5"
                " RETURNING delivery_id",
                row["delivery_id"],
                status,
                retry_at,
                error,
                row["attempts"],
            )
            if moved is None:
                return  # the lease expired and another attempt took over
            for e in events:
                uow.emit(e)

    async def attempt(row: Any) -> None:
        n = row["attempts"]
        secret = derive_secret(master, "consumer", row["account_id"])
        headers = webhook_headers(
            [secret], row["message_id"], int(time.time()), row["body"], USER_AGENT
        )
        started = time.perf_counter()
        status_code: int | None = None
        excerpt, retry_after = "", None
        error_class: ErrorClass | None = None
        try:
            async with session["http"].post(
                row["url"], data=row["body"], headers=headers, allow_redirects=False
            ) as resp:
                status_code = resp.status
                excerpt = (await read_capped(resp, EXCERPT_BYTES)).decode(errors="replace")
                retry_after = (
                    domain.retry_after_seconds(resp.headers.get("retry-after"), datetime.now(UTC))
                    if status_code in (429, 503)
                    else None
                )
        except Exception as e:
            error_class = classify_error(e)
            excerpt = repr(e)[:500]
        latency_ms = (time.perf_counter() - started) * 1000
        verdict = domain.judge(status_code) if status_code is not None else "retry"
        if status_code is not None and verdict != "succeeded":
            error_class = "http_status"
        ref = {
            "delivery_id": row["delivery_id"],
            "message_id": row["message_id"],
            "request_id": row["request_id"],
            "endpoint_id": row["endpoint_id"],
        }
        error = f"{error_class}: {status_code or excerpt}"[:500] if error_class else None
        delay = None
        if verdict == "retry":
            delay = domain.next_delay(schedule, n, rng)
            if delay is not None and retry_after is not None:
                delay = max(delay, retry_after)
        retry_at = datetime.now(UTC) + timedelta(seconds=delay) if delay is not None else None
        attempted = DeliveryAttempted(
            **ref,
            url=row["url"],
            attempt=n,
            status_code=status_code,
            latency_ms=round(latency_ms, 2),
            error_class=error_class,
            response_excerpt=excerpt,
            next_attempt_at=retry_at,
        )
        call_event = row["request_id"] is not None and row["endpoint_id"] is None
        if verdict == "succeeded":
            final: list[EventData] = [DeliverySucceeded(**ref, attempts=n)]
            if call_event:
                final.append(
                    CallDelivered(
                        request_id=row["request_id"], message_id=row["message_id"], attempts=n
                    )
                )
            await record(row, "succeeded", attempted, *final)
        elif retry_at is not None:
            await record(row, "pending", attempted, retry_at=retry_at, error=error)
        else:
            gone = verdict == "gone"
            final = [
                DeliveryFailed(**ref, attempts=n, reason="endpoint answered 410 Gone")
                if gone
                else DeliveryExhausted(**ref, attempts=n, last_error=error or "")
            ]
            if call_event:
                final.append(
                    CallDeliveryFailed(
                        request_id=row["request_id"],
                        message_id=row["message_id"],
                        attempts=n,
                        last_error=error or "",
                    )
                )
            await record(row, "failed" if gone else "exhausted", attempted, *final, error=error)

    async def claim(n: int) -> list[Any]:
        rows: list[Any] = await service.pool.fetch(
            "UPDATE deliveries SET status = 'delivering', attempts = attempts + 1,"
            " lease_until = now() + make_interval(secs => $2), updated_at = now()"
            " WHERE delivery_id IN (SELECT delivery_id FROM deliveries"
            "   WHERE (status = 'pending' AND next_attempt_at <= now())"
            "      OR (status = 'delivering' AND lease_until < now())"
            "   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING *",
            n,
            settings.delivery_timeout_seconds + 5,
        )
        return rows

    queue = WorkQueue(claim, attempt, concurrency=settings.delivery_concurrency)
    service.worker(queue.run)

    @service.on_start
    async def open_session() -> None:
        session["http"] = guarded_session(
            AddressPolicy(settings.allowed_network_list),
            connect_timeout=5,
            total_timeout=settings.delivery_timeout_seconds,
            limit=settings.delivery_concurrency,
            user_agent=USER_AGENT,
        )

    @service.on_stop
    async def drain() -> None:
        await queue.drain(settings.shutdown_grace_seconds / 2)
        await session["http"].close()

    service.consume(handlers)
    return service

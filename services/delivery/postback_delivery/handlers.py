"""What delivery reacts to on Kafka, in one screen:

* `postback.calls`: remember each call, then on its final event (settled, refunded, rejected)
  queue the outcome for the call's `webhook_url` and every subscribed endpoint, and
  `call.settled` for endpoints subscribed to it;
* `postback.ledger`: `balance.low` for subscribed endpoints;
* `postback.webhooks`: the endpoints view (state, enabled, deleted);
* `postback.deliveries`: resend and recover requests from ingress.

Every handler runs in its consumer group's transaction, with the inbox and the outbox. The calls
batch starts the messages to calls' own webhook_urls this process has room for and hands them
to its dispatcher once it has committed (decision 16). A batch
that may have queued messages wakes this process's dispatcher once it has committed; other
replicas find the rows on their next short poll (no NOTIFY: its commit-time lock would
serialise every commit in the database)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from postback_delivery import domain, store
from postback_delivery.dispatch import Dispatcher
from postback_delivery.outcomes import CallBatch, apply_call_batch
from postback_delivery.store import Claimed
from postback_delivery.subscriptions import Message, destinations, enqueue, record_state
from postback_libs.consumer import Handlers
from postback_libs.events import (
    CALLS,
    DELIVERIES,
    LEDGER,
    WEBHOOKS,
    BalanceLow,
    CallCompleted,
    CallFailed,
    CallRefunded,
    CallRejected,
    CallRequested,
    CallSettled,
    CallTimedOut,
    CloudEvent,
    DeliveryRecoverRequested,
    DeliveryResendRequested,
    DeliveryScheduled,
    EndpointCreated,
    EndpointDeleted,
    EndpointSecretRotated,
    EndpointUpdated,
)
from postback_libs.ids import derived_id
from postback_libs.logging import get_logger
from postback_libs.outbox import UnitOfWork

log = get_logger(__name__)


def message_id(cause: str, purpose: str = "webhook") -> str:
    return f"msg_{derived_id(cause, purpose).hex}"


Wake = Callable[[], None]


def calls(wake: Wake, dispatcher: Dispatcher) -> Handlers:
    # What the batch being written started itself and how many it left to the claim; a failed
    # batch's are dropped when the next batch overwrites them (its rows were never committed).
    started: list[Claimed] = []
    waiting = [0]

    async def apply(uow: UnitOfWork) -> None:
        lease = dispatcher.queue.lease
        started[:], waiting[0] = await apply_call_batch(uow, dispatcher.room(), lease)

    def committed() -> None:
        dispatcher.hand_off(started)
        started.clear()
        if waiting[0]:
            wake()

    h = Handlers("delivery", CALLS.name, after_batch=apply, after_commit=committed)

    @h.on(
        CallRequested,
        CallCompleted,
        CallFailed,
        CallTimedOut,
        CallSettled,
        CallRefunded,
        CallRejected,
    )
    async def collect_call_event(event: CloudEvent, data: Any, uow: UnitOfWork) -> None:
        # Applied for the whole batch at once, in its transaction (outcomes.py says why).
        CallBatch.of(uow).events.append((event, data))

    return h


def ledger(wake: Wake) -> Handlers:
    h = Handlers("delivery-ledger", LEDGER.name, after_commit=wake, background=True)

    @h.on(BalanceLow)
    async def announce_low_balance(event: CloudEvent, low: BalanceLow, uow: UnitOfWork) -> None:
        to = await destinations(uow.conn, low.account_id, "balance.low")
        if not to:
            return
        data = {"account_id": low.account_id, "balance": low.balance, "threshold": low.threshold}
        body = domain.webhook_body("balance.low", event.time, data)
        msg = Message(message_id(event.id), low.account_id, "balance.low", body)
        await enqueue(uow, msg, to, cause=event.id)

    return h


def endpoints(wake: Wake) -> Handlers:
    h = Handlers("delivery-endpoints", WEBHOOKS.name, after_commit=wake)

    @h.on(EndpointCreated, EndpointUpdated, EndpointSecretRotated, EndpointDeleted)
    async def follow_endpoint(event: CloudEvent, change: Any, uow: UnitOfWork) -> None:
        deleted = isinstance(change, EndpointDeleted)
        result = await record_state(uow.conn, change.endpoint, deleted)
        if result.fail_open is not None:
            await store.fail_open(uow, change.endpoint.endpoint_id, result.fail_open, event.id)
        if result.clear_disable or result.reset_health:
            # Messages recovered while it was off wait for it; now is their time.
            await uow.conn.execute(
                "UPDATE deliveries SET next_attempt_at = now() WHERE endpoint_id = $1"
                " AND status = 'pending' AND NOT held AND next_attempt_at > now()",
                change.endpoint.endpoint_id,
            )

    return h


REQUEUE = """
UPDATE deliveries SET status = 'pending', next_attempt_at = now(), retry_base = attempts,
    cycle_started_at = now(),
    held = false, last_error = NULL, lease_until = NULL, updated_at = now()
WHERE delivery_id IN (SELECT delivery_id FROM deliveries WHERE {where} FOR UPDATE)
RETURNING delivery_id, message_id, request_id, endpoint_id, account_id,
    event_type AS message_type, url
"""
RESEND = REQUEUE.format(
    where="delivery_id = $1 AND account_id = $2 AND status IN ('succeeded', 'failed', 'exhausted')"
)
RECOVER = REQUEUE.format(
    where="endpoint_id = $1 AND account_id = $2 AND status IN ('failed', 'exhausted')"
    " AND created_at >= $3 AND ($4::timestamptz IS NULL OR created_at < $4)"
)


def commands(wake: Wake) -> Handlers:
    h = Handlers("delivery-commands", DELIVERIES.name, after_commit=wake, background=True)

    async def requeued(uow: UnitOfWork, rows: list[Any], reason: Any, cause: str) -> None:
        for r in rows:
            uow.emit(
                DeliveryScheduled(**dict(r), reason=reason),
                cause=str(derived_id(cause, r["delivery_id"])),
            )

    @h.on(DeliveryResendRequested)
    async def resend(event: CloudEvent, req: DeliveryResendRequested, uow: UnitOfWork) -> None:
        rows = await uow.conn.fetch(RESEND, req.delivery_id, req.account_id)
        await requeued(uow, rows, "resend", event.id)

    @h.on(DeliveryRecoverRequested)
    async def recover(event: CloudEvent, req: DeliveryRecoverRequested, uow: UnitOfWork) -> None:
        rows = await uow.conn.fetch(RECOVER, req.endpoint_id, req.account_id, req.since, req.until)
        log.info("recovering messages", endpoint_id=req.endpoint_id, count=len(rows))
        await requeued(uow, rows, "recover", event.id)

    return h

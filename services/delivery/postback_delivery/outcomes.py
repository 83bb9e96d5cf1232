"""Turning call events into messages, a whole consumer batch at a time.

Delivery remembers each call (`call.requested`: consumer, API, webhook_url), its outcome
(`call.completed`/`failed`/`timed_out`) and, on the final event (`call.settled`, `refunded`,
`rejected`), queues the outcome for the webhook_url and every subscribed endpoint. Done event
by event that is four or five statements per call, and the round trips were most of the
delivery process's time (profiled under `bench/delivery.py`). Instead the handlers only collect
the batch's events, and `apply` runs once, as the consumer's after-batch hook, just before the
batch's transaction writes its outbox and commits: a handful of set-based statements for the
whole batch, in the same transaction as the inbox, so the effects still happen exactly once.

Messages to a call's own webhook_url (no endpoint, so no rate limit, cap, FIFO or circuit to
admit them through) are started by the same insert, as many as the dispatcher has room for,
and handed to it once the batch commits: no claim round trip, no wait for a poll.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from postback_delivery import domain
from postback_delivery.store import Claimed
from postback_delivery.subscriptions import (
    Destination,
    Message,
    delivery_id,
    pick,
)
from postback_libs.events import (
    CallRejected,
    CallSettled,
    CloudEvent,
    DeliveryScheduled,
    EventData,
)
from postback_libs.ids import derived_id
from postback_libs.outbox import UnitOfWork

OUTCOMES = frozenset({"call.completed", "call.failed", "call.timed_out"})
FINALS = frozenset({"call.settled", "call.refunded", "call.rejected"})


@dataclass
class Context:
    consumer_id: str
    api: str
    webhook_url: str | None
    outcome_type: str | None = None
    outcome: dict[str, Any] | None = None


@dataclass
class Plan:
    """What one batch does to the stored contexts, worked out before any I/O."""

    new: dict[str, Context] = field(default_factory=dict)  # to insert (not final yet)
    outcomes: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # to stored
    finals: list[tuple[CloudEvent, EventData, Context | None]] = field(default_factory=list)
    stored_finals: list[str] = field(default_factory=list)  # request ids to take from the table


def fold(events: list[tuple[CloudEvent, EventData]]) -> Plan:
    """Pure: apply a batch's call events in order. A call's events share a partition, so they
    arrive in order; what earlier batches stored is resolved by `apply`."""
    plan = Plan()
    for event, data in events:
        rid = data.request_id  # type: ignore[attr-defined]
        if event.type == "call.requested":
            if rid not in plan.new:
                plan.new[rid] = Context(
                    consumer_id=event.data["consumer_id"],
                    api=event.data["api"],
                    webhook_url=event.data.get("webhook_url"),
                )
        elif event.type in OUTCOMES:
            ctx = plan.new.get(rid)
            if ctx is not None:
                if ctx.outcome_type is None:  # the first outcome is the outcome
                    ctx.outcome_type, ctx.outcome = event.type, event.data
            else:
                plan.outcomes.setdefault(rid, (event.type, event.data))
        elif event.type in FINALS:
            ctx = plan.new.pop(rid, None)
            if ctx is None and rid not in plan.stored_finals:
                plan.stored_finals.append(rid)
            plan.finals.append((event, data, ctx))
    return plan


def messages_for(
    event: CloudEvent, final: EventData, ctx: Context, endpoints: list[Any]
) -> list[tuple[Message, list[Destination]]]:
    """The messages a call's final event makes, each with where it goes."""
    out: list[tuple[Message, list[Destination]]] = []
    rid = final.request_id  # type: ignore[attr-defined]
    if isinstance(final, CallRejected):
        outcome_type, status = "call.rejected", "rejected"
        outcome: dict[str, Any] = {"reason": final.reason, "detail": final.detail}
        # Older events: settlement named the API in `api`, routing what the consumer sent.
        api_id = final.api_id or (final.api if final.stage == "settlement" else None)
    else:
        api_id = final.api_id  # type: ignore[attr-defined]
        outcome_type = ctx.outcome_type or "call.failed"
        status = outcome_type.removeprefix("call.")
        outcome = ctx.outcome or {}
    cost = final.amount if isinstance(final, CallSettled) else 0
    to = [Destination(ctx.webhook_url)] if ctx.webhook_url else []
    to += pick(endpoints, outcome_type)
    if to:
        data = domain.outcome_data(
            request_id=rid, api=ctx.api, api_id=api_id, status=status, outcome=outcome, cost=cost
        )
        body = domain.webhook_body(outcome_type, event.time, data)
        msg_id = f"msg_{derived_id(event.id, 'webhook').hex}"
        out.append((Message(msg_id, ctx.consumer_id, outcome_type, body, rid), to))
    if isinstance(final, CallSettled):
        settled_to = pick(endpoints, "call.settled")
        if settled_to:
            data = {"request_id": rid, "api": ctx.api, "cost": final.amount}
            if api_id is not None:
                data["api_id"] = api_id
            body = domain.webhook_body("call.settled", event.time, data)
            msg_id = f"msg_{derived_id(event.id, 'webhook:call.settled').hex}"
            out.append((Message(msg_id, ctx.consumer_id, "call.settled", body, rid), settled_to))
    return out


TAKE_STORED = "DELETE FROM call_context WHERE request_id = ANY($1::text[]) RETURNING *"
SET_OUTCOMES = """
UPDATE call_context c SET outcome_type = u.type, outcome = u.outcome::jsonb
FROM unnest($1::text[], $2::text[], $3::text[]) AS u(id, type, outcome)
WHERE c.request_id = u.id AND c.outcome_type IS NULL
"""
REMEMBER = """
INSERT INTO call_context (request_id, consumer_id, api, webhook_url, outcome_type, outcome)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
ON CONFLICT DO NOTHING
"""
ENDPOINTS_OF = """
SELECT account_id, endpoint_id, state->>'url' AS url, event_types FROM endpoints
WHERE account_id = ANY($1::text[]) AND enabled AND NOT deleted AND disabled_at IS NULL
"""


class CallBatch:
    """The call events of one consumer batch (one unit of work)."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow
        self.events: list[tuple[CloudEvent, EventData]] = []
        self.start, self.lease = 0, 0.0  # how many messages to start, and their lease
        self.started: list[Claimed] = []
        self.waiting = 0  # messages queued for the dispatcher's claim

    @classmethod
    def of(cls, uow: UnitOfWork) -> CallBatch:
        """The batch collecting for `uow`, made on the first event; `apply_call_batch` (the
        consumer's after-batch hook) applies it inside the transaction, before the outbox."""
        batch: CallBatch | None = uow.scratch.get("calls")
        if batch is None:
            batch = uow.scratch["calls"] = cls(uow)
        return batch

    async def apply(self) -> None:
        events, self.events = self.events, []
        if not events:
            return
        conn = self.uow.conn
        plan = fold(events)
        stored: dict[str, Context] = {}
        if plan.stored_finals:
            for r in await conn.fetch(TAKE_STORED, plan.stored_finals):
                stored[r["request_id"]] = Context(
                    r["consumer_id"],
                    r["api"],
                    r["webhook_url"],
                    r["outcome_type"],
                    json.loads(r["outcome"]) if r["outcome"] else None,
                )
        # An outcome in this batch for a call stored earlier and final in this batch.
        for rid, (type_, data) in list(plan.outcomes.items()):
            ctx = stored.get(rid)
            if ctx is not None:
                if ctx.outcome_type is None:
                    ctx.outcome_type, ctx.outcome = type_, data
                del plan.outcomes[rid]
        if plan.outcomes:
            ids = list(plan.outcomes)
            await conn.execute(
                SET_OUTCOMES,
                ids,
                [plan.outcomes[i][0] for i in ids],
                [json.dumps(plan.outcomes[i][1]) for i in ids],
            )
        if plan.new:
            ids = list(plan.new)
            new = [plan.new[i] for i in ids]
            await conn.execute(
                REMEMBER,
                ids,
                [c.consumer_id for c in new],
                [c.api for c in new],
                [c.webhook_url for c in new],
                [c.outcome_type for c in new],
                [json.dumps(c.outcome) if c.outcome is not None else None for c in new],
            )
        resolved: list[tuple[CloudEvent, EventData, Context]] = []
        taken: set[str] = set()
        for event, final, ctx in plan.finals:
            rid = final.request_id  # type: ignore[attr-defined]
            if ctx is None and rid not in taken:
                ctx = stored.get(rid)
                taken.add(rid)
            if ctx is not None:  # None: a second final event, or a call never seen
                resolved.append((event, final, ctx))
        if resolved:
            await self._queue(resolved)

    async def _queue(self, resolved: list[tuple[CloudEvent, EventData, Context]]) -> None:
        conn = self.uow.conn
        accounts = sorted({ctx.consumer_id for _, _, ctx in resolved})
        endpoints: dict[str, list[Any]] = {}
        for r in await conn.fetch(ENDPOINTS_OF, accounts):
            endpoints.setdefault(r["account_id"], []).append(r)
        # Each message continues the trace of the final event that made it.
        rows: list[tuple[str, Message, Destination, CloudEvent]] = []
        for event, data, ctx in resolved:
            for msg, to in messages_for(event, data, ctx, endpoints.get(ctx.consumer_id, [])):
                rows += [(delivery_id(msg.message_id, d), msg, d, event) for d in to]
        if not rows:
            return
        # A call's own webhook_url has no endpoint limits to admit it through: started here,
        # as `Queue.claim` would (decision 16). Subscribed endpoints' rows go through the claim.
        room = self.start
        start: list[bool] = []
        for _, _, dest, _ in rows:
            starts = room > 0 and dest.endpoint_id is None
            room -= starts
            start.append(starts)
        claimed_at = time.monotonic()  # before the lease is taken: `can_start` errs early
        inserted = await conn.fetch(
            ENQUEUE_MANY,
            [r[0] for r in rows],
            [r[1].message_id for r in rows],
            [r[1].request_id for r in rows],
            [r[1].account_id for r in rows],
            [r[1].event_type for r in rows],
            [r[1].body for r in rows],
            [r[2].endpoint_id for r in rows],
            [r[2].url for r in rows],
            start,
            self.lease,
            [r[3].traceparent for r in rows],
        )
        fresh = {r["delivery_id"]: r for r in inserted}
        for dlv, msg, dest, cause in rows:
            row = fresh.get(dlv)
            if row is None:
                continue
            traceparent = cause.traceparent
            self.uow.emit(
                DeliveryScheduled(
                    delivery_id=dlv,
                    message_id=msg.message_id,
                    request_id=msg.request_id,
                    endpoint_id=dest.endpoint_id,
                    account_id=msg.account_id,
                    message_type=msg.event_type,
                    url=dest.url,
                ),
                cause=str(derived_id(cause.id, dlv)),
                traceparent=traceparent,
            )
            if row["status"] != "delivering":
                self.waiting += 1
            else:
                self.started.append(
                    Claimed(
                        delivery_id=dlv,
                        message_id=msg.message_id,
                        request_id=msg.request_id,
                        account_id=msg.account_id,
                        endpoint_id=None,
                        url=dest.url,
                        event_type=msg.event_type,
                        body=msg.body,
                        attempts=1,
                        retry_base=0,
                        cycle_started_at=row["created_at"],
                        claimed_at=claimed_at,
                        traceparent=traceparent,
                    )
                )


# Every message of the batch at once: per-row message fields, unlike ENQUEUE. Rows marked to
# start are leased as START leases them; the lease runs from the statement's clock, not the
# batch's, so that it is never shorter than `Queue.can_start` assumes.
ENQUEUE_MANY = """
INSERT INTO deliveries (delivery_id, message_id, request_id, account_id, event_type, body,
                        endpoint_id, url, traceparent, status, attempts, lease_until,
                        next_attempt_at)
SELECT u.id, u.message_id, u.request_id, u.account_id, u.event_type, u.body, u.endpoint_id, u.url,
    u.traceparent, CASE WHEN u.start THEN 'delivering' ELSE 'pending' END, u.start::int,
    CASE WHEN u.start THEN clock_timestamp() + make_interval(secs => $10) END, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[],
            $7::text[], $8::text[], $9::boolean[], $11::text[])
    AS u(id, message_id, request_id, account_id, event_type, body, endpoint_id, url, start,
         traceparent)
ON CONFLICT DO NOTHING
RETURNING delivery_id, status, created_at
"""


async def apply_call_batch(
    uow: UnitOfWork, start: int = 0, lease: float = 0.0
) -> tuple[list[Claimed], int]:
    """Apply the batch collected for `uow`, starting up to `start` messages to calls' own
    webhook_urls with a lease of `lease` seconds; returns those started, to be handed to the
    dispatcher once the batch has committed, and how many it queued for the claim."""
    batch: CallBatch | None = uow.scratch.get("calls")
    if batch is None:
        return [], 0
    batch.start, batch.lease = start, lease
    await batch.apply()
    return batch.started, batch.waiting

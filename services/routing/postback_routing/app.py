"""Routing: turns each `call.requested` into `call.routed` or `call.rejected`.

The catalog and accounts are followed from their compacted topics into memory, in every replica.
Rate limits and quotas live in routing's schema, shared by the replicas. Upstream health comes
from the outcomes on the calls topic this replica reads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from postback_libs.consumer import Handlers
from postback_libs.events import (
    ACCOUNTS,
    CALLS,
    CATALOG,
    ApiState,
    CallCompleted,
    CallFailed,
    CallRejected,
    CallRequested,
    CallRouted,
    CloudEvent,
)
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_libs.telemetry import current_traceparent
from postback_routing import limits
from postback_routing.domain import Catalog, UpstreamHealth, limited, reject, route

UNHEALTHY_OUTCOMES = {"owner_unreachable", "owner_error"}


@dataclass
class Decided:
    """A call routed by a handler, waiting for the batch to take its limits."""

    event: CloudEvent
    req: CallRequested
    api: ApiState | None
    decision: CallRouted | CallRejected
    traceparent: str | None


def decided(uow: UnitOfWork) -> list[Decided]:
    found: list[Decided] = uow.scratch.setdefault("decided", [])
    return found


async def admit_and_emit(uow: UnitOfWork) -> None:
    """Take the batch's rate limits and quotas under one set of row locks, in event order, and
    emit each call's outcome in event order, in its own trace."""
    calls = decided(uow)
    to_admit = [
        (c, c.api)
        for c in calls
        if isinstance(c.decision, CallRouted) and c.api is not None and limited(c.api)
    ]
    if to_admit:
        held = await limits.lock(
            uow.conn, [(c.req.consumer_id, api, c.event.time) for c, api in to_admit]
        )
        for c, api in to_admit:
            refusal = held.admit(c.req.consumer_id, api, c.event.time)
            if refusal is not None:
                c.decision = reject(c.req, *refusal, c.api)
        await limits.save(uow.conn, held)
    for c in calls:
        uow.emit(c.decision, cause=c.event.id, traceparent=c.traceparent)
    calls.clear()


def build(settings: Settings) -> Service:
    service = Service("routing", "postback_routing", settings)
    catalog = Catalog()
    health = UpstreamHealth()
    apis = service.follow(CATALOG, catalog.apply_api)
    accounts = service.follow(ACCOUNTS, catalog.apply_account)
    handlers = Handlers("routing", CALLS.name, after_batch=admit_and_emit)

    @handlers.on(CallRequested)
    async def route_call(event: CloudEvent, req: CallRequested, uow: UnitOfWork) -> None:
        api = catalog.find(req.api)
        consumer = catalog.accounts.get(req.consumer_id)
        # A call may arrive before routing has read the catalog or account write that came
        # just before it: catch up before refusing. Once per batch: every write that came
        # before one of its calls is read by then, and a batch of calls naming no API at all
        # must not wait a catch-up each.
        followed = uow.scratch.setdefault("caught_up", set())
        if api is None and "apis" not in followed:
            await apis.caught_up()
            followed.add("apis")
            api = catalog.find(req.api)
        if consumer is None and "accounts" not in followed:
            await accounts.caught_up()
            followed.add("accounts")
            consumer = catalog.accounts.get(req.consumer_id)
        now = datetime.now(UTC)
        decision = route(
            req,
            api,
            consumer,
            default_fee_bps=settings.platform_fee_bps,
            now=now,
            unhealthy=health.unhealthy(now),
            owner=catalog.accounts.get(api.owner_id) if api is not None else None,
        )
        decided(uow).append(Decided(event, req, api, decision, current_traceparent()))

    # Kept in memory only: an outcome costs no transaction.
    @handlers.observe(CallCompleted, CallFailed)
    def note_upstream_health(event: CloudEvent, outcome: CallCompleted | CallFailed) -> None:
        if outcome.upstream_url is None:
            return
        failed = isinstance(outcome, CallFailed) and outcome.reason in UNHEALTHY_OUTCOMES
        health.record(outcome.upstream_url, ok=not failed, at=event.time, event_id=event.id)

    service.consume(handlers)
    return service

"""Routing: turns each `call.requested` into `call.routed` or `call.rejected`.

The catalog and accounts are followed from their compacted topics into memory, in every replica.
Rate limits and quotas live in routing's schema, shared by the replicas. Upstream health comes
from the outcomes on the calls topic this replica reads."""

from __future__ import annotations

from datetime import UTC, datetime

from postback_libs.consumer import Handlers
from postback_libs.events import (
    ACCOUNTS,
    CALLS,
    CATALOG,
    CallCompleted,
    CallFailed,
    CallRequested,
    CallRouted,
    CloudEvent,
)
from postback_libs.follower import TopicFollower
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_routing import limits
from postback_routing.domain import Catalog, UpstreamHealth, reject, route

UNHEALTHY_OUTCOMES = {"owner_unreachable", "owner_error"}


def build(settings: Settings) -> Service:
    service = Service("routing", "postback_routing", settings)
    catalog = Catalog()
    health = UpstreamHealth()
    apis = TopicFollower(settings.kafka_bootstrap, settings.topic(CATALOG.name), catalog.apply_api)
    accounts = TopicFollower(
        settings.kafka_bootstrap, settings.topic(ACCOUNTS.name), catalog.apply_account
    )
    handlers = Handlers("routing", CALLS.name)

    @handlers.on(CallRequested)
    async def route_call(event: CloudEvent, req: CallRequested, uow: UnitOfWork) -> None:
        api = catalog.find(req.api)
        consumer = catalog.accounts.get(req.consumer_id)
        # A call may arrive before routing has read the catalog or account write that came
        # just before it: catch up before refusing.
        if api is None:
            await apis.caught_up()
            api = catalog.find(req.api)
        if consumer is None:
            await accounts.caught_up()
            consumer = catalog.accounts.get(req.consumer_id)
        now = datetime.now(UTC)
        decision = route(
            req,
            api,
            consumer,
            default_fee_bps=settings.platform_fee_bps,
            now=now,
            unhealthy=health.unhealthy(now),
        )
        if isinstance(decision, CallRouted) and api is not None:
            refusal = await limits.admit(uow.conn, req.consumer_id, api, event.time)
            if refusal is not None:
                decision = reject(req, *refusal)
        uow.emit(decision, cause=event.id)

    @handlers.on(CallCompleted, CallFailed)
    async def note_upstream_health(
        event: CloudEvent, outcome: CallCompleted | CallFailed, uow: UnitOfWork
    ) -> None:
        if outcome.upstream_url is None:
            return
        failed = isinstance(outcome, CallFailed) and outcome.reason in UNHEALTHY_OUTCOMES
        health.record(outcome.upstream_url, ok=not failed, at=event.time)

    @service.on_start
    async def follow_catalog() -> None:
        await apis.start()
        await accounts.start()

    @service.on_stop
    async def stop_following() -> None:
        await apis.stop()
        await accounts.stop()

    service.consume(handlers)
    return service

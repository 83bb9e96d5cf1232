"""Routing: turns each `call.requested` into `call.routed` or `call.rejected`."""

from __future__ import annotations

from datetime import UTC, datetime

from postback_libs.consumer import Handlers
from postback_libs.events import ACCOUNTS, CALLS, CATALOG, CallRequested, CloudEvent
from postback_libs.follower import TopicFollower
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_routing.domain import Catalog, route


def build(settings: Settings) -> Service:
    service = Service("routing", "postback_routing", settings)
    catalog = Catalog()
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
        decision = route(
            req,
            api,
            consumer,
            default_fee_bps=settings.platform_fee_bps,
            now=datetime.now(UTC),
        )
        uow.emit(decision, cause=event.id)

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

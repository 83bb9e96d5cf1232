"""Delivery: sends every call's outcome to the consumer's webhook and to every subscribed
endpoint, signed per Standard Webhooks, within each endpoint's rate limit, concurrency cap,
order and circuit breaker, retried on a schedule that survives restarts, and records every
attempt as an event."""

from __future__ import annotations

import aiohttp

from postback_delivery import handlers
from postback_delivery.dispatch import USER_AGENT, Dispatcher, Sender
from postback_delivery.recorder import Recorder
from postback_delivery.store import Queue
from postback_libs.db import delete_in_chunks
from postback_libs.events import ACCOUNTS
from postback_libs.outbound import AddressPolicy, guarded_session
from postback_libs.rotation import SecretVersions, webhook_secret_versions
from postback_libs.runtime import Service
from postback_libs.settings import Settings


def build(settings: Settings) -> Service:
    service = Service("delivery", "postback_delivery", settings)
    http: dict[str, aiohttp.ClientSession] = {}
    # Which webhook secrets of each consumer sign its calls' messages, followed in every replica.
    consumer_secrets = SecretVersions(webhook_secret_versions)
    service.follow(ACCOUNTS, consumer_secrets.apply)
    sender = Sender(settings, lambda: http["session"], consumer_secrets)
    recorder = Recorder(service, settings)

    # The queue gets its pool once the service has started.
    dispatcher = Dispatcher(
        Queue(None, settings), sender.attempt, recorder, concurrency=settings.delivery_concurrency
    )

    @service.on_start
    async def open_session() -> None:
        # Connect and total timeouts and the body cap apply to every attempt (SSRF guard on).
        http["session"] = guarded_session(
            AddressPolicy(settings.allowed_network_list),
            connect_timeout=settings.delivery_connect_timeout_seconds,
            total_timeout=settings.delivery_timeout_seconds,
            limit=settings.delivery_concurrency,
            user_agent=USER_AGENT,
        )
        dispatcher.queue.pool = service.pool

    service.worker(recorder.run)
    service.worker(dispatcher.run)

    @service.purge
    async def forget_finished_messages() -> None:
        # Their bodies hold results, kept no longer than the read model keeps them; the read
        # model keeps their history.
        await delete_in_chunks(
            service.pool,
            "deliveries",
            "status IN ('succeeded', 'failed', 'exhausted')"
            " AND updated_at < now() - make_interval(days => $1)",
            settings.result_retention_days,
        )

    @service.on_stop
    async def drain() -> None:
        await dispatcher.drain(service.drain_time_left())
        recorder.stop()
        await http["session"].close()

    # What a batch queues is claimed by this process as soon as the batch commits; other
    # replicas find it on their next idle poll. The calls batch starts some itself.
    wake = dispatcher.wake.set
    service.consume(handlers.calls(wake, dispatcher))
    for make in (handlers.ledger, handlers.endpoints, handlers.commands):
        service.consume(make(wake))
    return service

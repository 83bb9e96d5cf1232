"""Delivery against the real broker, Postgres and real webhook receivers: every call's outcome is
sent signed per Standard Webhooks, retried on the schedule under one webhook-id, stopped by 410,
never redirected, and a pending retry survives a restart."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

from aiohttp import web
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from postback_delivery.app import build as delivery
from postback_delivery.dispatch import ATTEMPTS
from postback_libs.events import (
    CallCompleted,
    CallFailed,
    CallRefunded,
    CallRejected,
    CallRequested,
    CallSettled,
    CallTimedOut,
    EventData,
)
from postback_libs.signing import derive_secret
from tests.helpers import (
    HttpServer,
    TopicReader,
    events_of,
    eventually,
    fetch,
    publish,
    receiver,
    running,
    scripted,
    uid,
)


def completed_call(hook: str, consumer_id: str | None = None, price: int = 10) -> list[EventData]:
    """The events of a call that completed and was settled, as delivery sees them."""
    rid, consumer = uid("req"), consumer_id or uid("acct_c")
    return [
        CallRequested(request_id=rid, consumer_id=consumer, api="weather", webhook_url=hook),
        CallCompleted(request_id=rid, via="response", status_code=200, result={"temp": 21}),
        CallSettled(request_id=rid, consumer_id=consumer, owner_id="o", amount=price, fee=1),
    ]


def webhook_ids(server: HttpServer) -> list[str]:
    return [headers["webhook-id"] for _, headers, _ in server.received]


async def test_every_outcome_is_delivered_signed(settings):
    consumer = uid("acct_c")
    secret = derive_secret(settings.master_key(), "consumer", consumer)
    async with (
        receiver() as hooks,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, delivery),
    ):
        hook = f"{hooks.url}/hook"
        done = completed_call(hook, consumer, price=10)
        failed, timed_out, rejected, silent = (uid("req") for _ in range(4))

        def req(rid: str, url: str | None = hook) -> CallRequested:
            return CallRequested(
                request_id=rid, consumer_id=consumer, api="weather", webhook_url=url
            )

        await publish(
            settings,
            *done,
            req(failed),
            CallFailed(request_id=failed, reason="owner_error", status_code=500, detail="boom"),
            CallRefunded(request_id=failed, consumer_id=consumer, amount=10, outcome="call.failed"),
            req(timed_out),
            CallTimedOut(request_id=timed_out, deadline=datetime.now(UTC)),
            CallRefunded(
                request_id=timed_out, consumer_id=consumer, amount=10, outcome="call.timed_out"
            ),
            req(rejected),
            CallRejected(
                request_id=rejected,
                consumer_id=consumer,
                api="weather",
                reason="unknown_api",
                stage="routing",
            ),
            # No webhook_url: nothing to deliver.
            req(silent, None),
            CallRejected(
                request_id=silent,
                consumer_id=consumer,
                api="weather",
                reason="unknown_api",
                stage="routing",
            ),
        )
        await eventually(lambda: len(hooks.received) >= 4, what="four webhooks")
        by_request = {}
        for path, headers, body in hooks.received:
            assert path == "/hook"
            # Two verifiers nobody here wrote.
            StandardWebhook(secret).verify(body, headers)
            SvixWebhook(secret).verify(body, headers)
            assert headers["Content-Type"] == "application/json"
            assert headers["User-Agent"].startswith("Postback/")
            payload = json.loads(body)
            by_request[payload["data"]["request_id"]] = payload

        ok = by_request[done[0].request_id]
        assert ok["type"] == "call.completed"
        assert ok["data"]["status"] == "completed"
        assert ok["data"]["result"] == {"temp": 21}
        assert ok["data"]["cost"] == 10
        assert ok["data"]["api"] == "weather"
        assert by_request[failed]["type"] == "call.failed"
        assert by_request[failed]["data"]["error"]["reason"] == "owner_error"
        assert by_request[failed]["data"]["cost"] == 0
        assert by_request[timed_out]["type"] == "call.timed_out"
        assert by_request[timed_out]["data"]["status"] == "timed_out"
        assert by_request[rejected]["type"] == "call.rejected"
        assert by_request[rejected]["data"]["error"]["reason"] == "unknown_api"
        assert silent not in by_request

        for rid in by_request:
            [delivered] = await events_of(calls, "call.delivered", rid)
            assert delivered.data["attempts"] == 1
        await asyncio.sleep(0.3)
        assert len(hooks.received) == 4
        assert not calls.of_type("call.delivered", silent)


def attempts_counted(status: str, error_class: str) -> float:
    return ATTEMPTS.labels(status, error_class)._value.get()


async def test_failures_are_retried_under_the_same_webhook_id(settings):
    retried, succeeded_before = (
        attempts_counted("pending", "http_status"),
        attempts_counted("succeeded", "none"),
    )
    async with (
        scripted([(500, {}), (503, {"Retry-After": "0"})]) as hooks,
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        story = completed_call(f"{hooks.url}/hook")
        rid = story[0].request_id
        await publish(settings, *story)
        [delivered] = await events_of(calls, "call.delivered", rid)
        assert delivered.data["attempts"] == 3
        # Written with the last attempt, after it on the same partition.
        [succeeded] = await events_of(deliveries, "delivery.succeeded")
        assert succeeded.data["attempts"] == 3

        ids = webhook_ids(hooks)
        assert len(ids) == 3
        assert len(set(ids)) == 1
        assert delivered.data["message_id"] == ids[0]
        bodies = {body for _, _, body in hooks.received}
        assert len(bodies) == 1  # the same bytes every time

        attempted = sorted(
            deliveries.of_type("delivery.attempted"), key=lambda e: e.data["attempt"]
        )
        assert [e.data["attempt"] for e in attempted] == [1, 2, 3]
        assert [e.data["status_code"] for e in attempted] == [500, 503, 200]
        assert [e.data.get("error_class") for e in attempted] == ["http_status"] * 2 + [None]
        assert all(e.data["message_id"] == ids[0] for e in attempted)
        assert attempted[0].data["next_attempt_at"]
        [row] = await fetch(svc, "SELECT status, attempts FROM deliveries")
        assert (row["status"], row["attempts"]) == ("succeeded", 3)
        await asyncio.sleep(0.3)
        assert len(hooks.received) == 3
    # On the metrics the on-call engineer watches.
    assert attempts_counted("pending", "http_status") == retried + 2
    assert attempts_counted("succeeded", "none") == succeeded_before + 1


async def test_410_gone_stops_delivery_at_once(settings):
    async with (
        scripted([(410, {})] * 5) as hooks,
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        story = completed_call(f"{hooks.url}/hook")
        rid = story[0].request_id
        await publish(settings, *story)
        [failed] = await events_of(calls, "call.delivery_failed", rid)
        assert failed.data["attempts"] == 1
        [gone] = await events_of(deliveries, "delivery.failed")
        assert gone.data["attempts"] == 1
        assert "410" in gone.data["reason"]
        await asyncio.sleep(1.0)  # longer than the whole test retry schedule
        assert len(hooks.received) == 1
        assert len(deliveries.of_type("delivery.attempted")) == 1
        assert not calls.of_type("call.delivered", rid)
        [row] = await fetch(svc, "SELECT status FROM deliveries")
        assert row["status"] == "failed"


async def test_retries_are_exhausted_after_the_schedule(settings):
    async with (
        scripted([(500, {})] * 10) as hooks,
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery),
    ):
        story = completed_call(f"{hooks.url}/hook")
        rid = story[0].request_id
        await publish(settings, *story)
        [failed] = await events_of(calls, "call.delivery_failed", rid)
        schedule = settings.retry_delays
        assert failed.data["attempts"] == len(schedule) == 4
        [exhausted] = await events_of(deliveries, "delivery.exhausted")
        assert exhausted.data["attempts"] == 4
        assert "500" in exhausted.data["last_error"]
        attempted = deliveries.of_type("delivery.attempted")
        assert sorted(e.data["attempt"] for e in attempted) == [1, 2, 3, 4]
        last = max(attempted, key=lambda e: e.data["attempt"])
        assert last.data.get("next_attempt_at") is None
        await asyncio.sleep(1.0)
        assert len(hooks.received) == 4
        assert len(set(webhook_ids(hooks))) == 1
        assert not calls.of_type("call.delivered", rid)


async def test_a_redirect_is_not_followed_and_counts_as_a_failure(settings):
    async def target(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async with (
        scripted([(302, {"Location": "/elsewhere"})] * 10, extra={"/elsewhere": target}) as hooks,
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery),
    ):
        story = completed_call(f"{hooks.url}/hook")
        rid = story[0].request_id
        await publish(settings, *story)
        attempted = await events_of(deliveries, "delivery.attempted")
        first = next(e for e in attempted if e.data["attempt"] == 1)
        assert first.data["status_code"] == 302
        assert first.data["error_class"] == "http_status"
        await events_of(calls, "call.delivery_failed", rid)
        assert [path for path, _, _ in hooks.received] == ["/hook"] * 4
        assert not calls.of_type("call.delivered", rid)


async def test_a_pending_retry_survives_a_restart(settings):
    settings = settings.model_copy(update={"retry_schedule": "0,3,3"})
    async with (
        scripted([(500, {})]) as hooks,
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.deliveries") as deliveries,
    ):
        story = completed_call(f"{hooks.url}/hook")
        rid = story[0].request_id
        async with running(settings, delivery) as [svc]:
            await publish(settings, *story)
            [first] = await events_of(deliveries, "delivery.attempted")
            assert first.data["status_code"] == 500
            assert first.data["next_attempt_at"]
            [row] = await fetch(svc, "SELECT status, attempts FROM deliveries")
            assert (row["status"], row["attempts"]) == ("pending", 1)
        # Down while the retry is due.
        assert len(hooks.received) == 1
        async with running(settings, delivery) as [svc]:
            [delivered] = await events_of(calls, "call.delivered", rid)
            assert delivered.data["attempts"] == 2
            await asyncio.sleep(0.5)
            [row] = await fetch(svc, "SELECT status, attempts FROM deliveries")
            assert (row["status"], row["attempts"]) == ("succeeded", 2)
        await events_of(deliveries, "delivery.succeeded")
        statuses = [e.data["status_code"] for e in deliveries.of_type("delivery.attempted")]
        assert sorted(statuses) == [200, 500]
        assert len(hooks.received) == 2
        assert len(set(webhook_ids(hooks))) == 1
        assert len(calls.of_type("call.delivered", rid)) == 1


async def test_retry_after_on_429_is_honoured(settings):
    arrivals: list[float] = []
    answers = [web.Response(status=429, headers={"Retry-After": "1"})]

    async def hook(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        return answers.pop(0) if answers else web.Response(status=200)

    async with (
        HttpServer({"/hook": hook}) as hooks,
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery),
    ):
        story = completed_call(f"{hooks.url}/hook")
        rid = story[0].request_id
        await publish(settings, *story)
        [delivered] = await events_of(calls, "call.delivered", rid)
        assert delivered.data["attempts"] == 2
        # The schedule alone would retry after ~0.2 s.
        assert arrivals[1] - arrivals[0] >= 0.95
        await events_of(deliveries, "delivery.succeeded")
        first = next(e for e in deliveries.of_type("delivery.attempted") if e.data["attempt"] == 1)
        assert first.data["status_code"] == 429
        assert first.data["next_attempt_at"]

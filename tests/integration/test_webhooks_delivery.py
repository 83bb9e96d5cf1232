"""Delivery to subscribed endpoints against the real broker, Postgres and real receivers:
fan-out by event type, signatures (two independent verifiers, Ed25519, rotation), receivers
that fail, time out, redirect, answer 429 or 410 and recover, the circuit breaker, FIFO order,
concurrency cap, exhausted messages announced, resent and recovered."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

from aiohttp import web
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from postback_delivery.app import build as delivery
from postback_libs.events import (
    BalanceLow,
    DeliveryRecoverRequested,
    DeliveryResendRequested,
    EndpointSecretRotated,
    RetiredSecret,
)
from postback_libs.signing import derive_secret
from postback_libs.webhooks import public_key, verify_asymmetric
from tests.helpers import (
    HttpServer,
    TopicReader,
    events_of,
    eventually,
    fetch,
    publish,
    running,
    uid,
)
from tests.integration.webhook_kit import completed_call, endpoint, now, secret_of, subscribe


class Receiver(HttpServer):
    """Answers each request with `script(n, request)` (n counts from 0) and notes when."""

    def __init__(self, script=None) -> None:
        self.script = script or (lambda n, request: web.Response(status=200))
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        super().__init__({"/hook": self._answer, "/elsewhere": self._elsewhere})
        self.elsewhere = 0

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.times.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            answer = self.script(len(self.times) - 1, request)
            if asyncio.iscoroutine(answer):
                answer = await answer
            return answer
        finally:
            self.in_flight -= 1

    async def _elsewhere(self, request: web.Request) -> web.Response:
        self.elsewhere += 1
        return web.Response(status=200)

    @property
    def hook(self) -> str:
        return f"{self.url}/hook"

    def payloads(self) -> list[dict]:
        return [json.loads(body) for _, _, body in self.received]

    def types(self) -> list[str]:
        return [p["type"] for p in self.payloads()]


def statuses(*codes: int, then: int = 200):
    def script(n: int, request: web.Request) -> web.Response:
        return web.Response(status=codes[n] if n < len(codes) else then)

    return script


async def test_outcomes_fan_out_to_every_subscribed_endpoint_signed(settings):
    consumer = uid("acc")
    async with (
        Receiver() as call_hook,
        Receiver() as everything,
        Receiver() as billing,
        Receiver() as other_account,
        Receiver() as switched_off,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        all_calls = endpoint(everything.hook, consumer, event_types=["call.*"])
        money = endpoint(billing.hook, consumer, event_types=["call.settled", "balance.low"])
        foreign = endpoint(other_account.hook, event_types=["*"])
        off = endpoint(switched_off.hook, consumer, event_types=["*"], enabled=False)
        await subscribe(settings, svc, all_calls, money, foreign, off)
        story = completed_call(consumer, call_hook.hook, price=25)
        rid = story[0].request_id
        await publish(settings, *story, BalanceLow(account_id=consumer, balance=5, threshold=100))
        await eventually(lambda: len(billing.received) >= 2, what="call.settled + balance.low")
        await eventually(
            lambda: len(everything.received) >= 2 and call_hook.received, what="outcomes"
        )
        await asyncio.sleep(0.5)  # anything extra would show up here

        # call.* covers the outcome and call.settled.
        assert sorted(everything.types()) == ["call.completed", "call.settled"]
        assert sorted(billing.types()) == ["balance.low", "call.settled"]
        assert call_hook.types() == ["call.completed"]
        assert other_account.received == [] and switched_off.received == []

        # The call's own webhook_url is signed with the consumer's secret, each endpoint with
        # its own; two verifiers nobody here wrote accept them.
        consumer_secret = derive_secret(settings.master_key(), "consumer", consumer)
        for receiver, secret in (
            (call_hook, consumer_secret),
            (everything, secret_of(settings, all_calls)),
            (billing, secret_of(settings, money)),
        ):
            for _, headers, body in receiver.received:
                StandardWebhook(secret).verify(body, headers)
                SvixWebhook(secret).verify(body, headers)
        # One message, one webhook-id, wherever it goes.
        [(_, h1, b1)] = call_hook.received
        [(_, h2, b2)] = [r for r in everything.received if b'"call.completed"' in r[2]]
        assert h1["webhook-id"] == h2["webhook-id"] and b1 == b2
        completed = json.loads(b2)
        assert completed["data"]["request_id"] == rid and completed["data"]["cost"] == 25
        settled = next(p for p in billing.payloads() if p["type"] == "call.settled")
        assert settled["data"] == {"request_id": rid, "api": "weather", "cost": 25}
        low = next(p for p in billing.payloads() if p["type"] == "balance.low")
        assert low["data"]["balance"] == 5

        scheduled = await events_of(deliveries, "delivery.scheduled", n=4)
        assert {e.data["endpoint_id"] for e in scheduled if e.data.get("endpoint_id")} == {
            all_calls.endpoint_id,
            money.endpoint_id,
        }
        assert all(e.data["account_id"] == consumer for e in scheduled)


async def test_ed25519_signing_and_a_rotation_overlap(settings):
    consumer = uid("acc")
    master = settings.master_key()
    async with (
        Receiver() as signed_asym,
        Receiver() as rotating,
        running(settings, delivery) as [svc],
    ):
        only = ["call.completed"]
        asym = endpoint(signed_asym.hook, consumer, signing="asymmetric", event_types=only)
        sym = endpoint(rotating.hook, consumer, event_types=only)
        await subscribe(settings, svc, asym, sym)
        rotated = sym.model_copy(
            update={
                "secret_version": 2,
                "revision": 2,
                "retired_secrets": [RetiredSecret(version=1, valid_until=now() + timedelta(1))],
            }
        )
        await publish(
            settings,
            EndpointSecretRotated(endpoint=rotated, previous_secret_valid_until=now()),
        )
        await eventually(
            lambda: svc.pool.fetchval(
                "SELECT revision = 2 FROM endpoints WHERE endpoint_id = $1", sym.endpoint_id
            ),
            what="rotation seen",
        )
        await publish(settings, *completed_call(consumer))
        await eventually(lambda: signed_asym.received and rotating.received, what="both")

        [(_, headers, body)] = signed_asym.received
        assert headers["webhook-signature"].startswith("v1a,")
        verify_asymmetric(public_key(master, asym.endpoint_id, 1), headers, body)

        [(_, headers, body)] = rotating.received
        assert len(headers["webhook-signature"].split()) == 2
        for version in (1, 2):  # the old secret and the new one both verify
            StandardWebhook(secret_of(settings, sym, version)).verify(body, headers)


async def test_a_receiver_that_fails_redirects_times_out_then_recovers(settings):
    settings = settings.model_copy(update={"delivery_timeout_seconds": 1.0})

    async def script(n: int, request: web.Request) -> web.StreamResponse:
        if n == 0:
            return web.Response(status=500, text="boom")
        if n == 1:
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        if n == 2:
            await asyncio.sleep(2)  # past the timeout
        return web.Response(status=200, text="thanks", headers={"X-Receiver": "yes"})

    consumer = uid("acc")
    async with (
        Receiver(script) as hooks,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(hooks.hook, consumer, retry_schedule=[0, 0.2, 0.2, 0.2], max_attempts=6)
        await subscribe(settings, svc, ep)
        await publish(settings, *completed_call(consumer))
        [ok] = await events_of(deliveries, "delivery.succeeded")
        assert ok.data["attempts"] == 4 and ok.data["endpoint_id"] == ep.endpoint_id
        attempts = sorted(deliveries.of_type("delivery.attempted"), key=lambda e: e.data["attempt"])
        assert [a.data.get("status_code") for a in attempts] == [500, 302, None, 200]
        assert [a.data.get("error_class") for a in attempts] == [
            "http_status",
            "http_status",
            "timeout",
            None,
        ]
        assert attempts[0].data["response_excerpt"] == "boom"
        assert attempts[3].data["response_headers"]["X-Receiver"] == "yes"
        assert hooks.elsewhere == 0  # the redirect was not followed
        assert len({h["webhook-id"] for _, h, _ in hooks.received}) == 1
        [row] = await fetch(svc, "SELECT status, attempts FROM deliveries")
        assert (row["status"], row["attempts"]) == ("succeeded", 4)


async def test_an_answer_that_is_not_utf8_is_recorded_and_holds_nothing_up(settings):
    """A receiver's header that is not UTF-8 and a NUL in its body are recorded as U+FFFD;
    such an answer once stopped the recording of every attempt."""
    answers = [
        b"HTTP/1.1 500 Oops\r\nX-Weird: caf\xe9\xff\r\nContent-Length: 4\r\n"
        b"Connection: close\r\n\r\nn\x00o\xff",
        b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0) if len(answers) > 1 else answers[0])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    consumer = uid("acc")
    try:
        async with (
            TopicReader(settings, "postback.deliveries") as deliveries,
            running(settings, delivery) as [svc],
        ):
            ep = endpoint(f"http://127.0.0.1:{port}/hook", consumer, retry_schedule=[0, 0.2])
            await subscribe(settings, svc, ep)
            await publish(settings, *completed_call(consumer))
            await events_of(deliveries, "delivery.succeeded")
            attempts = sorted(
                deliveries.of_type("delivery.attempted"), key=lambda e: e.data["attempt"]
            )
            assert [a.data.get("status_code") for a in attempts] == [500, 204]
            assert attempts[0].data["response_headers"]["X-Weird"] == "caf\ufffd\ufffd"
            assert attempts[0].data["response_excerpt"] == "n\ufffdo\ufffd"
            [row] = await fetch(svc, "SELECT status, last_error FROM deliveries")
            assert row["status"] == "succeeded"
    finally:
        server.close()
        await server.wait_closed()


async def test_429_retry_after_pauses_the_whole_endpoint(settings):
    consumer = uid("acc")
    answers = [web.Response(status=429, headers={"Retry-After": "1"})]

    def script(n: int, request: web.Request) -> web.Response:
        return answers.pop(0) if answers else web.Response(status=200)

    async with (
        Receiver(script) as hooks,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(hooks.hook, consumer)
        await subscribe(settings, svc, ep)
        await publish(settings, *completed_call(consumer))
        [first] = await events_of(deliveries, "delivery.attempted")
        assert first.data["status_code"] == 429
        # A second message, due at once, waits for the pause the endpoint asked for.
        await publish(settings, *completed_call(consumer))
        await events_of(deliveries, "delivery.succeeded", n=2)
        assert len(hooks.times) == 3
        assert hooks.times[1] - hooks.times[0] >= 0.9
        assert hooks.times[2] - hooks.times[0] >= 0.9


async def test_410_disables_the_endpoint_and_announces_it(settings):
    consumer = uid("acc")
    async with (
        Receiver(statuses(410)) as gone,
        Receiver() as watcher,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(gone.hook, consumer)
        watch = endpoint(watcher.hook, consumer, event_types=["endpoint.disabled"])
        await subscribe(settings, svc, ep, watch)
        await publish(settings, *completed_call(consumer))
        [disabled] = await events_of(deliveries, "endpoint.disabled")
        assert disabled.data["endpoint_id"] == ep.endpoint_id
        assert "410" in disabled.data["reason"]
        [failed] = await events_of(deliveries, "delivery.failed")
        assert failed.data["attempts"] == 1
        await eventually(lambda: watcher.received, what="endpoint.disabled announced")
        [note] = watcher.payloads()
        assert note["type"] == "endpoint.disabled"
        assert note["data"]["endpoint_id"] == ep.endpoint_id
        # Nothing more goes to it.
        await publish(settings, *completed_call(consumer))
        await asyncio.sleep(1.0)
        assert len(gone.received) == 1
        [row] = await fetch(
            svc, "SELECT disabled_reason FROM endpoints WHERE endpoint_id = $1", ep.endpoint_id
        )
        assert "410" in row["disabled_reason"]


async def test_circuit_breaker_stops_hammering_and_probes(settings):
    settings = settings.model_copy(
        update={"circuit_failure_threshold": 2, "circuit_cooldown_seconds": 1.0}
    )
    healthy = asyncio.Event()

    def script(n: int, request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy.is_set() else 500)

    consumer = uid("acc")
    async with (
        Receiver(script) as hooks,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(
            hooks.hook, consumer, retry_schedule=[0, 0.05], max_attempts=50, max_in_flight=1
        )
        await subscribe(settings, svc, ep)
        await publish(settings, *completed_call(consumer), *completed_call(consumer))
        await eventually(lambda: len(hooks.times) >= 2, what="two failures")
        await asyncio.sleep(0.6)
        # Open: without the breaker, 0.05 s retries would have hit it ~10 more times.
        assert len(hooks.times) == 2
        [row] = await fetch(
            svc, "SELECT circuit FROM endpoints WHERE endpoint_id = $1", ep.endpoint_id
        )
        assert row["circuit"] == "open"
        await eventually(lambda: len(hooks.times) >= 3, what="a probe", timeout=5)
        assert hooks.times[2] - hooks.times[1] >= 0.9
        healthy.set()
        await events_of(deliveries, "delivery.succeeded", n=2, timeout=10)
        [row] = await fetch(
            svc, "SELECT circuit FROM endpoints WHERE endpoint_id = $1", ep.endpoint_id
        )
        assert row["circuit"] == "closed"


async def test_fifo_endpoint_delivers_in_order(settings):
    consumer = uid("acc")
    async with (
        Receiver(statuses(500, 503)) as hooks,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(hooks.hook, consumer, fifo=True, retry_schedule=[0, 0.2], max_attempts=10)
        await subscribe(settings, svc, ep)
        # Calls live on different partitions: FIFO is the order delivery queued their
        # outcomes, so queue them one after another.
        for i in range(6):
            await publish(settings, *completed_call(consumer, n=i))
            await events_of(deliveries, "delivery.scheduled", n=i + 1)
        await events_of(deliveries, "delivery.succeeded", n=6, timeout=30)
        seen = [p["data"]["result"]["n"] for p in hooks.payloads()]
        # The first message failed twice: nothing else went before it succeeded.
        assert seen == [0, 0, 0, 1, 2, 3, 4, 5]
        assert hooks.max_in_flight == 1


async def test_concurrency_cap_per_endpoint(settings):
    async def slow(n: int, request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(status=200)

    consumer = uid("acc")
    async with (
        Receiver(slow) as hooks,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(hooks.hook, consumer, max_in_flight=2)
        await subscribe(settings, svc, ep)
        await publish(settings, *(e for _ in range(8) for e in completed_call(consumer)))
        await events_of(deliveries, "delivery.succeeded", n=8, timeout=30)
        assert hooks.max_in_flight == 2


async def test_exhausted_messages_are_announced_then_resent_and_recovered(settings):
    # Six failures in a row would open the circuit for 30 s: not what this test is about.
    settings = settings.model_copy(update={"circuit_failure_threshold": 100})
    healthy = asyncio.Event()

    def script(n: int, request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy.is_set() else 500)

    consumer = uid("acc")
    async with (
        Receiver(script) as hooks,
        Receiver() as watcher,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(hooks.hook, consumer, retry_schedule=[0, 0.1], max_attempts=2)
        watch = endpoint(watcher.hook, consumer, event_types=["delivery.exhausted"])
        await subscribe(settings, svc, ep, watch)
        since = now()
        for _ in range(3):
            await publish(settings, *completed_call(consumer))
        exhausted = await events_of(deliveries, "delivery.exhausted", n=3)
        assert all(e.data["attempts"] == 2 for e in exhausted)
        await eventually(lambda: len(watcher.received) >= 3, what="exhaustion announced")
        notes = watcher.payloads()
        assert {n["data"]["delivery_id"] for n in notes} == {e.subject for e in exhausted}
        assert all(n["data"]["endpoint_id"] == ep.endpoint_id for n in notes)
        assert all(n["data"]["event_type"] == "call.completed" for n in notes)

        healthy.set()
        first = exhausted[0]
        await publish(
            settings,
            DeliveryResendRequested(
                delivery_id=first.subject,
                message_id=first.data["message_id"],
                endpoint_id=ep.endpoint_id,
                account_id=consumer,
            ),
        )

        def succeeded_here():
            return [
                e
                for e in deliveries.of_type("delivery.succeeded")
                if e.data["endpoint_id"] == ep.endpoint_id
            ]

        [ok] = await eventually(succeeded_here, what="the resent message delivered")
        assert ok.subject == first.subject and ok.data["attempts"] == 3
        await publish(
            settings,
            DeliveryRecoverRequested(
                endpoint_id=ep.endpoint_id, account_id=consumer, recovery_id="r1", since=since
            ),
        )
        await eventually(lambda: len(succeeded_here()) == 3, what="the other two recovered")
        recovered = [
            e for e in deliveries.of_type("delivery.scheduled") if e.data["reason"] != "new"
        ]
        assert sorted(e.data["reason"] for e in recovered) == ["recover", "recover", "resend"]
        rows = await fetch(
            svc, "SELECT status FROM deliveries WHERE endpoint_id = $1", ep.endpoint_id
        )
        assert {r["status"] for r in rows} == {"succeeded"}
        # Each message kept its webhook-id through resend and recovery.
        ids = [h["webhook-id"] for _, h, _ in hooks.received]
        assert len(set(ids)) == 3 and len(ids) == 9


async def test_continuous_failure_disables_the_endpoint(settings):
    settings = settings.model_copy(
        update={"endpoint_disable_after_seconds": 1.0, "circuit_failure_threshold": 1000}
    )
    consumer = uid("acc")
    async with (
        Receiver(statuses(*[500] * 1000)) as hooks,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        ep = endpoint(hooks.hook, consumer, retry_schedule=[0, 0.2], max_attempts=100)
        await subscribe(settings, svc, ep)
        await publish(settings, *completed_call(consumer))
        [disabled] = await events_of(deliveries, "endpoint.disabled", timeout=10)
        assert "failed since" in disabled.data["reason"]
        [failed] = await events_of(deliveries, "delivery.failed")
        assert "disabled" in failed.data["reason"]
        count = len(hooks.received)
        await asyncio.sleep(0.6)
        assert len(hooks.received) == count


async def test_a_resent_message_gets_a_whole_retry_window_again(settings):
    settings = settings.model_copy(update={"circuit_failure_threshold": 100})
    failures_left = [1_000]  # failing until the message is exhausted, then once more

    def script(n: int, request: web.Request) -> web.Response:
        failures_left[0] -= 1
        return web.Response(status=500 if failures_left[0] >= 0 else 200)

    consumer = uid("acc")
    async with (
        Receiver(script) as hooks,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        # No attempt limit: retries every 0.3 s until a second has passed since the message.
        ep = endpoint(hooks.hook, consumer, retry_schedule=[0, 0.3], retry_window_seconds=1)
        await subscribe(settings, svc, ep)
        await publish(settings, *completed_call(consumer))
        [exhausted] = await events_of(deliveries, "delivery.exhausted")
        failures_left[0] = 1
        await publish(
            settings,
            DeliveryResendRequested(
                delivery_id=exhausted.subject,
                message_id=exhausted.data["message_id"],
                endpoint_id=ep.endpoint_id,
                account_id=consumer,
            ),
        )
        # The resend's window counts from the resend: its first failure is retried, not the
        # end of the message (the window from the message's making closed long ago).
        [ok] = await events_of(deliveries, "delivery.succeeded")
        assert ok.data["attempts"] == exhausted.data["attempts"] + 2
        assert len(deliveries.of_type("delivery.exhausted")) == 1

"""Test helpers over real sockets: services run in-process against the real broker and
database, owners and webhook receivers are real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx
import uvicorn
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from postback.embedded import free_port
from postback_delivery.app import build as delivery
from postback_ingress.app import build as ingress
from postback_libs.events import (
    AccountState,
    ApiState,
    CallRouted,
    CloudEvent,
    EventData,
    new_event,
)
from postback_libs.offsets import OffsetGaps, guarded, seek_to_log_start
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_owner_adapter.app import build as owner_adapter
from postback_projection.app import build as projection
from postback_routing.app import build as routing
from postback_settlement.app import build as settlement

OPERATOR = {"Authorization": "Bearer test-operator-token"}

# Every service, as `postback up` runs them.
EVERY_SERVICE = (ingress, routing, settlement, owner_adapter, delivery, projection)


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *builders: Callable[[Settings], Service]
) -> AsyncIterator[list[Service]]:
    """Start services in-process, each with its HTTP server on its own port on 127.0.0.1."""
    callback_port = free_port()
    settings = settings.model_copy(update={"callback_url": f"http://127.0.0.1:{callback_port}"})
    services = [build(settings) for build in builders]
    started: list[tuple[Service, uvicorn.Server, asyncio.Task[None]]] = []
    try:
        for s in services:
            await s.start()
            port = callback_port if s.name == "owner-adapter" else free_port()
            server = uvicorn.Server(
                uvicorn.Config(
                    s.app, host="127.0.0.1", port=port, log_config=None, access_log=False
                )
            )
            task = asyncio.create_task(server.serve())
            started.append((s, server, task))
            await eventually(lambda server=server: server.started, what=f"{s.name} HTTP")
            s.http_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield services
    finally:
        for s, server, task in reversed(started):
            server.should_exit = True
            await task
            await s.stop()


def client(service: Service) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=service.http_url, timeout=30)  # type: ignore[attr-defined]


async def eventually(
    check: Callable[[], Any], timeout: float = 45.0, every: float = 0.05, what: str = "condition"
) -> Any:
    """Poll an async or sync check until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


class TopicReader:
    """Reads a whole topic from the beginning, outside any consumer group."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic = settings, settings.topic(topic)
        self.events: list[CloudEvent] = []
        self.raw: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TopicReader:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False, group_id=None
        )
        await self.consumer.start()
        parts = [
            TopicPartition(self.topic, p)
            for p in self.consumer.partitions_for_topic(self.topic) or {0}
        ]
        self.consumer.assign(parts)
        await seek_to_log_start(self.consumer, parts)
        self.gaps = OffsetGaps("test topic reader")
        if guarded(self.topic.removeprefix(self.settings.topic_prefix)):
            await self.gaps.expect_log_start(self.consumer, parts)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            fetched = await self.consumer.getmany(timeout_ms=100)
            for records in (await self.gaps.take(self.consumer, fetched)).records.values():
                for r in records:
                    self.raw.append(r)
                    with contextlib.suppress(ValueError):
                        self.events.append(CloudEvent.from_bytes(r.value))

    def of_type(self, type_: str, subject: str | None = None) -> list[CloudEvent]:
        return [
            e for e in self.events if e.type == type_ and (subject is None or e.subject == subject)
        ]

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


async def publish(
    settings: Settings, *items: EventData | tuple[str, bytes, bytes, str]
) -> list[CloudEvent]:
    """Publish events (or raw (topic, key, value, ce_type) records) as the relay would."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    out = []
    try:
        for item in items:
            if isinstance(item, EventData):
                e = new_event(item, source="test")
                out.append(e)
                topic, key, value, ce_type = (
                    settings.topic(item.topic.name),
                    e.subject.encode(),
                    e.to_bytes(),
                    e.type,
                )
            else:
                topic, key, value, ce_type = item
            await producer.send_and_wait(
                topic, value=value, key=key, headers=[("ce_type", ce_type.encode())]
            )
    finally:
        await producer.stop()
    return out


async def republish(settings: Settings, event: CloudEvent, topic: str) -> None:
    """Send an already-published event again, byte for byte (a redelivery)."""
    await publish(
        settings, (settings.topic(topic), event.subject.encode(), event.to_bytes(), event.type)
    )


@dataclass
class HttpServer:
    """A real HTTP server on 127.0.0.1 recording what it receives."""

    routes: dict[str, Callable[[web.Request], Any]]
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def __aenter__(self) -> HttpServer:
        app = web.Application()
        for path, handler in self.routes.items():
            app.router.add_route("*", path, self._recording(handler))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def _recording(self, handler: Callable[[web.Request], Any]) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.received.append((request.path, dict(request.headers), body))
            result: web.StreamResponse = await handler(request)
            return result

        return wrapped

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def owner_server(delay: float = 0.05) -> HttpServer:
    """A sync owner at /sync (result in the response) and an async one at /async (202, then a
    callback with the result)."""
    tasks: set[asyncio.Task[None]] = set()

    async def sync(request: web.Request) -> web.Response:
        params = json.loads(await request.read() or b"{}")
        return web.json_response({"echo": params, "via": "sync"})

    async def async_(request: web.Request) -> web.Response:
        params = json.loads(await request.read() or b"{}")

        async def call_back() -> None:
            await asyncio.sleep(delay)
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    request.headers["X-Postback-Callback-Url"],
                    json={"echo": params, "via": "callback"},
                    headers={
                        "X-Postback-Callback-Token": request.headers["X-Postback-Callback-Token"]
                    },
                ) as r,
            ):
                assert r.status == 200, await r.text()

        t = asyncio.create_task(call_back())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return web.json_response({"accepted": True}, status=202)

    return HttpServer({"/sync": sync, "/async": async_})


def receiver(statuses: list[int] | None = None) -> HttpServer:
    """A webhook receiver answering the given statuses in turn, then 200."""
    queue = list(statuses or [])

    async def hook(request: web.Request) -> web.Response:
        return web.Response(status=queue.pop(0) if queue else 200)

    return HttpServer({"/hook": hook})


async def create_account(
    http: httpx.AsyncClient, roles: list[str], name: str = "acct"
) -> dict[str, Any]:
    r = await http.post("/v1/accounts", json={"name": name, "roles": roles}, headers=OPERATOR)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def bearer(account: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {account['secret']}"}


# --- Helpers for the per-service integration tests ---------------------------------------------


def uid(prefix: str) -> str:
    """A fresh id with a readable prefix."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def api_state(**over: Any) -> ApiState:
    fields: dict[str, Any] = {
        "api_id": uid("api"),
        "slug": uid("slug"),
        "owner_id": uid("acct_owner"),
        "name": "Test API",
        "endpoint": "http://127.0.0.1:9/api",
        "price": 10,
        "max_duration_seconds": 90,
    }
    return ApiState(**{**fields, **over})


def account_state(**over: Any) -> AccountState:
    fields: dict[str, Any] = {
        "account_id": uid("acct"),
        "name": "test",
        "roles": ["consumer"],
        "key_id": uid("key"),
        "key_hash": "0" * 64,
    }
    return AccountState(**{**fields, **over})


def call_routed(upstream_url: str, *, deadline_in: float = 30.0, **over: Any) -> CallRouted:
    """A `call.routed` as routing would emit it, due `deadline_in` seconds from now."""
    fields: dict[str, Any] = {
        "request_id": uid("req"),
        "consumer_id": uid("acct_consumer"),
        "owner_id": uid("acct_owner"),
        "api_id": uid("api"),
        "mode": "production",
        "upstream_url": upstream_url,
        "method": "POST",
        "path": "/",
        "params": {"n": 1},
        "price": 10,
        "fee_bps": 1000,
        "deadline": datetime.now(UTC) + timedelta(seconds=deadline_in),
    }
    return CallRouted(**{**fields, **over})


def scripted(
    responses: list[tuple[int, dict[str, str]]],
    path: str = "/hook",
    extra: dict[str, Callable[[web.Request], Any]] | None = None,
) -> HttpServer:
    """A server at `path` answering the given (status, headers) in turn, then 200; `extra`
    adds more routes (a redirect target, say)."""
    queue = list(responses)

    async def answer(request: web.Request) -> web.Response:
        status, headers = queue.pop(0) if queue else (200, {})
        return web.Response(status=status, headers=headers)

    return HttpServer({path: answer, **(extra or {})})


def sleepy_owner(seconds: float) -> HttpServer:
    """An owner at /slow that answers only after `seconds`."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.json_response({"late": True})

    return HttpServer({"/slow": slow})


def silent_async_owner() -> HttpServer:
    """An owner at /async that answers 202 and never calls back by itself."""

    async def accept(request: web.Request) -> web.Response:
        return web.json_response({"accepted": True}, status=202)

    return HttpServer({"/async": accept})


def failing_owner(status: int = 500) -> HttpServer:
    """An owner at /fail that always answers `status`."""

    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=status)

    return HttpServer({"/fail": fail})


async def fetch(service: Service, sql: str, *args: Any) -> list[Any]:
    """Rows from the service's own schema."""
    rows: list[Any] = await service.pool.fetch(sql, *args)
    return rows


async def events_of(
    reader: TopicReader, type_: str, subject: str | None = None, n: int = 1, timeout: float = 45.0
) -> list[CloudEvent]:
    """Wait until the reader holds at least `n` events of a type (and subject)."""
    await eventually(
        lambda: len(reader.of_type(type_, subject)) >= n,
        timeout=timeout,
        what=f"{n} x {type_} {subject or ''}",
    )
    return reader.of_type(type_, subject)

"""`postback demo`: shows one call go through a running Postback, end to end.

It registers a small built-in owner — a report generator that answers 202 at once and posts the
report to its callback URL after a delay, as slow APIs do — and a consumer with credit, starts a
webhook receiver, makes a call, and waits for the signed result."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from postback_libs.signing import SignatureError, verify

PRICE = 25
CREDIT = 1000


def _operator_token(data_dir: Path) -> str:
    token = os.environ.get("POSTBACK_OPERATOR_TOKEN")
    if token:
        return token
    path = data_dir / "operator-token"
    if not path.exists():
        raise SystemExit(
            f"no operator token: set POSTBACK_OPERATOR_TOKEN or run `postback up` "
            f"(it writes {path})"
        )
    return path.read_text().strip()


class DemoOwner:
    """An async owner: 202 now, the report later on the callback URL."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.signing_secret = ""
        self.verified_calls = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(self.signing_secret, dict(request.headers), body)
            self.verified_calls += 1
        except SignatureError as e:
            return web.json_response({"error": f"not from Postback: {e}"}, status=401)
        task = asyncio.create_task(
            self._report_later(
                request.headers["X-Postback-Callback-Url"],
                request.headers["X-Postback-Callback-Token"],
                json.loads(body or b"{}"),
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"status": "generating"}, status=202)

    async def _report_later(self, url: str, token: str, params: dict[str, Any]) -> None:
        await asyncio.sleep(self.delay)
        report = {
            "report": {
                "title": f"{params.get('action', 'sales')} report",
                "format": params.get("format", "pdf"),
                "pages": 12,
                "generated_in_seconds": self.delay,
            }
        }
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, json=report, headers={"X-Postback-Callback-Token": token}) as r,
        ):
            r.raise_for_status()


async def _serve(handler: Any, path: str) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}{path}"


async def run_demo(url: str, data_dir: Path, delay: float, timeout: float) -> int:
    operator = {"Authorization": f"Bearer {_operator_token(data_dir)}"}
    owner = DemoOwner(delay)
    webhooks: asyncio.Queue[tuple[dict[str, str], bytes, float]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        await webhooks.put((dict(request.headers), await request.read(), time.perf_counter()))
        return web.Response(status=204)

    owner_runner, owner_url = await _serve(owner.handle, "/reports")
    hook_runner, hook_url = await _serve(receive, "/webhook")
    try:
        async with aiohttp.ClientSession(url) as http:

            async def call(method: str, path: str, expect: int, **kw: Any) -> Any:
                async with http.request(method, path, **kw) as r:
                    body = await r.json(content_type=None)
                    if r.status != expect:
                        raise RuntimeError(f"{method} {path} answered {r.status}: {body}")
                    return body, r

            slug = f"reports-{int(time.time())}"
            owner_acc, _ = await call(
                "POST",
                "/v1/accounts",
                201,
                headers=operator,
                json={"name": "Demo Reports Inc.", "roles": ["owner"]},
            )
            registered, _ = await call(
                "POST",
                "/v1/apis",
                201,
                headers={"Authorization": f"Bearer {owner_acc['secret']}"},
                json={
                    "slug": slug,
                    "name": "Report generator",
                    "endpoint": owner_url,
                    "delivery_mode": "async",
                    "price": PRICE,
                    "max_duration_seconds": 120,
                    "description": "Generates a report; takes a while.",
                },
            )
            owner.signing_secret = registered["signing_secret"]
            print(
                f"1. Owner registered API {slug!r} (async: answers 202, posts the report "
                f"after {delay:g}s), price {PRICE}"
            )
            consumer, _ = await call(
                "POST",
                "/v1/accounts",
                201,
                headers=operator,
                json={"name": "Demo consumer", "roles": ["consumer"]},
            )
            auth = {"Authorization": f"Bearer {consumer['secret']}"}
            await call(
                "POST",
                f"/v1/accounts/{consumer['account_id']}/credits",
                202,
                headers=operator,
                json={"amount": CREDIT, "note": "demo credit"},
            )
            await _wait_for(
                lambda: _balance(call, auth),
                lambda b: b >= CREDIT,
                30,
                "the consumer's credit to be applied",
            )
            print(f"2. Consumer {consumer['account_id']} credited with {CREDIT}")

            started = time.perf_counter()
            accepted, resp = await call(
                "POST",
                "/v1/calls",
                202,
                headers={**auth, "Idempotency-Key": slug},
                json={
                    "api": slug,
                    "params": {"action": "sales", "format": "pdf"},
                    "webhook_url": hook_url,
                },
            )
            ack_ms = (time.perf_counter() - started) * 1000
            rid = accepted["request_id"]
            print(
                f"3. POST /v1/calls -> {resp.status} Accepted in {ack_ms:.0f} ms: "
                f"request_id={rid} Location={resp.headers['Location']}"
            )

            headers, body, arrived = await asyncio.wait_for(webhooks.get(), timeout)
            e2e_ms = (arrived - started) * 1000
            verify(consumer["webhook_secret"], headers, body)
            hook = json.loads(body)
            print(
                f"4. Webhook {hook['type']} arrived after {e2e_ms:.0f} ms; signature verified "
                f"(webhook-id {headers.get('Webhook-Id') or headers.get('webhook-id')})"
            )
            print(f"   data: {json.dumps(hook['data'])}")
            if hook["data"].get("request_id") != rid or hook["type"] != "call.completed":
                print("   unexpected webhook")
                return 1

            view = await _wait_for(
                lambda: call("GET", f"/v1/calls/{rid}", 200, headers=auth),
                lambda v: v[0]["status"] == "delivered",
                30,
                "the read model to show the call delivered",
            )
            print(f"5. GET /v1/calls/{rid}: status={view[0]['status']} cost={view[0]['cost']}")
            for step in view[0]["timeline"]:
                print(f"   {step['time']}  {step['type']:<22} {step['source']}")
            print(
                f"Demo passed: accepted in {ack_ms:.0f} ms, webhook after {e2e_ms:.0f} ms "
                f"(of which the owner took {delay:g} s)"
            )
            return 0
    except (RuntimeError, TimeoutError, SignatureError, aiohttp.ClientError) as e:
        print(f"Demo failed: {e.__class__.__name__}: {e}")
        return 1
    finally:
        await owner_runner.cleanup()
        await hook_runner.cleanup()


async def _balance(call: Any, auth: dict[str, str]) -> int:
    me, _ = await call("GET", "/v1/accounts/me", 200, headers=auth)
    return int(me["balances"].get("consumer", {}).get("balance", 0))


async def _wait_for(fetch: Any, ok: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)

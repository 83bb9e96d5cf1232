"""The whole system as `postback up` runs it: embedded broker and database, six service
processes. 50 calls mixing sync and async owners, one service killed with SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from postback.embedded import free_port
from postback_libs.settings import DEFAULT_PORTS
from tests.helpers import HttpServer, eventually, receiver

CALLS = 50
PRICE = 7


def start_stack(data_dir: Path, base_port: int) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    env.update(
        POSTBACK_OWNER_TIMEOUT_SECONDS="3",
        POSTBACK_DELIVERY_TIMEOUT_SECONDS="3",
        POSTBACK_RETRY_SCHEDULE="0,0.5,1,2,4,8",
        POSTBACK_LOG_LEVEL="INFO",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "postback",
            "up",
            "--data-dir",
            str(data_dir),
            "--base-port",
            str(base_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Postback is ready:"):
            return proc, lines
    proc.kill()
    raise AssertionError("postback up did not get ready:\n" + "".join(lines))


def patient_owner() -> HttpServer:
    """Sync at /sync; async at /async, whose callback is retried while Postback is away, as a
    real owner's would be."""
    tasks: set[asyncio.Task[None]] = set()

    async def sync(request: web.Request) -> web.Response:
        return web.json_response({"echo": json.loads(await request.read()), "via": "sync"})

    async def async_(request: web.Request) -> web.Response:
        params = json.loads(await request.read())
        url = request.headers["X-Postback-Callback-Url"]
        token = request.headers["X-Postback-Callback-Token"]

        async def call_back() -> None:
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as s:
                for _ in range(100):
                    try:
                        async with s.post(
                            url,
                            json={"echo": params, "via": "callback"},
                            headers={"X-Postback-Callback-Token": token},
                        ) as r:
                            if r.status in (200, 409):
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.3)

        t = asyncio.create_task(call_back())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return web.json_response({"accepted": True}, status=202)

    return HttpServer({"/sync": sync, "/async": async_})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_fifty_calls_survive_a_killed_service(tmp_path):
    base = free_port(len(DEFAULT_PORTS))
    proc, lines = start_stack(tmp_path / "stack", base)
    pids = {p.stem: int(p.read_text()) for p in (tmp_path / "stack" / "pids").glob("*.pid")}
    assert set(pids) == {
        "ingress",
        "routing",
        "settlement",
        "owner-adapter",
        "delivery",
        "projection",
    }
    operator = {"Authorization": f"Bearer {(tmp_path / 'stack' / 'operator-token').read_text()}"}
    try:
        async with (
            patient_owner() as owner_http,
            receiver() as hooks,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{base}", timeout=10) as http,
        ):
            owner = (
                await http.post(
                    "/v1/accounts", headers=operator, json={"name": "o", "roles": ["owner"]}
                )
            ).json()
            consumer = (
                await http.post(
                    "/v1/accounts", headers=operator, json={"name": "c", "roles": ["consumer"]}
                )
            ).json()
            auth = {"Authorization": f"Bearer {consumer['secret']}"}
            for slug, path in (("e2e-sync", "/sync"), ("e2e-async", "/async")):
                r = await http.post(
                    "/v1/apis",
                    headers={"X-Consumer-Key": owner["secret"]},
                    json={
                        "slug": slug,
                        "name": slug,
                        "price": PRICE,
                        "endpoint": owner_http.url + path,
                        "max_duration_seconds": 90,
                    },
                )
                assert r.status_code == 201, r.text
            r = await http.post(
                f"/v1/accounts/{consumer['account_id']}/credits",
                headers=operator,
                json={"amount": 10_000},
            )
            assert r.status_code == 202

            async def funded():
                me = (await http.get("/v1/accounts/me", headers=auth)).json()
                return me["balances"].get("consumer", {}).get("balance") == 10_000

            await eventually(funded, timeout=30, what="credit applied")

            request_ids = []
            for i in range(CALLS):
                if i == CALLS // 2:
                    os.kill(pids["owner-adapter"], signal.SIGKILL)  # mid-run, calls in flight
                r = await http.post(
                    "/v1/calls",
                    headers=auth,
                    json={
                        "api": "e2e-async" if i % 2 else "e2e-sync",
                        "params": {"n": i},
                        "webhook_url": f"{hooks.url}/hook",
                    },
                )
                assert r.status_code == 202, r.text
                request_ids.append(r.json()["request_id"])

            def delivered_ids():
                return {json.loads(body)["data"]["request_id"] for _, _, body in hooks.received}

            await eventually(
                lambda: delivered_ids() >= set(request_ids),
                timeout=120,
                what="a webhook for every call",
            )
            for _, headers, body in hooks.received:
                Webhook(consumer["webhook_secret"]).verify(body, headers)
                payload = json.loads(body)
                assert payload["type"] == "call.completed", payload
                assert payload["data"]["result"]["echo"]["n"] == request_ids.index(
                    payload["data"]["request_id"]
                )
            # At least once: a retry after the kill may repeat a message, never under a new id.
            ids_per_request: dict[str, set[str]] = {}
            for _, headers, body in hooks.received:
                rid = json.loads(body)["data"]["request_id"]
                ids_per_request.setdefault(rid, set()).add(headers["webhook-id"])
            assert all(len(ids) == 1 for ids in ids_per_request.values())

            async def all_delivered_in_read_model():
                for rid in request_ids:
                    view = (await http.get(f"/v1/calls/{rid}", headers=auth)).json()
                    if view["status"] != "delivered":
                        return False
                return True

            await eventually(all_delivered_in_read_model, timeout=30, what="read model")
            me = (await http.get("/v1/accounts/me", headers=auth)).json()
            assert me["balances"]["consumer"] == {"balance": 10_000 - CALLS * PRICE, "reserved": 0}

        restarted = int((tmp_path / "stack" / "pids" / "owner-adapter.pid").read_text())
        assert restarted != pids["owner-adapter"]
        assert alive(restarted)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        lines.append(out)
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert "owner-adapter exited with code -9; restarting" in log
    final = {p.stem: int(p.read_text()) for p in (tmp_path / "stack" / "pids").glob("*.pid")}
    assert not [s for s, pid in final.items() if alive(pid)], "a service outlived `postback up`"

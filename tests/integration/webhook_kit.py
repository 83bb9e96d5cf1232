"""Shared pieces of the webhook tests: endpoints published as ingress would, call stories as
delivery sees them, and delivery run as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from postback.embedded import free_port
from postback_libs.events import (
    CallCompleted,
    CallRequested,
    CallSettled,
    EndpointCreated,
    EndpointState,
    EventData,
)
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_libs.webhooks import endpoint_secret
from tests.helpers import eventually, publish, uid

ROOT = Path(__file__).resolve().parents[2]


def endpoint(url: str, account_id: str | None = None, **over: Any) -> EndpointState:
    """An endpoint subscribed to call.completed unless told otherwise: one message per call."""
    over.setdefault("event_types", ["call.completed"])
    return EndpointState(
        endpoint_id=uid("ep"), account_id=account_id or uid("acc"), url=url, **over
    )


def secret_of(settings: Settings, state: EndpointState, version: int | None = None) -> str:
    master = settings.master_key()
    return endpoint_secret(master, state.endpoint_id, version or state.secret_version)


async def subscribe(settings: Settings, delivery: Service | None, *states: EndpointState) -> None:
    """Publish endpoint states as ingress would; wait until delivery has read them (when it
    runs in this process)."""
    await publish(settings, *(EndpointCreated(endpoint=s) for s in states))
    if delivery is not None:
        await seen(delivery, *states)


async def seen(delivery: Service, *states: EndpointState) -> None:
    async def known() -> bool:
        rows = await delivery.pool.fetch(
            "SELECT endpoint_id, revision FROM endpoints WHERE endpoint_id = ANY($1::text[])",
            [s.endpoint_id for s in states],
        )
        have = {r["endpoint_id"]: r["revision"] for r in rows}
        return all(have.get(s.endpoint_id, 0) >= s.revision for s in states)

    await eventually(known, what="delivery read the endpoints")


def completed_call(
    consumer_id: str, hook: str | None = None, price: int = 10, **result: Any
) -> list[EventData]:
    """The events of a call that completed and was settled, as delivery sees them."""
    rid = uid("req")
    return [
        CallRequested(request_id=rid, consumer_id=consumer_id, api="weather", webhook_url=hook),
        CallCompleted(request_id=rid, via="response", status_code=200, result=result or {"n": 1}),
        CallSettled(request_id=rid, consumer_id=consumer_id, owner_id="o", amount=price, fee=1),
    ]


def now() -> datetime:
    return datetime.now(UTC)


# --- delivery as a real process ------------------------------------------------------------------


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The POSTBACK_* environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"POSTBACK_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    env.update(
        {
            "POSTBACK_HTTP_PORT": str(free_port()),
            "POSTBACK_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "POSTBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "POSTBACK_LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra)
    return env


class DeliveryProcess:
    """`postback run delivery` as its own process, its output in a file."""

    def __init__(self, settings: Settings, log: Path, **extra: str) -> None:
        self.env = service_env(settings, **extra)
        self.port = int(self.env["POSTBACK_HTTP_PORT"])
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 -- the child writes it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postback", "run", "delivery"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.ready):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"delivery did not start:\n{self.log_path.read_text()[-3000:]}"
                )
            await asyncio.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, leases left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.asynccontextmanager
async def delivery_processes(
    settings: Settings, tmp: Path, n: int = 1, **extra: str
) -> AsyncIterator[list[DeliveryProcess]]:
    procs = [DeliveryProcess(settings, tmp / f"delivery-{i}.log", **extra) for i in range(n)]
    try:
        for p in procs:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in procs))
        yield procs
    finally:
        for p in procs:
            p.stop()

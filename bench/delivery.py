"""Webhook delivery throughput: deliveries/s of ONE delivery process to a fast local receiver,
beside a plain aiohttp client's rate to the same receiver, measured in the same run.

`run(settings, messages)` starts an aiohttp receiver on 127.0.0.1 in its own process and
`postback run delivery`, and measures:

* the raw client: 64 requests in flight, bodies of the webhooks' size, before and after the
  rest (the machine may be shared; ratios are taken against the better of the two);
* end to end: `messages` call stories (requested, completed, settled) naming the receiver as
  their webhook_url, published at once; timed from the first webhook the receiver acknowledged
  to the last, with consuming, queueing, claiming, signing, sending, recording and publishing
  the events all running together;
* the send stage: `messages` more to a subscribed endpoint, the receiver holding its first
  requests until every message is queued, then timed from their release to the last;
* CPU milliseconds per delivery (the delivery process) and per request (the raw client).

    uv run python -m bench.delivery --messages 5000     # embedded broker and database
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from aiokafka import AIOKafkaProducer

from bench.infra import SECRET_KEY
from postback.embedded import free_port
from postback_libs.events import (
    CallCompleted,
    CallRequested,
    CallSettled,
    EndpointCreated,
    EndpointState,
    EventData,
    new_event,
)
from postback_libs.settings import Settings
from postback_libs.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
RAW_CONCURRENCY = 64


# --- the receiver, in its own process ------------------------------------------------------------


def serve_receiver(port: int) -> None:
    """Answer every POST with 204 and keep count; GET /count reports it (monotonic clock,
    shared by every process on the machine)."""
    state = {"count": 0, "first": 0.0, "last": 0.0, "released": 0.0}
    open_ = asyncio.Event()
    open_.set()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        await open_.wait()
        now = time.monotonic()
        if state["count"] == 0:
            state["first"] = now
        state["count"] += 1
        state["last"] = now
        return web.Response(status=204)

    async def count(request: web.Request) -> web.Response:
        return web.json_response(state)

    async def reset(request: web.Request) -> web.Response:
        state.update(count=0, first=0.0, last=0.0, released=0.0)
        return web.json_response(state)

    async def hold(request: web.Request) -> web.Response:
        open_.clear()
        return web.json_response(state)

    async def release(request: web.Request) -> web.Response:
        state["released"] = time.monotonic()
        open_.set()
        return web.json_response(state)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    app.router.add_post("/hold", hold)
    app.router.add_post("/release", release)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


@contextlib.contextmanager
def receiver_process() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "bench.delivery", "--receiver", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/count", proc, "receiver")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=1) as r,  # noqa: S310 - loopback
        ):
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout} s")
        time.sleep(0.1)


async def _receiver_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/count") as r:
        state: dict[str, Any] = await r.json()
        return state


# --- the delivery process ----------------------------------------------------------------------


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"POSTBACK_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    env.update(extra)
    return env


@contextlib.contextmanager
def delivery_process(settings: Settings, log: Path | None) -> Iterator[subprocess.Popen[bytes]]:
    port = free_port()
    env = service_env(
        settings,
        POSTBACK_HTTP_PORT=str(port),
        POSTBACK_LOG_LEVEL="WARNING",
        POSTBACK_ALLOWED_NETWORKS="127.0.0.0/8",
        POSTBACK_KAFKA_SESSION_TIMEOUT_MS="2000",
        # The send-stage phase holds requests at the receiver while the backlog builds.
        POSTBACK_DELIVERY_TIMEOUT_SECONDS="300",
    )
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "postback", "run", "delivery"],
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", proc, "delivery")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log and hasattr(out, "close"):
            out.close()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the measurements -----------------------------------------------------------------------------


async def raw_client(url: str, requests: int, body: bytes) -> tuple[float, float]:
    """(requests/s, CPU ms per request) of a plain aiohttp client at RAW_CONCURRENCY in flight,
    in this process."""
    headers = {"content-type": "application/json", "webhook-id": "msg_raw"}
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=RAW_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in counter:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()

        started, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(RAW_CONCURRENCY)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
        return requests / elapsed, 1000 * cpu / requests


def _records(settings: Settings, items: list[EventData]) -> list[tuple[str, bytes, bytes, Any]]:
    out = []
    for data in items:
        e = new_event(data, source="bench")
        out.append(
            (
                settings.topic(data.topic.name),
                e.subject.encode(),
                e.to_bytes(),
                [("ce_type", e.type.encode())],
            )
        )
    return out


def stories(consumer: str, n: int, hook: str | None, tag: str) -> list[EventData]:
    out: list[EventData] = []
    for i in range(n):
        rid = f"req_bench_{tag}_{i}"
        out += [
            CallRequested(request_id=rid, consumer_id=consumer, api="bench", webhook_url=hook),
            CallCompleted(request_id=rid, via="response", result={"i": i, "ok": True}),
            CallSettled(request_id=rid, consumer_id=consumer, owner_id="o", amount=1, fee=0),
        ]
    return out


async def _publish(
    producer: AIOKafkaProducer, records: list[tuple[str, bytes, bytes, Any]]
) -> None:
    for first in range(0, len(records), 5000):
        futures = [
            await producer.send(topic, value=value, key=key, headers=headers)
            for topic, key, value, headers in records[first : first + 5000]
        ]
        await asyncio.gather(*futures)


async def _timed_phase(
    session: aiohttp.ClientSession, url: str, messages: int, timeout: float
) -> tuple[float, int]:
    """Wait until the receiver has `messages`; returns (deliveries/s, count), timed from the
    first delivery, or from the release of a held receiver, to the last."""
    deadline = time.monotonic() + timeout
    while True:
        state = await _receiver_state(session, url)
        if state["count"] >= messages:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{state['count']}/{messages} delivered after {timeout} s")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # anything beyond `messages` would be a duplicate
    state = await _receiver_state(session, url)
    if state["released"]:
        return state["count"] / (state["last"] - state["released"]), state["count"]
    return (state["count"] - 1) / (state["last"] - state["first"]), state["count"]


async def _end_to_end(
    settings: Settings,
    producer: AIOKafkaProducer,
    session: aiohttp.ClientSession,
    url: str,
    proc: subprocess.Popen[bytes],
    messages: int,
    tag: str,
) -> dict[str, Any]:
    """Every call names the receiver as its webhook_url; timed from the first webhook to the
    last, with consumption, queueing and sending all running at once."""
    await session.post(f"{url}/reset")
    cpu0 = cpu_seconds(proc.pid)
    consumer = f"acc_bench_{tag}"
    await _publish(
        producer, _records(settings, stories(consumer, messages, f"{url}/hook", f"{tag}u"))
    )
    rate, count = await _timed_phase(session, url, messages, 600)
    return {
        "end_to_end_deliveries_per_second": round(rate),
        "end_to_end_delivered": count,
        "end_to_end_delivery_cpu_ms_per_delivery": round(
            1000 * (cpu_seconds(proc.pid) - cpu0) / messages, 3
        ),
    }


async def _send_stage(
    settings: Settings,
    producer: AIOKafkaProducer,
    session: aiohttp.ClientSession,
    url: str,
    proc: subprocess.Popen[bytes],
    messages: int,
    tag: str,
) -> dict[str, Any]:
    """Through a subscribed endpoint (no rate limit), the send stage alone: the
    receiver holds the first requests until the whole backlog is queued, then lets go; timed
    from then to the last delivery (claim, sign, send, record, events)."""
    await session.post(f"{url}/reset")
    await session.post(f"{url}/hold")
    subscriber = f"acc_bench_sub_{tag}"
    ep = EndpointState(
        endpoint_id=f"ep_bench_{tag}",
        account_id=subscriber,
        url=f"{url}/hook",
        event_types=["call.completed"],
        # The endpoint's cap counts rows claimed and not yet recorded, so it is set above the
        # process's 64 requests in flight (the raw client's concurrency), which it must not
        # limit here.
        max_in_flight=16 * RAW_CONCURRENCY,
    )
    await _publish(producer, _records(settings, [EndpointCreated(endpoint=ep)]))
    await _wait_rows(settings, "endpoints", "endpoint_id", ep.endpoint_id, 1)
    started = time.perf_counter()
    cpu0 = cpu_seconds(proc.pid)
    await _publish(producer, _records(settings, stories(subscriber, messages, None, f"{tag}s")))
    await _wait_rows(settings, "deliveries", "account_id", subscriber, messages)
    queued = {
        "calls_queued_per_second": round(messages / (time.perf_counter() - started)),
        "queue_cpu_ms_per_call": round(1000 * (cpu_seconds(proc.pid) - cpu0) / messages, 3),
    }
    cpu0 = cpu_seconds(proc.pid)
    await session.post(f"{url}/release")
    rate, count = await _timed_phase(session, url, messages, 600)
    return queued | {
        "send_stage_deliveries_per_second": round(rate),
        "send_stage_delivered": count,
        "send_stage_cpu_ms_per_delivery": round(
            1000 * (cpu_seconds(proc.pid) - cpu0) / messages, 3
        ),
    }


async def run(
    settings: Settings, messages: int, log: Path | None = None, *, send_stage_only: bool = False
) -> dict[str, Any]:
    """Deliver `messages` webhooks through one delivery process end to end (per-call
    webhook_url), then `messages` more through a subscribed endpoint timing the send stage
    alone, beside the raw client's rate to the same receiver; returns the figures."""
    await ensure_topics(settings)
    tag = uuid.uuid4().hex[:8]
    figures: dict[str, Any] = {}
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        with receiver_process() as url, delivery_process(settings, log) as proc:
            sample = json.dumps(
                {"type": "call.completed", "timestamp": "2025-01-01T00:00:00Z", "data": {}}
            ).encode()
            body = sample + b" " * max(0, 220 - len(sample))  # the webhooks' size
            async with aiohttp.ClientSession() as session:
                # The raw client before and after: on a shared machine the load moves, and the
                # ratio is taken against the better of the two.
                raw_before, raw_cpu = await raw_client(f"{url}/hook", messages, body)
                if not send_stage_only:
                    figures |= await _end_to_end(
                        settings, producer, session, url, proc, messages, tag
                    )
                figures |= await _send_stage(settings, producer, session, url, proc, messages, tag)
                await session.post(f"{url}/reset")
                raw_after, _ = await raw_client(f"{url}/hook", messages, body)
                raw = max(raw_before, raw_after)
                headline: dict[str, Any] = {
                    "messages": messages,
                    "raw_aiohttp_requests_per_second": round(raw),
                    "raw_aiohttp_before_and_after": [round(raw_before), round(raw_after)],
                    "raw_aiohttp_cpu_ms_per_request": round(raw_cpu, 3),
                }
                figures = headline | figures
                for phase in ("end_to_end", "send_stage"):
                    if f"{phase}_deliveries_per_second" in figures:
                        figures[f"{phase}_ratio"] = round(
                            figures[f"{phase}_deliveries_per_second"] / raw, 3
                        )
    finally:
        await producer.stop()
    return figures


async def _wait_rows(settings: Settings, table: str, column: str, value: str, n: int) -> None:
    """Wait until delivery's `table` has `n` rows where `column` = `value`."""
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": "delivery"})
    try:
        for _ in range(6000):
            got = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", value)
            if got >= n:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{table}: {got}/{n} rows")
    finally:
        await conn.close()


async def _main(messages: int, durable: bool, send_stage_only: bool) -> dict[str, Any]:
    from postback.embedded import EmbeddedKafka, EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="postback-bench-") as tmp:
        root = Path(tmp)
        pg = EmbeddedPostgres(root / "pg", free_port(), durable=durable)
        kafka = EmbeddedKafka(free_port(), root / "broker.log")
        pg.start()
        kafka.start()
        try:
            pg.create_database("bench")
            settings = Settings(
                kafka_bootstrap=kafka.bootstrap,
                database_url=pg.dsn("bench"),
                topic_prefix="bench.",
                kafka_session_timeout_ms=2000,
                secret_key=SECRET_KEY,
            )
            return await run(
                settings, messages, root / "delivery.log", send_stage_only=send_stage_only
            )
        finally:
            kafka.stop()
            pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--no-fsync", action="store_true", help="Postgres without fsync.")
    parser.add_argument("--send-stage-only", action="store_true", help="Skip the end-to-end run.")
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        serve_receiver(args.receiver)
        return
    figures = asyncio.run(
        _main(args.messages, durable=not args.no_fsync, send_stage_only=args.send_stage_only)
    )
    for k, v in figures.items():
        print(f"{k:>36}: {v}")


if __name__ == "__main__":
    main()

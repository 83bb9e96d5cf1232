"""Projection throughput: events/s applied to the read model by one projection process, replaying
a pre-filled calls topic into an empty read model; then `postback projection rebuild` timed on
the same topics (if the command exists), beside the live projection.

The topic holds whole call lives (requested, routed, authorized, dispatched, completed, settled,
delivered: 7 events per call, keyed by request id, as the services publish them)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.infra import BenchStack
from postback_libs.events import (
    CallAuthorized,
    CallCompleted,
    CallDelivered,
    CallDispatched,
    CallRequested,
    CallRouted,
    CallSettled,
    EventData,
    new_event,
)
from postback_libs.outbox import new_producer
from postback_libs.settings import Settings

EVENTS_PER_CALL = 7


def call_life(i: int, tag: str) -> list[EventData]:
    rid = f"req_bench_{tag}_{i}"
    consumer, owner = f"acc_c{i % 8}_{tag}", f"acc_o_{tag}"
    upstream = "http://127.0.0.1:9/owner"
    params = {"n": i, "t": 1_700_000_000_000 + i}
    return [
        CallRequested(
            request_id=rid,
            consumer_id=consumer,
            api="bench-echo",
            params=params,
            webhook_url="http://127.0.0.1:9/hook",
        ),
        CallRouted(
            request_id=rid,
            consumer_id=consumer,
            owner_id=owner,
            api_id=f"api_{tag}",
            mode="production",
            upstream_url=upstream,
            method="POST",
            path="/",
            params=params,
            price=10,
            fee_bps=1000,
            deadline=datetime.now(UTC) + timedelta(minutes=2),
        ),
        CallAuthorized(request_id=rid, consumer_id=consumer, amount=10),
        CallDispatched(request_id=rid, attempt=1, upstream_url=upstream),
        CallCompleted(request_id=rid, via="response", status_code=200, result=params),
        CallSettled(request_id=rid, consumer_id=consumer, owner_id=owner, amount=10, fee=1),
        CallDelivered(request_id=rid, message_id=f"msg_{rid}", attempts=1),
    ]


async def prefill(settings: Settings, calls: int) -> float:
    """Publish `calls` whole call lives; returns the seconds it took."""
    tag = uuid.uuid4().hex[:8]
    producer = new_producer(settings)
    await producer.start()
    started = time.perf_counter()
    try:
        for first in range(0, calls, 500):
            futures = []
            for i in range(first, min(calls, first + 500)):
                for data in call_life(i, tag):
                    e = new_event(data, source="bench")
                    futures.append(
                        await producer.send(
                            settings.topic(data.topic.name),
                            value=e.to_bytes(),
                            key=e.subject.encode(),
                            headers=[("ce_type", e.type.encode())],
                        )
                    )
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def rebuild_command_exists() -> bool:
    """Whether the `postback` command has `projection rebuild` (looked up, not run)."""
    import typer

    from postback.cli import app

    # Typer's groups are not click.Group subclasses in every version: look, do not check types.
    commands = getattr(typer.main.get_command(app), "commands", {})
    return "rebuild" in getattr(commands.get("projection"), "commands", {})


def time_rebuild(env: dict[str, str], timeout: float) -> dict[str, Any]:
    """`postback projection rebuild` as an operator runs it, beside the live projection."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "postback", "projection", "rebuild"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-500:]}"}
    # "read model rebuilt from 35,000 events in 4.2 s (...)"
    found = re.search(r"from ([\d,]+) events in ([\d.]+) s", done.stdout)
    events = int(found[1].replace(",", "")) if found else None
    seconds = float(found[2]) if found else None
    return {
        "events": events,
        "seconds": seconds,
        "events_per_second": round(events / seconds) if events and seconds else None,
        "wall_seconds_with_process_start": round(wall, 2),
    }


async def run(stack: BenchStack, calls: int, timeout: float = 300) -> dict[str, Any]:
    """Pre-fill the calls topic, start one projection process, and time it to the last event."""
    settings = stack.place.settings()
    await asyncio.to_thread(stack.prepare)
    events = calls * EVENTS_PER_CALL
    publish_s = await prefill(settings, calls)
    db = await asyncpg.connect(settings.database_url, server_settings={"application_name": "bench"})
    try:
        started = time.perf_counter()
        await asyncio.to_thread(stack.start, ("projection",))
        ready = time.perf_counter()
        first_at: float | None = None
        first_count = 0
        count = 0
        while count < events:
            count = int(await db.fetchval("SELECT count(*) FROM projection.call_events"))
            now = time.perf_counter()
            if count and first_at is None:
                first_at, first_count = now, count
            if now - started > timeout:
                break
            await asyncio.sleep(0.1)
        done = time.perf_counter()
        rows = int(await db.fetchval("SELECT count(*) FROM projection.calls"))
    finally:
        await db.close()
    # Timed from the first applied batch: a count that was complete at the first look is too
    # small to time.
    applying = done - (first_at or done) if count > first_count else 0.0
    if rebuild_command_exists():
        rebuild: dict[str, Any] = await asyncio.to_thread(time_rebuild, stack.env, timeout)
    else:
        rebuild = {"skipped": "`postback projection rebuild` does not exist yet"}
    return {
        "events": events,
        "calls": calls,
        "applied": count,
        "call_rows": rows,
        "prefill_seconds": round(publish_s, 2),
        "events_per_second": round((count - first_count) / applying) if applying else None,
        "replay_seconds_from_process_start": round(done - started, 2),
        "process_start_seconds": round(ready - started, 2),
        "rebuild": rebuild,
    }

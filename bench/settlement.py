"""Settlement throughput: reserve + post pairs per second by one settlement process, through the
real broker and Postgres.

`run(settings, calls)` starts `postback run settlement` as its own process, funds a set of
consumers, publishes `calls` x `call.routed` and `calls` x `call.completed` as fast as one
producer can, and times until `calls` x `call.settled` are on the calls topic (published by the
settlement's outbox relay, so the figure includes the whole hop: consume, ledger, outbox, relay).

    uv run python -m bench.settlement --calls 20000      # embedded broker and database
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from postback.embedded import free_port
from postback_libs.events import (
    CALLS,
    LEDGER,
    CallCompleted,
    CallRouted,
    CreditRequested,
    EventData,
    new_event,
)
from postback_libs.offsets import seek_to_log_start
from postback_libs.settings import Settings
from postback_libs.topics import ensure_topics

PRICE = 10
CONSUMERS = 100
OWNERS = 10


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The POSTBACK_* environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, list | dict):
            text = json.dumps(value)  # how pydantic-settings reads complex values
        else:
            text = str(value)
        env[f"POSTBACK_{name.upper()}"] = text
    env.update(extra)
    return env


@contextlib.contextmanager
def settlement_process(settings: Settings, log: Path | None = None) -> Iterator[Any]:
    """`postback run settlement` as a child process, ready when the context is entered."""
    port = free_port()
    env = service_env(settings, POSTBACK_HTTP_PORT=str(port), POSTBACK_LOG_LEVEL="WARNING")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "postback", "run", "settlement"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"settlement exited with {proc.returncode}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("settlement not ready in 60 s")
            time.sleep(0.1)
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


class TypeCounter:
    """Counts records of some CloudEvents types on a topic (by the ce_type header, no parsing)."""

    def __init__(self, settings: Settings, topic: str, types: set[str]) -> None:
        self.settings, self.topic, self.types = settings, settings.topic(topic), types
        self.counts: dict[str, int] = dict.fromkeys(types, 0)
        self.last_at: dict[str, float] = dict.fromkeys(types, 0.0)

    async def __aenter__(self) -> TypeCounter:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            group_id=None,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await self.consumer.start()
        parts = [
            TopicPartition(self.topic, p)
            for p in self.consumer.partitions_for_topic(self.topic) or {0}
        ]
        self.consumer.assign(parts)
        await seek_to_log_start(self.consumer, parts)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=50, max_records=10_000)
            for records in batch.values():
                for r in records:
                    for k, v in r.headers or ():
                        if k == "ce_type":
                            t = bytes(v).decode()
                            if t in self.counts:
                                self.counts[t] += 1
                                self.last_at[t] = time.perf_counter()
                            break

    async def wait_for(self, type_: str, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.counts[type_] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.counts[type_]}/{n} x {type_} after {timeout} s")
            await asyncio.sleep(0.01)

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.consumer.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc), to report cost per call
    apart from how busy the machine was with other work."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _record(settings: Settings, data: EventData) -> tuple[str, bytes, bytes, list[Any]]:
    e = new_event(data, source="bench")
    return (
        settings.topic(data.topic.name),
        e.subject.encode(),
        e.to_bytes(),
        [("ce_type", e.type.encode())],
    )


async def _send_all(
    producer: AIOKafkaProducer, records: list[tuple[str, bytes, bytes, Any]]
) -> None:
    futures = [
        await producer.send(topic, value=value, key=key, headers=headers)
        for topic, key, value, headers in records
    ]
    await asyncio.gather(*futures)


async def run(settings: Settings, calls: int, log: Path | None = None) -> dict[str, Any]:
    """Settle `calls` calls through one settlement process; returns the figures."""
    await ensure_topics(settings)
    tag = uuid.uuid4().hex[:8]
    consumers = [f"acct_bench_c{i}_{tag}" for i in range(min(CONSUMERS, calls))]
    owners = [f"acct_bench_o{i}_{tag}" for i in range(OWNERS)]
    per_consumer = (calls // len(consumers) + 1) * PRICE
    deadline = datetime.now(UTC) + timedelta(hours=1)
    routed, completed = [], []
    for i in range(calls):
        rid = f"req_bench_{tag}_{i}"
        routed.append(
            _record(
                settings,
                CallRouted(
                    request_id=rid,
                    consumer_id=consumers[i % len(consumers)],
                    owner_id=owners[i % len(owners)],
                    api_id=f"api_bench_{i % OWNERS}",
                    mode="production",
                    upstream_url="http://127.0.0.1:9/bench",
                    method="POST",
                    path="/",
                    params={"i": i},
                    price=PRICE,
                    fee_bps=1000,
                    deadline=deadline,
                ),
            )
        )
        completed.append(
            _record(settings, CallCompleted(request_id=rid, via="response", result={"i": i}))
        )
    credits = [
        _record(settings, CreditRequested(credit_id=f"cr_{c}", account_id=c, amount=per_consumer))
        for c in consumers
    ]
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        with settlement_process(settings, log) as proc:
            async with (
                TypeCounter(settings, LEDGER.name, {"account.credited"}) as ledger,
                TypeCounter(
                    settings, CALLS.name, {"call.settled", "call.rejected", "call.authorized"}
                ) as out,
            ):
                await _send_all(producer, credits)
                await ledger.wait_for("account.credited", len(credits), timeout=60)
                cpu_before = cpu_seconds(proc.pid)
                started = time.perf_counter()
                await _send_all(producer, routed)
                await _send_all(producer, completed)
                published = time.perf_counter() - started
                await out.wait_for("call.settled", calls, timeout=max(120, calls / 100))
                elapsed = out.last_at["call.settled"] - started
                cpu = cpu_seconds(proc.pid) - cpu_before
                rejected = out.counts["call.rejected"]
    finally:
        await producer.stop()
    return {
        "calls": calls,
        "seconds": round(elapsed, 3),
        "calls_settled_per_second": round(calls / elapsed),
        "events_consumed_per_second": round(2 * calls / elapsed),
        "publish_seconds": round(published, 3),
        "settlement_cpu_seconds": round(cpu, 3),
        # What one settlement process could settle with a core to itself.
        "calls_per_cpu_second": round(calls / cpu) if cpu > 0 else None,
        "rejected": rejected,
    }


async def _main(calls: int, durable: bool) -> dict[str, Any]:
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
            )
            return await run(settings, calls)
        finally:
            kafka.stop()
            pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument(
        "--no-fsync", action="store_true", help="Postgres without fsync (as the test fixtures)."
    )
    args = parser.parse_args()
    figures = asyncio.run(_main(args.calls, durable=not args.no_fsync))
    for k, v in figures.items():
        print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()

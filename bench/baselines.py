"""The physical limits the figures are measured against, on the same broker, database and
machine in the same run: raw aiokafka produce and consume, raw asyncpg inserts, and a raw aiohttp
client against the same receiver the webhooks go to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.stats import percentile
from postback_libs.offsets import seek_to_log_start
from postback_libs.outbox import new_producer
from postback_libs.settings import Settings

MESSAGE_BYTES = 400
HTTP_CONCURRENCY = 64
DB_CONNECTIONS = 16
DB_BATCH = 500


async def kafka(settings: Settings, messages: int) -> dict[str, Any]:
    """Produce `messages` x 400 B with the services' own producer settings (acks=all), then
    read them all back with one consumer."""
    topic = settings.topic("bench.raw")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=settings.topic_partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    producer = new_producer(settings)
    await producer.start()
    value = os.urandom(MESSAGE_BYTES // 2).hex().encode()
    try:
        started = time.perf_counter()
        # Sends in chunks keep the client's buffer bounded; each chunk is acknowledged.
        for first in range(0, messages, 5000):
            futures = [
                await producer.send(topic, value=value, key=str(i).encode())
                for i in range(first, min(messages, first + 5000))
            ]
            await asyncio.gather(*futures)
        produce_s = time.perf_counter() - started
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}]
        consumer.assign(parts)
        await seek_to_log_start(consumer, parts)
        got = 0
        started = time.perf_counter()
        deadline = started + 120
        while got < messages and time.perf_counter() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            got += sum(len(records) for records in batch.values())
        consume_s = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {
        "messages": messages,
        "message_bytes": MESSAGE_BYTES,
        "produce_per_second": round(messages / produce_s),
        "consume_per_second": round(got / consume_s),
        "consumed": got,
    }


async def kafka_hop(settings: Settings, messages: int, rate: float = 50) -> dict[str, Any]:
    """The latency of one hop through the broker at a light load: a record produced with the
    services' producer settings, read by a consumer-group member with the services' fetch
    settings. A call crosses about six such hops, so this bounds end-to-end latency from below."""
    topic = settings.topic("bench.hop")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=settings.topic_partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{settings.topic_prefix}bench-hop",
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(100, settings.kafka_session_timeout_ms // 4),
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    await consumer.start()
    producer = new_producer(settings)
    await producer.start()
    latencies: list[float] = []
    try:
        # The group must own the partitions before the clock starts.
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=100)

        async def read() -> None:
            while len(latencies) < messages:
                batch = await consumer.getmany(timeout_ms=settings.kafka_fetch_max_wait_ms)
                now = time.perf_counter()
                for records in batch.values():
                    latencies.extend((now - float(r.value or b"0")) * 1000 for r in records)

        reader = asyncio.create_task(read())
        for i in range(messages):
            await producer.send(
                topic, value=repr(time.perf_counter()).encode(), key=str(i).encode()
            )
            await asyncio.sleep(1 / rate)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 10)
    finally:
        await producer.stop()
        await consumer.stop()
    return {
        "messages": messages,
        "per_second": rate,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "received": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
    }


async def postgres(dsn: str, single_rows: int, batch_rows: int) -> dict[str, Any]:
    """Rows/s of a transaction per row from 16 connections (an HTTP request's shape, as ingress
    accepts a call), with and without pg_notify, and of batches of 500 rows per transaction (a
    consumer's shape)."""
    pool = await asyncpg.create_pool(dsn, min_size=DB_CONNECTIONS, max_size=DB_CONNECTIONS)
    assert pool is not None
    try:
        await pool.execute(
            "CREATE TABLE bench_raw (id bigserial PRIMARY KEY, key text NOT NULL, payload bytea)"
        )
        payload = os.urandom(MESSAGE_BYTES)

        async def commit_per_row(notify: bool) -> float:
            counter = iter(range(single_rows))

            async def one_connection() -> None:
                async with pool.acquire() as conn:
                    for i in counter:
                        async with conn.transaction():
                            await conn.execute(
                                "INSERT INTO bench_raw (key, payload) VALUES ($1, $2)",
                                str(i),
                                payload,
                            )
                            if notify:
                                await conn.execute("SELECT pg_notify('bench', '')")

            started = time.perf_counter()
            await asyncio.gather(*(one_connection() for _ in range(DB_CONNECTIONS)))
            return time.perf_counter() - started

        single_s = await commit_per_row(notify=False)
        # The write, then pg_notify in the same transaction, as units of work woke the outbox
        # relay until recently: PostgreSQL serialises the commits of notifying transactions.
        notify_s = await commit_per_row(notify=True)

        rows = [(f"b{i}", payload) for i in range(DB_BATCH)]
        batches = max(1, batch_rows // DB_BATCH)
        started = time.perf_counter()
        async with pool.acquire() as conn:
            for _ in range(batches):
                async with conn.transaction():
                    await conn.executemany(
                        "INSERT INTO bench_raw (key, payload) VALUES ($1, $2)", rows
                    )
        batch_s = time.perf_counter() - started
    finally:
        await pool.close()
    return {
        "commit_per_row_rows_per_second": round(single_rows / single_s),
        "commit_per_row_with_notify_rows_per_second": round(single_rows / notify_s),
        "commit_per_row_connections": DB_CONNECTIONS,
        "batched_rows_per_second": round(batches * DB_BATCH / batch_s),
        "batch_rows": DB_BATCH,
    }


async def http_client(url: str, requests: int) -> dict[str, Any]:
    """POSTs/s of a plain aiohttp client at 64 in flight, 400 B bodies, to `url`."""
    body = os.urandom(MESSAGE_BYTES // 2).hex().encode()
    headers = {"content-type": "application/json", "webhook-id": "msg_bench"}
    counter = iter(range(requests))
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for _ in counter:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status >= 300:
                    failures += 1

    connector = aiohttp.TCPConnector(limit=HTTP_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        # A first request opens the pool, so the timing is of requests, not of connecting.
        async with session.post(url, data=body, headers=headers) as r:
            await r.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(HTTP_CONCURRENCY)))
        elapsed = time.perf_counter() - started
    return {
        "requests": requests,
        "concurrency": HTTP_CONCURRENCY,
        "requests_per_second": round(requests / elapsed),
        "failures": failures,
    }

"""Transactional outbox: events are written in the same Postgres transaction as the state they
describe, and one relay per schema publishes them to Kafka in order, then deletes them.

Only one relay of a schema publishes at a time (an advisory lock), so events of one key leave in
the order they were written even when a service runs as several replicas."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from postback_libs.db import DATABASE_ERRORS, lock_key
from postback_libs.events import CONTENT_TYPE, MAX_EVENT_BYTES, CloudEvent, EventData, new_event
from postback_libs.logging import get_logger
from postback_libs.metrics import (
    EVENTS_PRODUCED,
    OUTBOX_DELAY_SECONDS,
    OUTBOX_OLDEST_SECONDS,
    OUTBOX_PENDING,
)
from postback_libs.settings import Settings
from postback_libs.telemetry import current_traceparent

log = get_logger(__name__)
POLL_SECONDS = 0.1
# Deletes the rows published last time and reads the next ones, in one round trip. The read
# sees the table as it was before the delete, hence the rows being deleted are left out.
NEXT_ROWS = """
WITH published AS (DELETE FROM outbox WHERE position = ANY($1::bigint[]))
SELECT position, topic, key, type, payload, traceparent, created_at FROM outbox
WHERE position <> ALL($1::bigint[])
ORDER BY position LIMIT $2
"""
# One statement for a whole batch's events; positions follow the order they were emitted in.
INSERT_OUTBOX = """
INSERT INTO outbox (topic, key, event_id, type, payload, traceparent)
SELECT topic, key, event_id, type, payload, traceparent
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[])
    WITH ORDINALITY AS e(topic, key, event_id, type, payload, traceparent, n)
ORDER BY n
"""


_M = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 (what its and aiokafka's default partitioners hash a key
    with), over 32-bit words at once: twice as fast as aiokafka's byte by byte, and run for
    every new key a relay publishes."""
    n = len(data)
    h = 0x9747B28C ^ n
    for k in struct.unpack_from(f"<{n >> 2}I", data):
        k = (k * _M) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * _M) & 0xFFFFFFFF
        h = ((h * _M) & 0xFFFFFFFF) ^ k
    tail, at = n & 3, n & ~3
    if tail:
        if tail == 3:
            h ^= data[at + 2] << 16
        if tail >= 2:
            h ^= data[at + 1] << 8
        h = ((h ^ data[at]) * _M) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * _M) & 0xFFFFFFFF
    return h ^ (h >> 15)


@functools.lru_cache(maxsize=65_536)
def _partition(key: bytes, partitions: tuple[int, ...]) -> int:
    """The partition the default partitioners give `key`; remembered, since a relay sees the
    same ledger accounts and calls again and again."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


@dataclass
class UnitOfWork:
    """A Postgres transaction plus the events to publish if, and only if, it commits."""

    conn: Any
    source: str
    settings: Settings
    events: list[tuple[str, CloudEvent]] = field(default_factory=list)
    # (partition, offset) of the record being handled, for read models that keep log order.
    position: tuple[int, int] = (0, 0)
    # What a batch's handlers gather for the batch's `after_batch` hook to write at once.
    scratch: dict[str, Any] = field(default_factory=dict)

    def emit(
        self, data: EventData, *, cause: str | None = None, traceparent: str | None = None
    ) -> CloudEvent:
        """Write `data` as an event at commit. `traceparent`: the trace it continues when that
        is not the current one (work gathered earlier and emitted together at the end)."""
        event = new_event(
            data, source=self.source, cause=cause, traceparent=traceparent or current_traceparent()
        )
        self.events.append((self.settings.topic(data.topic.name), event))
        return event

    async def flush(self) -> None:
        if not self.events:
            return
        rows = [(t, e.subject, e.id, e.type, e.to_bytes(), e.traceparent) for t, e in self.events]
        await self.conn.execute(INSERT_OUTBOX, *(list(c) for c in zip(*rows, strict=True)))
        self.events.clear()


@contextlib.asynccontextmanager
async def unit_of_work(
    pool: Any, source: str, settings: Settings, on_commit: Callable[[], None] = lambda: None
) -> AsyncIterator[UnitOfWork]:
    async with pool.acquire() as conn:
        async with conn.transaction():
            uow = UnitOfWork(conn, source, settings)
            yield uow
            await uow.flush()
        on_commit()


def new_producer(settings: Settings) -> AIOKafkaProducer:
    # acks=all: an event counts as published only once every in-sync replica has it.
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
        max_request_size=MAX_EVENT_BYTES,
        request_timeout_ms=30_000,
    )


class OutboxRelay:
    def __init__(self, dsn: str, schema: str, producer: AIOKafkaProducer, batch: int = 2000):
        self.dsn, self.schema, self.producer, self.batch = dsn, schema, producer, batch
        self._wake = asyncio.Event()
        self._stopping = False
        self.leader = False
        self._partitions: dict[str, tuple[int, ...]] = {}
        # Positions published and acknowledged, deleted by the next `publish_pending`; after
        # a crash they are published again, and consumers know the events by id.
        self._published: list[int] = []
        self._failures = 0  # publishing failures in a row

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self._lead()
            except DATABASE_ERRORS as e:
                log.warning("outbox relay lost its connection", error=str(e))
                await asyncio.sleep(1)
            except KafkaError as e:
                # What was not acknowledged is published again: consumers know events by id.
                self._failures += 1
                if isinstance(e, MessageSizeTooLargeError):
                    log.error(
                        "the broker refuses an event as too large: raise the topic's "
                        f"max.message.bytes to {MAX_EVENT_BYTES} (postback topics create does)",
                        error=repr(e),
                    )
                else:
                    log.warning("publishing failed, retrying", error=repr(e))
                await asyncio.sleep(min(0.5 * 2 ** min(self._failures, 5), 10.0))

    async def _lead(self) -> None:
        # Deleting published rows need not wait for the disk: rows a crash brings back are
        # published again, and consumers recognise the events by id.
        conn = await asyncpg.connect(
            self.dsn,
            server_settings={"search_path": self.schema, "synchronous_commit": "off"},
        )
        try:
            while not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", lock_key(f"relay:{self.schema}")
            ):
                self.leader = False
                if self._stopping:
                    return
                await asyncio.sleep(2)
            self.leader = True
            while True:
                self._wake.clear()  # before reading: a wake-up during the publish is kept
                published = await self.publish_pending(conn)
                if published == self.batch:
                    continue  # a full batch: more is waiting
                if self._stopping:
                    if published:
                        continue  # one more round deletes what was just published
                    return
                # Writers in this process wake the relay as they commit. A short poll picks up
                # what other replicas wrote while this one leads: no NOTIFY, whose commit-time
                # queue lock would serialise every writer's commit. What was just published is
                # deleted by that next round: a statement per round rather than two.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=POLL_SECONDS)
        finally:
            self.leader = False
            await conn.close()

    async def publish_pending(self, conn: Any) -> int:
        """Publish the next rows of the outbox, and delete the ones published by the call
        before: one statement per batch, not a read and a delete."""
        rows = await conn.fetch(NEXT_ROWS, self._published, self.batch)
        self._published = []
        if not rows:
            OUTBOX_PENDING.set(0)
            OUTBOX_OLDEST_SECONDS.set(0)
            return 0
        # Before sending: while the broker is away the sends fail, the rows are fetched again
        # each retry, and these show the wait growing.
        OUTBOX_PENDING.set(len(rows))
        OUTBOX_OLDEST_SECONDS.set(time.time() - min(r["created_at"] for r in rows).timestamp())
        sends = await self._send(rows)
        await asyncio.gather(*sends)  # every send acknowledged before the rows may go
        # By position, not by range: a transaction that commits late can hold a lower position
        # than rows already published, and must not be deleted unpublished.
        self._published = [r["position"] for r in rows]
        self._failures = 0
        acked = time.time()
        for topic, n in Counter(r["topic"] for r in rows).items():
            EVENTS_PRODUCED.labels(topic).inc(n)
        for r in rows:
            OUTBOX_DELAY_SECONDS.observe(acked - r["created_at"].timestamp())
        OUTBOX_PENDING.set(len(rows) if len(rows) == self.batch else 0)
        if len(rows) < self.batch:
            OUTBOX_OLDEST_SECONDS.set(0)
        return len(rows)

    async def _send(self, rows: list[Any]) -> list[asyncio.Future[Any]]:
        """Queue the rows for the broker as one record batch per partition (a future per
        batch, not per record), in order: a key's partition is the one the Java client and
        aiokafka's own `send` would choose (murmur2 of the key)."""
        builders: dict[tuple[str, int], Any] = {}
        sends: list[asyncio.Future[Any]] = []
        for r in rows:
            topic, key = r["topic"], r["key"].encode()
            headers = [("content-type", CONTENT_TYPE.encode()), ("ce_type", r["type"].encode())]
            if r["traceparent"]:
                headers.append(("traceparent", r["traceparent"].encode()))
            slot = (topic, _partition(key, await self._partitions_of(topic)))
            batch = builders.get(slot)
            if batch is None:
                batch = builders[slot] = self.producer.create_batch()
            if batch.append(key=key, value=r["payload"], timestamp=None, headers=headers) is None:
                sends.append(await self.producer.send_batch(batch, topic, partition=slot[1]))
                batch = builders[slot] = self.producer.create_batch()
                batch.append(key=key, value=r["payload"], timestamp=None, headers=headers)
        for (topic, partition), batch in builders.items():
            sends.append(await self.producer.send_batch(batch, topic, partition=partition))
        return sends

    async def _partitions_of(self, topic: str) -> tuple[int, ...]:
        # Known for the process's life: partitions added to a topic move keys anyway.
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = tuple(sorted(await self.producer.partitions_for(topic)))
            self._partitions[topic] = partitions
        return partitions

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Ask the relay to publish what is pending and return."""
        self._stopping = True
        self._wake.set()

"""Creating Postback's topics with their partitions, cleanup policy and retention, and reading
one whole (the tools that check or repair from the log: ledger check, dead letters)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from postback_libs.events import MAX_EVENT_BYTES, TOPICS
from postback_libs.offsets import OffsetGaps, seek_to_log_start
from postback_libs.settings import Settings


def topic_configs(cleanup: str, retention_ms: int) -> dict[str, str]:
    configs = {"cleanup.policy": cleanup, "max.message.bytes": str(MAX_EVENT_BYTES)}
    if cleanup == "delete":
        configs["retention.ms"] = str(retention_ms)
    return configs


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every missing topic; returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                settings.topic(t.name),
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication,
                topic_configs=topic_configs(t.cleanup, t.retention_ms),
            )
            for t in TOPICS
            if settings.topic(t.name) not in existing
        ]
        created = []
        for topic in missing:  # one by one: a topic created meanwhile by another is fine
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()


async def read_whole_topic(
    settings: Settings,
    name: str,
    on_record: Callable[[ConsumerRecord[bytes, bytes]], None],
    settle_seconds: float = 0.5,
) -> None:
    """Every record of topic `name` (unprefixed), from the beginning until caught up: past the
    end offsets it had when called, and then until a fetch comes back empty (the embedded
    broker can report an end offset short of its last batch) or `settle_seconds` pass."""
    topic = settings.topic(name)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        group_id=None,
        max_partition_fetch_bytes=MAX_EVENT_BYTES,
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not parts:
            return
        consumer.assign(parts)
        await seek_to_log_start(consumer, parts)
        end = await consumer.end_offsets(parts)
        # Several producers may write one partition (postback_libs/offsets.py).
        gaps = OffsetGaps(f"reading {name}")
        await gaps.expect_log_start(consumer, parts)
        loop = asyncio.get_running_loop()
        caught_up_at: float | None = None
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in (await gaps.take(consumer, batch)).records.values():
                for r in records:
                    on_record(r)
            if caught_up_at is None:
                positions = [await consumer.position(tp) for tp in parts]
                if all(pos >= end[tp] for pos, tp in zip(positions, parts, strict=True)):
                    caught_up_at = loop.time()
            if (
                caught_up_at is not None
                and not gaps.waiting()
                and (not batch or loop.time() - caught_up_at > settle_seconds)
            ):
                return
    finally:
        await consumer.stop()

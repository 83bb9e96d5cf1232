"""Creating Postback's topics with their partitions, cleanup policy and retention."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from postback_libs.events import TOPICS
from postback_libs.settings import Settings


def topic_configs(cleanup: str, retention_ms: int) -> dict[str, str]:
    configs = {"cleanup.policy": cleanup}
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

"""The outbox relay publishes what committed, in order per key, to the partition a plain
producer would choose for the key, with the CloudEvents headers — and deletes only that."""

from __future__ import annotations

import asyncio

import asyncpg
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.partitioner import murmur2

from postback_libs.db import schema_for
from postback_libs.metrics import OUTBOX_OLDEST_SECONDS
from postback_libs.outbox import OutboxRelay, new_producer, unit_of_work
from tests.helpers import TopicReader, call_routed, eventually

SCHEMA = schema_for("routing")  # any service schema: the fixtures migrated them all


async def test_the_relay_publishes_in_order_per_key_to_the_keys_partition(settings) -> None:
    pool = await asyncpg.create_pool(settings.database_url, server_settings={"search_path": SCHEMA})
    producer = new_producer(settings)
    await producer.start()
    relay = OutboxRelay(settings.database_url, SCHEMA, producer, batch=7)
    task = asyncio.create_task(relay.run())
    keys = [f"req_relay_{i}" for i in range(12)]
    try:
        async with TopicReader(settings, "postback.calls") as reader:
            for n in range(5):  # five transactions, each with an event for every key
                async with unit_of_work(pool, "test", settings, relay.wake) as uow:
                    for key in keys:
                        uow.emit(call_routed("http://127.0.0.1:9/", request_id=key, path=f"/{n}"))
            await eventually(lambda: len(reader.raw) == 60, what="every event published")
            partitions = len(await producer.partitions_for(settings.topic("postback.calls")))
            for key in keys:
                mine = [r for r in reader.raw if r.key == key.encode()]
                assert [r.partition for r in mine] == [
                    (murmur2(key.encode()) & 0x7FFFFFFF) % partitions
                ] * 5
                assert [e.data["path"] for e in reader.events if e.subject == key] == [
                    f"/{n}" for n in range(5)
                ]
            headers = dict(reader.raw[0].headers)
            assert headers["ce_type"] == b"call.routed"
            assert headers["content-type"] == b"application/cloudevents+json"

        # Published rows go with the relay's next round (at the latest, its next poll).
        async def outbox_empty() -> bool:
            return await pool.fetchval("SELECT count(*) FROM outbox") == 0

        await eventually(outbox_empty, timeout=5, what="published rows deleted")
    finally:
        await relay.stop()
        await task
        await producer.stop()
        await pool.close()


async def test_the_relay_rides_out_a_broker_that_fails_a_send(settings) -> None:
    """A send the broker fails (it is away, or refuses a record) is tried again: the relay
    carries on and the event is published, where it once ended the relay for good."""
    pool = await asyncpg.create_pool(settings.database_url, server_settings={"search_path": SCHEMA})
    producer = new_producer(settings)
    await producer.start()
    failures = [KafkaConnectionError("the broker went away"), MessageSizeTooLargeError("big")]
    send_batch = producer.send_batch
    waited: list[float] = []  # what the on-call engineer sees while the sends fail

    async def flaky(*args, **kwargs):
        if failures:
            waited.append(OUTBOX_OLDEST_SECONDS._value.get())
            raise failures.pop(0)
        return await send_batch(*args, **kwargs)

    producer.send_batch = flaky  # type: ignore[method-assign]
    relay = OutboxRelay(settings.database_url, SCHEMA, producer)
    task = asyncio.create_task(relay.run())
    try:
        async with TopicReader(settings, "postback.calls") as reader:
            async with unit_of_work(pool, "test", settings, relay.wake) as uow:
                uow.emit(call_routed("http://127.0.0.1:9/", request_id="req_relay_flaky"))
            await eventually(lambda: reader.raw, timeout=30, what="the event published")
        assert not failures and not task.done()
        assert len(waited) == 2 and 0 < waited[0] < waited[1]  # the wait shows, and grows
        await eventually(lambda: OUTBOX_OLDEST_SECONDS._value.get() == 0, what="back to 0")
    finally:
        await relay.stop()
        await task
        await producer.stop()
        await pool.close()

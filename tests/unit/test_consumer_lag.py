"""How far behind a consumer group is: its lagging partition's time, not its freshest's."""

import time

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from postback_libs.consumer import BatchApplier, Handlers
from postback_libs.settings import Settings

pytestmark = pytest.mark.unit
TOPIC = "postback.calls"


def record(partition: int, offset: int, age_seconds: float) -> ConsumerRecord:
    at = int((time.time() - age_seconds) * 1000)
    return ConsumerRecord(TOPIC, partition, offset, at, 0, b"k", b"v", None, 1, 1, [])


class Consumer:
    def __init__(self, ends: dict[int, int]) -> None:
        self.ends = ends

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in self.ends}

    def highwater(self, tp: TopicPartition) -> int:
        return self.ends[tp.partition]


def test_a_partition_an_hour_behind_shows_though_another_is_current():
    applier = BatchApplier(Handlers("g", TOPIC), None, Settings(), "t", None)  # type: ignore[arg-type]
    applier.note_lag(
        [record(0, 9, age_seconds=3600), record(1, 99, age_seconds=0.1)],
        Consumer({0: 50_000, 1: 100}),
    )
    assert applier.events_behind == 49_990
    assert 3590 < applier.seconds_behind < 3610


def test_caught_up_is_no_time_behind_and_a_revoked_partition_is_forgotten():
    applier = BatchApplier(Handlers("g", TOPIC), None, Settings(), "t", None)  # type: ignore[arg-type]
    applier.note_lag([record(0, 9, 3600), record(1, 99, 1)], Consumer({0: 50_000, 1: 100}))
    applier.note_lag([record(1, 199, 1)], Consumer({1: 200}))  # partition 0 went elsewhere
    assert (applier.events_behind, applier.seconds_behind) == (0, 0.0)


async def test_a_batch_stuck_in_its_transaction_shows_as_lag_while_it_is_stuck():
    """With the database stalled nothing is measured; the batch's wait is the lag."""
    import asyncio

    from prometheus_client import REGISTRY

    stalled = asyncio.Event()

    class Stalled(BatchApplier):
        async def _apply_in_one_transaction(self, batch):  # type: ignore[override]
            await stalled.wait()

    applier = Stalled(Handlers("stuck", TOPIC), None, Settings(), "t", None)  # type: ignore[arg-type]
    writing = asyncio.create_task(applier.write([object()]))  # type: ignore[list-item]
    await asyncio.sleep(0.3)
    assert applier.lag_seconds() >= 0.3
    scraped = REGISTRY.get_sample_value(
        "postback_consumer_lag_seconds", {"group": "stuck", "topic": TOPIC}
    )
    assert scraped is not None and scraped >= 0.3
    stalled.set()
    await writing
    assert applier.lag_seconds() == 0.0

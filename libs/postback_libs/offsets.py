"""Offsets that must follow on: a consumer takes a partition's records only up to the first gap
in their offsets, and fetches again from the gap, until the missing records come or a gap has
stood for `patience` seconds.

On Kafka the offsets of a topic that is neither compacted nor written in transactions have no
gaps: a consumer sees a record only once every record before it is readable. The embedded broker
does not keep that promise. It can let a fetch see a batch while an earlier batch, written at the
same moment by another producer, is not yet readable; a consumer that took the later batch would
move past the earlier one for good (measured: 20 of 65,476 records, in gaps of one batch, with six
producers on one partition). Waiting for the gap to fill costs nothing where there are none. A
gap that stands is taken as the log's own (records deleted, say), and reported, rather than
holding the partition for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from postback_libs.events import TOPICS
from postback_libs.logging import get_logger

log = get_logger(__name__)
PATIENCE_SECONDS = 5.0
# A partition held back by a gap is fetched again this much later.
RETRY_SECONDS = 0.01


async def seek_to_log_start(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """Position each of `tps` at its log's first offset, as read now; returns those offsets.
    Not `seek_to_beginning`, which resets each position by a later lookup of its own: with it,
    the records at the start of an embedded broker's partition were now and then skipped
    under load (the position already past them before one was read, and nothing said so)."""
    starts: dict[TopicPartition, int] = await consumer.beginning_offsets(list(tps))
    for tp, start in starts.items():
        consumer.seek(tp, start)
    return starts


def guarded(topic: str) -> bool:
    """Whether readers of `topic` (its name without prefix) wait for gaps: every topic of ours
    but the compacted ones, which have gaps of their own once compacted and a single writer
    each (ingress's relay), so none of the embedded broker's."""
    return any(t.name == topic and t.cleanup != "compact" for t in TOPICS)


class Record(Protocol):
    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=Record)


@dataclass
class Admitted(Generic[R]):
    records: list[R]  # those that follow on from the offset expected
    fetch_from: int | None = None  # where to fetch again, when a gap held records back
    skipped: list[tuple[int, int]] = field(default_factory=list)  # gaps given up on: [first, end)


@dataclass
class Taken:
    records: dict[TopicPartition, list[Any]]  # per partition, what follows on
    held_back: list[TopicPartition]  # fetched again from a gap
    skipped: list[tuple[TopicPartition, int, int]]  # gaps given up on: partition, [first, end)


class OffsetGaps:
    def __init__(
        self,
        reader: str,
        patience: float = PATIENCE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader  # who reads, for the log
        self.patience, self.clock = patience, clock
        self._next: dict[TopicPartition, int] = {}
        self._gap_since: dict[TopicPartition, float] = {}

    def knows(self, tp: TopicPartition) -> bool:
        return tp in self._next

    def expect(self, tp: TopicPartition, offset: int) -> None:
        """The next record of `tp` is at `offset`: where a fetch starts, or was moved to."""
        self._next[tp] = offset
        self._gap_since.pop(tp, None)

    async def expect_log_start(
        self, consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
    ) -> None:
        """`tps` are read from the beginning: each starts at its log's first offset."""
        if tps:
            for tp, start in (await consumer.beginning_offsets(list(tps))).items():
                self.expect(tp, start)

    def waiting(self) -> bool:
        """Whether a partition is held back at a gap (its records are not all taken yet)."""
        return bool(self._gap_since)

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        """Partitions this consumer no longer reads: whoever has them now moves them on."""
        for tp in tps:
            self._next.pop(tp, None)
            self._gap_since.pop(tp, None)

    def admit(self, tp: TopicPartition, records: Sequence[R]) -> Admitted[R]:
        """The records of one fetch of `tp` (in offset order) that follow on from those admitted
        before; `tp` must be known (`expect`)."""
        expected = self._next[tp]
        taken: list[R] = []
        skipped: list[tuple[int, int]] = []
        for record in records:
            if record.offset < expected:
                continue  # had already
            if record.offset > expected:
                since = self._gap_since.setdefault(tp, self.clock())
                if self.clock() - since < self.patience:
                    self._next[tp] = expected
                    return Admitted(taken, expected, skipped)
                skipped.append((expected, record.offset))
            self._gap_since.pop(tp, None)
            taken.append(record)
            expected = record.offset + 1
        self._next[tp] = expected
        return Admitted(taken, None, skipped)

    async def take(
        self,
        consumer: AIOKafkaConsumer,
        fetched: dict[TopicPartition, list[Any]],
        start_of: Callable[[TopicPartition, int], Awaitable[int]] | None = None,
    ) -> Taken:
        """What a `getmany` answer holds that follows on. A partition held back is fetched
        again from its gap, a moment later; a gap given up on is logged. Partitions not known
        are taken as they come, unless `start_of(tp, first offset fetched)` says where their
        reading began."""
        taken = Taken({}, [], [])
        for tp, records in fetched.items():
            if not self.knows(tp):
                if start_of is None:
                    taken.records[tp] = records
                    continue
                start = await start_of(tp, records[0].offset)
                if tp not in consumer.assignment():
                    continue  # taken away meanwhile: its new owner reads it
                self.expect(tp, start)
            admitted = self.admit(tp, records)
            for first, end in admitted.skipped:
                log.error(
                    "offsets missing from the log, going on without them",
                    reader=self.reader,
                    topic=tp.topic,
                    partition=tp.partition,
                    first=first,
                    end=end,
                )
                taken.skipped.append((tp, first, end))
            if admitted.fetch_from is not None:
                consumer.seek(tp, admitted.fetch_from)
                taken.held_back.append(tp)
            if admitted.records:
                taken.records[tp] = admitted.records
        if taken.held_back:
            await asyncio.sleep(RETRY_SECONDS)
        return taken

"""A partition's records are taken only up to the first gap in their offsets, until the gap fills
or has stood for the patience; partitions given up are forgotten."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from aiokafka import TopicPartition

from postback_libs.offsets import OffsetGaps

pytestmark = pytest.mark.unit
TP = TopicPartition("postback.calls", 3)


@dataclass
class Rec:
    offset: int


def recs(*offsets: int) -> list[Rec]:
    return [Rec(o) for o in offsets]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gaps(start: int = 0) -> tuple[OffsetGaps, Clock]:
    clock = Clock()
    g = OffsetGaps("test", patience=5.0, clock=clock)
    g.expect(TP, start)
    return g, clock


def test_records_that_follow_on_are_all_taken() -> None:
    g, _ = gaps(10)
    a = g.admit(TP, recs(10, 11, 12))
    assert [r.offset for r in a.records] == [10, 11, 12]
    assert a.fetch_from is None and a.skipped == []
    assert [r.offset for r in g.admit(TP, recs(13)).records] == [13]


def test_records_after_a_gap_are_held_back_and_the_gap_fetched_again() -> None:
    # The embedded broker showed 1457 while 1453-1456, written at the same time, were not
    # readable yet: what came before the gap is taken, the rest fetched again from 1453.
    g, _ = gaps(1450)
    a = g.admit(TP, recs(1450, 1451, 1452, 1457, 1458))
    assert [r.offset for r in a.records] == [1450, 1451, 1452]
    assert a.fetch_from == 1453
    # Fetched again, the batch is there now.
    b = g.admit(TP, recs(1453, 1454, 1455, 1456, 1457, 1458))
    assert [r.offset for r in b.records] == [1453, 1454, 1455, 1456, 1457, 1458]
    assert b.fetch_from is None and b.skipped == []


def test_a_gap_that_stands_for_the_patience_is_reported_and_passed() -> None:
    g, clock = gaps(0)
    assert g.admit(TP, recs(0, 5, 6)).fetch_from == 1
    clock.now += 4.9
    held = g.admit(TP, recs(5, 6))
    assert held.records == [] and held.fetch_from == 1
    clock.now += 0.2
    passed = g.admit(TP, recs(5, 6))
    assert [r.offset for r in passed.records] == [5, 6]
    assert passed.skipped == [(1, 5)]
    # The patience starts again at the next gap.
    assert g.admit(TP, recs(7, 9)).fetch_from == 8


def test_a_gap_that_fills_resets_the_patience() -> None:
    g, clock = gaps(0)
    g.admit(TP, recs(2))
    clock.now += 4.0
    assert [r.offset for r in g.admit(TP, recs(0, 1, 2)).records] == [0, 1, 2]
    clock.now += 4.0
    assert g.admit(TP, recs(4)).fetch_from == 3  # a new gap: waited for afresh


def test_records_already_taken_are_not_taken_twice() -> None:
    g, _ = gaps(5)
    assert [r.offset for r in g.admit(TP, recs(3, 4, 5, 6)).records] == [5, 6]


def test_a_partition_given_up_is_forgotten_and_expected_afresh() -> None:
    g, _ = gaps(0)
    g.admit(TP, recs(0, 1))
    g.forget([TP])
    assert not g.knows(TP)
    g.expect(TP, 40)  # another member committed up to 40 meanwhile
    assert [r.offset for r in g.admit(TP, recs(40, 41)).records] == [40, 41]


class Consumer:
    def __init__(self, *assigned: TopicPartition) -> None:
        self.assigned = set(assigned)
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


async def test_a_fetch_answer_is_cut_at_each_partitions_gap_and_that_partition_fetched_again() -> (
    None
):
    g, _ = gaps(0)
    other = TopicPartition("postback.calls", 1)
    compacted = TopicPartition("postback.catalog", 0)  # never expected: taken as it comes
    consumer = Consumer(TP, other, compacted)

    async def start_of(tp: TopicPartition, first: int) -> int:
        return 7  # its group's committed offset

    taken = await g.take(
        consumer,  # type: ignore[arg-type]
        {TP: recs(0, 1, 4), other: recs(7, 8)},
        start_of,
    )
    assert {tp: [r.offset for r in rs] for tp, rs in taken.records.items()} == {
        TP: [0, 1],
        other: [7, 8],
    }
    assert taken.held_back == [TP] and consumer.seeks == [(TP, 2)]
    plain = await g.take(consumer, {compacted: recs(3, 9)})  # type: ignore[arg-type]
    assert [r.offset for r in plain.records[compacted]] == [3, 9]


async def test_a_partition_taken_away_while_its_start_was_asked_for_is_left_to_its_new_owner() -> (
    None
):
    g = OffsetGaps("test")
    consumer = Consumer(TP)

    async def start_of(tp: TopicPartition, first: int) -> int:
        consumer.assigned.clear()  # a rebalance, meanwhile
        return 0

    taken = await g.take(consumer, {TP: recs(0, 5)}, start_of)  # type: ignore[arg-type]
    assert taken.records == {} and consumer.seeks == [] and not g.knows(TP)

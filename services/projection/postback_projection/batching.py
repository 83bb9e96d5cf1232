"""Writing a batch's gathered rows with a few set-based statements.

`INSERT ... ON CONFLICT DO UPDATE` may not touch one row twice in a statement, so rows that
share a key go out in waves: the first row of every key, then the second, and so on. Each key's
rows still meet the table in the order their events were read, so the merge rules in the SQL
stay the only ones, and a batch gives exactly what applying its events one by one gives."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TypeVar

Row = TypeVar("Row")


def waves(rows: Sequence[Row], key: Callable[[Row], Hashable]) -> Iterator[list[Row]]:
    """`rows` split into lists in which each key appears at most once, keeping each key's
    order. Waves are few: as many as the most events one entity has in the batch."""
    by_key: dict[Hashable, list[Row]] = {}
    for row in rows:
        by_key.setdefault(key(row), []).append(row)
    depth = max((len(same) for same in by_key.values()), default=0)
    for i in range(depth):
        yield [same[i] for same in by_key.values() if len(same) > i]


def columns(rows: Sequence[Sequence[object]], width: int) -> list[list[object]]:
    """Rows as one list per column, the parameters of `unnest($1::..[], $2::..[], ...)`."""
    return [[row[i] for row in rows] for i in range(width)]

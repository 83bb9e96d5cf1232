"""Rebuilding the read model from the topics.

The topics are replayed from offset zero into a fresh schema by the projection's own handlers.
Then, holding the lock every projection batch takes shared, the replay catches up to the end
of the topics and the live tables are replaced by the rebuilt ones in one transaction: readers
see the old read model or the new one, never a mix. The live projection resumes from its
committed offsets; applying again what the rebuild already applied changes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from postback_libs.consumer import BatchApplier
from postback_libs.db import create_pool, migrate
from postback_libs.offsets import OffsetGaps, guarded, seek_to_log_start
from postback_libs.outbox import new_producer
from postback_libs.settings import Settings
from postback_projection.app import handler_sets
from postback_projection.calls import SWAP_LOCK

LIVE = "projection"
REBUILD = "projection_rebuild"
KEEP_OUT = {"schema_migrations", "outbox", "applied_positions"}
Progress = Callable[[int, int], None]
Positions = dict[TopicPartition, int]
FETCH_WAIT_MS = 300
IDLE_FETCHES = 10  # empty waits in a row before a replay stops short of where it aimed
LOCKED_REPLAY_SECONDS = 30.0  # the most the last replay holds the swap lock (and the read model)


class IncompleteHistory(Exception):
    """A topic no longer holds its whole history: a rebuild would lose what retention took."""


class Replay:
    """Applies every topic of the projection, from the beginning, into the rebuild schema."""

    def __init__(
        self, settings: Settings, pool: Any, producer: Any, *, partial: bool = False
    ) -> None:
        self.settings, self.partial = settings, partial
        self.appliers = {
            settings.topic(h.topic): BatchApplier(h, pool, settings, "projection", producer)
            for h in handler_sets(live=False)
        }
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            group_id=None,
            # Well inside a wait for records (FETCH_WAIT_MS): a broker that answers a fetch
            # only when its wait ends (the embedded one) has answered before that wait ends,
            # so a wait that found nothing means nothing is left.
            fetch_max_wait_ms=FETCH_WAIT_MS // 3,
        )
        self.gaps = OffsetGaps("projection rebuild")
        self.applied = 0
        self.partitions: list[TopicPartition] = []

    async def start(self, applied: Positions) -> None:
        """`applied`: where the live projection stands. The partitions it names are read even
        if the broker's first metadata answer left them out (the embedded broker's may)."""
        await self.consumer.start()
        for topic in self.appliers:
            parts = set(self.consumer.partitions_for_topic(topic) or ())
            parts |= {tp.partition for tp in applied if tp.topic == topic}
            self.partitions += [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(self.partitions)
        starts = await seek_to_log_start(self.consumer, self.partitions)
        cut = sorted({tp.topic for tp, start in starts.items() if start > 0})
        if cut and not self.partial:
            raise IncompleteHistory(
                f"{', '.join(cut)} no longer hold their whole history (retention removed the "
                "oldest events): a rebuild would drop every call and delivery older than that "
                "from the read model. Rebuild from what they hold with --partial, and keep them "
                "longer (retention.ms) if the read model should outlive it."
            )
        prefix = self.settings.topic_prefix
        await self.gaps.expect_log_start(
            self.consumer, [tp for tp in self.partitions if guarded(tp.topic.removeprefix(prefix))]
        )

    async def until_end(
        self, progress: Progress, *, settle: bool = True, floor: Positions | None = None
    ) -> None:
        """Apply everything the topics hold now, and what arrives while doing so, until a
        fetch comes back empty. The end offsets are a floor, not the stop: some brokers (the
        embedded one) report them a batch behind, and reading past them is harmless (the live
        projection applies again what was already applied, which changes nothing).
        `settle=False` stops at the end offsets, or at `floor` where it is further: under the
        swap lock, what comes after what the live projection has applied it applies to the new
        tables once it has the lock back, so chasing it would only hold the lock.

        Each topic's batches are written in order; the topics' writes run side by side, and
        the next records are decoded while they do."""
        ends = await self.consumer.end_offsets(self.partitions)
        for tp, position in (floor or {}).items():
            if tp.topic not in self.appliers:
                continue  # a topic of another prefix, sharing the database
            if tp not in ends:
                raise IncompleteHistory(f"{tp.topic} partition {tp.partition} is not readable")
            ends[tp] = max(ends[tp], position)
        total = sum(ends.values())
        give_up = time.monotonic() + LOCKED_REPLAY_SECONDS
        behind = {tp for tp, end in ends.items() if await self.consumer.position(tp) < end}
        writing: list[asyncio.Task[None]] = []
        idle = 0  # fetches in a row that waited and found nothing
        for _ in range(100_000):
            # Only a fetch that waited says nothing is left: one that did not (writes were
            # running) returns only what had arrived.
            waited = not writing
            fetched = await self.consumer.getmany(
                timeout_ms=0 if writing else FETCH_WAIT_MS, max_records=5000
            )
            batches = (await self.gaps.take(self.consumer, fetched)).records
            by_topic: dict[str, list[Any]] = {}
            for tp, records in batches.items():
                by_topic.setdefault(tp.topic, []).extend(records)
            decoded = [
                (self.appliers[topic], await self.appliers[topic].decode(records), len(records))
                for topic, records in by_topic.items()
            ]
            await asyncio.gather(*writing)
            writing = [asyncio.create_task(applier.write(d)) for applier, d, _ in decoded]
            self.applied += sum(n for _, _, n in decoded)
            behind = {tp for tp in behind if await self.consumer.position(tp) < ends[tp]}
            progress(self.applied, max(total, self.applied))
            idle = idle + 1 if waited and not fetched else 0
            if not behind and not self.gaps.waiting() and (idle or not settle):
                break
            if idle >= IDLE_FETCHES or (not settle and time.monotonic() > give_up):
                break
        await asyncio.gather(*writing)
        if floor is not None and behind:
            # Swapping now would drop rows the live tables hold: the topics lost part of their
            # log, or the broker did not give it back in time. The transaction rolls back.
            short = ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in behind))
            raise IncompleteHistory(
                f"the replay could not reach what the read model has applied in {short}: the "
                "broker lost part of its log or did not answer in time; nothing was swapped"
            )

    async def stop(self) -> None:
        await self.consumer.stop()


SECONDARY_INDEXES = """
SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND NOT i.indisunique
"""


async def _drop_secondary_indexes(conn: Any, schema: str) -> list[str]:
    """Drop the indexes no upsert needs; returns the statements that build them again. One
    sorted build at the end costs less than keeping them up to date through the replay."""
    rows = await conn.fetch(SECONDARY_INDEXES, schema)
    for r in rows:
        await conn.execute(f'DROP INDEX "{schema}"."{r["name"]}"')
    return [r["definition"] for r in rows]


async def _tables(conn: Any, schema: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1"
        " AND table_type = 'BASE TABLE' ORDER BY table_name",
        schema,
    )
    return [r["table_name"] for r in rows if r["table_name"] not in KEEP_OUT]


async def _applied_live(conn: Any) -> Positions:
    """How far the live projection has applied each partition, as its tables hold it: under
    the swap lock it applies nothing more, and the rebuilt tables must hold at least as much.
    The end offsets cannot say so on a broker that reports them a batch behind."""
    rows = await conn.fetch(
        f'SELECT topic, partition, max(next_offset) AS next_offset FROM "{LIVE}".applied_positions'
        " GROUP BY topic, partition"
    )
    return {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}


async def _check_nothing_lost(conn: Any) -> None:
    """The topics may have lost history without a trace in their offsets: a broker that lost
    its log (the embedded one keeps none across restarts) starts again at offset zero. The
    read model cannot hold calls its topics never did, so fewer calls rebuilt is history lost."""
    live = await conn.fetchval(f'SELECT count(*) FROM "{LIVE}".calls')
    rebuilt = await conn.fetchval(f'SELECT count(*) FROM "{REBUILD}".calls')
    if rebuilt < live:
        raise IncompleteHistory(
            f"the topics hold {rebuilt} calls, the read model {live}: the broker has lost part "
            "of its log (an embedded broker keeps none across restarts), and a rebuild would "
            f"drop {live - rebuilt} calls from the read model. Rebuild from what the topics "
            "hold with --partial."
        )


async def rebuild(
    settings: Settings, progress: Progress, *, partial: bool = False
) -> dict[str, Any]:
    """`partial`: rebuild from what the topics still hold, though retention cut their start."""
    started = time.perf_counter()
    admin = await asyncpg.connect(settings.database_url)
    producer = new_producer(settings)
    await producer.start()
    pool = None
    replay = None
    try:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{REBUILD}" CASCADE')
        await migrate(settings.database_url, REBUILD, "postback_projection")
        pool = await create_pool(settings.database_url, REBUILD)
        deferred = await _drop_secondary_indexes(admin, REBUILD)
        replay = Replay(settings, pool, producer, partial=partial)
        await replay.start(await _applied_live(admin))
        await replay.until_end(progress)
        for definition in deferred:
            await admin.execute(definition)
        await replay.until_end(progress)  # what arrived while the indexes were built
        async with admin.transaction():
            # Live batches wait from here; the replay takes what arrived meanwhile, then the
            # tables change hands in this one transaction.
            await admin.execute("SELECT pg_advisory_xact_lock($1)", SWAP_LOCK)
            await replay.until_end(progress, settle=False, floor=await _applied_live(admin))
            if not partial:
                await _check_nothing_lost(admin)
            swapping = time.perf_counter()
            tables = await _tables(admin, REBUILD)
            for table in tables:
                # Moved, not copied: the swap takes as long for a million rows as for ten.
                # Statements prepared on the old table are planned again by name on next use.
                await admin.execute(f'DROP TABLE "{LIVE}"."{table}"')
                await admin.execute(f'ALTER TABLE "{REBUILD}"."{table}" SET SCHEMA "{LIVE}"')
        done = time.perf_counter()
        return {
            "events": replay.applied,
            "tables": tables,
            "seconds": round(done - started, 2),
            "swap_seconds": round(done - swapping, 2),
        }
    finally:
        if replay is not None:
            await replay.stop()
        if pool is not None:
            await pool.close()
        await producer.stop()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{REBUILD}" CASCADE')
        await admin.close()

"""One consumer group's loop: fetch a batch, decode it, write it, commit its offsets.

Batches are written one after another, each in its own transaction; the next batch is fetched
and decoded while the previous one's transaction runs. Offsets are committed only after the
batches' effects are (twice a second at most, each commit overlapping the next batch), so a
crash or a rebalance redelivers batches rather than losing them, and the applier recognises
what was already applied. The loop runs on aiokafka directly: a fetch returns as soon as
records arrive, and waits on the broker, not on a timer, while the topic is quiet. A
partition's records are taken only up to a gap in their offsets (offsets.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError

from postback_libs.consumer import BatchApplier
from postback_libs.logging import get_logger
from postback_libs.metrics import OFFSET_GAPS_SKIPPED, OFFSET_GAPS_WAITED
from postback_libs.offsets import OffsetGaps, guarded
from postback_libs.settings import Settings

log = get_logger(__name__)
# How long one fetch waits for records; only bounds how soon a quiet loop notices a stop.
IDLE_FETCH_MS = 1000
# Offsets are committed at most this often, and at once when the topic goes quiet or the loop
# stops. A commit per batch was a broker request per batch (dozens a second per group at any
# load); after a crash the batches written since the last commit come again, and the inbox
# and the handlers' keys recognise them.
COMMIT_EVERY_SECONDS = 0.5
Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class Subscription:
    def __init__(
        self,
        applier: BatchApplier,
        settings: Settings,
        client_id: str,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.applier = applier
        # Called if the loop dies of an error it does not handle (a bug): the process should
        # stop and be started again rather than live on with a group that no longer consumes.
        self.on_crash = on_crash
        self.max_records = applier.handlers.max_records or settings.consumer_max_records
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id=client_id,
            group_id=settings.consumer_group(applier.group),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.kafka_session_timeout_ms // 4),
            fetch_max_wait_ms=settings.kafka_background_fetch_max_wait_ms
            if applier.handlers.background
            else settings.kafka_fetch_max_wait_ms,
            max_poll_records=self.max_records,
        )
        self.gaps = OffsetGaps(applier.group) if guarded(applier.handlers.topic) else None
        self.consumer.subscribe(
            [settings.topic(applier.handlers.topic)],
            listener=_Forget(self.gaps) if self.gaps is not None else None,
        )
        self._task: asyncio.Task[None] | None = None
        self._commit: asyncio.Task[None] | None = None
        self._uncommitted: dict[TopicPartition, int] = {}
        self._committed_at = 0.0
        # The batch whose transaction is running, while the next one is fetched and decoded.
        self._writing: tuple[Fetched, asyncio.Task[None]] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Join the group; batches flow once this returns."""
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"consume {self.applier.group}")
        self._task.add_done_callback(self._ended)

    async def log_ends(self) -> dict[TopicPartition, int]:
        """Where the log of every partition of the topic ends now, whoever reads them."""
        topic = next(iter(self.consumer.subscription()))
        parts = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic) or ()]
        ends: dict[TopicPartition, int] = await self.consumer.end_offsets(parts)
        return ends

    async def group_has_read(self, ends: dict[TopicPartition, int]) -> bool:
        """Whether the whole group (every replica, every partition) has applied and committed
        everything up to `ends`."""
        for tp, end in ends.items():
            committed = await self.consumer.committed(tp)
            if committed is None:
                committed = (await self.consumer.beginning_offsets([tp]))[tp]
            if committed < end:
                return False
        return True

    def _ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is None:
            return
        log.critical("consumer loop died", group=self.applier.group, error=repr(error))
        if self.on_crash is not None:
            self.on_crash(error)

    async def stop(self) -> None:
        """Finish the batch being written (its offsets committed), then leave the group. What
        was fetched and not yet written is fetched again by whoever gets the partitions."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()  # writes run in their own task, shielded from this
            # A loop that died has been reported (`_ended`); the rest still stops in order.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._settle(None)
        await self._commit_progress(force=True)
        if self._commit is not None:
            await self._commit
        await self.consumer.stop()

    async def _run(self) -> None:
        while not self._stopping:
            quiet = self._writing is None  # an empty answer then means IDLE_FETCH_MS of nothing
            try:
                fetched = await self.consumer.getmany(
                    # While a batch is being written, take only what is already here.
                    timeout_ms=0 if self._writing else IDLE_FETCH_MS,
                    max_records=self.max_records,
                )
            except ConsumerStoppedError:
                return
            except KafkaError as e:
                log.warning("fetch failed", group=self.applier.group, error=repr(e))
                await asyncio.sleep(1)
                continue
            if self.gaps is not None:
                # Outside the handler above: what getmany returned is never dropped for an error.
                fetched = await self._hold_back_gaps(fetched)
            if not fetched:
                await self._settle(None)
                await self._commit_progress(force=quiet)
                continue
            # Decoding is CPU work: it runs while the previous batch waits on Postgres.
            decoded = await self.applier.decode([r for b in fetched.values() for r in b])
            if await self._settle(fetched):
                write = self.applier.write(decoded)
                self._writing = fetched, asyncio.create_task(write)

    async def _hold_back_gaps(self, fetched: Fetched) -> Fetched:
        """What follows on from the records before it (offsets.py)."""
        assert self.gaps is not None
        taken = await self.gaps.take(self.consumer, fetched, self._start_of)
        OFFSET_GAPS_WAITED.labels(self.applier.group).inc(len(taken.held_back))
        for _, first, end in taken.skipped:
            OFFSET_GAPS_SKIPPED.labels(self.applier.group).inc(end - first)
        return taken.records

    async def _start_of(self, tp: TopicPartition, first: int) -> int:
        """Where this consumer's reading of `tp` began: its group's committed offset, or the
        log's start if that is later (retention went past the group) or there is none; `first`,
        the first record fetched, if the broker cannot say."""
        try:
            committed: int | None = await self.consumer.committed(tp)
            start: int = (await self.consumer.beginning_offsets([tp]))[tp]
            return start if committed is None else max(committed, start)
        except KafkaError as e:
            log.warning("start offset unknown", group=self.applier.group, error=repr(e))
            return first

    async def _settle(self, fetched_since: Fetched | None) -> bool:
        """Wait for the batch being written and commit its offsets. If it failed, it and what
        was fetched since are fetched again; returns whether it succeeded."""
        if self._writing is None:
            return True
        fetched, write = self._writing
        try:
            await asyncio.shield(write)
        except Exception as e:
            # Not applied (the database went away while stopping, say): fetch it again.
            log.warning("batch not applied", group=self.applier.group, error=repr(e))
            self._writing = None
            assigned = self.consumer.assignment()
            for tp, batch in {**(fetched_since or {}), **fetched}.items():
                if tp in assigned:  # else its new owner reads it from the committed offset
                    self.consumer.seek(tp, batch[0].offset)
                    if self.gaps is not None:
                        self.gaps.expect(tp, batch[0].offset)
            await asyncio.sleep(0.5)
            return False
        self._writing = None
        for tp, batch in fetched.items():
            self._uncommitted[tp] = batch[-1].offset + 1
        await self._commit_progress(force=False)
        self.applier.note_lag([r for b in fetched.values() for r in b], self.consumer)
        return True

    async def _commit_progress(self, force: bool) -> None:
        """Commit the offsets of the batches written since the last commit, if it is time (or
        `force`). The commit runs while the next batch is written; commits stay in order."""
        if not self._uncommitted:
            return
        if self._commit is not None and not self._commit.done():
            if not force:
                return
            await asyncio.shield(self._commit)
        if not force and time.monotonic() - self._committed_at < COMMIT_EVERY_SECONDS:
            return
        offsets, self._uncommitted = self._uncommitted, {}
        self._committed_at = time.monotonic()
        self._commit = asyncio.create_task(self._commit_offsets(offsets))

    async def _commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        # Partitions a rebalance took since: their new owner starts from the last commit.
        assigned = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as e:
            # A rebalance took the partitions: their new owner gets the batch again, and the
            # inbox knows it was applied.
            log.warning("offsets not committed", group=self.applier.group, error=repr(e))


class _Forget(ConsumerRebalanceListener):  # type: ignore[misc]
    """Partitions taken away are forgotten: when one comes back, its expected offset is its
    group's committed offset again, not where this consumer left it."""

    def __init__(self, gaps: OffsetGaps) -> None:
        self.gaps = gaps

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.gaps.forget(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.gaps.forget(list(assigned))

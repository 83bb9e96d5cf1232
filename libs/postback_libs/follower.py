"""Following a compacted topic from its beginning into memory, in every replica.

Routing keeps the catalog this way. Each replica reads every partition (no consumer group), so
its view is complete; `caught_up()` waits until it has read everything the topic held at the
time of asking, which is how a reader avoids deciding on a view older than a write it follows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from postback_libs.events import CloudEvent
from postback_libs.logging import get_logger
from postback_libs.offsets import seek_to_log_start

log = get_logger(__name__)


class TopicFollower:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        apply: Callable[[CloudEvent], None],
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.bootstrap, self.topic, self.apply = bootstrap, topic, apply
        # Told if following dies of an error: the view would stop there while the service
        # goes on deciding by it, so the service should stop and be started again.
        self.on_crash = on_crash
        self.partitions: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()
        self._positions: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None
        )
        await self.consumer.start()
        parts = self.consumer.partitions_for_topic(self.topic)
        for _ in range(50):
            if parts:
                break
            await asyncio.sleep(0.1)
            await self.consumer.topics()
            parts = self.consumer.partitions_for_topic(self.topic)
        if not parts:
            raise RuntimeError(f"topic {self.topic} does not exist; run `postback topics create`")
        self.partitions = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(self.partitions)
        await seek_to_log_start(self.consumer, self.partitions)
        await self._note_positions()
        self._task = asyncio.create_task(self._follow(), name=f"follow {self.topic}")
        self._task.add_done_callback(self._ended)
        if not await self.caught_up(timeout=60):
            # Deciding (or signing) by a view that stops short is worse than not starting.
            raise RuntimeError(f"could not read {self.topic} to its end within 60 s")

    async def _follow(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100, max_records=1000)
            for records in batches.values():
                for record in records:
                    try:
                        self.apply(CloudEvent.from_bytes(record.value or b""))
                    except Exception as e:  # a bad record must not stop the follower
                        log.error("could not apply record", topic=self.topic, error=repr(e))
            await self._note_positions()
            async with self._progress:
                self._progress.notify_all()

    def _ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is None:
            return
        log.critical("following stopped", topic=self.topic, error=repr(error))
        if self.on_crash is not None:
            self.on_crash(error)

    async def _note_positions(self) -> None:
        for tp in self.partitions:
            self._positions[tp] = await self.consumer.position(tp)

    async def caught_up(self, timeout: float = 5.0) -> bool:
        """Wait until every record present now has been applied; False on timeout. One more
        fetch round after reaching the end offsets covers brokers that report them late."""
        ends = await self.consumer.end_offsets(self.partitions)

        def done() -> bool:
            return all(self._positions.get(tp, 0) >= end for tp, end in ends.items())

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._progress:
                await self._progress.wait_for(done)
                await self._progress.wait()
            return True
        return False

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            # A follower that died has said so (`_ended`); it still stops in order.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.consumer.stop()

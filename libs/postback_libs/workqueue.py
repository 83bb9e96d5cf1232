"""Working through rows that are due, with bounded concurrency.

Owner-adapter's dispatches and delivery's attempts are rows claimed with `FOR UPDATE SKIP
LOCKED` and a lease: any number of replicas share them without taking one row twice, and a row
whose replica died is claimed again when its lease runs out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from postback_libs.db import DATABASE_ERRORS
from postback_libs.logging import get_logger

log = get_logger(__name__)

# A claimed row's lease holds, beyond its request's timeout: up to CLAIM_WAIT_SECONDS waiting
# for a worker (a claim that waited longer is handed back unsent), the outcome's recording
# (the recorder's next batch, or its retries if the database blinks) and slack for the two
# clocks compared, the database's lease and the process's timers. Run out mid-request, the row
# would be claimed again elsewhere and its request made twice at once.
CLAIM_WAIT_SECONDS = 8.0
RECORDING_SECONDS = 10.0
LEASE_MARGIN_SECONDS = 2.0


LEASE_SLACK_SECONDS = CLAIM_WAIT_SECONDS + RECORDING_SECONDS + LEASE_MARGIN_SECONDS


def lease_for(request_seconds: float) -> float:
    """The lease a claim takes for a request that may last `request_seconds`."""
    return request_seconds + LEASE_SLACK_SECONDS


def fits_lease(lease_left: float, request_seconds: float) -> bool:
    """Whether a request started now, and its outcome's recording, end before the lease does."""
    return request_seconds + RECORDING_SECONDS + LEASE_MARGIN_SECONDS < lease_left


class WorkQueue:
    def __init__(
        self,
        claim: Callable[[int], Awaitable[list[Any]]],
        work: Callable[[Any], Coroutine[Any, Any, None]],
        *,
        concurrency: int,
        idle_poll_seconds: float = 0.5,
    ) -> None:
        self.claim, self.work, self.concurrency = claim, work, concurrency
        self.idle_poll_seconds = idle_poll_seconds
        self.wake = asyncio.Event()
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self.wake.set()

    async def run(self) -> None:
        while not self._stopping:
            # Cleared before claiming: a wake-up that arrives during the claim is kept.
            self.wake.clear()
            free = self.concurrency - len(self._in_flight)
            try:
                rows = await self.claim(free) if free > 0 else []
            except DATABASE_ERRORS as e:
                log.warning("claiming failed", error=repr(e))
                await asyncio.sleep(1.0)
                continue
            for row in rows:
                task = asyncio.create_task(self.work(row))
                self._in_flight.add(task)
                task.add_done_callback(self._done)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.idle_poll_seconds)

    async def drain(self, timeout: float) -> None:
        """Stop claiming and let the work in flight finish (what is left is re-claimed later,
        when its lease runs out)."""
        self._stopping = True
        self.wake.set()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=timeout)

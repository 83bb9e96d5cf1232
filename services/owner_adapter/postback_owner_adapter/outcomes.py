"""Writing outcomes many at a time (group commit): the outcomes that arrive while a write is in
flight go together into the next one, so a burst of answers costs one transaction, not one each.
An outcome that arrives while nothing is being written is written at once.

Each outcome is still decided on its own: a conditional update from a non-final status, whose
events go into the outbox only if it moved its dispatch (another outcome — a callback, the
deadline — may have got there first). `facts` (an attempt was made) are written either way.
Every caller learns, once the transaction has committed, whether its outcome won."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime

from postback_libs.events import EventData
from postback_libs.logging import get_logger
from postback_libs.outbox import UnitOfWork
from postback_libs.telemetry import current_traceparent

log = get_logger(__name__)

MAX_BATCH = 256
# A second outcome for a call already in the batch waits for the next write: in one UPDATE the
# two would race for the row with no defined winner.
# An outcome of an attempt moves the dispatch only while that attempt holds it: once its lease
# ran out and another replica claimed the call again, the late answer is not the call's.
FINISH = """
UPDATE dispatches d SET status = u.to_status, result_digest = coalesce(u.digest, d.result_digest),
    next_attempt_at = u.retry_at, lease_until = NULL, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::int[])
    AS u(request_id, from_statuses, to_status, digest, retry_at, attempt)
WHERE d.request_id = u.request_id AND d.status = ANY(string_to_array(u.from_statuses, ','))
    AND (u.attempt IS NULL OR d.attempts = u.attempt)
RETURNING d.request_id
"""


@dataclass(eq=False)
class Outcome:
    request_id: str
    from_statuses: tuple[str, ...]
    to_status: str
    digest: str | None
    retry_at: datetime | None
    attempt: int | None  # the attempt it is the outcome of; None: the call's (a callback)
    events: Sequence[EventData]
    facts: Sequence[EventData]
    # The caller's, so each event carries its caller's trace, not the writer's.
    traceparent: str | None
    won: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class OutcomeWriter:
    def __init__(
        self,
        unit_of_work: Callable[[], AbstractAsyncContextManager[UnitOfWork]],
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.unit_of_work = unit_of_work
        self.max_batch = max_batch
        self._waiting: list[Outcome] = []
        self._writer: asyncio.Task[None] | None = None

    async def finish(
        self,
        request_id: str,
        from_status: str | tuple[str, ...],
        to_status: str,
        *events: EventData,
        digest: str | None = None,
        retry_at: datetime | None = None,
        facts: Sequence[EventData] = (),
        attempt: int | None = None,
    ) -> bool:
        """Move a dispatch on and emit its events, unless another outcome got there first.
        True once written, if this outcome won; raises if its write failed."""
        statuses = (from_status,) if isinstance(from_status, str) else from_status
        outcome = Outcome(
            request_id,
            statuses,
            to_status,
            digest,
            retry_at,
            attempt,
            events,
            facts,
            current_traceparent(),
        )
        self._waiting.append(outcome)
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="outcome-writer")
        # Shielded: a caller that goes away (a callback's client) must not cancel the batch.
        return await asyncio.shield(outcome.won)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch: list[Outcome] = []
                seen: set[str] = set()
                for o in self._waiting:
                    if len(batch) < self.max_batch and o.request_id not in seen:
                        batch.append(o)
                        seen.add(o.request_id)
                taken = set(map(id, batch))
                self._waiting = [o for o in self._waiting if id(o) not in taken]
                try:
                    await self._write_or_isolate(batch)
                finally:  # cancelled, say: what is not settled now is not known to be written
                    for o in batch:
                        if not o.won.done():
                            o.won.set_exception(RuntimeError("outcome not written"))
        finally:
            self._writer = None

    async def _write_or_isolate(self, batch: list[Outcome]) -> None:
        try:
            await self._write(batch)
            return
        except Exception as e:
            if len(batch) == 1:
                batch[0].won.set_exception(e)
                return
            log.warning("writing outcomes failed, writing them one by one", error=repr(e))
        for o in batch:  # one bad outcome (or a deadlock) must not fail the others
            try:
                await self._write([o])
            except Exception as e:
                o.won.set_exception(e)

    async def _write(self, batch: list[Outcome]) -> None:
        # In key order, as the intake moves rows: deadlocks stay rare, and a batch that meets
        # one is written again outcome by outcome.
        batch = sorted(batch, key=lambda o: o.request_id)
        async with self.unit_of_work() as uow:
            moved = {
                r[0]
                for r in await uow.conn.fetch(
                    FINISH,
                    [o.request_id for o in batch],
                    [",".join(o.from_statuses) for o in batch],
                    [o.to_status for o in batch],
                    [o.digest for o in batch],
                    [o.retry_at for o in batch],
                    [o.attempt for o in batch],
                )
            }
            for o in batch:  # facts first: an attempt happens before its outcome
                for data in (*o.facts, *(o.events if o.request_id in moved else ())):
                    uow.emit(data, traceparent=o.traceparent)
        for o in batch:  # committed: now each caller may act on its result
            if not o.won.done():
                o.won.set_result(o.request_id in moved)

"""Group commit of accepted calls: the calls that arrive while a write is in flight are written
together in the next one, so a burst costs one statement and one WAL flush instead of a
transaction per call.

A write is one statement (its own transaction): it inserts the batch's `calls` rows and, for
the rows actually inserted, their `call.requested` events into the outbox. One round trip per
batch keeps the session from idling in a transaction while this process is busy answering
HTTP; a unit of work would cost a round trip each for BEGIN, the rows, the events and COMMIT.

A call that arrives while no write is in flight is written at once: batching adds no wait.
Each request awaits its own outcome, set only once the statement holding its row and its event
has committed; a write that fails fails every request in it (`AcceptFailed`), so nothing is
answered 202 that is not durable.

Idempotency-Key is decided as one request after another would be: the first request of a
(consumer, key) in a batch is the one that may insert; every other request with that key, in
the batch or holding a key an earlier write took, compares its digest with the call that
holds the key (the same digest: 200 with its id; another: 422)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from postback_libs.events import CallRequested, CloudEvent
from postback_libs.http import Problem
from postback_libs.logging import get_logger

log = get_logger(__name__)

# Bigger batches buy little: at a few hundred calls per statement the per-call work dominates.
MAX_BATCH = 256
# Calls waiting for a write beyond this are refused (503) rather than queued: the database is
# not keeping up, and a longer queue only makes every answer later.
MAX_WAITING = 4096
# Writes in flight at once: with one, the database idles while this process works between
# writes. Keys are inserted in sorted order, so two writes that wait on each other's keys
# cannot deadlock.
MAX_WRITERS = 3

# The outbox row of each call inserted just now, in the same statement: atomically, and
# without a round trip of its own. Columns as `postback_libs.outbox.UnitOfWork.flush` writes.
WRITE = """
WITH accepted AS (
    INSERT INTO calls (request_id, consumer_id, idempotency_key, request_digest)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
    ON CONFLICT DO NOTHING
    RETURNING request_id
), events AS (
    INSERT INTO outbox (topic, key, event_id, type, payload, traceparent)
    SELECT e.topic, e.key, e.event_id, e.type, e.payload, e.traceparent
    FROM unnest($1::text[], $5::text[], $6::text[], $7::text[], $8::bytea[], $9::text[])
        AS e(key, topic, event_id, type, payload, traceparent)
    JOIN accepted ON accepted.request_id = e.key
)
SELECT request_id FROM accepted
"""
HOLDERS = """
SELECT c.consumer_id, c.idempotency_key, c.request_id, c.request_digest
FROM calls c JOIN unnest($1::text[], $2::text[]) AS k(consumer_id, key)
    ON c.consumer_id = k.consumer_id AND c.idempotency_key = k.key
"""

Outcome = tuple[str, bool]  # request id, accepted just now (False: an earlier call's)
Key = tuple[str, str]  # consumer id, Idempotency-Key


class Overloaded(Problem):
    def __init__(self) -> None:
        super().__init__(
            503, "overloaded", "Too many calls in flight", "retry after the Retry-After delay"
        )
        self.headers["Retry-After"] = "1"


class AcceptFailed(Problem):
    """The write did not commit, or its commit is in doubt (the connection broke): the call
    may not be accepted. Retrying with the same Idempotency-Key is always safe."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "accept-failed",
            "The call could not be accepted",
            "it may not have been stored; retry (with the same Idempotency-Key to be safe)",
        )
        self.headers["Retry-After"] = "1"


def _reused() -> Problem:
    return Problem(
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "this key was used for a different request",
    )


@dataclass(eq=False)
class _Pending:
    call: CallRequested
    digest: str
    topic: str
    event: CloudEvent
    payload: bytes  # the event, serialised by the request rather than by the writer
    outcome: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def key(self) -> Key | None:
        k = self.call.idempotency_key
        return None if k is None else (self.call.consumer_id, k)

    def settle(self, result: Outcome | Problem) -> None:
        if self.outcome.done():
            return
        if isinstance(result, Problem):
            self.outcome.set_exception(result)
        else:
            self.outcome.set_result(result)


class CallWriter:
    def __init__(
        self,
        connection: Callable[[], AbstractAsyncContextManager[Any]],
        on_commit: Callable[[], None],
        *,
        max_batch: int = MAX_BATCH,
        max_waiting: int = MAX_WAITING,
        max_writers: int = MAX_WRITERS,
    ) -> None:
        self.connection, self.on_commit = connection, on_commit
        self.max_batch, self.max_waiting, self.max_writers = max_batch, max_waiting, max_writers
        self._waiting: list[_Pending] = []
        self._writers: set[asyncio.Task[None]] = set()

    async def write(
        self, call: CallRequested, digest: str, topic: str, event: CloudEvent
    ) -> Outcome:
        """Make `call` and its `event` (for `topic`) durable, or find the earlier call holding
        its Idempotency-Key."""
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded()
        pending = _Pending(call, digest, topic, event, event.to_bytes())
        self._waiting.append(pending)
        if len(self._writers) < self.max_writers:
            writer = asyncio.create_task(self._drain(), name="call-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        # Not shielded: a request that goes away cancels only its own outcome (which `settle`
        # then skips); its batch is written by the writer task all the same.
        return await pending.outcome

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: self.max_batch]
                try:
                    await self._write(batch)
                except Exception:
                    log.exception("accepting a batch of calls failed", calls=len(batch))
                finally:  # whatever is not settled by now is not known to be durable
                    for p in batch:
                        p.settle(AcceptFailed())
        finally:
            # As the loop ends, not in a done callback: a call queued in between would find
            # this writer still counted, start none, and wait for a write that never comes.
            task = asyncio.current_task()
            if task is not None:
                self._writers.discard(task)

    async def _write(self, batch: list[_Pending]) -> None:
        first: dict[Key, _Pending] = {}  # the request of each key that may insert
        rows: list[_Pending] = []
        for p in batch:
            if p.key is None:
                rows.append(p)
            elif p.key not in first:
                first[p.key] = p
        rows.extend(first[k] for k in sorted(first))
        async with self.connection() as conn:
            inserted = {
                r[0]
                for r in await conn.fetch(
                    WRITE,
                    [p.call.request_id for p in rows],
                    [p.call.consumer_id for p in rows],
                    [p.call.idempotency_key for p in rows],
                    [p.digest for p in rows],
                    [p.topic for p in rows],
                    [p.event.id for p in rows],
                    [p.event.type for p in rows],
                    [p.payload for p in rows],
                    [p.event.traceparent for p in rows],
                )
            }
            self.on_commit()
            holders: dict[Key, tuple[str, str]] = {}
            for p in batch:
                if p.call.request_id in inserted:
                    p.settle((p.call.request_id, True))
                    if p.key:
                        holders[p.key] = (p.call.request_id, p.digest)
            # Keys another write holds. The insert waited for that write to commit; a new
            # statement sees its row.
            held = {p.key for p in batch if p.key and p.key not in holders}
            if held:
                for r in await conn.fetch(HOLDERS, [k[0] for k in held], [k[1] for k in held]):
                    holders[(r[0], r[1])] = (r[2], r[3])
        for p in batch:
            if p.call.request_id in inserted:
                continue
            holder = holders.get(p.key) if p.key else None
            if holder is None:  # neither inserted nor held: not expected; never claim it
                log.error("call neither inserted nor found", request_id=p.call.request_id)
            elif holder[1] != p.digest:
                p.settle(_reused())
            else:
                p.settle((holder[0], False))

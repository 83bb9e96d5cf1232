"""Applying events from Kafka, effectively once.

A batch of records is applied in one Postgres transaction: the event ids go into the inbox (so a
redelivered event is recognised and skipped; a group whose effects are idempotent by nature keeps
no inbox), the handlers' effects and the events they emit (outbox) commit with them, and only
then is the Kafka offset committed. If the batch fails, each event is retried on its own; one
that keeps failing goes to the DLQ with its error, so no partition is ever stuck behind it. A
lost database connection is not the event's fault: that is retried until the database is back,
holding the partition rather than dead-lettering good events.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from postback_libs.db import UNAVAILABLE, delete_in_chunks
from postback_libs.events import (
    CALLS,
    CONTENT_TYPE,
    DLQ,
    MAX_EVENT_BYTES,
    CloudEvent,
    DeadLetterRecorded,
    EventData,
    new_event,
)
from postback_libs.logging import get_logger
from postback_libs.metrics import CONSUMER_LAG, EVENTS_CONSUMED, HANDLER_SECONDS, SECONDS_BEHIND
from postback_libs.outbox import UnitOfWork
from postback_libs.settings import Settings
from postback_libs.telemetry import span_from

log = get_logger(__name__)

Handler = Callable[[CloudEvent, Any, UnitOfWork], Awaitable[None]]
Observer = Callable[[CloudEvent, Any], None]
BatchHook = Callable[[UnitOfWork], Awaitable[None]]


RECORD_POSITIONS = """
INSERT INTO applied_positions (consumer, topic, partition, next_offset)
SELECT $1, u.topic, u.partition, u.next_offset
FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(topic, partition, next_offset)
ON CONFLICT (consumer, topic, partition) DO UPDATE
    SET next_offset = greatest(applied_positions.next_offset, EXCLUDED.next_offset)
"""


class Handlers:
    """Which event types a consumer group reacts to, and how."""

    def __init__(
        self,
        group: str,
        topic: str,
        *,
        before_batch: BatchHook | None = None,
        after_batch: BatchHook | None = None,
        after_commit: Callable[[], None] | None = None,
        typed: bool = True,
        idempotent: bool = False,
        max_records: int | None = None,
        background: bool = False,
        remember_forever: bool = False,
        records_positions: bool = False,
    ) -> None:
        """`before_batch` runs first in each batch's transaction (a lock, say); `after_batch`
        runs last, before the commit (writing rows the handlers gathered in `uow.scratch`).
        `typed=False`: the handlers read the envelope only and get None for the payload (a read
        model that keeps events as they came need not validate each one's data twice).
        `idempotent=True`: the effects are keyed by what the events carry (an event id, a
        transfer id, a log position), so an event applied twice changes nothing and no inbox
        row is written for it (one index insert per event saved). `max_records`: the most
        records a batch holds, when not `POSTBACK_CONSUMER_MAX_RECORDS`. `background=True`: no
        call waits on this group on its way to a webhook, so it fetches with the longer
        `POSTBACK_KAFKA_BACKGROUND_FETCH_MAX_WAIT_MS`. `remember_forever=True`: the inbox keeps
        this group's event ids for good (requests on a topic kept for ever, whose refusal leaves
        nothing else behind: replayed after a reset, one must not be applied after all).
        `records_positions=True`: each batch also records, in its transaction, the next offset
        of each partition it applied (table `applied_positions`), for whoever must know exactly
        what the group's rows hold."""
        self.group, self.topic = group, topic
        self.records_positions = records_positions
        self.background, self.remember_forever = background, remember_forever
        self.typed, self.idempotent, self.max_records = typed, idempotent, max_records
        self.by_type: dict[str, Handler] = {}
        self.observers: dict[str, Observer] = {}
        self.before_batch, self.after_batch = before_batch, after_batch
        # For work that must see the batch's rows: a wake-up sent before the commit is missed.
        self.after_commit = after_commit

    def on(self, *models: type[EventData]) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            for model in models:
                self.by_type[model.event_type] = fn
            return fn

        return register

    def observe(self, *models: type[EventData]) -> Callable[[Observer], Observer]:
        """For state kept in memory only: `fn(event, payload)` is called as each event is
        fetched, outside any transaction and without an inbox, so an event that changes
        nothing durable costs no transaction. It sees an event again when its batch is fetched
        again (a failed write, a rebalance, a restart), and must tolerate that."""

        def register(fn: Observer) -> Observer:
            for model in models:
                assert model.event_type not in self.by_type, f"{model.event_type} is handled"
                self.observers[model.event_type] = fn
            return fn

        return register


@dataclass
class Decoded:
    record: ConsumerRecord[bytes, bytes]
    event: CloudEvent
    payload: EventData | None


def _header(record: ConsumerRecord[bytes, bytes], name: str) -> bytes | None:
    for k, v in record.headers or ():
        if k == name:
            return bytes(v)
    return None


# A dead letter sent back to the group that gave up on it (`postback dlq replay`) carries this
# header: every other group skips it, having applied it already.
REPLAY_FOR = "postback-replay-for"


async def purge_inbox(
    pool: Any, retention_days: int, chunk: int = 10_000, keep: Sequence[str] = ()
) -> int:
    """Forget processed event ids older than the retention, but the groups in `keep`'s;
    returns how many went."""
    return await delete_in_chunks(
        pool,
        "inbox",
        "processed_at < now() - make_interval(days => $1) AND consumer <> ALL($2::text[])",
        retention_days,
        list(keep),
        chunk=chunk,
    )


def _reason(e: Exception) -> str:
    """Why an event could not be read, without quoting it: it may hold a call's data."""
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'event'}: {err['msg']}"
            for err in e.errors(include_url=False, include_input=False)
        )
    return type(e).__name__


class BatchApplier:
    def __init__(
        self,
        handlers: Handlers,
        pool: Any,
        settings: Settings,
        source: str,
        producer: AIOKafkaProducer,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.handlers, self.pool, self.settings = handlers, pool, settings
        self.source, self.producer, self.on_commit = source, producer, on_commit
        self.group = handlers.group
        self._wanted = {t.encode() for t in (*handlers.by_type, *handlers.observers)}
        self._group_bytes = self.group.encode()
        self.stopping = False
        self.events_behind = 0
        self.seconds_behind = 0.0  # as measured when the last batch was written
        self._writing_since: float | None = None
        # Read at each scrape: a batch stuck in its transaction shows while it is stuck.
        SECONDS_BEHIND.labels(self.group, handlers.topic).set_function(self.lag_seconds)
        self._behind: dict[int, int] = {}
        # Per partition, the log time of the last record applied: how far behind the group is
        # is its lagging partition's, not its freshest one's.
        self._applied_at: dict[int, float] = {}

    async def apply(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        await self.write(await self.decode(records))

    async def decode(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[Decoded]:
        """The records this group handles, as events; an undecodable one goes to the DLQ."""
        decoded: list[Decoded] = []
        ignored: Counter[str] = Counter()  # counted per batch: most records are someone else's
        observed: Counter[str] = Counter()
        for record in records:
            ce_type = _header(record, "ce_type")
            if ce_type is not None and ce_type not in self._wanted:
                ignored[ce_type.decode(errors="replace")] += 1
                continue
            replay_for = _header(record, REPLAY_FOR)
            if replay_for is not None and replay_for != self._group_bytes:
                ignored["replayed for another group"] += 1
                continue
            try:
                event = CloudEvent.from_bytes(record.value or b"")
                observer = self.handlers.observers.get(event.type)
                if observer is not None:
                    try:
                        observer(event, event.payload())
                    except Exception as e:  # a bug in what is only kept in memory
                        log.error("observer failed", group=self.group, error=repr(e))
                    observed[event.type] += 1
                    continue
                if event.type not in self.handlers.by_type:
                    ignored[event.type] += 1
                    continue
                payload = event.payload() if self.handlers.typed else None
                decoded.append(Decoded(record, event, payload))
            except (ValidationError, ValueError, KeyError) as e:
                await self.dead_letter(record, f"undecodable event: {_reason(e)}", attempts=1)
        for type_, n in ignored.items():
            EVENTS_CONSUMED.labels(self.group, type_, "ignored").inc(n)
        for type_, n in observed.items():
            EVENTS_CONSUMED.labels(self.group, type_, "applied").inc(n)
        return decoded

    async def write(self, decoded: list[Decoded]) -> None:
        """Apply decoded events: in one transaction, or one by one if that fails."""
        if not decoded:
            return
        started = time.perf_counter()
        self._writing_since = time.monotonic()
        try:
            await self._apply_in_one_transaction(decoded)
        except UNAVAILABLE:
            await self._apply_one_by_one(decoded)
        except Exception as e:  # a bad event or a bug: isolate it
            log.warning(
                "batch failed, applying events one by one",
                group=self.group,
                events=len(decoded),
                error=repr(e),
            )
            await self._apply_one_by_one(decoded)
        finally:
            self._writing_since = None
        HANDLER_SECONDS.labels(self.group).observe(time.perf_counter() - started)

    def lag_seconds(self) -> float:
        """How far behind the group is: the lag measured with the last batch written, or, if
        longer, how long the batch in hand has been writing (the database may be stalled and
        nothing be measured meanwhile)."""
        writing = self._writing_since
        stuck = time.monotonic() - writing if writing is not None else 0.0
        return max(self.seconds_behind, stuck)

    def note_lag(self, records: Sequence[ConsumerRecord[bytes, bytes]], consumer: Any) -> None:
        """Events and seconds between the last record applied and the end of its partitions."""
        last: dict[tuple[str, int], ConsumerRecord[bytes, bytes]] = {}
        for record in records:
            last[(record.topic, record.partition)] = record
        assigned = consumer.assignment()
        # Partitions a rebalance took away are the new owner's to count.
        owned = {tp.partition for tp in assigned}
        self._behind = {p: n for p, n in self._behind.items() if p in owned}
        self._applied_at = {p: t for p, t in self._applied_at.items() if p in owned}
        for (topic, partition), record in last.items():
            tp = TopicPartition(topic, partition)
            if tp not in assigned:  # taken by a rebalance while its batch was written
                continue
            end = consumer.highwater(tp)
            if end is not None:
                self._behind[partition] = max(0, end - record.offset - 1)
            self._applied_at[partition] = record.timestamp / 1000
        self.events_behind = sum(self._behind.values())
        lagging = [
            self._applied_at[p] for p, n in self._behind.items() if n and p in self._applied_at
        ]
        self.seconds_behind = max(0.0, time.time() - min(lagging)) if lagging else 0.0
        CONSUMER_LAG.labels(self.group, self.handlers.topic).set(self.events_behind)

    async def _apply_in_one_transaction(self, batch: list[Decoded]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            uow = UnitOfWork(conn, self.source, self.settings)
            if self.handlers.before_batch is not None:
                await self.handlers.before_batch(uow)
            fresh = None if self.handlers.idempotent else await self._record_in_inbox(conn, batch)
            outcomes: Counter[tuple[str, str]] = Counter()
            for d in batch:
                if fresh is not None:
                    if d.event.id not in fresh:
                        outcomes[(d.event.type, "duplicate")] += 1
                        continue
                    fresh.discard(d.event.id)  # the same event twice in one batch: apply once
                uow.position = (d.record.partition, d.record.offset)
                await self._handle(d, uow)
                outcomes[(d.event.type, "applied")] += 1
            if self.handlers.after_batch is not None:
                await self.handlers.after_batch(uow)
            if self.handlers.records_positions:
                await self._record_positions(conn, batch)
            await uow.flush()
        self.on_commit()
        if self.handlers.after_commit is not None:
            self.handlers.after_commit()
        for (type_, outcome), n in outcomes.items():
            EVENTS_CONSUMED.labels(self.group, type_, outcome).inc(n)

    async def _record_positions(self, conn: Any, batch: list[Decoded]) -> None:
        ends = {(d.record.topic, d.record.partition): d.record.offset + 1 for d in batch}
        await conn.execute(
            RECORD_POSITIONS,
            self.group,
            [t for t, _ in ends],
            [p for _, p in ends],
            list(ends.values()),
        )

    async def _record_in_inbox(self, conn: Any, batch: list[Decoded]) -> set[str]:
        """The batch's event ids not handled before, now recorded as handled."""
        rows = await conn.fetch(
            "INSERT INTO inbox (consumer, event_id) SELECT $1, unnest($2::text[])"
            " ON CONFLICT DO NOTHING RETURNING event_id",
            self.group,
            [d.event.id for d in batch],
        )
        return {r["event_id"] for r in rows}

    async def _handle(self, d: Decoded, uow: UnitOfWork) -> None:
        # A call's events are keyed by its request id: the id people search the logs by.
        ids = {"event_id": d.event.id, "event_type": d.event.type, "subject": d.event.subject}
        if self.handlers.topic == CALLS.name:
            ids["request_id"] = d.event.subject
        structlog.contextvars.bind_contextvars(**ids)
        try:
            with span_from(d.event.traceparent, f"{self.group} {d.event.type}", SpanKind.CONSUMER):
                await self.handlers.by_type[d.event.type](d.event, d.payload, uow)
        finally:
            structlog.contextvars.unbind_contextvars(*ids)

    async def _apply_one_by_one(self, batch: list[Decoded]) -> None:
        for d in batch:
            attempt = 0
            while True:
                attempt += 1
                try:
                    await self._apply_in_one_transaction([d])
                    break
                except UNAVAILABLE as e:
                    if self.stopping:
                        raise
                    log.warning("database unavailable, holding the partition", error=repr(e))
                    await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
                    attempt = min(attempt, 5)
                except Exception as e:
                    if attempt > self.settings.handler_retries:
                        await self.dead_letter(d.record, repr(e), attempts=attempt)
                        break
                    await asyncio.sleep(0.05 * 2**attempt)

    async def dead_letter(
        self, record: ConsumerRecord[bytes, bytes], error: str, attempts: int
    ) -> None:
        key = (record.key or b"").decode(errors="replace")
        letter = DeadLetterRecorded(
            consumer_group=self.group,
            original_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            original_key=key,
            error=error[:4000],
            attempts=attempts,
            # Escaped inside the letter, an event near the largest a topic takes would not fit.
            original=(record.value or b"")[: MAX_EVENT_BYTES // 4].decode(errors="replace"),
        )
        cause = f"{record.topic}:{record.partition}:{record.offset}:{self.group}"
        trace = _header(record, "traceparent")
        event = new_event(
            letter,
            source=self.source,
            cause=cause,
            cause_ms=record.timestamp,
            traceparent=trace.decode(errors="replace") if trace else None,
        )
        # The headers every topic's records carry (the relay's), so CloudEvents clients and
        # tracing read dead letters as they read the rest.
        headers = [("content-type", CONTENT_TYPE.encode()), ("ce_type", event.type.encode())]
        if trace:
            headers.append(("traceparent", trace))
        await self.producer.send_and_wait(
            self.settings.topic(DLQ.name), value=event.to_bytes(), key=key.encode(), headers=headers
        )
        ce_type = (_header(record, "ce_type") or b"?").decode(errors="replace")
        EVENTS_CONSUMED.labels(self.group, ce_type, "dead_lettered").inc()
        log.error(
            "event dead-lettered",
            group=self.group,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=key,
            event_type=ce_type,
            trace_id=trace.decode(errors="replace")[3:35] if trace else None,
            dead_letter_id=event.id,
            attempts=attempts,
            error=error,
        )

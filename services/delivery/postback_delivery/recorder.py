"""Recording what attempts gave, many per transaction (group commit): each delivery's new
status, the events (`delivery.attempted`, `.succeeded`, ...) in the outbox, and the endpoint's
health (circuit breaker, disabling), all in one transaction per batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from postback_delivery import domain, store
from postback_delivery.domain import Decision
from postback_delivery.health import BreakerPolicy, Health, Result
from postback_delivery.store import Claimed
from postback_delivery.subscriptions import Message, destinations, enqueue, state_of
from postback_libs.db import UNAVAILABLE
from postback_libs.events import (
    CallDelivered,
    CallDeliveryFailed,
    DeliveryAttempted,
    DeliveryExhausted,
    DeliveryFailed,
    DeliverySucceeded,
    EndpointDisabled,
    ErrorClass,
    EventData,
)
from postback_libs.ids import derived_id
from postback_libs.logging import get_logger
from postback_libs.outbox import UnitOfWork
from postback_libs.settings import Settings
from postback_libs.telemetry import continuing
from postback_libs.webhooks import NOTIFICATION_EVENTS, AttemptResult

log = get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    claimed: Claimed
    url: str
    result: AttemptResult
    decision: Decision


def _events(o: Outcome) -> list[EventData]:
    """The events one recorded attempt emits."""
    c, r, d = o.claimed, o.result, o.decision
    ref = {
        "delivery_id": c.delivery_id,
        "message_id": c.message_id,
        "request_id": c.request_id,
        "endpoint_id": c.endpoint_id,
    }
    error_class: ErrorClass | None = r.error_class
    if r.status_code is not None and d.verdict != "succeeded":
        error_class = "http_status"
    out: list[EventData] = [
        DeliveryAttempted(
            **ref,
            url=o.url,
            attempt=c.attempts,
            status_code=r.status_code,
            latency_ms=r.latency_ms,
            error_class=error_class,
            response_excerpt=r.excerpt,
            next_attempt_at=d.retry_at,
            response_headers=r.headers or None,
        )
    ]
    call_webhook = c.request_id is not None and c.endpoint_id is None
    if d.status == "succeeded":
        out.append(DeliverySucceeded(**ref, attempts=c.attempts))
        if call_webhook:
            assert c.request_id is not None
            out.append(
                CallDelivered(request_id=c.request_id, message_id=c.message_id, attempts=c.attempts)
            )
    elif d.status in ("failed", "exhausted"):
        if d.status == "failed":
            out.append(
                DeliveryFailed(**ref, attempts=c.attempts, reason="endpoint answered 410 Gone")
            )
        else:
            out.append(DeliveryExhausted(**ref, attempts=c.attempts, last_error=d.error or ""))
        if call_webhook:
            assert c.request_id is not None
            out.append(
                CallDeliveryFailed(
                    request_id=c.request_id,
                    message_id=c.message_id,
                    attempts=c.attempts,
                    last_error=d.error or "",
                )
            )
    return out


def _endpoint_result(d: Decision) -> Result:
    if d.status == "succeeded":
        return "succeeded"
    return "gone" if d.verdict == "gone" else "failed"


class Recorder:
    """Writes outcomes in batches; each outcome's callback runs once it is committed (or
    given up on at shutdown, when its lease brings the message back)."""

    def __init__(self, service: Any, settings: Settings, max_batch: int = 500) -> None:
        self.service, self.settings, self.max_batch = service, settings, max_batch
        self.breaker = BreakerPolicy(
            failure_threshold=settings.circuit_failure_threshold,
            cooldown_seconds=settings.circuit_cooldown_seconds,
            max_cooldown_seconds=settings.circuit_max_cooldown_seconds,
            disable_after_seconds=settings.endpoint_disable_after_seconds,
        )
        self._pending: list[tuple[Outcome, Callable[[], None]]] = []
        self._wake = asyncio.Event()
        self._stopping = False

    def submit(self, outcome: Outcome, done: Callable[[], None]) -> None:
        self._pending.append((outcome, done))
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while not (self._stopping and not self._pending):
            if not self._pending:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                await self.write([o for o, _ in batch])
                failures = 0
            except UNAVAILABLE as e:
                failures += 1
                log.warning("recording attempts failed, retrying", error=repr(e), n=len(batch))
                if self._stopping and failures > 3:
                    # Their leases run out and the messages are attempted again: at least once.
                    for _, done in batch:
                        done()
                    continue
                self._pending[:0] = batch
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            except Exception as e:
                # Not the database being away: an outcome in the batch cannot be written. One
                # by one, so that it holds up only itself.
                log.error("recording attempts failed", error=repr(e), n=len(batch))
                for i, (outcome, done) in enumerate(batch):
                    try:
                        await self._write_alone(outcome)
                    except UNAVAILABLE:
                        self._pending[:0] = batch[i:]
                        break
                    done()
                continue
            for _, done in batch:
                done()

    async def _write_alone(self, outcome: Outcome) -> None:
        """Record one outcome; if it cannot be, record it without the receiver's answer, and if
        not even that, give it up: its lease runs out and it is attempted again."""
        try:
            await self.write([outcome])
            return
        except UNAVAILABLE:
            raise
        except Exception as e:
            log.error(
                "attempt not recordable", delivery_id=outcome.claimed.delivery_id, error=repr(e)
            )
        bare = replace(outcome.result, excerpt="(answer not recordable)", headers={})
        try:
            await self.write([replace(outcome, result=bare)])
        except UNAVAILABLE:
            raise
        except Exception as e:
            log.error("attempt given up", delivery_id=outcome.claimed.delivery_id, error=repr(e))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def write(self, outcomes: list[Outcome]) -> None:
        async with self.service.unit_of_work() as uow:
            conn = uow.conn
            locked = await store.lock_endpoints(
                conn, list({o.claimed.endpoint_id for o in outcomes if o.claimed.endpoint_id})
            )
            moved = {
                r["delivery_id"]
                for r in await conn.fetch(
                    store.FINISH,
                    [o.claimed.delivery_id for o in outcomes],
                    [o.decision.status for o in outcomes],
                    [o.decision.retry_at for o in outcomes],
                    [o.decision.error for o in outcomes],
                    [o.claimed.attempts for o in outcomes],
                )
            }
            by_endpoint: dict[str, list[Outcome]] = {}
            for o in outcomes:
                if o.claimed.delivery_id not in moved:
                    continue  # its lease ran out and another attempt took over
                if o.claimed.endpoint_id is not None:
                    by_endpoint.setdefault(o.claimed.endpoint_id, []).append(o)
                with continuing(o.claimed.traceparent):  # the message's, not the recorder's
                    for e in _events(o):
                        uow.emit(e)
                    if o.decision.status == "exhausted":
                        await self._announce_exhausted(uow, o)
            if by_endpoint:
                await self._record_health(uow, locked, by_endpoint)

    async def _record_health(
        self, uow: UnitOfWork, locked: dict[str, Any], by_endpoint: dict[str, list[Outcome]]
    ) -> None:
        """Each endpoint's circuit breaker, pauses and held messages after its attempts."""
        conn = uow.conn
        # The database's clock, as the claim's: cooldowns and pauses compare against it.
        now: datetime = await conn.fetchval("SELECT now()")
        changed: dict[str, Health] = {}
        releases: dict[str, int] = {}
        disabled: list[tuple[Any, str]] = []
        for endpoint_id, done in by_endpoint.items():
            row = locked.get(endpoint_id)
            if row is None or row["deleted"] or row["disabled_at"] is not None:
                continue
            results = [(_endpoint_result(o.decision), o.decision.retry_after) for o in done]
            before, after, disable = store.fold_health(row, results, now, self.breaker)
            if after != before:
                changed[endpoint_id] = after
            if disable is not None:
                disabled.append((row, disable))
                continue
            # Held messages wait for a slot (FIFO: for the one before them to settle).
            settled = sum(o.decision.status != "pending" for o in done)
            free = settled if row["fifo"] else len(done)
            if free:
                releases[endpoint_id] = free
        await store.save_healths(conn, changed)
        await store.release_held(conn, releases)
        for row, reason in disabled:
            await self._disable(uow, row, reason)

    async def _announce_exhausted(self, uow: UnitOfWork, o: Outcome) -> None:
        c = o.claimed
        if c.event_type in NOTIFICATION_EVENTS:
            return  # never announce the failure of an announcement: no loops
        to = await destinations(uow.conn, c.account_id, "delivery.exhausted", exclude=c.endpoint_id)
        if not to:
            return
        at = datetime.now(UTC)
        body = domain.webhook_body(
            "delivery.exhausted",
            at,
            {
                "delivery_id": c.delivery_id,
                "message_id": c.message_id,
                "endpoint_id": c.endpoint_id,
                "request_id": c.request_id,
                "event_type": c.event_type,
                "url": o.url,
                "attempts": c.attempts,
                "last_error": o.decision.error,
            },
        )
        message_id = f"msg_{derived_id(f'{c.delivery_id}:{c.attempts}', 'exhausted').hex}"
        await enqueue(
            uow, Message(message_id, c.account_id, "delivery.exhausted", body, c.request_id), to
        )

    async def _disable(self, uow: UnitOfWork, row: Any, reason: str) -> None:
        endpoint_id, account_id = row["endpoint_id"], row["account_id"]
        await uow.conn.execute(
            "UPDATE endpoints SET disabled_at = now(), disabled_reason = $2 WHERE endpoint_id = $1",
            endpoint_id,
            reason,
        )
        uow.emit(EndpointDisabled(endpoint_id=endpoint_id, account_id=account_id, reason=reason))
        await store.fail_open(uow, endpoint_id, f"endpoint disabled: {reason}")
        log.warning("endpoint disabled", endpoint_id=endpoint_id, reason=reason)
        to = await destinations(uow.conn, account_id, "endpoint.disabled", exclude=endpoint_id)
        if to:
            at = datetime.now(UTC)
            state = state_of(row["state"])
            body = domain.webhook_body(
                "endpoint.disabled",
                at,
                {"endpoint_id": endpoint_id, "url": state.url, "reason": reason},
            )
            message_id = f"msg_{derived_id(f'{endpoint_id}:{at.isoformat()}', 'disabled').hex}"
            await enqueue(uow, Message(message_id, account_id, "endpoint.disabled", body), to)

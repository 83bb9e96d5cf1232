"""Sending: the dispatcher claims due messages ahead of need (and takes those the calls batch
started itself, decision 16), `concurrency` workers sign and post them, and each outcome goes
to the recorder without waiting for its commit.

Database latency stays off the HTTP path: claims are prefetched in batches and outcomes are
committed in batches behind the workers. What is claimed but not yet recorded is bounded
(`8 x concurrency`), so a slow database slows sending instead of piling up work, and every
claimed row keeps its lease until its outcome is committed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import aiohttp
from prometheus_client import Counter, Gauge, Histogram

from postback_delivery import domain
from postback_delivery.domain import RetryPolicy
from postback_delivery.recorder import Outcome, Recorder
from postback_delivery.store import Claimed, Queue
from postback_libs.db import DATABASE_ERRORS
from postback_libs.logging import get_logger
from postback_libs.rotation import SecretVersions
from postback_libs.settings import Settings
from postback_libs.signing import derive_secret, signature_header
from postback_libs.webhooks import (
    endpoint_signature,
    message_headers,
    post_message,
    valid_versions,
)

log = get_logger(__name__)
USER_AGENT = "Postback/0.1.0"
ATTEMPTS = Counter(
    "postback_delivery_attempts_total",
    "Webhook attempts by what became of their message (succeeded, pending: retried later, "
    "failed: the endpoint is gone, exhausted) and why it failed (http_status, timeout, "
    "connect, dns, tls, blocked_address, other; none on success).",
    ["status", "error_class"],
)
ATTEMPT_SECONDS = Histogram(
    "postback_delivery_attempt_seconds",
    "Time from sending a webhook to its answer (or error).",
    ["status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OUTSTANDING = Gauge(
    "postback_delivery_outstanding", "Messages claimed by this process and not yet recorded."
)


@functools.lru_cache(maxsize=8192)
def _consumer_secret(master: bytes, account_id: str, version: int) -> str:
    # Cached, and bounded: every attempt signs, and a consumer account has a secret or two.
    return derive_secret(master, "consumer", account_id, version)


class Sender:
    """One attempt: sign with every valid secret of the destination, post, judge the answer.
    A call's own webhook_url is signed with its consumer's webhook secrets, an endpoint with
    its own."""

    def __init__(
        self,
        settings: Settings,
        session: Callable[[], aiohttp.ClientSession],
        consumer_secrets: SecretVersions,
    ) -> None:
        self.master = settings.master_key()
        self.consumer_secrets = consumer_secrets
        self.default = RetryPolicy(tuple(settings.retry_delays))
        self.session = session
        self.rng = random.Random()

    def policy(self, c: Claimed) -> RetryPolicy:
        e = c.endpoint
        if e is None:
            return self.default
        schedule = tuple(e.retry_schedule) if e.retry_schedule else self.default.schedule
        window = float(e.retry_window_seconds) if e.retry_window_seconds else None
        return RetryPolicy(schedule, e.max_attempts, window)

    def _signature(self, c: Claimed, timestamp: int, now: datetime) -> str:
        e = c.endpoint
        if e is not None:
            versions = valid_versions(e, now)
            return endpoint_signature(
                self.master, e.endpoint_id, e.signing, versions, c.message_id, timestamp, c.body
            )
        secrets = [
            _consumer_secret(self.master, c.account_id, v)
            for v in self.consumer_secrets.valid(c.account_id, now)
        ]
        return signature_header(secrets, c.message_id, timestamp, c.body)

    async def attempt(self, c: Claimed) -> Outcome:
        now = datetime.now(UTC)
        timestamp = int(now.timestamp())
        headers = message_headers(
            self._signature(c, timestamp, now), c.message_id, timestamp, USER_AGENT
        )
        if c.traceparent:  # the receiver may continue the call's trace
            headers["traceparent"] = c.traceparent
        # An endpoint's current URL: the account may have fixed it since the message was made.
        url = c.endpoint.url if c.endpoint is not None else c.url
        result = await post_message(self.session(), url, c.body, headers)
        decision = domain.decide(
            result.status_code,
            result.error_class,
            result.excerpt,
            result.retry_after,
            self.policy(c),
            c.attempts - c.retry_base,
            c.cycle_started_at,
            datetime.now(UTC),
            self.rng,
        )
        error_class = result.error_class or ("http_status" if not result.succeeded else "none")
        ATTEMPTS.labels(decision.status, error_class).inc()
        ATTEMPT_SECONDS.labels(decision.status).observe(result.latency_ms / 1000)
        if decision.status != "succeeded":
            log.warning(
                "webhook attempt failed",
                delivery_id=c.delivery_id,
                request_id=c.request_id,
                endpoint_id=c.endpoint_id,
                attempt=c.attempts,
                status_code=result.status_code,
                error_class=error_class,
                then=decision.status,
                retry_at=decision.retry_at.isoformat() if decision.retry_at else None,
            )
        return Outcome(c, url, result, decision)


class Dispatcher:
    """Keeps up to `8 x concurrency` messages claimed and `concurrency` of them in flight."""

    def __init__(
        self,
        queue: Queue,
        attempt: Callable[[Claimed], Coroutine[Any, Any, Outcome]],
        recorder: Recorder,
        *,
        concurrency: int,
        idle_poll_seconds: float = 0.2,
    ) -> None:
        self.queue, self.attempt, self.recorder = queue, attempt, recorder
        self.concurrency = concurrency
        self.max_outstanding = 8 * concurrency
        self.min_claim = max(1, concurrency // 4)
        self.idle_poll_seconds = idle_poll_seconds
        self.wake = asyncio.Event()
        self.outstanding = 0  # claimed, not yet recorded
        OUTSTANDING.set_function(lambda: self.outstanding)
        self._starved = False  # the last claim was cut short by room: rows may be waiting
        self._ready: asyncio.Queue[Claimed] = asyncio.Queue()
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []

    def room(self) -> int:
        """How many more claims this dispatcher takes now (none once it is stopping)."""
        return 0 if self._stopping else max(0, self.max_outstanding - self.outstanding)

    def hand_off(self, started: list[Claimed]) -> None:
        """Claims a committed consumer batch took itself (outcomes.py). Consumers stop before
        the dispatcher drains, so none arrives after: `drain` hands back what is unstarted."""
        self.outstanding += len(started)
        for c in started:
            self._ready.put_nowait(c)

    def _settled(self) -> None:
        self.outstanding -= 1
        self.wake.set()

    def _recorded(self, outcome: Outcome) -> None:
        self.outstanding -= 1
        # A claim that finds nothing costs a transaction: wake only when room came free for
        # rows left waiting, or the outcome may have made rows due (an endpoint's held
        # messages, an exhaustion announced). Other rows coming due are found by the poll.
        c = outcome.claimed
        if self._starved or c.endpoint_id is not None or outcome.decision.status == "exhausted":
            self.wake.set()

    async def _work(self) -> None:
        while True:
            claimed = await self._ready.get()
            if not self.queue.can_start(claimed):
                with contextlib.suppress(Exception):  # else its lease brings it back
                    await self.queue.release([claimed])
                self._settled()
                continue
            try:
                outcome = await self.attempt(claimed)
            except Exception as e:  # a bug, not the endpoint: its lease brings it back
                log.error("attempt crashed", error=repr(e), delivery_id=claimed.delivery_id)
                self._settled()
                continue
            self.recorder.submit(outcome, functools.partial(self._recorded, outcome))

    async def run(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"delivery-worker-{i}")
            for i in range(self.concurrency)
        ]
        last_reap = 0.0
        while not self._stopping:
            # Cleared before the claim: a wake-up while it runs (a commit it did not see) is kept.
            self.wake.clear()
            try:
                if time.monotonic() - last_reap > 1.0:
                    last_reap = time.monotonic()
                    await self.queue.reap()
                room = self.max_outstanding - self.outstanding
                claimed: list[Claimed] = []
                if room >= self.min_claim or (room > 0 and self.outstanding == 0):
                    claimed = await self.queue.claim(room)
                self._starved = len(claimed) >= room
            except DATABASE_ERRORS as e:
                log.warning("claiming failed", error=repr(e))
                await asyncio.sleep(1.0)
                continue
            except Exception:  # a bug must not stop delivery for good: log it, try again
                log.exception("claiming crashed")
                await asyncio.sleep(1.0)
                continue
            self.outstanding += len(claimed)
            for c in claimed:
                self._ready.put_nowait(c)
            if claimed:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.idle_poll_seconds)

    async def drain(self, timeout: float) -> None:
        """Stop claiming; hand back what no worker started, let the attempts in flight finish
        and be recorded (anything left is claimed again when its lease runs out)."""
        self._stopping = True
        self.wake.set()
        unstarted: list[Claimed] = []
        while not self._ready.empty():
            unstarted.append(self._ready.get_nowait())
        if unstarted:
            with contextlib.suppress(Exception):
                await self.queue.release(unstarted)
            self.outstanding -= len(unstarted)
        deadline = time.monotonic() + timeout
        while self.outstanding > 0 and time.monotonic() < deadline:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.1)
        for w in self._workers:
            w.cancel()

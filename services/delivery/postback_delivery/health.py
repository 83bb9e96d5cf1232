"""Endpoint health, free of I/O: how much work an endpoint may take now (rate limit, concurrency
cap, FIFO, circuit breaker) and how an attempt's outcome changes its health.

Every replica computes with the same rules on the same row (locked while it admits work), with
the database's clock, so the limits hold for the cluster, not per process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

Circuit = Literal["closed", "open", "half_open"]
BlockedFor = Literal["rate", "busy", "circuit", "retry_after"]


@dataclass(frozen=True)
class Limits:
    rate_per_second: float | None
    max_in_flight: int
    fifo: bool = False

    @property
    def cap(self) -> int:
        # Ordered delivery means one message at a time: the next waits for the previous.
        return 1 if self.fifo else self.max_in_flight


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    cooldown_seconds: float = 30.0
    max_cooldown_seconds: float = 900.0
    disable_after_seconds: float = 5 * 86400.0

    def cooldown(self, opened_count: int) -> float:
        """Doubles each time the circuit opens again without a success in between."""
        return min(
            self.max_cooldown_seconds, self.cooldown_seconds * 2.0 ** max(0, opened_count - 1)
        )


@dataclass(frozen=True)
class Health:
    tokens: float | None = None  # None: a full bucket
    tokens_at: datetime | None = None
    blocked_until: datetime | None = None
    blocked_for: BlockedFor | None = None
    circuit: Circuit = "closed"
    opened_count: int = 0
    consecutive_failures: int = 0
    failing_since: datetime | None = None
    last_success_at: datetime | None = None


def _seconds(d: timedelta) -> float:
    return max(0.0, d.total_seconds())


def admit(
    limits: Limits, health: Health, in_flight: int, wanted: int, now: datetime, lease: float
) -> tuple[int, Health]:
    """How many of `wanted` due messages may start now, and the endpoint's health after.

    `in_flight` counts the endpoint's attempts under a live lease, across every replica. When
    admission leaves the endpoint unable to take more, `blocked_until` says until when, so that
    claims skip its messages without locking them.
    """
    if wanted <= 0 or (health.blocked_until is not None and health.blocked_until > now):
        return 0, health
    room = max(0, limits.cap - in_flight)
    circuit = health.circuit
    if circuit != "closed":
        # Open with its cooldown over, or half-open with no probe in flight: one probe.
        room = min(room, 1) if in_flight == 0 else 0
    tokens = health.tokens
    if limits.rate_per_second is not None:
        rate = limits.rate_per_second
        burst = max(1.0, rate)  # one second's worth
        if tokens is None or health.tokens_at is None:
            tokens = burst
        else:
            # The clock may read a little behind the last writer's (transactions start in any
            # order): no refill then, so the limit errs on the safe side.
            tokens = min(burst, tokens + _seconds(now - health.tokens_at) * rate)
        room = min(room, math.floor(tokens))
    admitted = min(room, wanted)
    if limits.rate_per_second is not None and tokens is not None:
        tokens -= admitted
    blocked_until: datetime | None = None
    blocked_for: BlockedFor | None = None
    if circuit != "closed" and admitted:
        circuit = "half_open"
        # No second probe while this one may still be running; its outcome clears the block.
        blocked_until, blocked_for = now + timedelta(seconds=lease), "circuit"
    elif circuit != "closed":
        blocked_until, blocked_for = health.blocked_until, health.blocked_for
    elif limits.rate_per_second is not None and tokens is not None and tokens < 1:
        wait = (1 - tokens) / limits.rate_per_second
        blocked_until, blocked_for = now + timedelta(seconds=wait), "rate"
    elif in_flight + admitted >= limits.cap:
        # Until an attempt finishes (which clears this), or its lease runs out if the replica
        # running it died.
        blocked_until, blocked_for = now + timedelta(seconds=lease), "busy"
    after = replace(
        health,
        tokens=tokens if limits.rate_per_second is not None else None,
        tokens_at=now if limits.rate_per_second is not None else None,
        blocked_until=blocked_until,
        blocked_for=blocked_for,
        circuit=circuit,
    )
    return admitted, after


Result = Literal["succeeded", "failed", "gone"]


def after_attempt(
    health: Health,
    result: Result,
    now: datetime,
    policy: BreakerPolicy,
    retry_after: float | None = None,
) -> tuple[Health, str | None]:
    """The endpoint's health after one attempt's result, and why it must be disabled (or None).

    Any answer but 2xx counts as a failure of the endpoint. Consecutive failures open the
    circuit; while open nothing is sent until a single probe is due; a probe that succeeds
    closes it, one that fails opens it for twice as long. 410 Gone, or failing without a
    single success for `disable_after_seconds`, disables the endpoint.
    """
    unblock = health.blocked_for in ("busy", "circuit")
    if result == "succeeded":
        return replace(
            health,
            blocked_until=None if unblock else health.blocked_until,
            blocked_for=None if unblock else health.blocked_for,
            circuit="closed",
            opened_count=0,
            consecutive_failures=0,
            failing_since=None,
            last_success_at=now,
        ), None
    failing_since = health.failing_since or now
    failures = health.consecutive_failures + 1
    h = replace(
        health,
        consecutive_failures=failures,
        failing_since=failing_since,
        blocked_until=None if health.blocked_for == "busy" else health.blocked_until,
        blocked_for=None if health.blocked_for == "busy" else health.blocked_for,
    )
    if result == "gone":
        return h, "the endpoint answered 410 Gone"
    if _seconds(now - failing_since) >= policy.disable_after_seconds:
        since = failing_since.isoformat(timespec="seconds")
        return h, f"every attempt failed since {since}"
    if health.circuit == "half_open" or (
        health.circuit == "closed" and failures >= policy.failure_threshold
    ):
        opened = health.opened_count + 1
        h = replace(
            h,
            circuit="open",
            opened_count=opened,
            blocked_until=now + timedelta(seconds=policy.cooldown(opened)),
            blocked_for="circuit",
        )
    if retry_after is not None:
        until = now + timedelta(seconds=retry_after)
        if h.blocked_until is None or until > h.blocked_until:
            h = replace(h, blocked_until=until, blocked_for="retry_after")
    return h, None


def reset(health: Health) -> Health:
    """Health of an endpoint the account has just enabled again: a clean slate."""
    return Health(tokens=health.tokens, tokens_at=health.tokens_at)

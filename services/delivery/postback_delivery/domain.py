"""Delivery rules, free of I/O: the webhook body, the retry schedule and per-endpoint retry
policy, and what an answer means."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from postback_libs.outbound import retry_after_seconds
from postback_libs.settings import MAX_RETRY_DELAY_SECONDS


def webhook_body(event_type: str, at: datetime, data: dict[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": at.isoformat().replace("+00:00", "Z"), "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


def outcome_data(
    *,
    request_id: str,
    api: str,
    api_id: str | None = None,
    status: str,
    outcome: dict[str, Any] | None,
    cost: int | None,
) -> dict[str, Any]:
    """The `data` of a call-outcome webhook: `api` as the consumer named it, `api_id` once
    the API is known (not for a call naming no API)."""
    data: dict[str, Any] = {"request_id": request_id, "api": api, "status": status}
    if api_id is not None:
        data["api_id"] = api_id
    outcome = outcome or {}
    if status == "completed":
        data["result"] = outcome.get("result")
        data["content_type"] = outcome.get("content_type", "application/json")
    else:
        data["error"] = {
            k: outcome[k] for k in ("reason", "detail", "status_code", "deadline") if k in outcome
        }
    if cost is not None:
        data["cost"] = cost
    return data


Verdict = Literal["succeeded", "retry", "gone"]


def judge(status: int) -> Verdict:
    """Only 2xx is success; 410 means the endpoint is gone for good; anything else (3xx
    included: redirects are not followed) is retried."""
    if 200 <= status < 300:
        return "succeeded"
    if status == 410:
        return "gone"
    return "retry"


# Retry policy and the decision after an attempt ------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again: `schedule[i]` is the wait before attempt i+1 (attempt 1 is immediate);
    past its end the last step repeats while `max_attempts` and `window_seconds` allow."""

    schedule: tuple[float, ...]
    max_attempts: int | None = None
    window_seconds: float | None = None

    @property
    def attempt_limit(self) -> int | None:
        if self.max_attempts is not None:
            return self.max_attempts
        # A window alone keeps trying on the last step until the window closes.
        return None if self.window_seconds is not None else len(self.schedule)


def plan_retry(
    policy: RetryPolicy,
    attempts_made: int,
    cycle_started_at: datetime,
    now: datetime,
    rng: random.Random,
    retry_after: float | None = None,
) -> datetime | None:
    """When the next attempt is due, or None when the policy allows no more."""
    limit = policy.attempt_limit
    if (limit is not None and attempts_made >= limit) or not policy.schedule:
        return None
    step = policy.schedule[min(attempts_made, len(policy.schedule) - 1)]
    # Schedules are checked where they are set; one from an older event is held to the bounds.
    step = 0.0 if math.isnan(step) else min(max(step, 0.0), MAX_RETRY_DELAY_SECONDS)
    delay = step * rng.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    due = now + timedelta(seconds=delay)
    if policy.window_seconds is not None and due > cycle_started_at + timedelta(
        seconds=policy.window_seconds
    ):
        return None
    return due


Status = Literal["succeeded", "pending", "failed", "exhausted"]


@dataclass(frozen=True)
class Decision:
    status: Status
    verdict: Verdict
    retry_at: datetime | None = None
    error: str | None = None
    retry_after: float | None = None


def decide(
    status_code: int | None,
    error_class: str | None,
    excerpt: str,
    retry_after_header: str | None,
    policy: RetryPolicy,
    attempts_made: int,
    cycle_started_at: datetime,
    now: datetime,
    rng: random.Random,
) -> Decision:
    """What an attempt's answer means for its message: delivered, retried when, or given up."""
    verdict: Verdict = judge(status_code) if status_code is not None else "retry"
    if verdict == "succeeded":
        return Decision("succeeded", verdict)
    if status_code is not None:
        error = f"http_status: {status_code}"
    else:
        error = f"{error_class or 'other'}: {excerpt}"[:500]
    if verdict == "gone":
        return Decision("failed", verdict, error=error)
    retry_after = (
        retry_after_seconds(retry_after_header, now) if status_code in (429, 503) else None
    )
    due = plan_retry(policy, attempts_made, cycle_started_at, now, rng, retry_after)
    if due is None:
        return Decision("exhausted", verdict, error=error, retry_after=retry_after)
    return Decision("pending", verdict, retry_at=due, error=error, retry_after=retry_after)

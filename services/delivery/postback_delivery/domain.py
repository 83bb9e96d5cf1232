"""Delivery rules, free of I/O: the webhook body, the retry schedule, and what an answer means."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

MAX_RETRY_AFTER = 24 * 3600.0


def webhook_body(event_type: str, at: datetime, data: dict[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": at.isoformat().replace("+00:00", "Z"), "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


def outcome_data(
    *, request_id: str, api: str, status: str, outcome: dict[str, Any] | None, cost: int | None
) -> dict[str, Any]:
    """The `data` of a call-outcome webhook."""
    data: dict[str, Any] = {"request_id": request_id, "api": api, "status": status}
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


def next_delay(schedule: list[float], attempts_made: int, rng: random.Random) -> float | None:
    """Seconds until the next attempt after `attempts_made` attempts, ±20 % jitter; None when
    the schedule is exhausted. `schedule[i]` is the wait before attempt i+1."""
    if attempts_made >= len(schedule):
        return None
    return schedule[attempts_made] * rng.uniform(0.8, 1.2)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds (either form), bounded; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - now).total_seconds()
        except (TypeError, ValueError):
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


Verdict = Literal["succeeded", "retry", "gone"]


def judge(status: int) -> Verdict:
    """Only 2xx is success; 410 means the endpoint is gone for good; anything else (3xx
    included: redirects are not followed) is retried."""
    if 200 <= status < 300:
        return "succeeded"
    if status == 410:
        return "gone"
    return "retry"

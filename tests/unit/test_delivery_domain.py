"""Delivery rules: the webhook body, the retry schedule, and what the consumer's answer means."""

import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postback_delivery.domain import (
    RetryPolicy,
    judge,
    outcome_data,
    plan_retry,
    webhook_body,
)
from postback_libs.outbound import MAX_RETRY_AFTER, retry_after_seconds
from postback_libs.settings import MAX_RETRY_DELAY_SECONDS

pytestmark = pytest.mark.unit

NOW = datetime(2025, 7, 8, 9, 10, 11, tzinfo=UTC)
SCHEDULE = [5.0, 300.0, 1800.0, 7200.0]


# Body ---------------------------------------------------------------------------------------


def test_webhook_body_shape():
    raw = webhook_body("call.completed", NOW, {"request_id": "req_1", "n": [1]})
    assert json.loads(raw) == {
        "type": "call.completed",
        "timestamp": "2025-07-08T09:10:11Z",
        "data": {"request_id": "req_1", "n": [1]},
    }
    assert b" " not in raw  # compact: these are the exact bytes that get signed


def test_webhook_body_keeps_sub_second_precision():
    at = NOW + timedelta(microseconds=250_000)
    assert json.loads(webhook_body("t", at, {}))["timestamp"] == "2025-07-08T09:10:11.250000Z"


def test_webhook_body_is_deterministic():
    assert webhook_body("t", NOW, {"a": 1}) == webhook_body("t", NOW, {"a": 1})


def test_completed_outcome_carries_the_result():
    data = outcome_data(
        request_id="req_1",
        api="weather",
        status="completed",
        outcome={"result": {"t": 21}, "content_type": "application/json", "via": "response"},
        cost=120,
    )
    assert data == {
        "request_id": "req_1",
        "api": "weather",
        "status": "completed",
        "result": {"t": 21},
        "content_type": "application/json",
        "cost": 120,
    }


def test_completed_outcome_defaults():
    data = outcome_data(request_id="r", api="a", status="completed", outcome=None, cost=None)
    assert data == {
        "request_id": "r",
        "api": "a",
        "status": "completed",
        "result": None,
        "content_type": "application/json",
    }


def test_completed_text_result_keeps_its_content_type():
    data = outcome_data(
        request_id="r",
        api="a",
        status="completed",
        outcome={"result": "hi", "content_type": "text/plain"},
        cost=0,
    )
    assert data["result"] == "hi"
    assert data["content_type"] == "text/plain"
    assert data["cost"] == 0  # zero is a cost, not an absent one


@pytest.mark.parametrize(
    ("status", "outcome", "error"),
    [
        (
            "failed",
            {"reason": "owner_error", "status_code": 500, "detail": "boom", "request_id": "r"},
            {"reason": "owner_error", "status_code": 500, "detail": "boom"},
        ),
        (
            "timed_out",
            {"deadline": "2025-07-08T09:15:11Z", "request_id": "r"},
            {"deadline": "2025-07-08T09:15:11Z"},
        ),
        (
            "rejected",
            {"reason": "insufficient_funds", "detail": "costs 5", "stage": "settlement"},
            {"reason": "insufficient_funds", "detail": "costs 5"},
        ),
        ("failed", None, {}),
    ],
)
def test_unsuccessful_outcomes_carry_an_error(status, outcome, error):
    data = outcome_data(request_id="r", api="a", status=status, outcome=outcome, cost=None)
    assert data == {"request_id": "r", "api": "a", "status": status, "error": error}
    assert "result" not in data


def test_failed_outcome_with_refund_cost():
    data = outcome_data(
        request_id="r", api="a", status="failed", outcome={"reason": "owner_error"}, cost=0
    )
    assert data["cost"] == 0
    assert data["error"] == {"reason": "owner_error"}


# Retry schedule -----------------------------------------------------------------------------


def planned_delay(schedule: list[float], attempts_made: int, rng: random.Random) -> float | None:
    """Seconds until the attempt after `attempts_made`, as `plan_retry` plans it."""
    due = plan_retry(RetryPolicy(tuple(schedule)), attempts_made, NOW, NOW, rng)
    return None if due is None else (due - NOW).total_seconds()


def test_planned_delay_follows_the_schedule_with_jitter():
    rng = random.Random(7)
    for attempts_made, base in enumerate(SCHEDULE):
        delay = planned_delay(SCHEDULE, attempts_made, rng)
        assert delay is not None
        assert 0.8 * base <= delay <= 1.2 * base


def test_planned_delay_is_none_when_the_schedule_is_exhausted():
    rng = random.Random(1)
    assert planned_delay(SCHEDULE, len(SCHEDULE), rng) is None
    assert planned_delay(SCHEDULE, len(SCHEDULE) + 5, rng) is None
    assert planned_delay([], 0, rng) is None


def test_planned_delay_is_reproducible_with_a_seed():
    a = [planned_delay(SCHEDULE, i, random.Random(42)) for i in range(4)]
    b = [planned_delay(SCHEDULE, i, random.Random(42)) for i in range(4)]
    assert a == b


def test_planned_delay_jitters():
    rng = random.Random(3)
    delays = {planned_delay([100.0], 0, rng) for _ in range(200)}
    assert len(delays) > 100
    assert min(delays) < 90 < 110 < max(delays)  # spread over most of ±20 %
    assert all(80 <= d <= 120 for d in delays)


@given(
    schedule=st.lists(st.floats(min_value=0, max_value=1e6), max_size=10),
    attempts_made=st.integers(min_value=0, max_value=12),
    seed=st.integers(),
)
def test_planned_delay_property(schedule, attempts_made, seed):
    delay = planned_delay(schedule, attempts_made, random.Random(seed))
    if attempts_made >= len(schedule):
        assert delay is None
    else:
        base = min(schedule[attempts_made], MAX_RETRY_DELAY_SECONDS)
        assert delay is not None
        assert base * 0.8 - 1e-5 <= delay <= base * 1.2 + 1e-5


@pytest.mark.parametrize("step", [1e12, math.inf, -5.0, math.nan])
def test_a_step_out_of_bounds_is_held_to_them(step):
    """Schedules are checked where they are set; one from an older event must still give a
    time (a step of 1e12 s once raised, after the request had gone out)."""
    delay = planned_delay([step], 0, random.Random(1))
    assert delay is not None
    assert 0 <= delay <= 1.2 * MAX_RETRY_DELAY_SECONDS


# Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("86400", MAX_RETRY_AFTER),
        ("86401", MAX_RETRY_AFTER),
        ("99999999999", MAX_RETRY_AFTER),
        ("1e400", MAX_RETRY_AFTER),
        (None, None),
        ("", None),
        ("soon", None),
        ("120 seconds", None),
        ("Thu, 32 Foo 2025 99:99:99 GMT", None),
    ],
)
def test_retry_after_seconds(value, expected):
    assert retry_after_seconds(value, NOW) == expected


def test_retry_after_http_date():
    later = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert later.endswith("GMT")
    assert retry_after_seconds(later, NOW) == 90.0


def test_retry_after_http_date_in_the_past_is_zero():
    earlier = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert retry_after_seconds(earlier, NOW) == 0.0


def test_retry_after_http_date_far_ahead_is_bounded():
    far = format_datetime(NOW + timedelta(days=30), usegmt=True)
    assert retry_after_seconds(far, NOW) == MAX_RETRY_AFTER


def test_retry_after_date_with_an_offset():
    at = (NOW + timedelta(seconds=30)).astimezone(timezone(timedelta(hours=2)))
    assert retry_after_seconds(format_datetime(at), NOW) == 30.0


@given(value=st.text(max_size=40))
def test_retry_after_never_escapes_its_bounds(value):
    seconds = retry_after_seconds(value, NOW)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan"])
def test_retry_after_nan_is_unreadable(value):
    seconds = retry_after_seconds(value, NOW)
    assert seconds is None or not math.isnan(seconds)


# Verdicts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "succeeded"),
        (201, "succeeded"),
        (202, "succeeded"),
        (204, "succeeded"),
        (299, "succeeded"),
        (199, "retry"),
        (300, "retry"),
        (301, "retry"),
        (302, "retry"),
        (308, "retry"),
        (400, "retry"),
        (404, "retry"),
        (409, "retry"),
        (410, "gone"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_judge(status, verdict):
    assert judge(status) == verdict


@given(status=st.integers(min_value=100, max_value=599))
def test_only_2xx_succeeds(status):
    assert (judge(status) == "succeeded") == (200 <= status < 300)
    assert (judge(status) == "gone") == (status == 410)


def test_a_claim_that_waited_too_long_is_not_sent() -> None:
    """An attempt must end before its claim's lease does: else the row is due again elsewhere
    and the message could go out twice at once."""
    import dataclasses
    import time as _time

    from postback_delivery.store import Claimed, Queue
    from postback_libs.settings import Settings

    queue = Queue(None, Settings(delivery_timeout_seconds=15))
    fresh = Claimed(
        delivery_id="d",
        message_id="m",
        request_id=None,
        account_id="a",
        endpoint_id=None,
        url="http://127.0.0.1/",
        event_type="call.completed",
        body=b"{}",
        attempts=1,
        retry_base=0,
        cycle_started_at=datetime.now(UTC),
        claimed_at=_time.monotonic(),
    )
    assert queue.can_start(fresh)
    waited = dataclasses.replace(fresh, claimed_at=fresh.claimed_at - (queue.lease - 15))
    assert not queue.can_start(waited)  # waited the lease's whole headroom

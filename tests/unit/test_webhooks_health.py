"""Endpoint health: rate limit (token bucket), concurrency cap, FIFO, circuit breaker and
automatic disabling, as pure functions of the endpoint's row and the clock."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postback_delivery.health import BreakerPolicy, Health, Limits, admit, after_attempt, reset

pytestmark = pytest.mark.unit

T0 = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
LEASE = 20.0
POLICY = BreakerPolicy(
    failure_threshold=3, cooldown_seconds=10, max_cooldown_seconds=60, disable_after_seconds=3600
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_no_limits_admits_up_to_the_cap():
    n, h = admit(Limits(None, 32), Health(), in_flight=0, wanted=10, now=T0, lease=LEASE)
    assert n == 10
    assert h.blocked_until is None


def test_concurrency_cap_counts_attempts_in_flight_everywhere():
    n, h = admit(Limits(None, 5), Health(), in_flight=3, wanted=10, now=T0, lease=LEASE)
    assert n == 2
    # Full: blocked until an attempt finishes, or its lease runs out.
    assert (h.blocked_for, h.blocked_until) == ("busy", at(LEASE))
    done, _ = after_attempt(h, "succeeded", at(1), POLICY)
    assert done.blocked_until is None and done.blocked_for is None


def test_fifo_means_one_at_a_time():
    limits = Limits(None, 50, fifo=True)
    assert admit(limits, Health(), 0, 5, T0, LEASE)[0] == 1
    assert admit(limits, Health(), 1, 5, T0, LEASE)[0] == 0


def test_token_bucket_starts_full_then_refills_at_the_rate():
    limits = Limits(rate_per_second=4, max_in_flight=100)
    n, h = admit(limits, Health(), 0, 10, T0, LEASE)
    assert n == 4  # burst: one second's worth
    assert h.blocked_for == "rate"
    assert h.blocked_until == at(0.25)
    # Blocked until the next token.
    assert admit(limits, h, 0, 10, at(0.1), LEASE)[0] == 0
    n, h = admit(limits, h, 0, 10, at(0.5), LEASE)
    assert n == 2
    n, h = admit(limits, h, 0, 10, at(10), LEASE)
    assert n == 4  # never more than the burst, however long it waited


def test_a_clock_behind_the_last_writer_never_adds_tokens():
    limits = Limits(rate_per_second=2, max_in_flight=100)
    _, h = admit(limits, Health(), 0, 2, at(5), LEASE)
    assert admit(limits, h, 0, 5, at(4), LEASE)[0] == 0


@given(
    rate=st.integers(1, 50),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 80)), min_size=1, max_size=40),
)
def test_the_rate_limit_holds_over_any_window(rate, steps):
    """However claims interleave, admissions by time t never exceed burst + rate * t."""
    limits = Limits(rate_per_second=rate, max_in_flight=10_000)
    h, t, total = Health(), 0.0, 0
    for gap, wanted in steps:
        t += gap
        n, h = admit(limits, h, 0, wanted, at(t), LEASE)
        total += n
        assert total <= rate + rate * t + 1e-9


def test_circuit_opens_after_consecutive_failures_and_probes_later():
    h = Health()
    for i in range(2):
        h, why = after_attempt(h, "failed", at(i), POLICY)
        assert h.circuit == "closed" and why is None
    h, _ = after_attempt(h, "failed", at(2), POLICY)
    assert h.circuit == "open"
    assert (h.blocked_for, h.blocked_until) == ("circuit", at(12))
    assert admit(Limits(None, 10), h, 0, 5, at(5), LEASE)[0] == 0
    # Cooldown over: exactly one probe, and nothing else while it runs.
    n, h = admit(Limits(None, 10), h, 0, 5, at(12), LEASE)
    assert n == 1 and h.circuit == "half_open"
    assert admit(Limits(None, 10), h, 1, 5, at(13), LEASE)[0] == 0
    # The probe fails: open again, twice as long.
    h, _ = after_attempt(h, "failed", at(13), POLICY)
    assert h.circuit == "open" and h.blocked_until == at(33)
    n, h = admit(Limits(None, 10), h, 0, 5, at(33), LEASE)
    assert n == 1
    h, _ = after_attempt(h, "succeeded", at(34), POLICY)
    assert h.circuit == "closed" and h.consecutive_failures == 0 and h.blocked_until is None
    assert admit(Limits(None, 10), h, 0, 5, at(34), LEASE)[0] == 5


def test_cooldown_is_capped():
    assert POLICY.cooldown(1) == 10
    assert POLICY.cooldown(3) == 40
    assert POLICY.cooldown(10) == 60


def test_410_disables_at_once():
    _, why = after_attempt(Health(), "gone", T0, POLICY)
    assert why is not None and "410" in why


def test_continuous_failure_for_the_window_disables():
    h, why = after_attempt(Health(), "failed", T0, POLICY)
    assert why is None and h.failing_since == T0
    h, why = after_attempt(h, "failed", at(3599), POLICY)
    assert why is None
    h, why = after_attempt(h, "failed", at(3600), POLICY)
    assert why is not None and "since" in why
    # One success starts the clock again.
    h, _ = after_attempt(Health(failing_since=T0), "succeeded", at(3000), POLICY)
    h, why = after_attempt(h, "failed", at(3700), POLICY)
    assert why is None and h.failing_since == at(3700)


def test_retry_after_pauses_the_endpoint():
    h, _ = after_attempt(Health(), "failed", T0, POLICY, retry_after=30)
    assert (h.blocked_for, h.blocked_until) == ("retry_after", at(30))
    assert admit(Limits(None, 10), h, 0, 1, at(29), LEASE)[0] == 0
    assert admit(Limits(None, 10), h, 0, 1, at(30), LEASE)[0] == 1
    # A success elsewhere does not cut the pause the endpoint asked for.
    h2, _ = after_attempt(h, "succeeded", at(1), POLICY)
    assert h2.blocked_until == at(30)


def test_reset_keeps_only_the_bucket():
    h = Health(tokens=1.5, tokens_at=T0, circuit="open", consecutive_failures=9, failing_since=T0)
    assert reset(h) == Health(tokens=1.5, tokens_at=T0)

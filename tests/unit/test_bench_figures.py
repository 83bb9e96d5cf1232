"""How far up the offered rate the end-to-end latency target holds, read off the phases."""

from __future__ import annotations

import pytest

from bench.figures import p99_target_holds_up_to, targets

pytestmark = pytest.mark.unit


def phase(rate: float, p99: float, kept_up: bool = True) -> dict[str, object]:
    return {"offered_per_second": rate, "latency_ms": {"p99": p99}, "kept_up": kept_up}


def test_the_latency_target_holds_up_to_the_last_rate_before_the_first_miss() -> None:
    r = {
        "e2e": {
            "light": [phase(25, 210), phase(50, 380), phase(100, 1_160)],
            "latency": phase(200, 2_100),
        }
    }
    assert p99_target_holds_up_to(r) == 50


def test_a_rate_that_did_not_keep_up_ends_it_even_with_a_low_p99() -> None:
    r = {
        "e2e": {
            "light": [phase(25, 210), phase(50, 300, kept_up=False)],
            "latency": phase(200, 400),
        }
    }
    assert p99_target_holds_up_to(r) == 25


def test_the_latency_phase_counts_and_nothing_held_is_none() -> None:
    assert p99_target_holds_up_to({"e2e": {"latency": phase(200, 450)}}) == 200
    assert p99_target_holds_up_to({"e2e": {"light": [phase(25, 600)]}}) is None
    assert p99_target_holds_up_to({"e2e": {}}) is None


def test_the_p99_target_row_says_how_far_up_it_held_only_when_light_steps_ran() -> None:
    def row(e2e: dict[str, object]) -> str:
        measured: str = targets({"e2e": e2e})[1]["measured"]
        return measured

    latency = phase(200, 2_100)
    assert row({"latency": latency}) == "p99 2100 ms at 200 calls/s"
    assert row({"latency": latency, "light": [phase(25, 210)]}).endswith(
        "; p99 < 500 ms up to 25 calls/s"
    )
    assert row({"latency": latency, "light": [phase(25, 600)]}).endswith(
        "; p99 >= 500 ms at every rate measured"
    )

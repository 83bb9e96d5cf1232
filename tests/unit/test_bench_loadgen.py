"""A wrk run is read off the summary line its script writes, into the same figures as k6's."""

from __future__ import annotations

import pytest

from bench.loadgen import wrk_load

pytestmark = pytest.mark.unit

OUTPUT = """Running 8s test @ http://127.0.0.1:8080
  1 threads and 64 connections
  95885 requests in 8.01s, 31.18MB read
{"wrk_summary":{"requests":96000,"duration_us":8000000,"status_errors":1000,"socket_errors":\
24,"p50_us":5170,"p95_us":7400,"p99_us":12070,"max_us":31290}}
Requests/sec:  11971.80
"""


def test_only_answers_below_400_count_as_accepted() -> None:
    load = wrk_load(OUTPUT, connections=64)
    assert load.accepted == 95_000
    assert load.accepted_per_second == 11_875.0
    assert load.refused == 1_024  # status errors and requests that got no answer
    assert load.sent == 96_024
    assert load.offered_per_second is None  # closed loop
    assert (load.p50_ms, load.p95_ms, load.p99_ms, load.max_ms) == (5.17, 7.4, 12.07, 31.29)
    assert load.vus == 64


def test_output_without_the_summary_line_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no summary"):
        wrk_load("Running 8s test @ http://127.0.0.1:8080\n", connections=64)

"""The benchmark names each process of a run, so its CPU is charged to the right part."""

from __future__ import annotations

import pytest

from bench.machine import classify

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("cmdline", "part"),
    [
        (["/venv/bin/python", "-m", "postback", "run", "owner-adapter"], "owner-adapter"),
        (["/root/.calfkit/bin/tansu-v0.6.0-510f3e2", "broker"], "broker (tansu)"),
        (["/pg/bin/postgres", "-D", "/data"], "postgres (all backends)"),
        (["/usr/local/bin/k6", "run", "calls.js"], "k6 (load generator)"),
        (["/usr/bin/wrk", "--threads", "1", "http://127.0.0.1:8080"], "wrk (load generator)"),
    ],
)
def test_each_process_of_a_run_is_named(cmdline: list[str], part: str) -> None:
    named = classify(cmdline)
    assert named is not None
    assert named[0] == part


def test_a_process_outside_the_run_is_not_counted() -> None:
    assert classify(["/usr/bin/sshd", "-D"]) is None

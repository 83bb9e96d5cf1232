"""The benchmark harness runs every section end to end on tiny counts and writes a well-formed
report. Speed is never checked here: on a shared 2-core machine it says nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.infra import Infra
from bench.loadgen import wrk_binary
from bench.plan import TINY
from bench.report import write
from bench.run import Run
from postback.embedded import EmbeddedKafka, EmbeddedPostgres
from postback_libs.settings import SERVICES

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

SECTIONS = (
    "baselines",
    "ingress",
    "e2e",
    "growth",
    "delivery",
    "settlement",
    "projection",
    "resources",
    "ratios",
    "targets",
    "meta",
)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def numbers(d: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert is_number(d.get(key)), f"{key} = {d.get(key)!r} in {sorted(d)}"


def lost_zero(phase: dict[str, Any]) -> None:
    for key in ("accepted", "delivered", "lost", "duplicated"):
        assert is_number(phase[key]), key
    assert phase["lost"] == 0, phase


async def test_tiny_run_writes_a_complete_report(
    infra: tuple[EmbeddedPostgres, EmbeddedKafka], tmp_path: Path
) -> None:
    pg, kafka = infra
    harness = Infra(tmp_path / "bench", kafka.bootstrap, pg.dsn("postgres"))
    await harness.start()
    report = await Run(TINY, harness, tmp_path / "out", "test").run()
    json_path, md_path, png_path = write(report, tmp_path / "out", "test")

    r = json.loads(json_path.read_text())
    assert set(SECTIONS) <= set(r), sorted(r)
    # The sections this run owns must have run; delivery and settlement come from their own
    # modules and may be skipped, but then say so.
    for key in ("baselines", "ingress", "e2e", "growth", "projection"):
        assert "error" not in r[key], r[key]
    for key in ("delivery", "settlement"):
        assert r[key], key

    b = r["baselines"]
    numbers(b["kafka"], "produce_per_second", "consume_per_second")
    numbers(b["kafka_hop"], "p50_ms", "p99_ms")
    numbers(
        b["postgres"],
        "commit_per_row_rows_per_second",
        "commit_per_row_with_notify_rows_per_second",
        "batched_rows_per_second",
    )
    numbers(b["http_client"], "requests_per_second")

    ing = r["ingress"]
    assert len(ing["bare"]) == len(ing["ingress"]) == len(TINY.ingress_rates) + 1
    for row in ing["bare"] + ing["ingress"]:
        numbers(row, "accepted_per_second", "accepted", "p50_ms", "p95_ms", "p99_ms")
    numbers(ing["saturation"], "bare_per_second", "ingress_per_second", "ratio")
    generator = ing["saturation"]["load_generator"]
    assert generator == ("wrk" if wrk_binary() else "k6")
    for row in (ing["bare"][-1], ing["ingress"][-1]):
        assert row["load_generator"] == generator
        numbers(row, "server_cpu_ms_per_request", "load_generator_cpu_ms_per_request")

    e2e = r["e2e"]
    assert [x["offered_per_second"] for x in e2e["light"]] == list(TINY.light_rates)
    for phase in (e2e["latency"], e2e["sustained"], *e2e["ramp"], *e2e["light"]):
        lost_zero(phase)
        numbers(phase["latency_ms"], "p50", "p95", "p99")
        assert isinstance(phase["kept_up"], bool)
    lost_zero(e2e["capacity"])
    numbers(e2e["sustained"], "calls_per_second")
    assert e2e["busiest_service"] in SERVICES
    assert e2e["latency"]["hops"]["calls"] == e2e["latency"]["delivered"]
    drift = e2e["latency"]["cpu_first_and_last_fifth"]
    assert set(SERVICES) <= set(drift), sorted(drift)
    for service in SERVICES:
        numbers(drift[service], "first", "last")
    numbers(e2e["events_per_call"], "per_call")

    points = r["growth"]["points"]
    assert [p["instances"] for p in points] == list(TINY.growth_instances)
    for p in points:
        lost_zero(p)

    numbers(r["projection"], "events", "applied")
    assert r["projection"]["applied"] == r["projection"]["events"]
    rebuild = r["projection"]["rebuild"]
    assert "skipped" in rebuild or is_number(rebuild["events_per_second"]), rebuild

    usage = r["resources"]["e2e whole stack"]
    for service in SERVICES:
        numbers(usage[service], "cpu_seconds", "peak_rss_mb")

    for row in r["ratios"]:
        assert {"figure", "value", "baseline", "baseline_value", "ratio"} <= set(row)
    assert len(r["targets"]) == 8
    assert all(t["status"] in ("met", "not met", "n/a") for t in r["targets"])

    md = md_path.read_text()
    for heading in (
        "## Targets",
        "## Figures beside their baselines",
        "## 1. Ingress",
        "## 2. End to end",
        "## 3. Delivery",
        "## 4. Projection",
        "## 5. Settlement",
        "## 6. Baselines",
        "## 7. Resources",
        "## 8. Growth",
        "## Profiles",
        "in its first and its last fifth",
    ):
        assert heading in md, heading
    assert png_path is not None
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

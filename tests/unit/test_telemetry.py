"""A request's trace reaches the events it emits."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.trace import SpanKind

from postback_libs.telemetry import (
    TraceRequests,
    current_trace_ids,
    current_traceparent,
    span_from,
)

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(TraceRequests)

    @app.get("/emit")
    async def emit() -> dict[str, str | None]:
        return {"traceparent": current_traceparent()}

    return app


def test_a_request_continues_the_callers_trace() -> None:
    with TestClient(_app()) as client:
        got = client.get("/emit", headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    traceparent = got.json()["traceparent"]
    assert traceparent is not None
    assert traceparent.split("-")[1] == TRACE_ID


def test_a_request_without_a_trace_starts_its_own() -> None:
    with TestClient(_app()) as client:
        client.get("/emit", headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
        later = client.get("/emit").json()["traceparent"]
    version, trace_id, span_id, _flags = later.split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert trace_id != TRACE_ID  # the first request's trace ended with it


def test_log_lines_carry_the_trace_of_the_work_in_progress() -> None:
    assert current_trace_ids() is None
    with span_from(f"00-{TRACE_ID}-00f067aa0ba902b7-01", "work", SpanKind.CONSUMER):
        assert current_trace_ids() == (TRACE_ID, "00f067aa0ba902b7")
    assert current_trace_ids() is None


def test_a_token_in_the_query_string_stays_out_of_the_trace_store() -> None:
    """An owner may post its callback with `?token=`: FastAPI's spans would record it."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from postback_libs.http import App

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    app = App(telemetry={"tracer_provider": provider})

    @app.post("/v1/callbacks/{request_id}")
    async def callback(request_id: str) -> dict[str, str]:
        return {"request_id": request_id}

    with TestClient(app) as http:
        assert http.post("/v1/callbacks/req_1?token=SECRET-TOKEN").status_code == 200
        assert http.post("/v1/callbacks/req_2?page=2").status_code == 200
    recorded = [str(dict(s.attributes or {})) for s in exported.get_finished_spans()]
    assert any("page=2" in r for r in recorded)  # FastAPI's spans are recorded...
    assert not any("SECRET-TOKEN" in r for r in recorded)  # ...but not those with a token

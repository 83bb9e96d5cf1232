"""A request's trace reaches the events it emits."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from postback_libs.telemetry import TraceRequests, current_traceparent

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


def test_the_trace_ends_with_its_request() -> None:
    with TestClient(_app()) as client:
        client.get("/emit", headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
        later = client.get("/emit").json()["traceparent"]
    assert later is None or TRACE_ID not in later

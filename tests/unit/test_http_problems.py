"""Errors every service answers as problems (RFC 9457), whatever raised them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.unit


def test_a_database_away_for_a_moment_is_a_503_to_try_again() -> None:
    from postback_libs.http import App, install_problem_handlers

    app = App()
    install_problem_handlers(app)

    @app.get("/v1/calls")
    async def calls() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.get("/v1/calls")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["type"] == "urn:postback:problem:service-unavailable"

"""Input the system could not store or pass on is refused at ingress with a specific problem,
never a 500 and never a 202 for a call that would die downstream: NUL characters, lone
surrogates, JSON nested too deep, times the database cannot hold, forged cursors, bodies past
the limit. And the catalog shows where an API runs to its owner only."""

from __future__ import annotations

import base64
import json

from postback_ingress.app import build as ingress
from tests.helpers import OPERATOR, bearer, client, create_account, running

PROBLEM = "application/problem+json"


def refused(r, status: int, slug: str) -> None:
    assert (r.status_code, r.headers["content-type"]) == (status, PROBLEM), r.text
    assert r.json()["type"] == f"urn:postback:problem:{slug}"


async def test_what_cannot_be_stored_is_refused_at_the_door(settings):
    async with running(settings, ingress) as [svc], client(svc) as http:
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        r = await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "echo", "name": "Echo", "endpoint": "https://o.example/run"},
        )
        assert r.status_code == 201, r.text
        me = bearer(consumer)

        # Calls: 202 would mean a call that dead-letters downstream and never answers.
        for params in ({"x": "a\u0000b"}, {"a\u0000": 1}, {"x": "\ud800"}):
            body = json.dumps({"api": "echo", "params": params}).encode()
            refused(await http.post("/v1/calls", content=body, headers=me), 422, "validation-error")
        r = await http.post(
            "/v1/calls", json={"api": "echo", "params": {"x": [[[[]]]]}}, headers=me
        )
        assert r.status_code == 202, r.text  # nesting is fine, within reason
        deep = '{"api": "echo", "params": {"x": ' + "[" * 100 + "]" * 100 + "}}"
        refused(await http.post("/v1/calls", content=deep, headers=me), 422, "validation-error")
        seed = {"api_id_public": "echo", "method": "POST", "path": "/"}
        for params, status, slug in [
            ("[" * 5000 + "]" * 5000, 400, "invalid-json"),
            ('{"x": "\\ud800"}', 422, "validation-error"),
            ('{"x": NaN}', 400, "invalid-json"),
        ]:
            body = json.dumps(seed)[:-1] + ', "params": ' + params + "}"
            refused(await http.post("/internal/call", content=body, headers=me), status, slug)

        # Other bodies, paths and queries.
        r = await http.post(
            "/v1/accounts", json={"name": "a\u0000", "roles": ["consumer"]}, headers=OPERATOR
        )
        refused(r, 422, "validation-error")
        for path in ("/v1/apis/%00", "/v1/calls/%00", "/v1/apis?q=%00", "/v1/calls?status=%ff"):
            refused(await http.get(path, headers=me), 400, "invalid-characters")
        forged = base64.urlsafe_b64encode(
            json.dumps(["2025-01-01T00:00:00+00:00", "r\u0000"]).encode()
        )
        refused(
            await http.get(f"/v1/calls?cursor={forged.decode()}", headers=me), 400, "invalid-cursor"
        )
        refused(
            await http.get("/v1/calls", params={"since": "0001-01-01T00:00:00+14:00"}, headers=me),
            422,
            "validation-error",
        )
        r = await http.patch("/v1/apis/echo", json={"name": None}, headers=bearer(owner))
        refused(r, 422, "validation-error")
        r = await http.post(
            f"/v1/accounts/{consumer['account_id']}/credits",
            json={"amount": True},
            headers=OPERATOR,
        )
        refused(r, 422, "validation-error")
        r = await http.get("/v1/apis", headers={"traceparent": b"\xff\xfe"})
        assert r.status_code == 200
        r = await http.post("/v1/webhooks", content=b"x" * (settings.max_call_bytes + 1))
        refused(r, 413, "payload-too-large")

        # Where an API runs is its owner's to see.
        anyone = (await http.get("/v1/apis/echo")).json()
        assert "endpoint" not in anyone and "fee_bps" not in anyone
        assert "endpoint" not in (await http.get("/v1/apis")).json()["data"][0]
        assert "endpoint" not in (await http.get("/v1/apis/echo", headers=me)).json()
        mine = (await http.get("/v1/apis/echo", headers=bearer(owner))).json()
        assert mine["endpoint"] == "https://o.example/run"

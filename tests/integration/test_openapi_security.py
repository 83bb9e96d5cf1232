"""The OpenAPI document says how each route authenticates, and the running service agrees:
every route documented as needing a secret refuses a request without one, before it judges the
fields of the request's body (or finds that the body is not JSON at all), and refuses the other
kind of credential too; no public route refuses a request without one."""

from __future__ import annotations

import re

from postback_ingress.app import build as ingress
from tests.helpers import client, running

DEEP = b"[" * 100_000 + b"]" * 100_000


async def test_documented_security_matches_what_each_route_enforces(settings):
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        document = (await http.get("/openapi.json")).json()
        assert set(document["components"]["securitySchemes"]) == {
            "accountKey",
            "consumerKey",
            "operatorToken",
        }
        operator = {"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"}
        created = await http.post(
            "/v1/accounts", headers=operator, json={"name": "probe", "roles": ["consumer"]}
        )
        account = {"Authorization": f"Bearer {created.json()['secret']}"}
        checked = {"secured": 0, "public": 0, "unreadable bodies": 0}
        for path, operations in document["paths"].items():
            if not path.startswith(("/v1/", "/api/", "/internal/")):
                continue
            for method, operation in operations.items():
                if "requestBody" in operation and not operation.get("security"):
                    continue  # a body is validated first; public routes take none anyway
                url = re.sub(r"\{[^}]+\}", "x", path.replace("{mode}", "demo"))
                r = await http.request(method.upper(), url, json={})
                required = operation.get("security") and {} not in operation["security"]
                if required:
                    # Refused before its body (`{}`, invalid for most) is validated: no 422.
                    assert r.status_code == 401, (method, path, r.status_code)
                    # And the other kind of credential is no credential here.
                    schemes = {name for s in operation["security"] for name in s}
                    other = account if schemes == {"operatorToken"} else operator
                    r = await http.request(method.upper(), url, json={}, headers=other)
                    assert r.status_code == 401, (method, path, "other credential", r.status_code)
                    checked["secured"] += 1
                    if "requestBody" in operation:
                        # A body FastAPI cannot read at all: not JSON, not even UTF-8,
                        # nested past its parser's recursion limit.
                        for unreadable in (b'{"name": ', b"\xff\xfe", DEEP):
                            r = await http.request(
                                method.upper(),
                                url,
                                content=unreadable,
                                headers={"content-type": "application/json"},
                            )
                            assert r.status_code == 401, (method, path, unreadable, r.status_code)
                            checked["unreadable bodies"] += 1
                else:
                    assert r.status_code != 401, (method, path)
                    checked["public"] += 1
        assert checked["secured"] > 30 and checked["public"] >= 3, checked
        assert checked["unreadable bodies"] > 20, checked
        # With credentials, the same body is still judged: refused as what it is.
        r = await http.post(
            "/v1/webhooks",
            content=b'{"url": ',
            headers={**account, "content-type": "application/json"},
        )
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["message"] == "JSON decode error", r.json()
        r = await http.post(
            "/v1/webhooks",
            content=DEEP,
            headers={**account, "content-type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "urn:postback:problem:unreadable-body", r.json()

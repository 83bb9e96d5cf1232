"""The webhook endpoints API on ingress, with delivery and projection running: CRUD owned by
the account, problem+json errors with stable types, the test message, secret rotation, the
delivery history, resend and recover, and an endpoint disabled by delivery shown as such."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from aiohttp import web
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from postback_delivery.app import build as delivery
from postback_ingress.app import build as ingress
from postback_ingress.webhook_models import (
    EndpointPage,
    EndpointView,
    EndpointWithSecret,
    EventTypeList,
    Rotated,
    SentTestMessage,
)
from postback_libs.events import CallCompleted, CallSettled
from postback_libs.webhooks import verify_asymmetric
from postback_projection.app import build as projection
from tests.helpers import (
    HttpServer,
    TopicReader,
    bearer,
    client,
    create_account,
    events_of,
    eventually,
    publish,
    running,
)
from tests.integration.webhook_kit import now

PROBLEM = "application/problem+json"


def receiver(script):
    async def hook(request: web.Request) -> web.Response:
        return script()

    return HttpServer({"/hook": hook})


def problem(r, status: int, slug: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["type"] == f"urn:postback:problem:{slug}", body
    assert body["status"] == status
    return body


async def test_endpoint_crud_is_owned_by_the_account_and_errors_are_problems(settings):
    async with running(settings, ingress) as [svc]:
        http = client(svc)
        alice = await create_account(http, ["consumer"], "alice")
        bob = await create_account(http, ["consumer"], "bob")
        r = await http.post(
            "/v1/webhooks",
            headers=bearer(alice),
            json={
                "url": "https://hooks.example.com/in",
                "description": "orders",
                "event_types": ["call.*", "balance.low"],
                "rate_limit_per_second": 20,
                "max_in_flight": 4,
                "fifo": True,
                "retry_policy": {"schedule": [0, 10, 60], "max_attempts": 5},
                "metadata": {"team": "billing"},
            },
        )
        assert r.status_code == 201, r.text
        created = r.json()
        EndpointWithSecret.model_validate(created)  # the answer is what the document says
        ep = created["endpoint_id"]
        assert created["secret"].startswith("whsec_")
        assert created["event_types"] == ["call.*", "balance.low"]
        assert created["retry_policy"] == {
            "schedule": [0.0, 10.0, 60.0],
            "max_attempts": 5,
            "window_seconds": None,
        }
        assert created["fifo"] is True and created["enabled"] is True
        assert not {"max_attempts", "retry_window_seconds", "retry_schedule"} & set(created)

        got = (await http.get(f"/v1/webhooks/{ep}", headers=bearer(alice))).json()
        EndpointView.model_validate(got)
        assert "secret" not in got  # shown on creation and rotation only
        assert got["metadata"] == {"team": "billing"} and got["rate_limit_per_second"] == 20
        listed = (await http.get("/v1/webhooks", headers=bearer(alice))).json()
        EndpointPage.model_validate(listed)
        assert [e["endpoint_id"] for e in listed["data"]] == [ep]
        assert (await http.get("/v1/webhooks", headers=bearer(bob))).json()["data"] == []
        problem(
            await http.get(f"/v1/webhooks/{ep}", headers=bearer(bob)), 404, "endpoint-not-found"
        )

        r = await http.patch(
            f"/v1/webhooks/{ep}",
            headers=bearer(alice),
            json={"enabled": False, "rate_limit_per_second": None, "description": "paused"},
        )
        assert r.status_code == 200, r.text
        patched = r.json()
        EndpointView.model_validate(patched)
        assert patched["enabled"] is False and patched["rate_limit_per_second"] is None
        assert patched["description"] == "paused" and patched["fifo"] is True
        assert patched["revision"] == 2
        assert patched["updated_at"] > created["updated_at"]  # the answer's, not the row read
        # Only the limits and the retry policy can be cleared; nothing to change, no revision.
        for field in ("url", "event_types", "enabled", "fifo", "metadata", "description"):
            body = problem(
                await http.patch(f"/v1/webhooks/{ep}", headers=bearer(alice), json={field: None}),
                422,
                "validation-error",
            )
            assert f"{field} cannot be null" in json.dumps(body)
        r = await http.patch(f"/v1/webhooks/{ep}", headers=bearer(alice), json={})
        assert r.json()["revision"] == 2
        r = await http.patch(
            f"/v1/webhooks/{ep}",
            headers=bearer(alice),
            json={"event_types": ["call.completed", "call.failed", "call.completed"]},
        )
        assert r.json()["event_types"] == ["call.completed", "call.failed"]

        # Bad input: problem+json with a stable type.
        def create(**body):
            return http.post("/v1/webhooks", headers=bearer(alice), json=body)

        problem(await create(url="not a url"), 422, "validation-error")
        problem(await create(url="ftp://x.example/"), 422, "validation-error")
        problem(
            await create(url="https://x.example/", rate_limit_per_second=0), 422, "validation-error"
        )
        problem(await create(url="https://x.example/", colour="red"), 422, "validation-error")
        for schedule in ([1e12], [-1], []):  # a step of 1e12 s would never come due
            retry = {"schedule": schedule}
            problem(
                await create(url="https://x.example/", retry_policy=retry), 422, "validation-error"
            )
        body = problem(
            await create(url="https://x.example/", event_types=["call.complete"]),
            422,
            "unknown-event-type",
        )
        assert "call.complete" in body["detail"]
        problem(await create(url="https://10.0.0.1/hook"), 422, "url-not-allowed")
        problem(await create(url="https://[::ffff:169.254.169.254]/"), 422, "url-not-allowed")
        problem(
            await http.post("/v1/webhooks", json={"url": "https://x.example/"}), 401, "unauthorized"
        )
        problem(
            await http.patch(f"/v1/webhooks/{ep}", headers=bearer(alice), json={"event_types": []}),
            422,
            "validation-error",
        )
        # Times need an offset (RFC 3339): a naive one beside an aware one was a 500.
        for window in (
            {"since": "yesterday"},
            {"since": "2025-01-01T10:00:00"},
            {"since": "2025-01-01T10:00:00Z", "until": "2025-01-02T10:00:00"},
        ):
            problem(
                await http.post(f"/v1/webhooks/{ep}/recover", headers=bearer(alice), json=window),
                422,
                "validation-error",
            )
        problem(
            await http.get(
                f"/v1/webhooks/{ep}/attempts?before=2025-01-01T10:00:00", headers=bearer(alice)
            ),
            422,
            "validation-error",
        )
        types = (await http.get("/v1/webhooks/event-types", headers=bearer(alice))).json()
        EventTypeList.model_validate(types)
        assert {"call.completed", "balance.low", "endpoint.disabled"} <= {
            t["type"] for t in types["data"]
        }

        r = await http.delete(f"/v1/webhooks/{ep}", headers=bearer(alice))
        assert r.status_code == 204
        problem(
            await http.get(f"/v1/webhooks/{ep}", headers=bearer(alice)), 404, "endpoint-not-found"
        )
        problem(
            await http.delete(f"/v1/webhooks/{ep}", headers=bearer(alice)),
            404,
            "endpoint-not-found",
        )


async def test_test_message_rotation_and_attempt_log(settings):
    answers = [web.Response(status=200, text='{"ok":true}', headers={"X-Seen": "1"})]

    def script() -> web.Response:
        return answers.pop(0) if answers else web.Response(status=500, text="nope")

    async with receiver(script) as hooks, running(settings, ingress, projection) as [svc, _]:
        http = client(svc)
        alice = await create_account(http, ["consumer"], "alice")
        r = await http.post(
            "/v1/webhooks",
            headers=bearer(alice),
            json={"url": f"{hooks.url}/hook", "event_types": ["call.failed"]},
        )
        ep, secret = r.json()["endpoint_id"], r.json()["secret"]

        r = await http.post(f"/v1/webhooks/{ep}/test", headers=bearer(alice))
        assert r.status_code == 200, r.text
        outcome = r.json()
        SentTestMessage.model_validate(outcome)
        assert outcome["success"] is True and outcome["status_code"] == 200
        assert outcome["response_excerpt"] == '{"ok":true}'
        assert outcome["response_headers"]["X-Seen"] == "1"
        assert outcome["latency_ms"] > 0
        [(_, headers, body)] = hooks.received
        assert json.loads(body)["type"] == "webhook.test" and json.loads(body)["data"] == {}
        StandardWebhook(secret).verify(body, headers)
        SvixWebhook(secret).verify(body, headers)

        # Rotation: a new secret, and the old one keeps signing during the overlap.
        r = await http.post(
            f"/v1/webhooks/{ep}/rotate-secret", headers=bearer(alice), json={"overlap_seconds": 600}
        )
        assert r.status_code == 200, r.text
        rotated = r.json()
        Rotated.model_validate(rotated)
        assert rotated["secret"] != secret and rotated["secret_version"] == 2
        r = await http.post(f"/v1/webhooks/{ep}/test", headers=bearer(alice))
        assert r.json() | {"latency_ms": 0} == {
            "message_id": r.json()["message_id"],
            "success": False,
            "status_code": 500,
            "latency_ms": 0,
            "error_class": "http_status",
            "response_excerpt": "nope",
            "response_headers": r.json()["response_headers"],
        }
        _, headers, body = hooks.received[1]
        assert len(headers["webhook-signature"].split()) == 2
        StandardWebhook(secret).verify(body, headers)
        StandardWebhook(rotated["secret"]).verify(body, headers)
        got = (await http.get(f"/v1/webhooks/{ep}", headers=bearer(alice))).json()
        assert got["secret_version"] == 2 and got["secret_rotation_ends_at"]

        # Both tests are in the endpoint's attempt log, newest first (never retried).
        async def logged():
            r = await http.get(f"/v1/webhooks/{ep}/attempts", headers=bearer(alice))
            return r.json()["data"] if len(r.json()["data"]) == 2 else None

        newest, oldest = await eventually(logged, what="test attempts projected")
        assert (newest["status_code"], oldest["status_code"]) == (500, 200)
        assert newest["test"] and newest["attempt"] == 1
        assert oldest["response_headers"]["X-Seen"] == "1"
        await asyncio.sleep(0.5)
        assert len(hooks.received) == 2

        # A rotation with no overlap (a leaked secret) revokes every older secret at once,
        # the one still in its overlap from the rotation before included.
        r = await http.post(
            f"/v1/webhooks/{ep}/rotate-secret", headers=bearer(alice), json={"overlap_seconds": 0}
        )
        newest_secret = r.json()["secret"]
        await http.post(f"/v1/webhooks/{ep}/test", headers=bearer(alice))
        _, headers, body = hooks.received[2]
        assert len(headers["webhook-signature"].split()) == 1
        StandardWebhook(newest_secret).verify(body, headers)
        got = (await http.get(f"/v1/webhooks/{ep}", headers=bearer(alice))).json()
        assert got["secret_version"] == 3 and got["secret_rotation_ends_at"] is None

        # An unreachable endpoint: the answer says why.
        r = await http.patch(
            f"/v1/webhooks/{ep}", headers=bearer(alice), json={"url": "http://127.0.0.1:9/hook"}
        )
        outcome = (await http.post(f"/v1/webhooks/{ep}/test", headers=bearer(alice))).json()
        assert outcome["success"] is False and outcome["error_class"] == "connect"


async def test_asymmetric_endpoint_shows_a_public_key(settings):
    async with (
        receiver(lambda: web.Response(status=204)) as hooks,
        running(settings, ingress) as [svc],
    ):
        http = client(svc)
        alice = await create_account(http, ["consumer"], "alice")
        r = await http.post(
            "/v1/webhooks",
            headers=bearer(alice),
            json={"url": f"{hooks.url}/hook", "signing": "asymmetric"},
        )
        created = r.json()
        assert "secret" not in created and created["public_key"].startswith("whpk_")
        r = await http.post(f"/v1/webhooks/{created['endpoint_id']}/test", headers=bearer(alice))
        assert r.json()["success"] is True
        [(_, headers, body)] = hooks.received
        verify_asymmetric(created["public_key"], headers, body)


async def test_delivery_history_resend_recover_and_a_disabled_endpoint(settings):
    settings = settings.model_copy(
        update={"retry_schedule": "0,0.1", "circuit_failure_threshold": 100}
    )
    mode = {"status": 500}

    def script() -> web.Response:
        return web.Response(status=mode["status"], text=f"status {mode['status']}")

    async with (
        receiver(script) as hooks,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, ingress, delivery, projection) as [svc, deliv, _],
    ):
        http = client(svc)
        alice = await create_account(http, ["consumer"], "alice")
        r = await http.post(
            "/v1/webhooks",
            headers=bearer(alice),
            json={"url": f"{hooks.url}/hook", "event_types": ["call.completed"]},
        )
        ep = r.json()["endpoint_id"]
        await eventually(
            lambda: deliv.pool.fetchval("SELECT 1 FROM endpoints WHERE endpoint_id = $1", ep),
            what="delivery read the endpoint",
        )
        since = now() - timedelta(seconds=1)

        async def call() -> str:
            r = await http.post("/v1/calls", headers=bearer(alice), json={"api": "weather"})
            rid = r.json()["request_id"]
            # The rest of the call's story, after the request itself (as routing, the owner
            # and settlement would add it).
            await events_of(calls, "call.requested", rid)
            await publish(
                settings,
                CallCompleted(request_id=rid, via="response", result={"t": 1}),
                CallSettled(
                    request_id=rid, consumer_id=alice["account_id"], owner_id="o", amount=3, fee=0
                ),
            )
            return rid

        first, second = await call(), await call()

        async def deliveries_of(rid: str, status: str) -> list | None:
            r = await http.get(f"/v1/calls/{rid}/deliveries", headers=bearer(alice))
            data = r.json()["data"]
            return data if data and all(d["status"] == status for d in data) else None

        [d1] = await eventually(lambda: deliveries_of(first, "exhausted"), what="exhausted")
        assert d1["endpoint_id"] == ep and d1["attempt_count"] == 2
        assert [a["status_code"] for a in d1["attempts"]] == [500, 500]
        assert d1["attempts"][0]["response_excerpt"] == "status 500"
        await eventually(lambda: deliveries_of(second, "exhausted"), what="both exhausted")
        dead = (
            await http.get(f"/v1/webhooks/{ep}/deliveries?status=exhausted", headers=bearer(alice))
        ).json()["data"]
        assert {d["request_id"] for d in dead} == {first, second}
        problem(
            await http.get(
                f"/v1/calls/{first}/deliveries",
                headers=bearer(await create_account(http, ["consumer"], "bob")),
            ),
            404,
            "call-not-found",
        )

        # Fixed: resend one, recover the rest since a time.
        mode["status"] = 200
        r = await http.post(f"/v1/deliveries/{d1['delivery_id']}/resend", headers=bearer(alice))
        assert r.status_code == 202, r.text
        [done] = await eventually(lambda: deliveries_of(first, "succeeded"), what="resent")
        assert done["attempt_count"] == 3
        r = await http.post(
            f"/v1/webhooks/{ep}/recover", headers=bearer(alice), json={"since": since.isoformat()}
        )
        assert r.status_code == 202, r.text
        await eventually(lambda: deliveries_of(second, "succeeded"), what="recovered")
        detail = (
            await http.get(f"/v1/deliveries/{done['delivery_id']}", headers=bearer(alice))
        ).json()
        assert [a["status_code"] for a in detail["attempts"]] == [500, 500, 200]
        problem(
            await http.post("/v1/deliveries/dlv_nope/resend", headers=bearer(alice)),
            404,
            "delivery-not-found",
        )
        # Past the retention its body is gone: nothing to send again.
        await svc.pool.execute(
            "UPDATE projection.deliveries SET updated_at = now() - interval '31 days'"
            " WHERE delivery_id = $1",
            done["delivery_id"],
        )
        problem(
            await http.post(f"/v1/deliveries/{done['delivery_id']}/resend", headers=bearer(alice)),
            410,
            "message-expired",
        )

        # 410: delivery disables it, ingress shows it; enabling it again lets messages flow.
        mode["status"] = 410
        third = await call()
        await eventually(lambda: deliveries_of(third, "failed"), what="410 failed")

        async def disabled():
            got = (await http.get(f"/v1/webhooks/{ep}", headers=bearer(alice))).json()
            return got if got["enabled"] is False else None

        got = await eventually(disabled, what="endpoint disabled")
        assert "410" in got["disabled_reason"]
        problem(
            await http.post(
                f"/v1/webhooks/{ep}/recover",
                headers=bearer(alice),
                json={"since": since.isoformat()},
            ),
            409,
            "endpoint-disabled",
        )
        mode["status"] = 200
        r = await http.patch(f"/v1/webhooks/{ep}", headers=bearer(alice), json={"enabled": True})
        assert r.json()["enabled"] is True and r.json()["disabled_reason"] is None
        r = await http.post(
            f"/v1/webhooks/{ep}/recover", headers=bearer(alice), json={"since": since.isoformat()}
        )
        assert r.status_code == 202
        await eventually(lambda: deliveries_of(third, "succeeded"), what="delivered after fix")

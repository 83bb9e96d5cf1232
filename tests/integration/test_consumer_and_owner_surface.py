"""Accounts, catalog, routing refusals, limits and the seed-compatible entry points, through the
real services over the real broker and Postgres."""

from __future__ import annotations

import asyncio
import json

import httpx
import requests

from postback_ingress.app import build as ingress
from postback_libs.events import CALLS, CallRequested
from postback_projection.app import build as projection
from postback_routing.app import build as routing
from postback_settlement.app import build as settlement
from tests.helpers import (
    EVERY_SERVICE,
    OPERATOR,
    TopicReader,
    bearer,
    client,
    create_account,
    eventually,
    owner_server,
    publish,
    receiver,
    running,
)


async def register(http, owner, slug, endpoint, **extra):
    r = await http.post(
        "/v1/apis",
        headers=bearer(owner),
        json={"slug": slug, "name": slug, "endpoint": endpoint, **extra},
    )
    assert r.status_code == 201, r.text
    return r.json()["api"]


async def test_key_rotation_keeps_the_old_secret_for_the_overlap_only(settings):
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        account = await create_account(http, ["consumer"])
        r = await http.post("/v1/accounts/me/keys/rotate", headers=bearer(account))
        assert r.status_code == 200, r.text
        rotated = r.json()
        assert rotated["secret"] != account["secret"]
        for secret in (account["secret"], rotated["secret"]):
            me = await http.get("/v1/accounts/me", headers={"X-Consumer-Key": secret})
            assert me.status_code == 200
        # Rotating again ends the first secret's grace: only one previous key is kept.
        again = (await http.post("/v1/accounts/me/keys/rotate", headers=bearer(rotated))).json()
        old = await http.get("/v1/accounts/me", headers=bearer(account))
        assert old.status_code == 401
        assert old.headers["content-type"] == "application/problem+json"
        assert (await http.get("/v1/accounts/me", headers=bearer(rotated))).status_code == 200
        assert (await http.get("/v1/accounts/me", headers=bearer(again))).status_code == 200


async def test_rotation_without_overlap_revokes_at_once(settings):
    settings = settings.model_copy(update={"key_rotation_overlap_seconds": 0})
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        account = await create_account(http, ["consumer"])
        rotated = (await http.post("/v1/accounts/me/keys/rotate", headers=bearer(account))).json()
        assert (await http.get("/v1/accounts/me", headers=bearer(account))).status_code == 401
        assert (await http.get("/v1/accounts/me", headers=bearer(rotated))).status_code == 200


async def test_accounts_topic_carries_hashes_never_secrets(settings):
    async with (
        TopicReader(settings, "postback.accounts") as topic,
        running(settings, ingress) as (svc,),
    ):
        http = client(svc)
        account = await create_account(http, ["consumer", "owner"])
        await http.post("/v1/accounts/me/keys/rotate", headers=bearer(account))
        await eventually(lambda: len(topic.raw) >= 2, what="account events")
        raw = b"".join(r.value for r in topic.raw)
        assert account["secret"].encode() not in raw
        assert account["secret"].split("_")[-1].encode() not in raw
        assert {e.type for e in topic.events} == {"account.created", "account.key_rotated"}


async def test_catalog_update_retire_and_search(settings):
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        owner = await create_account(http, ["owner"])
        other = await create_account(http, ["owner"])
        await register(
            http,
            owner,
            "weather",
            "https://o.example/w",
            tags=["climate"],
            description="Forecasts for any city, hourly.",
        )
        await register(
            http,
            owner,
            "geocode",
            "https://o.example/g",
            tags=["maps"],
            description="Addresses to coordinates.",
        )
        await register(
            http,
            other,
            "reports",
            "https://o.example/r",
            description="Sales reports as PDF, weather permitting.",
        )
        found = (await http.get("/v1/apis", params={"q": "weather"})).json()["data"]
        assert [a["slug"] for a in found] == ["weather", "reports"]  # name outranks text
        assert [
            a["slug"] for a in (await http.get("/v1/apis", params={"tag": "maps"})).json()["data"]
        ] == ["geocode"]
        page1 = (await http.get("/v1/apis", params={"limit": 2})).json()
        page2 = (
            await http.get("/v1/apis", params={"limit": 2, "cursor": page1["next_cursor"]})
        ).json()
        assert "next_cursor" not in page2
        slugs = [a["slug"] for a in page1["data"] + page2["data"]]
        assert sorted(slugs) == ["geocode", "reports", "weather"]
        bad = await http.get("/v1/apis", params={"cursor": "nonsense"})
        assert bad.status_code == 400
        assert bad.json()["type"] == "urn:postback:problem:invalid-cursor"

        r = await http.patch("/v1/apis/weather", headers=bearer(owner), json={"price": 5})
        assert r.status_code == 200
        assert r.json()["price"] == 5
        assert r.json()["version"] == 2
        r = await http.patch("/v1/apis/weather", headers=bearer(other), json={"price": 0})
        assert r.status_code == 403
        r = await http.patch("/v1/apis/weather", headers=bearer(owner), json={"slug": "geocode"})
        assert r.status_code == 409
        assert r.json()["type"] == "urn:postback:problem:slug-taken"
        r = await http.patch("/v1/apis/weather", headers=bearer(owner), json={"price": -1})
        assert r.status_code == 422
        # A renamed API keeps its old slug: another owner taking it would get its calls.
        r = await http.patch("/v1/apis/geocode", headers=bearer(owner), json={"slug": "geo-2"})
        assert r.status_code == 200, r.text
        r = await http.post(
            "/v1/apis",
            headers=bearer(other),
            json={"slug": "geocode", "name": "g", "endpoint": "https://x.example/"},
        )
        assert r.status_code == 409
        assert r.json()["type"] == "urn:postback:problem:slug-taken"
        r = await http.patch("/v1/apis/geo-2", headers=bearer(owner), json={"slug": "geocode"})
        assert r.status_code == 200, r.text  # its own, back again
        # Settings that could never work are refused when made, not found out from calls.
        for bad in (
            {"endpoint": "http://169.254.169.254/latest"},
            {"endpoints": ["http://10.0.0.1/x"]},
            {"path_prefixes": ["v1"]},
        ):
            r = await http.patch("/v1/apis/weather", headers=bearer(owner), json=bad)
            assert r.status_code == 422, bad
        # The platform's fee is the operator's to set, never the owner's.
        r = await http.patch("/v1/apis/weather", headers=bearer(owner), json={"fee_bps": 0})
        assert r.status_code == 422
        r = await http.put("/v1/apis/weather/fee", headers=bearer(owner), json={"fee_bps": 0})
        assert r.status_code == 401
        r = await http.put("/v1/apis/weather/fee", headers=OPERATOR, json={"fee_bps": 250})
        assert r.status_code == 200 and r.json()["fee_bps"] == 250
        mine = (await http.get("/v1/apis/weather", headers=bearer(owner))).json()
        assert mine["fee_bps"] == 250 and mine["version"] == 3
        r = await http.delete("/v1/apis/weather", headers=bearer(owner))
        assert r.json()["status"] == "retired"
        assert (await http.get("/v1/apis/weather")).json()["status"] == "retired"
        assert "weather" not in [a["slug"] for a in (await http.get("/v1/apis")).json()["data"]]


async def test_every_refusal_reaches_the_consumers_webhook(settings):
    async with (
        owner_server() as owner_http,
        receiver() as hooks,
        running(settings, *EVERY_SERVICE) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        await register(
            http,
            owner,
            "strict",
            f"{owner_http.url}/sync",
            methods=["POST"],
            path_prefixes=["/v1/"],
            max_request_bytes=100,
            price=5,
        )
        await register(http, owner, "old", f"{owner_http.url}/sync")
        await http.delete("/v1/apis/old", headers=bearer(owner))
        hook = f"{hooks.url}/hook"
        cases = {
            "unknown_api": {"api": "nope"},
            "api_retired": {"api": "old"},
            "mode_not_available": {"api": "strict", "mode": "demo"},
            "method_not_allowed": {"api": "strict", "method": "GET", "path": "/v1/x"},
            "path_not_allowed": {"api": "strict", "path": "/admin"},
            "payload_too_large": {"api": "strict", "path": "/v1/x", "params": {"x": "y" * 200}},
            "price_above_max": {"api": "strict", "path": "/v1/x", "max_price": 4},
        }
        for bad in (-1, "4", 1.5):
            r = await http.post(
                "/v1/calls", headers=bearer(consumer), json={"api": "strict", "max_price": bad}
            )
            assert r.status_code == 422, (bad, r.text)
        sent = {}
        for reason, body in cases.items():
            r = await http.post(
                "/v1/calls", headers=bearer(consumer), json={**body, "webhook_url": hook}
            )
            assert r.status_code == 202, r.text
            sent[r.json()["request_id"]] = reason
        await eventually(lambda: len(hooks.received) >= len(sent), what="refusal webhooks")
        for _, _, body in hooks.received:
            payload = json.loads(body)
            assert payload["type"] == "call.rejected"
            assert payload["data"]["error"]["reason"] == sent[payload["data"]["request_id"]]


async def test_suspended_accounts_are_refused_at_the_door_and_by_routing(settings):
    async with (
        TopicReader(settings, CALLS.name) as calls,
        running(settings, ingress, routing) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        await register(http, owner, "svc", "https://o.example/")
        r = await http.post(
            f"/v1/accounts/{consumer['account_id']}/suspend",
            headers=OPERATOR,
            json={"reason": "unpaid"},
        )
        assert r.json()["status"] == "suspended"
        r = await http.post("/v1/calls", headers=bearer(consumer), json={"api": "svc"})
        assert r.status_code == 403
        assert r.json()["type"] == "urn:postback:problem:account-suspended"
        # A call accepted just before the suspension is refused by routing, once routing has
        # read the suspension from the accounts topic (a moment later, on a busy machine).
        race = iter(range(1000))

        async def refused_by_routing() -> bool:
            rid = f"req_race_{next(race)}"
            await publish(
                settings,
                CallRequested(request_id=rid, consumer_id=consumer["account_id"], api="svc"),
            )
            [decided] = await eventually(
                lambda: calls.of_type("call.rejected", rid) or calls.of_type("call.routed", rid)
            )
            return decided.data.get("reason") == "account_suspended"

        await eventually(refused_by_routing, every=0.2, what="routing refuses the suspended")
        await http.post(f"/v1/accounts/{consumer['account_id']}/reinstate", headers=OPERATOR)
        r = await http.post("/v1/calls", headers=bearer(consumer), json={"api": "svc"})
        assert r.status_code == 202

        # A suspended owner sells nothing and changes nothing in the catalog.
        await http.post(
            f"/v1/accounts/{owner['account_id']}/suspend", headers=OPERATOR, json={"reason": "x"}
        )
        r = await http.patch("/v1/apis/svc", headers=bearer(owner), json={"price": 1})
        assert r.json()["type"] == "urn:postback:problem:account-suspended"
        r = await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "svc-2", "name": "s", "endpoint": "https://o.example/"},
        )
        assert r.json()["type"] == "urn:postback:problem:account-suspended"

        async def owner_refused() -> bool:
            r = await http.post("/v1/calls", headers=bearer(consumer), json={"api": "svc"})
            rid = r.json()["request_id"]
            [decided] = await eventually(
                lambda: calls.of_type("call.rejected", rid) or calls.of_type("call.routed", rid)
            )
            return decided.data.get("reason") == "owner_suspended"

        await eventually(owner_refused, every=0.2, what="routing refuses the owner's API")


async def test_rate_limit_and_quota_hold_across_two_routing_replicas(settings):
    async with (
        TopicReader(settings, CALLS.name) as calls,
        running(settings, ingress, routing, routing) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        # Practically no refill: exactly `burst` calls pass, whatever the timing.
        await register(
            http,
            owner,
            "limited",
            "https://o.example/",
            rate_limit_per_second=0.0001,
            rate_limit_burst=5,
        )
        await register(http, owner, "quota", "https://o.example/", quota_per_day=3)

        async def fire(api, n):
            rs = await asyncio.gather(
                *[
                    http.post("/v1/calls", headers=bearer(consumer), json={"api": api})
                    for _ in range(n)
                ]
            )
            return {r.json()["request_id"] for r in rs}

        limited, quota = await fire("limited", 30), await fire("quota", 12)

        def outcomes(ids):
            done = [
                e
                for e in calls.events
                if e.subject in ids and e.type in ("call.routed", "call.rejected")
            ]
            return done if len(done) == len(ids) else None

        limited_out = await eventually(lambda: outcomes(limited), what="limited calls routed")
        quota_out = await eventually(lambda: outcomes(quota), what="quota calls routed")
        assert sum(e.type == "call.routed" for e in limited_out) == 5
        assert {e.data.get("reason") for e in limited_out if e.type == "call.rejected"} == {
            "rate_limited"
        }
        assert sum(e.type == "call.routed" for e in quota_out) == 3
        assert {e.data.get("reason") for e in quota_out if e.type == "call.rejected"} == {
            "quota_exceeded"
        }


async def test_seed_compatible_entry_points_with_plain_clients(settings):
    async with (
        owner_server() as owner_http,
        receiver() as hooks,
        running(settings, *EVERY_SERVICE) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        api = await register(http, owner, "report-gen", f"{owner_http.url}/sync")
        base, secret, hook = svcs[0].http_url, consumer["secret"], f"{hooks.url}/hook"

        def internal_call():  # as the product's documentation shows it, with requests
            return requests.post(
                f"{base}/internal/call",
                headers={"Authorization": f"Bearer {secret}"},
                json={
                    "api_id_public": api["api_id"],
                    "method": "POST",
                    "path": "/",
                    "params": {"action": "sales", "format": "pdf", "webhook_url": hook},
                },
                timeout=10,
            )

        r = await asyncio.to_thread(internal_call)
        assert r.status_code == 202, r.text
        first = r.json()["result"]["requestId"]

        with httpx.Client() as plain:  # the other documented shape, with httpx
            r = await asyncio.to_thread(
                plain.post,
                f"{base}/api/demo/api/report-gen",
                headers={"X-Consumer-Key": secret},
                json={"action": "sales", "format": "pdf", "webhook_url": hook},
            )
        assert r.status_code == 202, r.text
        second = r.json()["requestId"]
        await eventually(lambda: len(hooks.received) >= 2, what="both webhooks")
        by_id = {json.loads(b)["data"]["request_id"]: json.loads(b) for _, _, b in hooks.received}
        assert by_id[first]["type"] == "call.completed"
        # The owner saw its webhook_url rewritten to Postback's callback, token included.
        forwarded = json.loads(owner_http.received[0][2])
        assert forwarded["action"] == "sales"
        assert forwarded["webhook_url"].startswith(settings.callback_url.rsplit(":", 1)[0])
        assert "/v1/callbacks/" in forwarded["webhook_url"]
        assert "token=" in forwarded["webhook_url"]

        # Where the consumer's webhooks go is not the owner's to read, among params either.
        async def seen_by_owner() -> dict:
            view = (await http.get(f"/v1/calls/{first}", headers=bearer(owner))).json()
            return view if view["status"] == "delivered" else {}

        owners_view = await eventually(seen_by_owner, what="the call in the read model")
        assert hook not in json.dumps(owners_view)
        consumers = await http.get(f"/v1/calls/{first}", headers={"X-Consumer-Key": secret})
        assert hook in json.dumps(consumers.json())
        # The demo call has no demo endpoint on this API.
        assert by_id[second]["type"] == "call.rejected"
        assert by_id[second]["data"]["error"]["reason"] == "mode_not_available"
        bad = await asyncio.to_thread(
            requests.post,
            f"{base}/internal/call",
            headers={"Authorization": f"Bearer {secret}"},
            data="not json",
            timeout=10,
        )
        assert bad.status_code == 400
        assert bad.headers["content-type"] == "application/problem+json"


async def test_only_the_current_key_rotates_and_a_leak_is_revoked_at_once(settings):
    """Whoever holds a leaked previous key must not rotate the account's new key away."""
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        account = await create_account(http, ["consumer"])
        rotated = (await http.post("/v1/accounts/me/keys/rotate", headers=bearer(account))).json()
        r = await http.post("/v1/accounts/me/keys/rotate", headers=bearer(account))
        assert r.status_code == 403
        assert r.json()["type"] == "urn:postback:problem:current-key-required"
        # The previous key still works for reading, until the owner revokes it.
        assert (await http.get("/v1/accounts/me", headers=bearer(account))).status_code == 200
        r = await http.post(
            "/v1/accounts/me/keys/rotate", headers=bearer(rotated), json={"overlap_seconds": 0}
        )
        latest = r.json()
        for old in (account, rotated):
            assert (await http.get("/v1/accounts/me", headers=bearer(old))).status_code == 401
        assert (await http.get("/v1/accounts/me", headers=bearer(latest))).status_code == 200


async def test_the_operator_finds_accounts_and_their_balances(settings):
    async with running(settings, ingress, settlement, projection) as (svc, *_):
        http = client(svc)
        made = [await create_account(http, ["consumer"], f"c{i}") for i in range(3)]
        owner = await create_account(http, ["owner"], "o")
        await http.post(f"/v1/accounts/{owner['account_id']}/suspend", headers=OPERATOR, json={})
        r = await http.post(
            f"/v1/accounts/{made[0]['account_id']}/credits", headers=OPERATOR, json={"amount": 70}
        )
        assert r.status_code == 202

        async def credited():
            r = await http.get(f"/v1/accounts/{made[0]['account_id']}", headers=OPERATOR)
            return r.json()["balances"].get("consumer", {}).get("balance") == 70

        await eventually(credited, what="the credit in the operator's view")
        one = (await http.get(f"/v1/accounts/{owner['account_id']}", headers=OPERATOR)).json()
        assert (one["name"], one["roles"], one["status"]) == ("o", ["owner"], "suspended")

        # Oldest first, two at a time, filtered; the pages together are every match.
        seen, cursor = [], None
        while True:
            params = {"role": "consumer", "limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await http.get("/v1/accounts", headers=OPERATOR, params=params)).json()
            seen += [a["account_id"] for a in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [a["account_id"] for a in made]
        suspended = await http.get("/v1/accounts", headers=OPERATOR, params={"status": "suspended"})
        assert [a["account_id"] for a in suspended.json()["data"]] == [owner["account_id"]]

        assert (await http.get("/v1/accounts", headers=bearer(made[1]))).status_code == 401
        missing = await http.get("/v1/accounts/acc_none", headers=OPERATOR)
        assert missing.status_code == 404
        assert missing.json()["type"] == "urn:postback:problem:account-not-found"
        bad = await http.get("/v1/accounts", headers=OPERATOR, params={"cursor": "zz"})
        assert bad.status_code == 400

"""Money through the public API, over the real broker and Postgres: operator corrections as
transfers (refused, visibly, when they would take an account below zero), statements paged with
a cursor, and owners' earnings per API."""

from __future__ import annotations

import asyncio

from postback_ingress.app import build as ingress
from postback_libs.events import CallCompleted, CallFailed
from postback_projection.app import build as projection
from postback_settlement.app import build as settlement
from tests.helpers import (
    OPERATOR,
    TopicReader,
    bearer,
    call_routed,
    client,
    create_account,
    events_of,
    eventually,
    publish,
    running,
)

UPSTREAM = "http://127.0.0.1:9/api"


async def balance(http, account, role="consumer") -> tuple[int, int]:
    r = await http.get("/v1/accounts/me", headers=bearer(account))
    b = r.json()["balances"].get(role, {})
    return b.get("balance", 0), b.get("reserved", 0)


async def credit(http, account, amount: int) -> None:
    r = await http.post(
        f"/v1/accounts/{account['account_id']}/credits", json={"amount": amount}, headers=OPERATOR
    )
    assert r.status_code == 202, r.text


async def corrections(http, account) -> list[dict]:
    r = await http.get(f"/v1/accounts/{account['account_id']}/corrections", headers=OPERATOR)
    assert r.status_code == 200, r.text
    data: list[dict] = r.json()["data"]
    return data


async def test_corrections_are_transfers_and_never_push_an_account_below_zero(settings):
    async with (
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, ingress, settlement, projection) as [ing, _, _],
    ):
        http = client(ing)
        consumer = await create_account(http, ["consumer"], "c")
        cid = consumer["account_id"]
        await credit(http, consumer, 100)
        await eventually(lambda: _is(balance(http, consumer), (100, 0)), what="credit")

        r = await http.post(
            f"/v1/accounts/{cid}/corrections",
            json={"amount": -30, "note": "double charge on invoice 7"},
            headers=OPERATOR,
        )
        assert r.status_code == 202, r.text
        taken = r.json()
        assert taken["status"] == "requested" and taken["amount"] == -30
        await eventually(lambda: _is(balance(http, consumer), (70, 0)), what="correction")
        [applied] = await events_of(ledger, "account.corrected")
        assert applied.data["correction_id"] == taken["correction_id"]
        assert applied.data["debit_account"] == f"consumer:{cid}"
        assert applied.data["credit_account"] == "operator:funding"
        assert applied.data["balance"] == 70

        r = await http.post(
            f"/v1/accounts/{cid}/corrections", json={"amount": -71}, headers=OPERATOR
        )
        assert r.status_code == 202
        refused_id = r.json()["correction_id"]
        [refused] = await events_of(ledger, "correction.refused")
        assert refused.data["correction_id"] == refused_id
        assert refused.data["reason"] == "insufficient_funds"
        assert refused.data["available"] == 70

        r = await http.post(f"/v1/accounts/{cid}/corrections", json={"amount": 5}, headers=OPERATOR)
        assert r.status_code == 202
        await eventually(lambda: _is(balance(http, consumer), (75, 0)), what="positive correction")

        async def decided() -> list[dict]:
            rows = await corrections(http, consumer)
            return rows if all(c["status"] != "requested" for c in rows) and len(rows) == 3 else []

        rows = await eventually(decided, what="corrections visible with their outcome")
        by_id = {c["correction_id"]: c for c in rows}
        assert by_id[taken["correction_id"]]["status"] == "applied"
        assert by_id[taken["correction_id"]]["note"] == "double charge on invoice 7"
        assert (
            by_id[taken["correction_id"]]["transfer_id"] == f"correction:{taken['correction_id']}"
        )
        assert by_id[refused_id]["status"] == "refused"
        assert by_id[refused_id]["reason"] == "insufficient_funds"
        assert "70" in by_id[refused_id]["detail"]

        # Refused at the door: zero, not the operator, no such account, no such balance.
        bad = [
            (f"/v1/accounts/{cid}/corrections", {"amount": 0}, OPERATOR, 422),
            (f"/v1/accounts/{cid}/corrections", {"amount": 1}, bearer(consumer), 401),
            ("/v1/accounts/acc_nobody/corrections", {"amount": 1}, OPERATOR, 404),
            (f"/v1/accounts/{cid}/corrections", {"amount": 1, "role": "owner"}, OPERATOR, 422),
            # Past any real amount: the ledger's running totals must stay within 64 bits.
            (f"/v1/accounts/{cid}/corrections", {"amount": -(10**16)}, OPERATOR, 422),
            (f"/v1/accounts/{cid}/credits", {"amount": 2**63}, OPERATOR, 422),
        ]
        for path, body, headers, status in bad:
            r = await http.post(path, json=body, headers=headers)
            assert r.status_code == status, (path, body, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")


async def test_statements_page_through_every_transfer_and_owners_see_earnings_per_api(settings):
    async with (
        TopicReader(settings, "postback.calls") as calls,
        running(settings, ingress, settlement, projection) as [ing, _, _],
    ):
        http = client(ing)
        consumer = await create_account(http, ["consumer"], "c")
        owner = await create_account(http, ["owner"], "o")
        # Both roles: calling its own API moves money between two of its own balances.
        both = await create_account(http, ["consumer", "owner"], "both")
        await credit(http, consumer, 1000)
        await credit(http, both, 100)
        await eventually(lambda: _is(balance(http, consumer), (1000, 0)), what="credit")
        await eventually(lambda: _is(balance(http, both), (100, 0)), what="credit")

        cid, oid, bid = consumer["account_id"], owner["account_id"], both["account_id"]
        weather = [
            call_routed(UPSTREAM, consumer_id=cid, owner_id=oid, api_id="api_weather", price=100)
            for _ in range(3)
        ]
        maps = [
            call_routed(UPSTREAM, consumer_id=cid, owner_id=oid, api_id="api_maps", price=40)
            for _ in range(2)
        ]
        own = call_routed(
            UPSTREAM, consumer_id=bid, owner_id=bid, api_id="api_own", price=20, fee_bps=0
        )
        await publish(settings, *weather, *maps, own)
        for r in [*weather, *maps, own]:
            await events_of(calls, "call.authorized", r.request_id)
        await publish(
            settings,
            *(CallCompleted(request_id=r.request_id, via="response") for r in weather[:2]),
            CallFailed(request_id=weather[2].request_id, reason="owner_error"),
            CallCompleted(request_id=maps[0].request_id, via="response"),
            CallCompleted(request_id=own.request_id, via="response"),
        )
        # maps[1] stays in flight: held, not earned.
        await eventually(lambda: _is(balance(http, consumer), (1000 - 240, 40)), what="settled")
        await eventually(lambda: _is(balance(http, both, "owner"), (20, 0)), what="own call")

        # The consumer's statement, three entries a page.
        entries, cursor, pages = [], None, 0
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            r = await http.get("/v1/accounts/me/transfers", params=params, headers=bearer(consumer))
            assert r.status_code == 200, r.text
            page = r.json()
            entries += page["data"]
            pages += 1
            cursor = page.get("next_cursor")
            if not cursor:
                break
        # 1 credit + 5 calls x 2 legs reserved + 3 captured x 2 + 1 released x 2.
        assert len(entries) == 1 + 10 + 6 + 2
        assert pages == 7
        ids = [e["transfer_id"] for e in entries]
        assert len(set(ids)) == len(ids)
        times = [e["at"] for e in entries]
        assert times == sorted(times, reverse=True)
        assert {e["account"] for e in entries} == {f"consumer:{cid}"}
        by_kind: dict[str, int] = {}
        for e in entries:
            by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + e["amount"]
        assert by_kind == {"single": 1000, "pending": -380, "post": -240, "void": -100}
        captured = [e for e in entries if e["kind"] == "post"]
        assert {e["api_id"] for e in captured} == {"api_weather", "api_maps"}
        assert {e["counterparty"] for e in captured} == {f"owner:{oid}", "platform:fee"}

        # An account on both sides of one transfer sees it once per side, across pages too.
        seen = []
        cursor = None
        while True:
            params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
            r = await http.get("/v1/accounts/me/transfers", params=params, headers=bearer(both))
            seen += r.json()["data"]
            cursor = r.json().get("next_cursor")
            if not cursor:
                break
        sides = {(e["transfer_id"], e["side"]) for e in seen}
        assert len(sides) == len(seen) == 1 + 2 + 2  # credit; own call reserved and posted
        assert (f"{own.request_id}:post:owner", "debit") in sides
        assert (f"{own.request_id}:post:owner", "credit") in sides
        r = await http.get(
            "/v1/accounts/me/transfers", params={"role": "owner"}, headers=bearer(both)
        )
        assert {e["account"] for e in r.json()["data"]} == {f"owner:{bid}"}

        # The owner's earnings, per API, after the 10 % fee.
        r = await http.get("/v1/accounts/me/earnings", headers=bearer(owner))
        assert r.status_code == 200, r.text
        earnings = r.json()
        assert earnings["owner_account"] == f"owner:{oid}"
        per_api = {e["api_id"]: (e["earned"], e["calls"], e["pending"]) for e in earnings["data"]}
        assert per_api == {"api_weather": (180, 2, 0), "api_maps": (36, 1, 36)}
        assert (earnings["total_earned"], earnings["total_pending"]) == (216, 36)

        r = await http.get("/v1/accounts/me/earnings", headers=bearer(consumer))
        assert r.status_code == 403
        r = await http.get(
            "/v1/accounts/me/transfers", params={"cursor": "not-a-cursor"}, headers=bearer(consumer)
        )
        assert r.status_code == 400


async def _is(value, expected) -> bool:
    return await value == expected


async def test_an_operator_request_sent_twice_with_its_key_moves_money_once(settings):
    """A credit or a correction retried after a timeout, or sent twice at once, is one."""
    async with running(settings, ingress, settlement, projection) as [svc, *_]:
        http = client(svc)
        consumer = await create_account(http, ["consumer"])
        owner = await create_account(http, ["owner"])
        path = f"/v1/accounts/{consumer['account_id']}"
        once = {**OPERATOR, "Idempotency-Key": "invoice-77"}
        answers = await asyncio.gather(
            *(http.post(f"{path}/credits", json={"amount": 500}, headers=once) for _ in range(3))
        )
        assert {r.status_code for r in answers} == {202}
        assert len({r.json()["credit_id"] for r in answers}) == 1
        again = await http.post(f"{path}/credits", json={"amount": 500}, headers=once)
        assert again.json()["credit_id"] == answers[0].json()["credit_id"]
        other = await http.post(f"{path}/credits", json={"amount": 900}, headers=once)
        assert other.status_code == 422
        assert other.json()["type"] == "urn:postback:problem:idempotency-key-reused"
        fix = {**OPERATOR, "Idempotency-Key": "fix-1"}
        for _ in range(2):
            r = await http.post(
                f"{path}/corrections", json={"role": "consumer", "amount": -100}, headers=fix
            )
            assert r.status_code == 202, r.text
        await eventually(lambda: _settled_at(http, consumer, 400), what="one credit, one fix")
        await asyncio.sleep(1)  # a second credit or correction would show by now
        assert await balance(http, consumer) == (400, 0)
        # An owner has no consumer balance: a credit would be money nobody can use.
        r = await http.post(
            f"/v1/accounts/{owner['account_id']}/credits", json={"amount": 5}, headers=OPERATOR
        )
        assert r.status_code == 422
        assert r.json()["type"] == "urn:postback:problem:role-required"


async def _settled_at(http, account, amount: int) -> bool:
    return await balance(http, account) == (amount, 0)

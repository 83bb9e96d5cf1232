"""Reading calls back: status resource, history with filters and pages, who may see what, and
the example consumer other teams start from."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.helpers import (
    EVERY_SERVICE,
    bearer,
    client,
    create_account,
    eventually,
    owner_server,
    receiver,
    running,
)

ROOT = Path(__file__).resolve().parents[2]


async def test_calls_are_visible_to_their_consumer_and_owner_only(settings):
    async with (
        owner_server() as owner_http,
        receiver() as hooks,
        running(settings, *EVERY_SERVICE) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        stranger = await create_account(http, ["owner", "consumer"])
        alice = await create_account(http, ["consumer"])
        bob = await create_account(http, ["consumer"])
        r = await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "echo", "name": "echo", "endpoint": f"{owner_http.url}/sync"},
        )
        assert r.status_code == 201
        ids = {}
        for who, n in ((alice, 3), (bob, 2)):
            for i in range(n):
                r = await http.post(
                    "/v1/calls",
                    headers=bearer(who),
                    json={"api": "echo", "params": {"i": i}, "webhook_url": f"{hooks.url}/hook"},
                )
                ids.setdefault(who["account_id"], []).append(r.json()["request_id"])
        r = await http.post("/v1/calls", headers=bearer(alice), json={"api": "missing"})
        failed = r.json()["request_id"]

        async def settled():
            r = await http.get("/v1/calls", headers=bearer(owner), params={"role": "owner"})
            refused = (await http.get(f"/v1/calls/{failed}", headers=bearer(alice))).json()
            return (
                len(r.json()["data"]) == 5
                and all(c["status"] == "delivered" for c in r.json()["data"])
                and refused["outcome"] == "rejected"
            )

        await eventually(settled, timeout=30, what="all calls delivered or rejected")
        alice_id = ids[alice["account_id"]][0]
        assert (await http.get(f"/v1/calls/{alice_id}", headers=bearer(alice))).status_code == 200
        assert (await http.get(f"/v1/calls/{alice_id}", headers=bearer(owner))).status_code == 200
        for outsider in (bob, stranger):
            r = await http.get(f"/v1/calls/{alice_id}", headers=bearer(outsider))
            assert r.status_code == 404
            assert r.json()["type"] == "urn:postback:problem:call-not-found"
        mine = (await http.get("/v1/calls", headers=bearer(alice))).json()["data"]
        assert {c["request_id"] for c in mine} == {*ids[alice["account_id"]], failed}
        assert not (
            await http.get("/v1/calls", headers=bearer(stranger), params={"role": "owner"})
        ).json()["data"]

        page1 = (await http.get("/v1/calls", headers=bearer(alice), params={"limit": 2})).json()
        page2 = (
            await http.get(
                "/v1/calls",
                headers=bearer(alice),
                params={"limit": 2, "cursor": page1["next_cursor"]},
            )
        ).json()
        seen = [c["request_id"] for c in page1["data"] + page2["data"]]
        assert len(seen) == len(set(seen)) == 4
        view = (await http.get(f"/v1/calls/{failed}", headers=bearer(alice))).json()
        assert view["outcome"] == "rejected"
        same_status = (
            await http.get("/v1/calls", headers=bearer(alice), params={"status": view["status"]})
        ).json()["data"]
        assert failed in [c["request_id"] for c in same_status]
        assert all(c["status"] == view["status"] for c in same_status)
        # What came of a call, whatever happened to it since (a rejected call is delivered).
        rejected = (
            await http.get("/v1/calls", headers=bearer(alice), params={"outcome": "rejected"})
        ).json()["data"]
        assert [c["request_id"] for c in rejected] == [failed]
        for bad in ({"status": "bogus"}, {"outcome": "delivered"}):
            r = await http.get("/v1/calls", headers=bearer(alice), params=bad)
            assert r.status_code == 422, bad
        view = (await http.get(f"/v1/calls/{failed}", headers=bearer(alice))).json()
        assert view["outcome"] == "rejected"
        assert view["error"]["type"] == "urn:postback:problem:call-unknown-api"
        done = await http.get(f"/v1/calls/{alice_id}", headers=bearer(alice))
        assert "Retry-After" not in done.headers
        assert done.json()["result"] == {"echo": {"i": 0}, "via": "sync"}


async def test_example_consumer_validates_and_prints_the_calls_topic(settings):
    async with owner_server() as owner_http, running(settings, *EVERY_SERVICE) as svcs:
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "echo", "name": "echo", "endpoint": f"{owner_http.url}/sync"},
        )
        r = await http.post("/v1/calls", headers=bearer(consumer), json={"api": "echo"})
        rid = r.json()["request_id"]
        await eventually(lambda: _status(http, consumer, rid), timeout=30, what="settled")
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                str(ROOT / "examples" / "consume_calls.py"),
                "--bootstrap",
                settings.kafka_bootstrap,
                "--topic",
                settings.topic("postback.calls"),
                "--limit",
                "6",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert any(f"{rid}  call.requested" in line for line in lines)
        assert any(f"{rid}  call.settled cost=0" in line for line in lines)
        assert "INVALID" not in proc.stdout


async def _status(http, consumer, rid):
    r = await http.get(f"/v1/calls/{rid}", headers=bearer(consumer))
    return r.json()["status"] in ("settled", "delivered")

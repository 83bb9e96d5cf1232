"""The read model is disposable: replaying the topics into a fresh schema and swapping it in
gives the same state, while the live projection keeps running."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from postback_libs.events import CallRequested, new_event
from postback_libs.outbox import new_producer
from postback_libs.topics import ensure_topics
from postback_projection.app import purge_old_bodies
from postback_projection.rebuild import IncompleteHistory, Replay, rebuild
from tests.helpers import (
    EVERY_SERVICE,
    OPERATOR,
    bearer,
    client,
    create_account,
    eventually,
    owner_server,
    receiver,
    running,
)


async def checksums(dsn: str) -> dict[str, tuple[int, str]]:
    """(rows, md5) per read-model table; columns stamped with now() are left out."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'projection'"
                " AND table_type = 'BASE TABLE'"
                " AND table_name NOT IN"
                " ('schema_migrations', 'outbox', 'inbox', 'applied_positions')"
            )
        ]
        out = {}
        for table in tables:
            stamped = [
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                    " 'projection' AND table_name = $1 AND column_default LIKE 'now()%'",
                    table,
                )
            ]
            minus = "".join(f" - '{c}'" for c in stamped)
            out[table] = tuple(
                await conn.fetchrow(
                    f"SELECT count(*), md5(coalesce(string_agg(j::text, '|' ORDER BY j::text), ''))"
                    f" FROM (SELECT to_jsonb(t){minus} AS j FROM projection.{table} t) x"
                )
            )
        return out
    finally:
        await conn.close()


async def indexes(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT indexdef FROM pg_indexes WHERE schemaname = 'projection'")
        return {r["indexdef"] for r in rows}
    finally:
        await conn.close()


async def stable_checksums(dsn: str) -> dict[str, tuple[int, str]]:
    """Checksums once the system has gone quiet (two readings a second apart agree)."""
    previous = await checksums(dsn)
    for _ in range(30):
        await asyncio.sleep(1)
        current = await checksums(dsn)
        if current == previous:
            return current
        previous = current
    raise AssertionError("the read model never went quiet")


async def test_rebuilt_read_model_equals_the_live_one(settings):
    async with (
        owner_server() as owner_http,
        receiver([500]) as hooks,
        running(settings, *EVERY_SERVICE) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "echo", "name": "echo", "price": 3, "endpoint": f"{owner_http.url}/sync"},
        )
        await http.post(
            f"/v1/accounts/{consumer['account_id']}/credits", headers=OPERATOR, json={"amount": 100}
        )
        ids = []
        for i in range(12):
            r = await http.post(
                "/v1/calls",
                headers=bearer(consumer),
                json={
                    "api": "echo" if i % 4 else "missing",
                    "params": {"i": i},
                    "webhook_url": f"{hooks.url}/hook",
                },
            )
            ids.append(r.json()["request_id"])

        async def all_delivered():
            for rid in ids:
                r = await http.get(f"/v1/calls/{rid}", headers=bearer(consumer))
                if r.json()["status"] != "delivered":
                    return False
            return True

        await eventually(all_delivered, timeout=60, what="every call delivered")
        before = await stable_checksums(settings.database_url)
        assert before["calls"][0] == 12
        assert before["call_events"][0] > 12 * 4

        indexes_before = await indexes(settings.database_url)
        lines = []
        result = await rebuild(settings, lambda applied, total: lines.append((applied, total)))
        assert result["events"] >= before["call_events"][0]
        assert lines[-1][0] == result["events"]
        assert await checksums(settings.database_url) == before
        # Indexes the replay went without are built again before the swap.
        assert await indexes(settings.database_url) == indexes_before
        assert any("calls_by_consumer" in d for d in indexes_before)
        # The live projection keeps working on the swapped-in tables.
        r = await http.post(
            "/v1/calls",
            headers=bearer(consumer),
            json={"api": "echo", "webhook_url": f"{hooks.url}/hook"},
        )
        after_id = r.json()["request_id"]
        await eventually(
            lambda: _delivered(http, consumer, after_id), timeout=30, what="a call after rebuild"
        )
        view = (await http.get(f"/v1/calls/{ids[1]}", headers=bearer(consumer))).json()
        assert view["result"] == {"echo": {"i": 1}, "via": "sync"}

        # A broker that lost its log starts again at offset zero, so no offset tells: the
        # read model holding calls the topics do not is what refuses the rebuild.
        lost = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}lost."})
        await ensure_topics(lost)
        kept = await stable_checksums(settings.database_url)
        with pytest.raises(IncompleteHistory, match="the topics hold 0 calls, the read model 13"):
            await rebuild(lost, lambda applied, total: None)
        assert await checksums(settings.database_url) == kept


async def _delivered(http, consumer, rid):
    return (await http.get(f"/v1/calls/{rid}", headers=bearer(consumer))).json()["status"] == (
        "delivered"
    )


async def test_retention_purges_results_but_keeps_status(settings):
    async with owner_server() as owner_http, running(settings, *EVERY_SERVICE) as svcs:
        http = client(svcs[0])
        owner = await create_account(http, ["owner"])
        consumer = await create_account(http, ["consumer"])
        await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "echo", "name": "echo", "endpoint": f"{owner_http.url}/sync"},
        )
        rid = (
            await http.post(
                "/v1/calls", headers=bearer(consumer), json={"api": "echo", "params": {"secret": 1}}
            )
        ).json()["request_id"]

        async def settled():
            view = (await http.get(f"/v1/calls/{rid}", headers=bearer(consumer))).json()
            return view if view["status"] == "settled" else None

        assert (await eventually(settled, what="settled"))["result"] is not None
        conn = await asyncpg.connect(
            settings.database_url, server_settings={"search_path": "projection"}
        )
        try:
            await purge_old_bodies(conn, datetime.now(UTC) - timedelta(days=1))
            assert (await settled())["result"] is not None  # too young to purge
            await purge_old_bodies(conn, datetime.now(UTC) + timedelta(seconds=1))
        finally:
            await conn.close()
        view = await settled()
        assert view["result"] is None
        assert view["outcome"] == "completed"
        completed = [s for s in view["timeline"] if s["type"] == "call.completed"]
        assert "result" not in completed[0]["data"]


async def _publish(settings, *events_data) -> None:
    producer = new_producer(settings)
    await producer.start()
    try:
        for data in events_data:
            e = new_event(data, source="test")
            await producer.send_and_wait(
                settings.topic(data.topic.name),
                value=e.to_bytes(),
                key=e.subject.encode(),
                headers=[("ce_type", e.type.encode())],
            )
    finally:
        await producer.stop()


async def test_events_arriving_while_the_rebuild_swaps_are_in_the_swapped_tables(
    settings, monkeypatch
):
    """The rebuild holds the swap lock while it applies what arrived during the replay; its
    own batches must not wait for that lock (they would wait for ever)."""
    request = CallRequested(request_id="req_early", consumer_id="acc_c", api="echo")
    await _publish(settings, request)
    until_end = Replay.until_end
    calls = 0

    async def publish_during_the_swap(self, progress, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:  # the catch-up under the lock (after the replay and the indexes')
            await _publish(settings, request.model_copy(update={"request_id": "req_late"}))
        await until_end(self, progress, **kwargs)

    monkeypatch.setattr(Replay, "until_end", publish_during_the_swap)
    result = await asyncio.wait_for(rebuild(settings, lambda *_: None), timeout=60)

    assert calls == 3
    assert result["events"] == 2
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT request_id, status FROM projection.calls ORDER BY 1")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("req_early", "accepted"), ("req_late", "accepted")]

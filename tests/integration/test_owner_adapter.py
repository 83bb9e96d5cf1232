"""Owner-adapter against the real broker, Postgres and real owner HTTP servers: it forwards each
authorized call, turns the owner's response or callback into the call's outcome, retries owner
errors, and times calls out at their deadline, even one that passed while it was down."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import aiohttp
import asyncpg
import httpx
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from postback.embedded import free_port
from postback_libs.events import CallAuthorized
from postback_libs.signing import derive_secret
from postback_owner_adapter.app import OWNER_REQUESTS
from postback_owner_adapter.app import build as owner_adapter
from postback_owner_adapter.domain import callback_token
from postback_owner_adapter.outcomes import OutcomeWriter
from tests.helpers import (
    HttpServer,
    TopicReader,
    call_routed,
    events_of,
    eventually,
    failing_owner,
    fetch,
    owner_server,
    publish,
    running,
    scripted,
    silent_async_owner,
    sleepy_owner,
)

OUTCOMES = {"call.completed", "call.failed", "call.timed_out"}


def master(settings) -> bytes:
    return settings.master_key()


async def route_and_authorize(settings, upstream_url: str, **over):
    routed = call_routed(upstream_url, **over)
    await publish(
        settings,
        routed,
        CallAuthorized(request_id=routed.request_id, consumer_id=routed.consumer_id, amount=10),
    )
    return routed


async def post_callback(svc, request_id: str, body: bytes, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=svc.http_url, timeout=10) as http:
        return await http.post(
            f"/v1/callbacks/{request_id}",
            content=body,
            headers={"X-Postback-Callback-Token": token, "content-type": "application/json"},
        )


async def test_a_sync_owner_answers_in_its_response(settings):
    async with (
        owner_server() as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter) as [svc],
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/sync", params={"q": "x"})
        rid = routed.request_id
        [completed] = await events_of(calls, "call.completed", rid)
        assert completed.data["via"] == "response"
        assert completed.data["status_code"] == 200
        assert completed.data["result"] == {"echo": {"q": "x"}, "via": "sync"}
        [dispatched] = calls.of_type("call.dispatched", rid)
        assert dispatched.data["attempt"] == 1

        # The owner got a forwarded request it can verify came from Postback.
        [(path, headers, body)] = owner.received
        assert path == "/sync"
        assert headers["X-Postback-Request-Id"] == rid
        assert datetime.fromisoformat(headers["X-Postback-Deadline"]) == routed.deadline
        assert headers["X-Postback-Callback-Url"] == f"{svc.http_url}/v1/callbacks/{rid}"
        assert headers["X-Postback-Callback-Token"] == callback_token(master(settings), rid)
        Webhook(derive_secret(master(settings), "api", routed.api_id)).verify(body, headers)
        assert json.loads(body) == {"q": "x"}
        [row] = await fetch(svc, "SELECT status FROM dispatches WHERE request_id = $1", rid)
        assert row["status"] == "completed"


async def test_a_forwarded_get_is_signed_with_its_query(settings):
    """A GET has no body: its path and query, as received, are what the signature covers, so
    a standard verifier checks its parameters too (one changed, it fails)."""
    seen: list[tuple[str, dict[str, str]]] = []

    async def report(request: web.Request) -> web.Response:
        seen.append((request.raw_path, dict(request.headers)))
        return web.json_response({"ok": True})

    async with (
        HttpServer({"/report": report}) as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(
            settings,
            f"{owner.url}/report",
            method="GET",
            params={"city": "Oslo & Bergen", "days": 3},
        )
        await events_of(calls, "call.completed", routed.request_id)
    [(raw_path, headers)] = seen
    verifier = Webhook(derive_secret(master(settings), "api", routed.api_id))
    assert verifier.verify(json.dumps(raw_path), headers) == raw_path
    assert "days=3" in raw_path
    with pytest.raises(WebhookVerificationError):
        verifier.verify(json.dumps(raw_path.replace("days=3", "days=300")), headers)


async def test_an_async_owner_answers_by_callback(settings):
    async with (
        owner_server(delay=0.1) as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/async", delivery_mode="async")
        rid = routed.request_id
        [completed] = await events_of(calls, "call.completed", rid)
        assert completed.data["via"] == "callback"
        assert completed.data["result"] == {"echo": {"n": 1}, "via": "callback"}
        [accepted] = calls.of_type("call.accepted", rid)
        assert datetime.fromisoformat(accepted.data["deadline"]) == routed.deadline
        types = [e.type for e in calls.events if e.subject == rid]
        assert types.index("call.accepted") < types.index("call.completed")


async def test_an_async_owner_that_holds_the_request_open_is_asked_again(settings):
    """An async API answers 202 at once: one that keeps a forwarded request open is stuck, and
    the call is forwarded again after the accept timeout rather than left to use up its
    deadline. Its result, posted back later, completes the call."""
    settings = settings.model_copy(
        update={"owner_timeout_seconds": None, "owner_accept_timeout_seconds": 1.0}
    )
    answers = owner_server().routes["/async"]
    stuck = asyncio.Event()

    async def stuck_once(request: web.Request) -> web.StreamResponse:
        if not stuck.is_set():
            stuck.set()
            await asyncio.sleep(60)
        return await answers(request)

    async with (
        HttpServer({"/async": stuck_once}) as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(
            settings, f"{owner.url}/async", delivery_mode="async", deadline_in=60
        )
        rid = routed.request_id
        [completed] = await events_of(calls, "call.completed", rid, timeout=15)
        assert completed.data["via"] == "callback"
        attempts = [e.data["attempt"] for e in calls.of_type("call.dispatched", rid)]
    assert attempts == [1, 2]
    assert len(owner.received) == 2
    assert (completed.time - routed.deadline).total_seconds() < -50  # not at the deadline


async def test_callbacks_are_accepted_once_and_checked(settings):
    async with (
        silent_async_owner() as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter) as [svc],
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/async")
        rid = routed.request_id
        await events_of(calls, "call.accepted", rid)
        token = callback_token(master(settings), rid)

        r = await post_callback(svc, rid, b'{"answer": 42}', "not-the-token")
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
        too_big = b'"' + b"x" * routed.max_result_bytes + b'"'
        r = await post_callback(svc, rid, too_big, token)
        assert (r.status_code, r.json()["type"]) == (413, "urn:postback:problem:result-too-large")

        r = await post_callback(svc, rid, b'{"answer": 42}', token)
        assert r.status_code == 200, r.text
        r = await post_callback(svc, rid, b'{"answer": 42}', token)
        assert r.status_code == 200, r.text

        # The same result written differently, as a client that retries may, is the same.
        r = await post_callback(svc, rid, b'{ "answer":42 }', token)
        assert r.status_code == 200
        r = await post_callback(svc, rid, b'{"answer": 43', token)
        assert r.status_code == 400  # not the JSON its content-type says
        r = await post_callback(svc, rid, b'{"answer": 43}', token)
        assert r.status_code == 409
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["status"] == 409
        assert problem["type"]
        assert problem["title"]

        [completed] = await events_of(calls, "call.completed", rid)
        assert completed.data["result"] == {"answer": 42}
        await asyncio.sleep(0.5)  # a second outcome would show up here
        assert len(calls.of_type("call.completed", rid)) == 1
        assert not calls.of_type("call.failed", rid)


async def test_an_owner_that_keeps_failing_is_retried_then_the_call_fails(settings):
    retried = OWNER_REQUESTS.labels("retry")._value.get()
    async with (
        failing_owner(500) as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/fail")
        rid = routed.request_id
        [failed] = await events_of(calls, "call.failed", rid, timeout=20)
        assert failed.data["reason"] == "owner_error"
        assert failed.data["status_code"] == 500
        attempts = [e.data["attempt"] for e in calls.of_type("call.dispatched", rid)]
        assert attempts == list(range(1, settings.owner_max_attempts + 1))
        assert len(owner.received) == settings.owner_max_attempts
        assert not calls.of_type("call.completed", rid)
    assert OWNER_REQUESTS.labels("retry")._value.get() == retried + settings.owner_max_attempts


async def test_a_slow_sync_owner_is_waited_for_until_the_deadline_and_asked_once(settings):
    """An owner takes as long as its API says calls may: no cap of Postback's own cuts the
    request short, and no second request repeats the work."""
    settings = settings.model_copy(update={"owner_timeout_seconds": None})
    async with (
        sleepy_owner(6) as owner,  # past the tests' own cap (conftest), which is lifted here
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/slow", deadline_in=30)
        [completed] = await events_of(calls, "call.completed", routed.request_id, timeout=20)
    assert completed.data["result"] == {"late": True}
    assert len(owner.received) == 1
    assert owner.received[0][1]["webhook-id"] == routed.request_id


async def test_an_owners_retry_after_is_honoured(settings):
    async with (
        scripted([(503, {"Retry-After": "2"})], path="/busy") as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/busy", deadline_in=30)
        await events_of(calls, "call.completed", routed.request_id, timeout=20)
        first, second = calls.of_type("call.dispatched", routed.request_id)
    # The first retry would come after 1 s; the owner asked for 2.
    assert (second.time - first.time).total_seconds() >= 2.0


async def test_an_unreachable_owner_fails_the_call_without_naming_its_address(settings):
    """The consumer reads the failure's detail: it says what went wrong, not where."""
    port = free_port()  # nothing listens there
    async with TopicReader(settings, "postback.calls") as calls, running(settings, owner_adapter):
        routed = await route_and_authorize(settings, f"http://127.0.0.1:{port}/hidden-upstream")
        [failed] = await events_of(calls, "call.failed", routed.request_id, timeout=20)
    assert failed.data["reason"] == "owner_unreachable"
    assert failed.data["detail"] == "connect: the connection failed or was closed"
    assert str(port) not in json.dumps(failed.data["detail"])


async def test_an_async_owner_that_never_calls_back_times_out_and_a_late_callback_is_refused(
    settings,
):
    async with (
        silent_async_owner() as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter) as [svc],
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/async", deadline_in=1.5)
        rid = routed.request_id
        await events_of(calls, "call.accepted", rid)
        [timed_out] = await events_of(calls, "call.timed_out", rid, timeout=10)
        assert datetime.fromisoformat(timed_out.data["deadline"]) == routed.deadline
        assert datetime.now(UTC) >= routed.deadline

        r = await post_callback(svc, rid, b'{"late": true}', callback_token(master(settings), rid))
        assert r.status_code == 409
        assert r.headers["content-type"].startswith("application/problem+json")
        await asyncio.sleep(0.3)
        assert [e.type for e in calls.events if e.subject == rid and e.type in OUTCOMES] == [
            "call.timed_out"
        ]


async def test_an_owner_that_never_answers_times_out_and_a_late_callback_is_refused(settings):
    async with (
        sleepy_owner(3.0) as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter) as [svc],
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/slow", deadline_in=1.5)
        rid = routed.request_id

        def outcome():
            return [e for e in calls.events if e.subject == rid and e.type in OUTCOMES]

        [out] = await eventually(outcome, timeout=10, what="an outcome")
        assert out.type == "call.timed_out", out
        assert datetime.fromisoformat(out.data["deadline"]) == routed.deadline

        r = await post_callback(svc, rid, b'{"late": true}', callback_token(master(settings), rid))
        assert r.status_code == 409
        assert r.headers["content-type"].startswith("application/problem+json")
        await asyncio.sleep(0.3)
        assert len(outcome()) == 1


async def test_a_deadline_that_passes_while_the_adapter_is_down_times_the_call_out(settings):
    async with silent_async_owner() as owner, TopicReader(settings, "postback.calls") as calls:
        async with running(settings, owner_adapter):
            routed = await route_and_authorize(settings, f"{owner.url}/async", deadline_in=3)
            rid = routed.request_id
            await events_of(calls, "call.accepted", rid)
        # The adapter is down; the deadline passes with nobody watching.
        assert not calls.of_type("call.timed_out", rid)
        wait = (routed.deadline - datetime.now(UTC)).total_seconds() + 0.2
        await asyncio.sleep(max(0.0, wait))
        assert not calls.of_type("call.timed_out", rid)

        async with running(settings, owner_adapter) as [svc]:
            [timed_out] = await events_of(calls, "call.timed_out", rid, timeout=10)
            assert datetime.fromisoformat(timed_out.data["deadline"]) == routed.deadline
            [row] = await fetch(svc, "SELECT status FROM dispatches WHERE request_id = $1", rid)
            assert row["status"] == "timed_out"
        assert len(owner.received) == 1  # dispatched once, not again after the restart


async def test_a_callback_that_overtakes_the_202_still_records_the_dispatch(settings):
    async def eager(request: web.Request) -> web.Response:
        # Calls back first, and only then answers 202 to the forwarded request.
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                request.headers["X-Postback-Callback-Url"],
                json={"eager": True},
                headers={"X-Postback-Callback-Token": request.headers["X-Postback-Callback-Token"]},
            ) as r,
        ):
            assert r.status == 200
        return web.json_response({"accepted": True}, status=202)

    async with (
        HttpServer({"/eager": eager}) as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/eager")
        rid = routed.request_id
        [completed] = await events_of(calls, "call.completed", rid)
        assert (
            completed.data.items()
            >= {
                "request_id": rid,
                "via": "callback",
                "content_type": "application/json",
                "result": {"eager": True},
            }.items()
        )
        assert len(owner.received) == 1
        await asyncio.sleep(0.5)
        assert [e.data["attempt"] for e in calls.of_type("call.dispatched", rid)] == [1]


async def test_a_call_authorized_past_its_deadline_is_not_forwarded(settings):
    """After a backlog, an owner must not work on a call nobody will pay for."""
    async with (
        owner_server() as owner,
        TopicReader(settings, "postback.calls") as calls,
        running(settings, owner_adapter),
    ):
        routed = await route_and_authorize(settings, f"{owner.url}/sync", deadline_in=-1)
        await events_of(calls, "call.timed_out", routed.request_id, timeout=15)
        await asyncio.sleep(0.5)
        assert owner.received == []
        assert not calls.of_type("call.dispatched", routed.request_id)


async def test_a_request_cut_off_by_shutdown_is_not_counted_against_the_owner(settings):
    """A restart that outlasts a slow owner's request hands the call back, due again, rather
    than recording a failed attempt (on the last attempt, a failed call the owner never
    caused)."""
    settings = settings.model_copy(
        update={"shutdown_grace_seconds": 2, "owner_timeout_seconds": 10}
    )
    async with sleepy_owner(5) as owner, TopicReader(settings, "postback.calls") as calls:
        async with running(settings, owner_adapter) as [svc]:
            routed = await route_and_authorize(settings, f"{owner.url}/slow", deadline_in=60)
            rid = routed.request_id
            await eventually(lambda: owner.received, what="the request under way")
            pool = svc.pool
            before = await pool.fetchrow(
                "SELECT attempts FROM dispatches WHERE request_id = $1", rid
            )
        conn = await asyncpg.connect(
            settings.database_url, server_settings={"search_path": "owner_adapter"}
        )
        try:
            row = await conn.fetchrow(
                "SELECT status, attempts, lease_until FROM dispatches WHERE request_id = $1", rid
            )
        finally:
            await conn.close()
        assert (row["status"], row["attempts"], row["lease_until"]) == (
            "pending",
            before["attempts"] - 1,
            None,
        )
        assert not calls.of_type("call.failed", rid) and not calls.of_type("call.dispatched", rid)


async def test_an_outcome_counts_only_for_the_attempt_that_holds_the_call(settings):
    """A late answer to an attempt whose lease ran out, the call claimed again since, must not
    move the call."""
    async with running(settings, owner_adapter) as [svc]:
        rid = f"req_{uuid.uuid4().hex}"
        await svc.pool.execute(
            "INSERT INTO dispatches (request_id, api_id, upstream_url, method, path, params,"
            " entry, max_result_bytes, deadline, status, attempts) VALUES ($1, 'api',"
            " 'https://o.example/', 'POST', '/', '{}', 'v1', 1000, now() + interval '1 hour',"
            " 'dispatching', 2)",
            rid,
        )
        writer = OutcomeWriter(svc.unit_of_work)
        assert not await writer.finish(rid, "dispatching", "failed", attempt=1)
        assert await writer.finish(rid, "dispatching", "completed", attempt=2)
        [row] = await fetch(svc, "SELECT status FROM dispatches WHERE request_id = $1", rid)
        assert row["status"] == "completed"

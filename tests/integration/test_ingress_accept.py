"""Ingress accepting calls under concurrency: group commit keeps every accepted call durable
and distinct, Idempotency-Key exact, and a failed write never answered 202."""

from __future__ import annotations

import asyncio

import asyncpg

from postback_ingress.app import build as ingress
from postback_libs.events import CALLS
from tests.helpers import TopicReader, bearer, client, create_account, eventually, running


async def _calls(settings) -> list[asyncpg.Record]:
    db = await asyncpg.connect(settings.database_url)
    try:
        return await db.fetch("SELECT request_id, idempotency_key FROM ingress.calls")
    finally:
        await db.close()


async def test_concurrent_calls_are_all_accepted_distinct_and_published(settings):
    async with (
        TopicReader(settings, CALLS.name) as topic,
        running(settings, ingress) as (svc,),
    ):
        http = client(svc)
        consumers = [await create_account(http, ["consumer"]) for _ in range(3)]

        async def call(i: int):
            who = consumers[i % len(consumers)]
            return await http.post(
                "/v1/calls", headers=bearer(who), json={"api": "svc", "params": {"n": i}}
            )

        answers = await asyncio.gather(*(call(i) for i in range(300)))
        assert {r.status_code for r in answers} == {202}
        ids = {r.json()["request_id"] for r in answers}
        assert len(ids) == 300
        assert {r["request_id"] for r in await _calls(settings)} == ids
        await eventually(
            lambda: {e.subject for e in topic.of_type("call.requested")} >= ids,
            what="every call.requested",
        )
        events = topic.of_type("call.requested")
        assert len(events) == 300
        # Each event is its own call's: its consumer and its params.
        by_id = {r.json()["request_id"]: i for i, r in enumerate(answers)}
        for e in events:
            i = by_id[e.subject]
            assert e.data["params"] == {"n": i}
            assert e.data["consumer_id"] == consumers[i % len(consumers)]["account_id"]


async def test_idempotency_key_sequentially(settings):
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        who = await create_account(http, ["consumer"])
        headers = {**bearer(who), "Idempotency-Key": "k-1"}
        first = await http.post("/v1/calls", headers=headers, json={"api": "svc"})
        again = await http.post("/v1/calls", headers=headers, json={"api": "svc"})
        other = await http.post("/v1/calls", headers=headers, json={"api": "other"})
        assert first.status_code == 202
        assert again.status_code == 200
        assert again.json()["request_id"] == first.json()["request_id"]
        assert other.status_code == 422
        assert other.json()["type"] == "urn:postback:problem:idempotency-key-reused"
        # The key is the consumer's own: another consumer's same key is another call.
        stranger = await create_account(http, ["consumer"])
        theirs = await http.post(
            "/v1/calls",
            headers={**bearer(stranger), "Idempotency-Key": "k-1"},
            json={"api": "svc"},
        )
        assert theirs.status_code == 202
        assert theirs.json()["request_id"] != first.json()["request_id"]


async def test_concurrent_requests_with_one_key_make_one_call(settings):
    async with (
        TopicReader(settings, CALLS.name) as topic,
        running(settings, ingress) as (svc,),
    ):
        http = client(svc)
        who = await create_account(http, ["consumer"])
        headers = {**bearer(who), "Idempotency-Key": "same"}
        # Two bodies under one key, interleaved: whichever body is first holds the key.
        bodies = [{"api": "svc", "params": {"v": i % 2}} for i in range(40)]
        answers = await asyncio.gather(
            *(http.post("/v1/calls", headers=headers, json=b) for b in bodies)
        )
        codes = [r.status_code for r in answers]
        assert codes.count(202) == 1
        winner = answers[codes.index(202)].json()["request_id"]
        won_with = bodies[codes.index(202)]
        for body, r in zip(bodies, answers, strict=True):
            if body == won_with:
                assert r.status_code in (200, 202)
                assert r.json()["request_id"] == winner
            else:
                assert r.status_code == 422
                assert r.json()["type"] == "urn:postback:problem:idempotency-key-reused"
        assert [r["request_id"] for r in await _calls(settings)] == [winner]
        await eventually(lambda: topic.of_type("call.requested", winner), what="the one event")
        await asyncio.sleep(0.5)  # let any (wrong) second event arrive before counting
        assert len(topic.of_type("call.requested")) == 1


async def test_a_failed_write_answers_no_call_202(settings):
    async with (
        TopicReader(settings, CALLS.name) as topic,
        running(settings, ingress) as (svc,),
    ):
        http = client(svc)
        who = await create_account(http, ["consumer"])
        db = await asyncpg.connect(settings.database_url)
        try:
            # A row the database refuses fails the whole write it is in.
            await db.execute(
                """
                CREATE FUNCTION ingress.refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.idempotency_key = 'boom' THEN RAISE EXCEPTION 'refused'; END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER refuse_boom BEFORE INSERT ON ingress.calls
                    FOR EACH ROW EXECUTE FUNCTION ingress.refuse_boom();
                """
            )
        finally:
            await db.close()

        async def call(i: int):
            key = {"Idempotency-Key": "boom"} if i % 10 == 0 else {}
            return await http.post(
                "/v1/calls", headers={**bearer(who), **key}, json={"api": "svc", "params": {"n": i}}
            )

        answers = await asyncio.gather(*(call(i) for i in range(100)))
        for i, r in enumerate(answers):
            if i % 10 == 0:
                assert r.status_code == 503, r.text
            assert r.status_code in (202, 503), r.text
            if r.status_code == 503:
                assert r.json()["type"] == "urn:postback:problem:accept-failed"
                assert r.headers["Retry-After"]
        accepted = {r.json()["request_id"] for r in answers if r.status_code == 202}
        assert {r["request_id"] for r in await _calls(settings)} == accepted
        await eventually(
            lambda: {e.subject for e in topic.of_type("call.requested")} >= accepted,
            what="the accepted calls' events",
        )
        await asyncio.sleep(0.5)  # let any (wrong) extra event arrive before comparing
        assert {e.subject for e in topic.of_type("call.requested")} == accepted


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PROBLEM = "application/problem+json"


async def test_the_direct_path_answers_as_the_documented_route(settings):
    """`POST /v1/calls` is handed straight to its endpoint, past FastAPI's router: it answers
    as the route would, and its event continues the caller's trace."""
    async with (
        TopicReader(settings, CALLS.name) as topic,
        running(settings, ingress) as (svc,),
    ):
        http = client(svc)
        who = bearer(await create_account(http, ["consumer"]))
        r = await http.post(
            "/v1/calls",
            json={"api": "svc", "params": {"n": 1}},
            headers={**who, "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
        )
        assert r.status_code == 202
        rid = r.json()["request_id"]
        assert r.json() == {
            "request_id": rid,
            "status": "accepted",
            "status_url": f"/v1/calls/{rid}",
        }
        assert (r.headers["location"], r.headers["retry-after"]) == (f"/v1/calls/{rid}", "1")
        await eventually(lambda: topic.of_type("call.requested"), what="call.requested")
        [event] = topic.of_type("call.requested")
        assert (event.subject, event.data["params"]) == (rid, {"n": 1})
        assert event.traceparent.split("-")[1] == TRACE_ID

        invalid = await http.post("/v1/calls", json={"params": {}}, headers=who)
        not_json = await http.post("/v1/calls", content=b"{", headers={**who, "content-type": "x"})
        anonymous = await http.post("/v1/calls", json={"api": "svc"})
        bad_key = await http.post(
            "/v1/calls", json={"api": "svc"}, headers={**who, "Idempotency-Key": "k" * 256}
        )
        for refused in (invalid, not_json):
            assert (refused.status_code, refused.headers["content-type"]) == (422, PROBLEM)
            assert refused.json()["type"] == "urn:postback:problem:validation-error"
            assert refused.json()["instance"] == "/v1/calls"
        assert invalid.json()["errors"][0]["location"] == "body.api"
        assert (anonymous.status_code, anonymous.headers["content-type"]) == (401, PROBLEM)
        assert anonymous.json()["type"] == "urn:postback:problem:unauthorized"
        assert anonymous.headers["www-authenticate"] == 'Bearer realm="postback"'
        assert bad_key.status_code == 400
        assert bad_key.json()["type"] == "urn:postback:problem:invalid-idempotency-key"
        # A body over the limit is refused whether its length is declared or not.
        big = b'{"api": "svc", "params": {"pad": "' + b"x" * settings.max_call_bytes + b'"}}'

        async def chunked():
            for at in range(0, len(big), 65536):
                yield big[at : at + 65536]

        for content in (big, chunked()):
            too_large = await http.post("/v1/calls", content=content, headers=who)
            assert (too_large.status_code, too_large.headers["content-type"]) == (413, PROBLEM)
            assert too_large.json()["type"] == "urn:postback:problem:payload-too-large"
        seed = await http.post("/api/demo/api/svc", content=big, headers=who)
        assert (seed.status_code, seed.json()["type"]) == (413, too_large.json()["type"])
        # Other methods on the path still go through the router.
        assert (await http.get("/v1/calls")).status_code == 401
        assert (await http.put("/v1/calls", json={"api": "svc"}, headers=who)).status_code == 405
        assert len(await _calls(settings)) == 1


async def test_a_webhook_url_no_attempt_may_reach_is_refused_before_any_charge(settings):
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        who = bearer(await create_account(http, ["consumer"]))
        for url in ("http://10.0.0.1/hook", "http://169.254.169.254/", "http://[::ffff:10.0.0.1]/"):
            answers = [
                await http.post("/v1/calls", headers=who, json={"api": "svc", "webhook_url": url}),
                await http.post(
                    "/internal/call",
                    headers=who,
                    json={"api_id_public": "svc", "params": {"webhook_url": url}},
                ),
                await http.post("/api/demo/api/svc", headers=who, json={"webhook_url": url}),
            ]
            for r in answers:
                assert r.status_code == 422, (url, r.text)
                assert r.json()["type"] == "urn:postback:problem:url-not-allowed"
        assert await _calls(settings) == []
        # Names are checked on what they resolve to at each attempt; allowed networks pass.
        for url in ("https://hooks.example.com/in", "http://127.0.0.1:9/hook"):
            r = await http.post("/v1/calls", headers=who, json={"api": "svc", "webhook_url": url})
            assert r.status_code == 202, r.text

"""Routing against the real broker: it follows the catalog and accounts topics and turns each
`call.requested` into `call.routed` or `call.rejected`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from postback_libs.events import (
    AccountCreated,
    AccountSuspended,
    ApiRegistered,
    CallCompleted,
    CallFailed,
    CallRequested,
    CloudEvent,
)
from postback_libs.follower import TopicFollower
from postback_libs.metrics import EVENTS_CONSUMED
from postback_routing.app import build as routing
from tests.helpers import (
    TopicReader,
    account_state,
    api_state,
    events_of,
    eventually,
    fetch,
    publish,
    running,
    uid,
)


def requested(consumer_id: str, api: str, **over: object) -> CallRequested:
    return CallRequested(
        request_id=uid("req"),
        consumer_id=consumer_id,
        api=api,
        params={"city": "Oslo"},
        webhook_url="http://127.0.0.1:9/hook",
        **over,  # type: ignore[arg-type]
    )


async def test_known_api_is_routed_and_unknown_api_rejected(settings):
    api = api_state(price=25, fee_bps=None, max_duration_seconds=120, endpoint="http://o/api")
    consumer = account_state()
    await publish(settings, ApiRegistered(api=api), AccountCreated(account=consumer))
    async with TopicReader(settings, "postback.calls") as calls, running(settings, routing):
        by_slug = requested(consumer.account_id, api.slug)
        by_id = requested(consumer.account_id, api.api_id)
        unknown = requested(consumer.account_id, "no-such-api")
        before = datetime.now(UTC)
        await publish(settings, by_slug, by_id, unknown)

        for req in (by_slug, by_id):
            [routed] = await events_of(calls, "call.routed", req.request_id)
            data = routed.data
            assert data["api_id"] == api.api_id
            assert data["owner_id"] == api.owner_id
            assert data["consumer_id"] == consumer.account_id
            assert data["upstream_url"] == "http://o/api"
            assert data["price"] == 25
            assert data["fee_bps"] == settings.platform_fee_bps
            assert data["params"] == {"city": "Oslo"}
            deadline = datetime.fromisoformat(data["deadline"])
            assert before + timedelta(seconds=119) < deadline
            assert deadline < datetime.now(UTC) + timedelta(seconds=121)
            assert routed.source == "routing"

        [rejected] = await events_of(calls, "call.rejected", unknown.request_id)
        assert rejected.data["reason"] == "unknown_api"
        assert rejected.data["stage"] == "routing"
        assert not calls.of_type("call.routed", unknown.request_id)


async def test_an_api_registered_just_before_the_call_is_found(settings):
    async with TopicReader(settings, "postback.calls") as calls, running(settings, routing):
        # Routing is up and has read an empty catalog; the registration and the call that
        # follows it land on different topics at nearly the same moment.
        api = api_state(price=7)
        consumer = account_state()
        req = requested(consumer.account_id, api.slug)
        await publish(settings, AccountCreated(account=consumer), ApiRegistered(api=api), req)

        await events_of(calls, "call.routed", req.request_id)
        assert not calls.of_type("call.rejected", req.request_id)
        assert calls.of_type("call.routed", req.request_id)[0].data["price"] == 7


async def test_a_suspended_account_is_rejected(settings):
    api = api_state()
    active = account_state()
    suspended = account_state()
    await publish(
        settings,
        ApiRegistered(api=api),
        AccountCreated(account=active),
        AccountCreated(account=suspended),
        AccountSuspended(account=suspended.model_copy(update={"status": "suspended"})),
    )
    async with TopicReader(settings, "postback.calls") as calls, running(settings, routing):
        ok = requested(active.account_id, api.slug)
        refused = requested(suspended.account_id, api.slug)
        await publish(settings, ok, refused)
        await events_of(calls, "call.routed", ok.request_id)
        [rejected] = await events_of(calls, "call.rejected", refused.request_id)
        assert rejected.data["reason"] == "account_suspended"
        assert rejected.data["stage"] == "routing"
        assert not calls.of_type("call.routed", refused.request_id)


async def test_calls_naming_no_api_wait_one_catch_up_per_batch_not_one_each(settings, monkeypatch):
    """Free to send (they are refused before settlement), calls naming no API must not hold a
    partition for a catch-up of the catalog each."""
    catch_ups = 0
    caught_up = TopicFollower.caught_up

    async def counted(self, *args, **kwargs):
        nonlocal catch_ups
        catch_ups += 1
        return await caught_up(self, *args, **kwargs)

    monkeypatch.setattr(TopicFollower, "caught_up", counted)
    consumer = account_state(roles=["consumer"])
    await publish(settings, AccountCreated(account=consumer))
    async with TopicReader(settings, "postback.calls") as calls, running(settings, routing):
        started = catch_ups  # the followers' own, at start
        junk = [requested(consumer.account_id, f"no-such-api-{i}") for i in range(40)]
        await publish(settings, *junk)
        await events_of(calls, "call.rejected", n=40)
        assert {e.data["reason"] for e in calls.of_type("call.rejected")} == {"unknown_api"}
        # One per batch the calls came in (a few at most), not forty.
        assert catch_ups - started <= 8


async def test_an_upstream_failing_three_times_in_a_row_is_skipped_until_it_succeeds(settings):
    """Owner outcomes on the calls topic tell routing which upstream is failing; they change
    nothing durable, so they are observed as they are fetched, outside any transaction."""
    a, b = "http://127.0.0.1:9/a", "http://127.0.0.1:9/b"
    api = api_state(endpoint=a, endpoints=[b])
    consumer = account_state()
    await publish(settings, ApiRegistered(api=api), AccountCreated(account=consumer))

    def observed(type_: str) -> float:
        return EVENTS_CONSUMED.labels("routing", type_, "applied")._value.get()

    async def outcomes(*items: CallFailed | CallCompleted) -> list[CloudEvent]:
        before = observed(items[0].event_type)
        published = await publish(settings, *items)
        await eventually(lambda: observed(items[0].event_type) >= before + len(items))
        return published

    async def upstreams(n: int) -> set[str]:
        reqs = [requested(consumer.account_id, api.slug) for _ in range(n)]
        await publish(settings, *reqs)
        return {
            (await events_of(calls, "call.routed", r.request_id))[0].data["upstream_url"]
            for r in reqs
        }

    async with (
        TopicReader(settings, "postback.calls") as calls,
        running(settings, routing) as [service],
    ):
        assert await upstreams(12) == {a, b}  # spread by request id
        failed = await outcomes(
            *(
                CallFailed(request_id=uid("req"), reason="owner_unreachable", upstream_url=a)
                for _ in range(3)
            )
        )
        assert await upstreams(12) == {b}
        await outcomes(CallCompleted(request_id=uid("req"), via="response", upstream_url=a))
        assert await upstreams(12) == {a, b}
        recorded = await fetch(
            service, "SELECT 1 FROM inbox WHERE event_id = ANY($1::text[])", [e.id for e in failed]
        )
    assert recorded == []  # no transaction, no inbox row

"""Projection against the real broker and Postgres: a call's row ends in the same state whatever
order its events were written in, and redelivered events change nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from postback_libs.events import (
    AccountCredited,
    CallAuthorized,
    CallCompleted,
    CallDelivered,
    CallDispatched,
    CallRequested,
    CallRouted,
    CallSettled,
    CloudEvent,
    EventData,
    TransferPosted,
    TransferReserved,
)
from postback_projection.app import build as projection
from tests.helpers import eventually, fetch, publish, republish, running, uid

ALL_FIELDS = (
    "consumer_id",
    "owner_id",
    "api",
    "api_id",
    "mode",
    "outcome",
    "webhook_url",
    "result",
    "result_content_type",
    "cost",
    "fee",
    "requested_at",
    "completed_at",
    "delivered_at",
)


def story(rid: str) -> dict[str, EventData]:
    """Every event of one call that completed, was settled and delivered."""
    consumer, owner = uid("acct_c"), uid("acct_o")
    return {
        "requested": CallRequested(
            request_id=rid,
            consumer_id=consumer,
            api="weather",
            webhook_url="https://example.com/hook",
        ),
        "routed": CallRouted(
            request_id=rid,
            consumer_id=consumer,
            owner_id=owner,
            api_id="api_1",
            mode="production",
            upstream_url="https://owner.example/api",
            method="POST",
            path="/",
            price=10,
            fee_bps=1000,
            deadline=datetime.now(UTC) + timedelta(minutes=5),
        ),
        "authorized": CallAuthorized(request_id=rid, consumer_id=consumer, amount=10),
        "completed": CallCompleted(request_id=rid, via="callback", result={"temp": 21}),
        "settled": CallSettled(
            request_id=rid, consumer_id=consumer, owner_id=owner, amount=10, fee=1
        ),
        "delivered": CallDelivered(request_id=rid, message_id="msg_1", attempts=1),
    }


async def call_row(svc, rid: str):
    rows = await fetch(svc, "SELECT * FROM calls WHERE request_id = $1", rid)
    return rows[0] if rows else None


async def event_count(svc, rid: str) -> int:
    [row] = await fetch(svc, "SELECT count(*) AS n FROM call_events WHERE request_id = $1", rid)
    return int(row["n"])


def assert_complete(row, events: dict[str, EventData]) -> None:
    assert row["status"] == "delivered"
    for column in ALL_FIELDS:
        assert row[column] is not None, column
    assert row["error"] is None
    assert row["outcome"] == "completed"
    assert row["consumer_id"] == events["requested"].consumer_id
    assert row["owner_id"] == events["routed"].owner_id
    assert row["api"] == "weather"
    assert row["api_id"] == "api_1"
    assert row["cost"] == 10
    assert row["fee"] == 1
    assert row["webhook_url"] == "https://example.com/hook"


async def test_events_out_of_order_end_in_the_same_state(settings):
    # The brief's order: settled before completed, delivered before settled.
    some = uid("req")
    some_events = story(some)
    some_order = ["requested", "routed", "authorized", "delivered", "settled", "completed"]
    # And the worst case: the story backwards.
    rev = uid("req")
    rev_events = story(rev)
    rev_order = list(reversed(list(rev_events)))

    async with running(settings, projection) as [svc]:
        await publish(
            settings,
            *(some_events[k] for k in some_order),
            *(rev_events[k] for k in rev_order),
        )

        async def projected(rid: str) -> bool:
            return await event_count(svc, rid) == 6

        await eventually(lambda: projected(some), what="first call projected")
        await eventually(lambda: projected(rev), what="second call projected")
        for rid, events in ((some, some_events), (rev, rev_events)):
            row = await call_row(svc, rid)
            assert_complete(row, events)
            assert row["result"] is not None
        timeline = await fetch(
            svc, 'SELECT type FROM call_events WHERE request_id = $1 ORDER BY "offset"', some
        )
        assert [r["type"] for r in timeline] == [f"call.{k}" for k in some_order]


async def test_redelivered_events_change_nothing(settings):
    rid = uid("req")
    events = story(rid)
    consumer = events["requested"].consumer_id
    owner = events["routed"].owner_id
    ledger: list[EventData] = [
        AccountCredited(credit_id="cr1", account_id=consumer, amount=100, balance=100),
        TransferReserved(
            transfer_id=f"{rid}:reserve:owner",
            request_id=rid,
            debit_account=f"consumer:{consumer}",
            credit_account=f"owner:{owner}",
            amount=9,
        ),
        TransferPosted(
            transfer_id=f"{rid}:post:owner",
            pending_id=f"{rid}:reserve:owner",
            request_id=rid,
            debit_account=f"consumer:{consumer}",
            credit_account=f"owner:{owner}",
            amount=9,
        ),
    ]
    async with running(settings, projection) as [svc]:
        published = await publish(settings, *events.values(), *ledger)
        await eventually(lambda: _count_is(svc, rid, 6), what="call projected")

        async def balances() -> dict[str, tuple[int, int]]:
            rows = await fetch(svc, "SELECT * FROM balances")
            return {r["ledger_account"]: (r["balance"], r["reserved"]) for r in rows}

        expected = {f"consumer:{consumer}": (91, 0), f"owner:{owner}": (9, 0)}
        await eventually(lambda: _equals(balances(), expected), what="balances projected")
        before = dict(await call_row(svc, rid))

        # Every event again, byte for byte, then one new event per key: once the new ones are
        # projected, the redelivered ones before them on the same partition have been read.
        for e in published:
            topic = "postback.calls" if e.type.startswith("call.") else "postback.ledger"
            await republish(settings, e, topic)
        marker = CallDispatched(request_id=rid, attempt=2, upstream_url="https://o.example")
        [marker_event] = await publish(settings, marker)
        more = [
            AccountCredited(credit_id="cr2", account_id=consumer, amount=1, balance=92),
            TransferReserved(
                transfer_id=f"{rid}:reserve:fee",
                request_id=rid,
                debit_account=f"consumer:{consumer}",
                credit_account="platform:fee",
                amount=1,
            ),
        ]
        await publish(settings, *more)
        await eventually(lambda: _count_is(svc, rid, 7), what="marker projected")
        expected = {
            f"consumer:{consumer}": (92, 1),
            f"owner:{owner}": (9, 0),
        }
        await eventually(lambda: _equals(balances(), expected), what="ledger markers projected")

        rows = await fetch(svc, "SELECT event_id, count(*) AS n FROM call_events GROUP BY event_id")
        assert {r["event_id"] for r in rows} == {
            e.id
            for e in [*published, marker_event]
            if isinstance(e, CloudEvent) and e.type.startswith("call.")
        }
        assert all(r["n"] == 1 for r in rows)
        after = dict(await call_row(svc, rid))
        # Only the marker (an earlier stage) touched the row; nothing moved backwards.
        assert {k: v for k, v in after.items() if k != "updated_at"} == {
            k: v for k, v in before.items() if k != "updated_at"
        }
        assert after["status"] == "delivered"


async def _count_is(svc, rid: str, n: int) -> bool:
    return await event_count(svc, rid) == n


async def _equals(value, expected) -> bool:
    return await value == expected

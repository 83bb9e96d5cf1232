"""Settlement against the real broker and Postgres: reserve on `call.routed`, capture on
`call.completed`, release on failure or timeout, refuse what the consumer cannot pay, and keep a
ledger that always sums to zero."""

from __future__ import annotations

from datetime import UTC, datetime

from postback_libs.events import (
    CallCompleted,
    CallFailed,
    CallTimedOut,
    CreditRequested,
)
from postback_settlement.app import build as settlement
from tests.helpers import (
    TopicReader,
    call_routed,
    events_of,
    eventually,
    fetch,
    publish,
    running,
    uid,
)

UPSTREAM = "http://127.0.0.1:9/api"


async def fund(settings, ledger: TopicReader, account_id: str, amount: int) -> None:
    credit = CreditRequested(credit_id=uid("cr"), account_id=account_id, amount=amount)
    await publish(settings, credit)
    await eventually_credited(ledger, credit.credit_id)


async def eventually_credited(ledger: TopicReader, credit_id: str) -> None:
    await eventually(
        lambda: [e for e in ledger.of_type("account.credited") if e.data["credit_id"] == credit_id],
        what=f"credit {credit_id}",
    )


async def assert_ledger_balanced(service) -> None:
    [total] = await fetch(service, "SELECT sum(credits_posted - debits_posted) AS s FROM accounts")
    assert total["s"] == 0
    overdrawn = await fetch(
        service,
        "SELECT id FROM accounts WHERE kind = 'consumer'"
        " AND credits_posted - debits_posted - debits_pending < 0",
    )
    assert overdrawn == []


async def test_a_call_is_reserved_then_settled_with_the_fee_split(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement) as [svc],
    ):
        await fund(settings, ledger, consumer, 1000)
        [credited] = ledger.of_type("account.credited")
        assert credited.data["balance"] == 1000

        routed = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=10, fee_bps=1000)
        rid = routed.request_id
        await publish(settings, routed)
        [authorized] = await events_of(calls, "call.authorized", rid)
        assert (
            authorized.data.items()
            >= {"request_id": rid, "consumer_id": consumer, "amount": 10}.items()
        )
        reserved = await events_of(ledger, "transfer.reserved", n=2)
        legs = {(e.data["debit_account"], e.data["credit_account"]): e.data for e in reserved}
        assert legs[(f"consumer:{consumer}", f"owner:{owner}")]["amount"] == 9
        assert legs[(f"consumer:{consumer}", "platform:fee")]["amount"] == 1
        [row] = await fetch(svc, "SELECT * FROM accounts WHERE id = $1", f"consumer:{consumer}")
        assert (row["debits_pending"], row["debits_posted"]) == (10, 0)

        await publish(settings, CallCompleted(request_id=rid, via="response", result={"ok": 1}))
        [settled] = await events_of(calls, "call.settled", rid)
        assert (
            settled.data.items()
            >= {
                "request_id": rid,
                "consumer_id": consumer,
                "owner_id": owner,
                "amount": 10,
                "fee": 1,
            }.items()
        )
        posted = await events_of(ledger, "transfer.posted", n=2)
        by_credit = {e.data["credit_account"]: e.data for e in posted}
        assert by_credit[f"owner:{owner}"]["amount"] == 9
        assert by_credit["platform:fee"]["amount"] == 1
        assert {e.data["pending_id"] for e in posted} == {e.data["transfer_id"] for e in reserved}

        balances = {
            r["id"]: (r["credits_posted"] - r["debits_posted"], r["debits_pending"])
            for r in await fetch(svc, "SELECT * FROM accounts")
        }
        assert balances[f"consumer:{consumer}"] == (990, 0)
        assert balances[f"owner:{owner}"] == (9, 0)
        assert balances["platform:fee"] == (1, 0)
        assert balances["operator:funding"] == (-1000, 0)
        [reservation] = await fetch(svc, "SELECT * FROM reservations WHERE request_id = $1", rid)
        assert reservation["state"] == "posted"
        await assert_ledger_balanced(svc)


async def test_failed_and_timed_out_calls_are_refunded(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement) as [svc],
    ):
        await fund(settings, ledger, consumer, 100)
        failed = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=30)
        timed_out = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=20)
        await publish(
            settings,
            failed,
            CallFailed(request_id=failed.request_id, reason="owner_error", status_code=500),
            timed_out,
            CallTimedOut(request_id=timed_out.request_id, deadline=datetime.now(UTC)),
        )
        [refund1] = await events_of(calls, "call.refunded", failed.request_id)
        assert refund1.data["outcome"] == "call.failed"
        assert refund1.data["amount"] == 30
        [refund2] = await events_of(calls, "call.refunded", timed_out.request_id)
        assert refund2.data["outcome"] == "call.timed_out"
        assert refund2.data["amount"] == 20
        await events_of(ledger, "transfer.voided", n=4)
        assert not calls.of_type("call.settled")

        [row] = await fetch(svc, "SELECT * FROM accounts WHERE id = $1", f"consumer:{consumer}")
        assert row["credits_posted"] - row["debits_posted"] == 100
        assert row["debits_pending"] == 0
        [owner_row] = await fetch(svc, "SELECT * FROM accounts WHERE id = $1", f"owner:{owner}")
        assert (owner_row["credits_posted"], owner_row["credits_pending"]) == (0, 0)
        states = {
            r["request_id"]: r["state"] for r in await fetch(svc, "SELECT * FROM reservations")
        }
        assert states == {failed.request_id: "voided", timed_out.request_id: "voided"}
        await assert_ledger_balanced(svc)


async def test_insufficient_funds_are_rejected_and_never_overdraw(settings):
    consumer, owner, broke = uid("acct_c"), uid("acct_o"), uid("acct_b")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement) as [svc],
    ):
        await fund(settings, ledger, consumer, 10)
        # Two calls that each cost the whole balance (on different partitions), and one by a
        # consumer settlement has never seen.
        a = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=10)
        b = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=10)
        c = call_routed(UPSTREAM, consumer_id=broke, owner_id=owner, price=1)
        await publish(settings, a, b, c)

        def decided(rid: str) -> bool:
            return bool(
                calls.of_type("call.authorized", rid) or calls.of_type("call.rejected", rid)
            )

        await eventually(lambda: all(decided(x.request_id) for x in (a, b, c)), what="decisions")
        authorized = [x for x in (a, b) if calls.of_type("call.authorized", x.request_id)]
        assert len(authorized) == 1
        [loser] = [x for x in (a, b) if x not in authorized]
        for x in (loser, c):
            [rejected] = calls.of_type("call.rejected", x.request_id)
            assert rejected.data["reason"] == "insufficient_funds"
            assert rejected.data["stage"] == "settlement"
        assert len(calls.of_type("call.rejected")) == 2

        # Completing a rejected call moves no money.
        await publish(
            settings,
            CallCompleted(request_id=loser.request_id, via="response", result=1),
            CallCompleted(request_id=authorized[0].request_id, via="response", result=1),
        )
        await events_of(calls, "call.settled", authorized[0].request_id)
        [row] = await fetch(svc, "SELECT * FROM accounts WHERE id = $1", f"consumer:{consumer}")
        assert (row["credits_posted"] - row["debits_posted"], row["debits_pending"]) == (0, 0)
        assert not calls.of_type("call.settled", loser.request_id)
        assert (
            await fetch(svc, "SELECT * FROM reservations WHERE request_id = $1", c.request_id) == []
        )
        await assert_ledger_balanced(svc)

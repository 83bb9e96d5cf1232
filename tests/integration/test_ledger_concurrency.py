"""Two settlement replicas in one consumer group share a consumer's balance: one consumer with
credit for 500 calls fires 1,000 at once, spread over every partition. Exactly 500 are
authorized and captured, the rest refused for insufficient funds, and the balance ends at
exactly zero — never below."""

from __future__ import annotations

from collections import Counter

from postback.ledger_check import check
from postback_libs.events import CallCompleted, CreditRequested
from postback_settlement.app import build as settlement
from tests.helpers import TopicReader, call_routed, eventually, fetch, publish, running, uid

UPSTREAM = "http://127.0.0.1:9/api"
PRICE = 10
FUNDED_CALLS = 500
CALLS = 1000


async def test_two_replicas_authorize_exactly_what_the_balance_covers(settings):
    consumer, owners = uid("acct_c"), [uid("acct_o") for _ in range(4)]
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement, settlement) as replicas,
    ):
        applied: Counter[int] = Counter()
        for n, svc in enumerate(replicas):
            for applier in svc.appliers:
                if applier.group == "settlement":
                    original = applier.write

                    async def counting(decoded, original=original, n=n):
                        applied[n] += len(decoded)
                        await original(decoded)

                    applier.write = counting  # type: ignore[method-assign]

        credit = CreditRequested(
            credit_id=uid("cr"), account_id=consumer, amount=FUNDED_CALLS * PRICE
        )
        await publish(settings, credit)
        await eventually(lambda: ledger.of_type("account.credited"), what="credit applied")

        routed = [
            call_routed(
                UPSTREAM, consumer_id=consumer, owner_id=owners[i % 4], price=PRICE, fee_bps=1000
            )
            for i in range(CALLS)
        ]
        await publish(settings, *routed)

        def decisions() -> dict[str, str]:
            out = {}
            for t in ("call.authorized", "call.rejected"):
                for e in calls.of_type(t):
                    out[e.subject] = t
            return out

        await eventually(lambda: len(decisions()) == CALLS, timeout=120, what="every decision")
        # Both replicas did part of the work.
        assert applied[0] > 0 and applied[1] > 0, applied
        decided = decisions()
        authorized = [r for r in routed if decided[r.request_id] == "call.authorized"]
        rejected = calls.of_type("call.rejected")
        assert len(authorized) == FUNDED_CALLS
        assert len(rejected) == CALLS - FUNDED_CALLS
        assert {e.data["reason"] for e in rejected} == {"insufficient_funds"}
        assert {e.data["stage"] for e in rejected} == {"settlement"}
        # No call was both authorized and rejected, nor authorized twice.
        assert len(calls.of_type("call.authorized")) == FUNDED_CALLS

        await publish(
            settings,
            *(CallCompleted(request_id=r.request_id, via="response") for r in authorized),
        )
        await eventually(
            lambda: len({e.subject for e in calls.of_type("call.settled")}) == FUNDED_CALLS,
            timeout=120,
            what="every authorized call captured",
        )
        [row] = await fetch(
            replicas[0], "SELECT * FROM accounts WHERE id = $1", f"consumer:{consumer}"
        )
        assert row["credits_posted"] - row["debits_posted"] == 0
        assert row["debits_pending"] == 0
        assert row["credits_posted"] == FUNDED_CALLS * PRICE
        [fee] = await fetch(replicas[0], "SELECT * FROM accounts WHERE id = 'platform:fee'")
        assert fee["credits_posted"] == FUNDED_CALLS * PRICE // 10
        states = Counter(
            r["state"] for r in await fetch(replicas[0], "SELECT state FROM reservations")
        )
        assert states == {"posted": FUNDED_CALLS}

    report = await check(settings)
    assert report.violations == [], report.violations

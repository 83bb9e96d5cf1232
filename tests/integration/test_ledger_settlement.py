"""Settlement's ledger against the real broker and Postgres: the platform fee from the default
rate or the API's own, `balance.low` once until money is added, reservations released long
after their deadline when no outcome came, `postback ledger check` (tables and topic), and the
balances rebuilt from the ledger topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import asyncpg

from postback.ledger_check import Replay, check, read_topic
from postback_libs.events import (
    AccountCreated,
    ApiRegistered,
    CallCompleted,
    CallFailed,
    CallRequested,
    CallTimedOut,
    CorrectionRequested,
    CreditRequested,
)
from postback_libs.settings import Settings
from postback_projection.app import build as projection
from postback_routing.app import build as routing
from postback_settlement.app import build as settlement
from tests.helpers import (
    TopicReader,
    account_state,
    api_state,
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
    await eventually(
        lambda: [
            e for e in ledger.of_type("account.credited") if e.data["credit_id"] == credit.credit_id
        ],
        what=f"credit {credit.credit_id}",
    )


async def balances(svc) -> dict[str, tuple[int, int]]:
    """(posted balance, pending debits) per ledger account."""
    return {
        r["id"]: (r["credits_posted"] - r["debits_posted"], r["debits_pending"])
        for r in await fetch(svc, "SELECT * FROM accounts")
    }


def cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    env.update(
        POSTBACK_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        POSTBACK_DATABASE_URL=settings.database_url,
        POSTBACK_TOPIC_PREFIX=settings.topic_prefix,
    )
    return env


async def postback_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "postback", *args],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_the_platform_fee_is_the_default_rate_unless_the_api_sets_its_own(settings):
    settings = settings.model_copy(update={"platform_fee_bps": 500})
    owner = uid("acct_o")
    default_api = api_state(owner_id=owner, price=1000, fee_bps=None)
    own_rate = api_state(owner_id=owner, price=1000, fee_bps=2500)
    rounding = api_state(owner_id=owner, price=199, fee_bps=100)  # 1.99 rounds down to 1
    free = api_state(owner_id=owner, price=0, fee_bps=None)
    consumer = account_state()
    await publish(
        settings,
        AccountCreated(account=consumer),
        *(ApiRegistered(api=a) for a in (default_api, own_rate, rounding, free)),
    )
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, routing, settlement) as [_, svc],
    ):
        await fund(settings, ledger, consumer.account_id, 5000)
        requests = {
            api.api_id: CallRequested(
                request_id=uid("req"), consumer_id=consumer.account_id, api=api.slug
            )
            for api in (default_api, own_rate, rounding, free)
        }
        await publish(settings, *requests.values())
        for req in requests.values():
            await events_of(calls, "call.authorized", req.request_id)
        await publish(
            settings,
            *(
                CallCompleted(request_id=r.request_id, via="response", result=1)
                for r in requests.values()
            ),
        )
        fees = {}
        for api_id, req in requests.items():
            [settled] = await events_of(calls, "call.settled", req.request_id)
            fees[api_id] = (settled.data["amount"], settled.data["fee"])
        assert fees == {
            default_api.api_id: (1000, 50),
            own_rate.api_id: (1000, 250),
            rounding.api_id: (199, 1),
            free.api_id: (0, 0),
        }
        posted = await events_of(ledger, "transfer.posted", n=6)
        assert {e.data["api_id"] for e in posted} == {
            default_api.api_id,
            own_rate.api_id,
            rounding.api_id,
        }
        b = await balances(svc)
        assert b[f"consumer:{consumer.account_id}"] == (5000 - 2199, 0)
        assert b[f"owner:{owner}"] == (950 + 750 + 198, 0)
        assert b["platform:fee"] == (50 + 250 + 1, 0)
        assert (await check(settings)).violations == []


async def test_balance_low_is_sent_once_until_money_is_added(settings):
    settings = settings.model_copy(update={"low_balance_threshold": 50})
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement),
    ):
        await fund(settings, ledger, consumer, 100)

        async def call(price: int = 20) -> str:
            routed = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=price)
            await publish(settings, routed)
            await events_of(calls, "call.authorized", routed.request_id)
            return routed.request_id

        def lows() -> list[int]:
            return [e.data["balance"] for e in ledger.of_type("balance.low")]

        await call()  # 80
        await call()  # 60
        third = await call()  # 40: below 50, the first crossing
        await events_of(ledger, "balance.low")
        fourth = await call()  # 20: still below, no second warning
        await publish(
            settings,
            CallFailed(request_id=third, reason="owner_error"),
            CallTimedOut(request_id=fourth, deadline=datetime.now(UTC)),
        )
        await events_of(calls, "call.refunded", fourth)
        await events_of(calls, "call.refunded", third)  # back to 60: above again
        await call()  # 40: crossing again, but no money came in since the warning
        await fund(settings, ledger, consumer, 100)  # 140: a credit re-arms it
        await publish(
            settings,
            CorrectionRequested(correction_id=uid("cor"), account_id=consumer, amount=-100),
        )
        await events_of(ledger, "balance.low", n=2)  # 40 by a correction: the second
        held = await call(30)  # 10
        await fund(settings, ledger, consumer, 20)  # 30: a top-up while a call holds money
        await publish(settings, CallFailed(request_id=held, reason="owner_error"))
        await events_of(calls, "call.refunded", held)  # 60
        await call()  # 40: the third, re-armed by that top-up
        await events_of(ledger, "balance.low", n=3)
        await asyncio.sleep(0.5)
        assert lows() == [40, 40, 40]
        [low] = ledger.of_type("balance.low")[:1]
        assert low.data == {"account_id": consumer, "balance": 40, "threshold": 50}
        assert low.subject == f"consumer:{consumer}"


async def test_a_reservation_that_never_gets_an_outcome_is_released_after_its_deadline(settings):
    settings = settings.model_copy(
        update={"reservation_grace_seconds": 1.0, "reservation_sweep_seconds": 0.2}
    )
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement) as [svc],
    ):
        await fund(settings, ledger, consumer, 100)
        forgotten = call_routed(
            UPSTREAM, consumer_id=consumer, owner_id=owner, price=30, deadline_in=1
        )
        in_time = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=20)
        await publish(settings, forgotten, in_time)
        await events_of(calls, "call.authorized", in_time.request_id)

        [refund] = await events_of(calls, "call.refunded", forgotten.request_id, timeout=20)
        assert refund.data["outcome"] == "call.timed_out"
        assert refund.data["amount"] == 30
        voided = await events_of(ledger, "transfer.voided", n=2)
        assert {e.data["request_id"] for e in voided} == {forgotten.request_id}
        states = {
            r["request_id"]: r["state"] for r in await fetch(svc, "SELECT * FROM reservations")
        }
        assert states == {forgotten.request_id: "voided", in_time.request_id: "reserved"}
        assert (await balances(svc))[f"consumer:{consumer}"] == (100, 20)

        # owner-adapter's own time-out, arriving late, finds nothing left to release.
        await publish(
            settings, CallTimedOut(request_id=forgotten.request_id, deadline=datetime.now(UTC))
        )
        await publish(settings, CallCompleted(request_id=in_time.request_id, via="response"))
        await events_of(calls, "call.settled", in_time.request_id)
        assert len(calls.of_type("call.refunded", forgotten.request_id)) == 1
        assert (await balances(svc))[f"consumer:{consumer}"] == (80, 0)
        assert (await check(settings, margin=None)).violations == []


async def test_ledger_check_passes_on_a_sound_ledger_and_names_what_is_wrong(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement),
    ):
        await fund(settings, ledger, consumer, 100)
        done = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=30)
        failed = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=20)
        open_ = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=10)
        await publish(
            settings,
            done,
            failed,
            open_,
            CallCompleted(request_id=done.request_id, via="response"),
            CallFailed(request_id=failed.request_id, reason="owner_error"),
            CorrectionRequested(correction_id=uid("cor"), account_id=consumer, amount=-5),
        )
        await events_of(calls, "call.settled", done.request_id)
        await events_of(calls, "call.refunded", failed.request_id)
        await events_of(ledger, "account.corrected")

    # A sound ledger, settlement stopped: tables and topic agree.
    ok = await postback_cli(settings, "ledger", "check")
    assert ok.returncode == 0, ok.stderr
    assert "ledger ok" in ok.stdout and "ledger events replayed" in ok.stdout

    conn = await asyncpg.connect(settings.database_url)
    try:
        # Money made out of thin air, in the tables only.
        await conn.execute(
            "UPDATE settlement.accounts SET credits_posted = credits_posted + 7 WHERE id = $1",
            f"consumer:{consumer}",
        )
        bad = await postback_cli(settings, "ledger", "check")
        assert bad.returncode == 1
        assert "balances sum to zero" in bad.stderr.splitlines()[0]
        await conn.execute(
            "UPDATE settlement.accounts SET credits_posted = credits_posted - 7 WHERE id = $1",
            f"consumer:{consumer}",
        )

        # A transfer the tables agree with but no event ever told: the topic disagrees.
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO settlement.transfers (id, debit_account, credit_account, amount,"
                " kind) VALUES ('credit:forged', 'operator:funding', $1, 50, 'single')",
                f"consumer:{consumer}",
            )
            await conn.execute(
                "UPDATE settlement.accounts SET credits_posted = credits_posted + 50 WHERE id = $1",
                f"consumer:{consumer}",
            )
            await conn.execute(
                "UPDATE settlement.accounts SET debits_posted = debits_posted + 50"
                " WHERE id = 'operator:funding'"
            )
        tables_only = await postback_cli(settings, "ledger", "check", "--no-topic")
        assert tables_only.returncode == 0, tables_only.stderr
        bad = await postback_cli(settings, "ledger", "check")
        assert bad.returncode == 1
        assert "replaying the ledger topic gives the same balances" in bad.stderr
        assert f"consumer:{consumer}" in bad.stderr

        # A reservation past its call's deadline (margin 0): the open call is due in 30 s.
        report = await check(settings, topic=False)
        assert report.violations == []
        await conn.execute(
            "UPDATE settlement.reservations SET deadline = now() - interval '1 hour'"
            " WHERE request_id = $1",
            open_.request_id,
        )
        bad = await postback_cli(settings, "ledger", "check", "--no-topic", "--margin", "60")
        assert bad.returncode == 1
        assert "no reservation left reserved past its deadline" in bad.stderr
        assert open_.request_id in bad.stderr

        # A reservation that no longer names who its legs pay: they would post elsewhere.
        await conn.execute(
            "UPDATE settlement.reservations SET owner_id = 'someone-else' WHERE request_id = $1",
            open_.request_id,
        )
        report = await check(settings, topic=False, margin=timedelta(days=1))
        assert [v.invariant for v in report.violations] == [
            "a reservation's legs go from its consumer to its owner and the platform"
        ]
        assert open_.request_id in report.violations[0].detail
        await conn.execute(
            "UPDATE settlement.reservations SET owner_id = $2 WHERE request_id = $1",
            open_.request_id,
            owner,
        )

        # A pending transfer resolved twice.
        await conn.execute("DROP INDEX settlement.transfers_resolve_once")
        await conn.execute(
            "INSERT INTO settlement.transfers (id, debit_account, credit_account, amount, kind,"
            " pending_id, request_id) SELECT id || ':again', debit_account, credit_account,"
            " amount, kind, pending_id, request_id FROM settlement.transfers"
            " WHERE kind = 'post' LIMIT 1"
        )
        report = await check(settings, topic=False)
        names = [v.invariant for v in report.violations]
        assert "a pending transfer is resolved at most once" in names
        assert "posted totals equal the sums of their transfers" in names
    finally:
        await conn.close()


async def test_the_ledger_topic_rebuilds_the_same_balances(settings):
    consumers = [uid("acct_c") for _ in range(3)]
    owners = [uid("acct_o") for _ in range(2)]
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement, projection) as [svc, proj],
    ):
        for c in consumers:
            await fund(settings, ledger, c, 200)
        routed = [
            call_routed(
                UPSTREAM,
                consumer_id=consumers[i % 3],
                owner_id=owners[i % 2],
                price=7 * i,
                fee_bps=(0, 1000, 3333, 10_000)[i % 4],
            )
            for i in range(30)
        ]
        await publish(settings, *routed)
        for r in routed:
            await eventually(
                lambda r=r: (
                    calls.of_type("call.authorized", r.request_id)
                    or calls.of_type("call.rejected", r.request_id)
                ),
                what="decision",
            )
        outcomes = [
            CallCompleted(request_id=r.request_id, via="response")
            if i % 3
            else CallFailed(request_id=r.request_id, reason="owner_error")
            for i, r in enumerate(routed)
        ]
        await publish(
            settings,
            *outcomes,
            CorrectionRequested(correction_id=uid("cor"), account_id=consumers[0], amount=13),
            CorrectionRequested(
                correction_id=uid("cor"), account_id=owners[0], role="owner", amount=-1
            ),
        )
        authorized = [r for r in routed if calls.of_type("call.authorized", r.request_id)]
        for r in authorized:
            await eventually(
                lambda r=r: (
                    calls.of_type("call.settled", r.request_id)
                    or calls.of_type("call.refunded", r.request_id)
                ),
                what="outcome",
            )
        await events_of(ledger, "account.corrected", n=2)

        tables = {
            r["id"]: (
                r["debits_pending"],
                r["debits_posted"],
                r["credits_pending"],
                r["credits_posted"],
            )
            for r in await fetch(svc, "SELECT * FROM accounts")
        }

        async def replayed() -> bool:
            replay = Replay()
            await read_topic(settings, replay)
            rebuilt = replay.totals()
            return all(rebuilt.get(k, (0, 0, 0, 0)) == v for k, v in tables.items()) and all(
                k in tables for k in rebuilt
            )

        await eventually(replayed, what="the topic rebuilds the tables' totals")

        # The read model, built from the same topic, shows the same balances.
        async def projected() -> bool:
            rows = await fetch(proj, "SELECT * FROM balances")
            view = {r["ledger_account"]: (r["balance"], r["reserved"]) for r in rows}
            want = {
                k: (cpo - dpo, dp)
                for k, (dp, dpo, _, cpo) in tables.items()
                if k.startswith(("consumer:", "owner:")) and (dp, dpo, cpo) != (0, 0, 0)
            }
            return all(view.get(k) == v for k, v in want.items())

        await eventually(projected, what="the read model's balances")
        report = await check(settings)
        assert report.violations == [], report.violations
        assert report.topic_events and report.topic_events >= len(authorized) * 2


async def test_an_outcome_written_in_time_is_captured_though_settlement_read_it_late(settings):
    """Settlement was down past the call's deadline while the owner's result waited in the
    log: on its return the result is captured, and the sweeper does not release the
    reservation first (the owner would never have been paid)."""
    settings = settings.model_copy(
        update={"reservation_grace_seconds": 0.5, "reservation_sweep_seconds": 0.2}
    )
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
    ):
        routed = call_routed(
            UPSTREAM, consumer_id=consumer, owner_id=owner, price=30, deadline_in=2
        )
        rid = routed.request_id
        async with running(settings, settlement):
            await fund(settings, ledger, consumer, 100)
            await publish(settings, routed)
            await events_of(calls, "call.authorized", rid)
        await publish(settings, CallCompleted(request_id=rid, via="response", result=1))
        wait = (routed.deadline - datetime.now(UTC)).total_seconds() + 1.5
        await asyncio.sleep(wait)  # past the deadline and the grace, with nobody settling
        async with running(settings, settlement) as [svc]:
            await events_of(calls, "call.settled", rid)
            await asyncio.sleep(1)  # a few sweeps
            assert not calls.of_type("call.refunded", rid)
            [row] = await fetch(svc, "SELECT state FROM reservations WHERE request_id = $1", rid)
            assert row["state"] == "posted"

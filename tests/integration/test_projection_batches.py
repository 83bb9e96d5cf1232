"""The ledger and deliveries read models write a batch with a few set-based statements; a batch
must leave exactly the state its events leave when applied one at a time (as the fallback after a
failed batch does), whatever a batch holds: a transfer published twice, a reservation voided in
the same batch, a correction requested and decided, a delivery's whole life, events read again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.structs import ConsumerRecord

from postback_libs.consumer import BatchApplier, Handlers
from postback_libs.db import create_pool, migrate
from postback_libs.events import (
    AccountCorrected,
    AccountCredited,
    CorrectionRefused,
    CorrectionRequested,
    DeliveryAttempted,
    DeliveryExhausted,
    DeliveryFailed,
    DeliveryScheduled,
    DeliverySucceeded,
    EventData,
    TransferPosted,
    TransferReserved,
    TransferVoided,
    new_event,
)
from postback_projection import deliveries, ledger

START = datetime(2025, 1, 1, tzinfo=UTC)
TABLES = ("transfers", "balances", "corrections", "deliveries", "delivery_attempts")


def ledger_events() -> list[EventData]:
    c, o, fee = "consumer:acc_c", "owner:acc_o", "platform:fee"
    reserve = TransferReserved(
        transfer_id="r1:reserve", request_id="r1", debit_account=c, credit_account=o, amount=9
    )
    post = TransferPosted(
        transfer_id="r1:post",
        pending_id="r1:reserve",
        request_id="r1",
        debit_account=c,
        credit_account=o,
        amount=9,
        api_id="api_1",
    )
    return [
        AccountCredited(credit_id="cr1", account_id="acc_c", amount=100, balance=100),
        reserve,
        post,
        post,  # published twice: counted once
        TransferReserved(
            transfer_id="r2:reserve", request_id="r2", debit_account=c, credit_account=fee, amount=1
        ),
        TransferVoided(
            transfer_id="r2:void",
            pending_id="r2:reserve",
            request_id="r2",
            debit_account=c,
            credit_account=fee,
            amount=1,
        ),
        CorrectionRequested(account_id="acc_c", correction_id="k1", amount=5, note="goodwill"),
        AccountCorrected(
            account_id="acc_c",
            correction_id="k1",
            transfer_id="correction:k1",
            debit_account="operator:funding",
            credit_account=c,
            amount=5,
            balance=96,
            note="goodwill",
        ),
        # Decided first, requested late: the decision stands.
        CorrectionRefused(
            account_id="acc_c",
            correction_id="k2",
            amount=-500,
            reason="insufficient_funds",
            available=96,
        ),
        CorrectionRequested(account_id="acc_c", correction_id="k2", amount=-500, note="oops"),
        reserve,  # published again after it was posted: changes nothing
    ]


def delivery_events() -> list[EventData]:
    later = datetime(2030, 1, 1, tzinfo=UTC)
    one: dict[str, Any] = {"delivery_id": "d1", "message_id": "m1", "request_id": "r1"}
    two: dict[str, Any] = {"delivery_id": "d2", "message_id": "m2", "endpoint_id": "ep1"}
    return [
        DeliveryScheduled(**one, account_id="acc_c", message_type="call.completed", url="u1"),
        DeliveryAttempted(
            **one,
            url="u1",
            attempt=1,
            status_code=503,
            error_class="http_status",
            next_attempt_at=later,
            response_headers={"retry-after": "5"},
        ),
        DeliveryAttempted(**one, url="u1", attempt=2, status_code=200, latency_ms=2.5),
        DeliverySucceeded(**one, attempts=2),
        DeliveryAttempted(**one, url="u1", attempt=3, status_code=200),  # late: status stays
        # Exhausted, then its endpoint disabled.
        DeliveryScheduled(**two, account_id="acc_c", message_type="call.failed", url="u2"),
        DeliveryAttempted(**two, url="u2b", attempt=1, error_class="connect"),
        DeliveryExhausted(**two, attempts=1, last_error="connect: refused"),
        DeliveryFailed(**two, attempts=1, reason="endpoint disabled"),
        DeliveryAttempted(**two, url="u3", attempt=1, status_code=200, test=True),
        DeliveryScheduled(
            delivery_id="d3", message_id="m3", account_id="acc_c", message_type="x", url="u4"
        ),
    ]


def records(events: list[EventData], topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    out = []
    for offset, data in enumerate(events):
        e = new_event(data, source="test", at=START + timedelta(seconds=offset))
        value = e.to_bytes()
        headers = [("ce_type", e.type.encode())]
        out.append(
            ConsumerRecord(
                topic, 0, offset, 0, 0, e.subject.encode(), value, None, 0, len(value), headers
            )
        )
    return out


async def state(pool: Any) -> dict[str, list[dict[str, Any]]]:
    out = {}
    async with pool.acquire() as conn:
        for table in TABLES:
            rows = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
            if table == "balances":
                for row in rows:
                    row.pop("updated_at")  # stamped with now()
            out[table] = sorted(rows, key=repr)
    return out


Topics = list[tuple[Handlers, list[ConsumerRecord[bytes, bytes]]]]


async def apply(
    settings, schema: str, topics: Topics, sizes: list[int]
) -> dict[str, list[dict[str, Any]]]:
    """Every event of both topics, in batches of `sizes` (then one by one), then all of them
    again as a redelivery."""
    await migrate(settings.database_url, schema, "postback_projection")
    pool = await create_pool(settings.database_url, schema)
    try:
        for handlers, recs in topics:
            applier = BatchApplier(handlers, pool, settings, "projection", producer=None)
            at = 0
            for size in [*sizes, *[1] * len(recs)]:
                if at < len(recs):
                    await applier.apply(recs[at : at + size])
                    at += size
            await applier.apply(recs)
        return await state(pool)
    finally:
        await pool.close()


async def test_a_batch_leaves_the_state_of_its_events_one_by_one(settings):
    topics: Topics = [
        (ledger.handlers(), records(ledger_events(), "ledger")),
        (deliveries.handlers(), records(delivery_events(), "deliveries")),
    ]
    one_by_one = await apply(settings, "one_by_one", topics, [])
    for name, sizes in (("whole", [100]), ("split", [3, 4])):
        assert await apply(settings, f"batched_{name}", topics, sizes) == one_by_one, name

    balances = {r["ledger_account"]: (r["balance"], r["reserved"]) for r in one_by_one["balances"]}
    assert balances == {"consumer:acc_c": (100 - 9 + 5, 0), "owner:acc_o": (9, 0)}
    corrections = {r["correction_id"]: r for r in one_by_one["corrections"]}
    assert corrections["k1"]["status"] == "applied"
    assert corrections["k2"]["status"] == "refused"
    assert corrections["k2"]["note"] == "oops"
    status = {r["delivery_id"]: r["status"] for r in one_by_one["deliveries"]}
    assert status == {"d1": "succeeded", "d2": "failed", "d3": "pending"}
    d1 = next(r for r in one_by_one["deliveries"] if r["delivery_id"] == "d1")
    assert (d1["attempts"], d1["last_status_code"], d1["last_error"]) == (3, 200, None)
    assert len(one_by_one["delivery_attempts"]) == 5

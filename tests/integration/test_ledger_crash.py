"""Settlement killed with SIGKILL in the middle of a burst, then started again: no call is
debited twice or lost, every invariant holds, and no call is left reserved forever (calls that
never get an outcome are released after their deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx

from postback.embedded import free_port
from postback.ledger_check import check
from postback_libs.events import CallCompleted, CallFailed, CreditRequested, EventData
from postback_libs.settings import Settings
from tests.helpers import TopicReader, call_routed, eventually, publish, uid

UPSTREAM = "http://127.0.0.1:9/api"
CALLS = 400
PRICE = 10
GRACE_SECONDS = 1.0


def settlement_env(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    env.update(
        POSTBACK_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        POSTBACK_DATABASE_URL=settings.database_url,
        POSTBACK_TOPIC_PREFIX=settings.topic_prefix,
        POSTBACK_HTTP_PORT=str(port),
        POSTBACK_KAFKA_SESSION_TIMEOUT_MS="2000",
        # Small batches, so the kill lands between and inside many of them.
        POSTBACK_CONSUMER_MAX_RECORDS="20",
        POSTBACK_RESERVATION_GRACE_SECONDS=str(GRACE_SECONDS),
        POSTBACK_RESERVATION_SWEEP_SECONDS="0.5",
        POSTBACK_LOG_LEVEL="WARNING",
    )
    return env


@contextlib.contextmanager
def settlement_process(
    settings: Settings, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "postback", "run", "settlement"],
            env=settlement_env(settings, port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def ready(port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
            return r.status_code == 200
    return False


async def publish_paced(settings: Settings, events: list[EventData], chunks: int = 20) -> None:
    """The burst over a few seconds: settlement keeps up with a burst published at once, and
    could settle all of it before the kill lands."""
    size = -(-len(events) // chunks)
    for first in range(0, len(events), size):
        await publish(settings, *events[first : first + size])
        await asyncio.sleep(0.15)


async def test_settlement_killed_mid_burst_loses_nothing_and_moves_nothing_twice(
    settings, tmp_path
):
    consumers = [uid("acct_c") for _ in range(5)]
    owners = [uid("acct_o") for _ in range(3)]
    log = tmp_path / "settlement.log"
    routed = [
        call_routed(
            UPSTREAM,
            consumer_id=consumers[i % 5],
            owner_id=owners[i % 3],
            price=PRICE,
            # A fifth of the calls never get an outcome: the safety net must release them.
            deadline_in=2 if i % 5 == 4 else 600,
        )
        for i in range(CALLS)
    ]
    outcome_of: dict[str, str] = {}
    burst: list[EventData] = []
    for i, r in enumerate(routed):
        burst.append(r)
        if i % 5 in (0, 1, 2):
            burst.append(CallCompleted(request_id=r.request_id, via="response"))
            outcome_of[r.request_id] = "call.settled"
        elif i % 5 == 3:
            burst.append(CallFailed(request_id=r.request_id, reason="owner_error"))
            outcome_of[r.request_id] = "call.failed"
        else:
            outcome_of[r.request_id] = "call.timed_out"

    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
    ):
        with settlement_process(settings, log) as (proc, port):
            await eventually(lambda: ready(port), timeout=60, what="settlement ready")
            await publish(
                settings,
                *(
                    CreditRequested(credit_id=f"cr_{c}", account_id=c, amount=CALLS * PRICE)
                    for c in consumers
                ),
            )
            await eventually(
                lambda: len(ledger.of_type("account.credited")) >= len(consumers),
                what="credits applied",
            )
            sending = asyncio.create_task(publish_paced(settings, burst))
            await eventually(
                lambda: len(calls.of_type("call.settled")) >= CALLS // 10,
                timeout=60,
                what="the burst under way",
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # What matters is that settlement had work in hand, not that the publisher did.
            killed_at = len({e.subject for e in calls.of_type("call.settled")})
            captures = sum(o == "call.settled" for o in outcome_of.values())
            assert killed_at < captures, "everything was settled before the kill; make it longer"

        with settlement_process(settings, log) as (proc, port):
            await sending

            def finals() -> dict[str, list[str]]:
                """The distinct final events of each call (a republished event keeps its id)."""
                out: dict[str, set[tuple[str, str]]] = {}
                for t in ("call.settled", "call.refunded", "call.rejected"):
                    for e in calls.of_type(t):
                        out.setdefault(e.subject, set()).add((e.id, t))
                return {k: sorted(t for _, t in v) for k, v in out.items()}

            await eventually(
                lambda: len(finals()) == CALLS, timeout=120, what="every call settled or released"
            )
            await asyncio.sleep(1.0)  # a second outcome for any call would show up here
            got = finals()
            assert all(len(v) == 1 for v in got.values()), {
                k: v for k, v in got.items() if len(v) > 1
            }
            for r in routed:
                want = outcome_of[r.request_id]
                [final] = got[r.request_id]
                if want == "call.settled":
                    assert final == "call.settled", r.request_id
                else:
                    assert final == "call.refunded", r.request_id
                    [refund] = {
                        e.id: e for e in calls.of_type("call.refunded", r.request_id)
                    }.values()
                    assert refund.data["outcome"] == want
            report = await check(settings)
            assert report.violations == [], report.violations
            assert report.open_reservations == 0
            assert proc.poll() is None

    # Each consumer paid for exactly its captured calls.
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT id, credits_posted - debits_posted AS balance, debits_pending"
            " FROM settlement.accounts WHERE kind = 'consumer'"
        )
    finally:
        await conn.close()
    settled_per_consumer = {c: 0 for c in consumers}
    for i, r in enumerate(routed):
        if outcome_of[r.request_id] == "call.settled":
            settled_per_consumer[consumers[i % 5]] += PRICE
    assert {r["id"]: (r["balance"], r["debits_pending"]) for r in rows} == {
        f"consumer:{c}": (CALLS * PRICE - paid, 0) for c, paid in settled_per_consumer.items()
    }
    assert 0 < killed_at < CALLS

"""Property: whatever sequence of call events and operator requests settlement consumes — with
redeliveries, duplicates under new ids, and the process dying at any statement of a batch — the
ledger keeps every invariant, matches a plain model of the rules, emits each outcome once, and
the ledger events it emitted rebuild the same balances.

Runs settlement's real handlers through the real consumer (`BatchApplier`: inbox, handlers,
outbox in one transaction) against the real Postgres; each example runs inside a transaction
that is rolled back, so the consumer's own transactions are savepoints in it and a "crash" is an
exception that unwinds one."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import ConsumerRecord
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from postback.ledger_check import Replay, check_tables
from postback_libs.consumer import BatchApplier
from postback_libs.db import migrate
from postback_libs.events import (
    CallCompleted,
    CallFailed,
    CallRouted,
    CallTimedOut,
    CloudEvent,
    CorrectionRequested,
    CreditRequested,
    EventData,
    new_event,
)
from postback_libs.outbox import UnitOfWork
from postback_settlement.app import call_handlers, funding_handlers, release_expired

CONSUMERS = ["c1", "c2"]
OWNERS = ["o1", "o2"]
THRESHOLD = 30
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


class Crash(BaseException):
    """The process died here: nothing of the transaction in flight survives."""


class CrashingConn:
    """A connection that dies after `left` statements."""

    def __init__(self, conn: Any, left: int | None) -> None:
        self._conn, self.left = conn, left

    def _tick(self) -> None:
        if self.left is not None:
            if self.left <= 0:
                raise Crash
            self.left -= 1

    async def execute(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return await self._conn.execute(*a, **k)

    async def executemany(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return await self._conn.executemany(*a, **k)

    async def fetch(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return await self._conn.fetch(*a, **k)

    async def fetchrow(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return await self._conn.fetchrow(*a, **k)

    async def fetchval(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return await self._conn.fetchval(*a, **k)

    def transaction(self, **k: Any) -> Any:
        return self._conn.transaction(**k)


class OneConnection:
    """A pool of the example's one connection (so every transaction nests in its rollback)."""

    def __init__(self, conn: Any) -> None:
        self.conn: Any = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        yield self.conn


class NoDeadLetters:
    async def send_and_wait(self, *a: Any, **k: Any) -> None:
        raise AssertionError(f"an event was dead-lettered: {k.get('value', b'')[:500]!r}")


# --- the model: the rules, written plainly --------------------------------------------------


@dataclass
class Model:
    acc: dict[str, list[int]] = field(default_factory=dict)  # dp, dpo, cp, cpo
    res: dict[str, dict[str, Any]] = field(default_factory=dict)
    credits: set[str] = field(default_factory=set)
    corrections: set[str] = field(default_factory=set)
    lows: list[tuple[str, int]] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)  # told of a low balance, no credit since

    def a(self, account: str) -> list[int]:
        return self.acc.setdefault(account, [0, 0, 0, 0])

    def available(self, account: str) -> int:
        x = self.a(account)
        return x[3] - x[1] - x[0]

    def low(self, account: str, before: int) -> None:
        after = self.available(account)
        crossed = account.startswith("consumer:") and before >= THRESHOLD > after
        if crossed and account not in self.warned:
            self.warned.add(account)
            self.lows.append((account.split(":", 1)[1], after))

    def added(self, account: str) -> None:
        self.warned.discard(account)

    def routed(self, e: CallRouted) -> None:
        if e.request_id in self.res:
            return
        consumer = f"consumer:{e.consumer_id}"
        before = self.available(consumer)
        if before < e.price:
            return
        fee = e.price * e.fee_bps // 10_000
        for credit, amount in ((f"owner:{e.owner_id}", e.price - fee), ("platform:fee", fee)):
            self.a(consumer)[0] += amount
            self.a(credit)[2] += amount
        self.res[e.request_id] = {
            "consumer": e.consumer_id,
            "owner": e.owner_id,
            "amount": e.price,
            "fee": fee,
            "state": "reserved",
        }
        self.low(consumer, before)

    def resolve(self, request_id: str, phase: str) -> None:
        r = self.res.get(request_id)
        if r is None or r["state"] != "reserved":
            return
        consumer = f"consumer:{r['consumer']}"
        for credit, amount in (
            (f"owner:{r['owner']}", r["amount"] - r["fee"]),
            ("platform:fee", r["fee"]),
        ):
            self.a(consumer)[0] -= amount
            self.a(credit)[2] -= amount
            if phase == "post":
                self.a(consumer)[1] += amount
                self.a(credit)[3] += amount
        r["state"] = "posted" if phase == "post" else "voided"

    def credit(self, e: CreditRequested) -> None:
        if e.credit_id in self.credits:
            return
        self.credits.add(e.credit_id)
        self.a("operator:funding")[1] += e.amount
        self.a(f"consumer:{e.account_id}")[3] += e.amount
        self.added(f"consumer:{e.account_id}")

    def correct(self, e: CorrectionRequested) -> None:
        account = f"{e.role}:{e.account_id}"
        if e.correction_id in self.corrections or e.amount == 0:
            return
        before = self.available(account)
        if e.amount > 0:
            self.a("operator:funding")[1] += e.amount
            self.a(account)[3] += e.amount
            self.added(account)
        elif before < -e.amount:
            return
        else:
            self.a(account)[1] -= e.amount
            self.a("operator:funding")[3] -= e.amount
        self.corrections.add(e.correction_id)
        self.low(account, before)

    def apply(self, data: EventData) -> None:
        if isinstance(data, CallRouted):
            self.routed(data)
        elif isinstance(data, CallCompleted):
            self.resolve(data.request_id, "post")
        elif isinstance(data, CallFailed | CallTimedOut):
            self.resolve(data.request_id, "void")
        elif isinstance(data, CreditRequested):
            self.credit(data)
        elif isinstance(data, CorrectionRequested):
            self.correct(data)

    def sweep(self) -> None:
        for rid in sorted(self.res):
            self.resolve(rid, "void")


# --- scenarios ------------------------------------------------------------------------------

calls_st = st.lists(
    st.tuples(
        st.sampled_from(CONSUMERS),
        st.sampled_from(OWNERS),
        st.integers(0, 60),
        st.sampled_from([0, 1, 250, 1000, 3333, 10_000]),
    ),
    min_size=1,
    max_size=5,
)


def action_st(n_calls: int) -> st.SearchStrategy[tuple[Any, ...]]:
    call = st.integers(0, n_calls - 1)
    return st.one_of(
        st.tuples(st.just("routed"), call),
        st.tuples(st.sampled_from(["completed", "failed", "timed_out"]), call),
        st.tuples(
            st.just("credit"), st.sampled_from(CONSUMERS), st.integers(1, 80), st.integers(0, 3)
        ),
        st.tuples(
            st.just("correction"),
            st.sampled_from([("consumer", c) for c in CONSUMERS] + [("owner", "o1")]),
            st.integers(-60, 60),
            st.integers(0, 3),
        ),
        st.tuples(st.sampled_from(["again", "copy"]), st.integers(0, 30)),
        st.tuples(st.just("sweep")),
    )


def record(e: CloudEvent, offset: int) -> ConsumerRecord[bytes, bytes]:
    value = e.to_bytes()
    return ConsumerRecord(
        "t",
        0,
        offset,
        0,
        0,
        e.subject.encode(),
        value,
        None,
        0,
        len(value),
        [("ce_type", e.type.encode())],
    )


def group_of(e: CloudEvent) -> str:
    return "calls" if e.type.startswith("call.") else "funding"


async def db_state(conn: Any) -> tuple[dict[str, list[int]], dict[str, tuple[Any, ...]]]:
    accounts = {
        r["id"]: [
            r["debits_pending"],
            r["debits_posted"],
            r["credits_pending"],
            r["credits_posted"],
        ]
        for r in await conn.fetch("SELECT * FROM accounts")
        if any((r["debits_pending"], r["debits_posted"], r["credits_pending"], r["credits_posted"]))
    }
    reservations = {
        r["request_id"]: (r["consumer_id"], r["owner_id"], r["amount"], r["fee"], r["state"])
        for r in await conn.fetch("SELECT * FROM reservations")
    }
    return accounts, reservations


async def assert_consistent(conn: Any, model: Model) -> None:
    violations = await check_tables(conn, margin=timedelta(days=365 * 200))
    assert violations == [], violations
    accounts, reservations = await db_state(conn)
    assert accounts == {k: v for k, v in model.acc.items() if any(v)}
    assert reservations == {
        k: (v["consumer"], v["owner"], v["amount"], v["fee"], v["state"])
        for k, v in model.res.items()
    }
    outbox = [
        (r["type"], json.loads(bytes(r["payload"])))
        for r in await conn.fetch("SELECT type, payload FROM outbox ORDER BY position")
    ]
    ids = Counter(e["id"] for _, e in outbox)
    assert max(ids.values(), default=1) == 1, "an event was emitted twice"
    per_call = Counter(
        (e["data"]["request_id"], "outcome" if t in ("call.settled", "call.refunded") else t)
        for t, e in outbox
        if t in ("call.authorized", "call.settled", "call.refunded")
    )
    assert max(per_call.values(), default=1) == 1, per_call
    transfers = Counter(e["data"]["transfer_id"] for t, e in outbox if t.startswith("transfer."))
    assert max(transfers.values(), default=1) == 1, transfers
    lows = [
        (e["data"]["account_id"], e["data"]["balance"]) for t, e in outbox if t == "balance.low"
    ]
    assert lows == model.lows
    # The ledger events settlement emitted rebuild exactly the balances it keeps.
    replay = Replay()
    for _, e in outbox:
        replay.add(CloudEvent.model_validate(e))
    assert replay.conflicts == []
    rebuilt = {k: list(v) for k, v in replay.totals().items() if any(v)}
    assert rebuilt == accounts


@hsettings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_ledger_keeps_every_invariant_whatever_it_consumes(settings, data):
    await migrate(settings.database_url, "settlement", "postback_settlement")  # once; then a no-op
    s = settings.model_copy(update={"low_balance_threshold": THRESHOLD, "handler_retries": 0})
    handlers = {"calls": call_handlers(s), "funding": funding_handlers(s)}
    calls = data.draw(calls_st, label="calls")
    deadline = datetime.now(UTC) + timedelta(hours=1)
    routed = [
        CallRouted(
            request_id=f"req{i}",
            consumer_id=c,
            owner_id=o,
            api_id=f"api_{o}",
            mode="production",
            upstream_url="http://127.0.0.1:9/x",
            method="POST",
            path="/",
            price=price,
            fee_bps=bps,
            deadline=deadline,
        )
        for i, (c, o, price, bps) in enumerate(calls)
    ]
    actions = data.draw(st.lists(action_st(len(calls)), max_size=40), label="actions")
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": "settlement,public"}
    )
    tx = conn.transaction()
    await tx.start()
    try:
        await run_scenario(data, conn, s, handlers, routed, actions)
    finally:
        await tx.rollback()
        await conn.close()


async def run_scenario(
    data: st.DataObject,
    conn: Any,
    s: Any,
    handlers: dict[str, Any],
    routed: list[CallRouted],
    actions: list[tuple[Any, ...]],
) -> None:
    model = Model()
    pool = OneConnection(conn)
    appliers = {
        g: BatchApplier(h, pool, s, "settlement", NoDeadLetters())  # type: ignore[arg-type]
        for g, h in handlers.items()
    }
    history: list[CloudEvent] = []
    applied: set[str] = set()
    queue: list[CloudEvent] = []
    offset = 0

    async def deliver() -> None:
        """Consume what is queued, in batches of one consumer group at a time."""
        nonlocal offset
        while queue:
            group = group_of(queue[0])
            size = data.draw(st.integers(1, 4), label="batch size")
            batch: list[CloudEvent] = []
            while queue and len(batch) < size and group_of(queue[0]) == group:
                batch.append(queue.pop(0))
            records = [record(e, offset + i) for i, e in enumerate(batch)]
            offset += len(batch)
            crash_at = data.draw(st.none() | st.integers(0, 8), label="crash after statements")
            if crash_at is not None:
                pool.conn = CrashingConn(conn, crash_at)
                try:
                    await appliers[group].apply(records)
                except Crash:
                    event("a batch died mid-transaction")
                finally:
                    pool.conn = conn
            # After a crash the offsets were never committed: the same batch comes again.
            await appliers[group].apply(records)
            if data.draw(st.booleans(), label="redelivered after commit"):
                await appliers[group].apply(records)
            for e in batch:
                if e.id not in applied:
                    applied.add(e.id)
                    model.apply(e.payload())
            await assert_consistent(conn, model)

    for action in actions:
        kind = action[0]
        e: CloudEvent | None = None
        if kind == "routed":
            e = new_event(routed[action[1]], source="routing")
        elif kind in ("completed", "failed", "timed_out"):
            rid = routed[action[1]].request_id
            outcome: EventData = {
                "completed": CallCompleted(request_id=rid, via="response", result={"ok": 1}),
                "failed": CallFailed(request_id=rid, reason="owner_error"),
                "timed_out": CallTimedOut(request_id=rid, deadline=datetime.now(UTC)),
            }[kind]
            e = new_event(outcome, source="owner-adapter")
        elif kind == "credit":
            _, consumer, amount, n = action
            e = new_event(
                CreditRequested(credit_id=f"cr{n}", account_id=consumer, amount=amount),
                source="ingress",
            )
        elif kind == "correction":
            _, (role, account), amount, n = action
            e = new_event(
                CorrectionRequested(
                    correction_id=f"cor{n}", account_id=account, role=role, amount=amount
                ),
                source="ingress",
            )
        elif kind in ("again", "copy") and history:
            earlier = history[action[1] % len(history)]
            # Byte for byte (a redelivery), or the same request under a new event id.
            e = earlier if kind == "again" else new_event(earlier.payload(), source="test")
        elif kind == "sweep":
            await deliver()
            async with conn.transaction():
                uow = UnitOfWork(conn, "settlement", s)
                await release_expired(uow, s, now=FAR_FUTURE)
                await uow.flush()
            model.sweep()
            await assert_consistent(conn, model)
        if e is not None:
            history.append(e)
            queue.append(e)
    await deliver()

"""The ledger in Postgres, applied a batch at a time.

Handlers do not touch the ledger tables themselves: each stages a step (what it needs locked,
and what to do with the `Book`), and at the end of the batch (`apply_ledger`, before its events
are written) the staged steps run together — one `Book` over rows locked once, written back in a
handful of set-based statements, whatever the batch size: per event no round trip at all,
where handlers writing as they went made about eight.

Rows are always locked in one global order — reservations, then accounts, each sorted by id —
so two settlement replicas, the funding consumer and the sweeper can share hot rows such as the
platform fee account without deadlocking. Every write is a plain INSERT or a conditional UPDATE
checked for its row count: if the stored ledger ever disagrees with the book, the transaction
fails and nothing of the batch is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from postback_libs.outbox import UnitOfWork
from postback_libs.telemetry import continuing, current_traceparent
from postback_settlement.domain import (
    Account,
    Book,
    LedgerInconsistent,
    Reservation,
    account_kind,
)

Step = Callable[[Book], None]
SCRATCH_KEY = "settlement.ledger"

LOCK_ACCOUNTS = """
SELECT id, kind, debits_pending, debits_posted, credits_pending, credits_posted,
       debits_must_not_exceed_credits AS floor, low_balance_warned
FROM accounts WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE
"""
CREATE_ACCOUNTS = """
INSERT INTO accounts (id, kind, debits_must_not_exceed_credits)
SELECT id, kind, kind = 'consumer' FROM unnest($1::text[], $2::text[]) AS u(id, kind)
ORDER BY id ON CONFLICT DO NOTHING
"""
LOCK_RESERVATIONS = """
SELECT request_id, consumer_id, owner_id, amount, fee, state, api_id, deadline
FROM reservations WHERE request_id = ANY($1::text[]) ORDER BY request_id FOR UPDATE
"""
EXISTING_TRANSFERS = "SELECT id FROM transfers WHERE id = ANY($1::text[])"
WRITE_ACCOUNTS = """
UPDATE accounts a SET debits_pending = u.dp, debits_posted = u.dpo,
                      credits_pending = u.cp, credits_posted = u.cpo, low_balance_warned = u.lw
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::boolean[])
     AS u(id, dp, dpo, cp, cpo, lw)
WHERE a.id = u.id
"""
INSERT_TRANSFERS = """
INSERT INTO transfers (id, debit_account, credit_account, amount, kind, pending_id, request_id,
                       api_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                     $7::text[], $8::text[])
"""
INSERT_RESERVATIONS = """
INSERT INTO reservations (request_id, consumer_id, owner_id, amount, fee, state, api_id,
                          deadline)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],
                     $7::text[], $8::timestamptz[])
"""
RESOLVE_RESERVATIONS = """
UPDATE reservations r SET state = u.state, updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u(request_id, state)
WHERE r.request_id = u.request_id AND r.state = 'reserved'
"""


async def lock_reservations(conn: Any, request_ids: Iterable[str]) -> list[Reservation]:
    ids = sorted(set(request_ids))
    if not ids:
        return []
    return [
        Reservation(
            r["request_id"],
            r["consumer_id"],
            r["owner_id"],
            r["amount"],
            r["fee"],
            r["state"],
            r["api_id"],
            r["deadline"],
        )
        for r in await conn.fetch(LOCK_RESERVATIONS, ids)
    ]


def _account(r: Any) -> Account:
    return Account(
        r["id"],
        r["kind"],
        r["debits_pending"],
        r["debits_posted"],
        r["credits_pending"],
        r["credits_posted"],
        r["floor"],
        r["low_balance_warned"],
    )


async def lock_accounts(conn: Any, ids: Iterable[str]) -> list[Account]:
    """Lock the accounts (creating the missing ones) in id order."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    rows = list(await conn.fetch(LOCK_ACCOUNTS, wanted))
    found = {r["id"] for r in rows}
    missing = [i for i in wanted if i not in found]
    if missing:
        # New rows are ours until commit; a replica creating the same account concurrently
        # makes this wait for its commit, after which the row is locked like any other.
        await conn.execute(CREATE_ACCOUNTS, missing, [account_kind(i) for i in missing])
        rows += await conn.fetch(LOCK_ACCOUNTS, missing)
    return [_account(r) for r in rows]


async def save(conn: Any, book: Book) -> None:
    """Write back what the book changed."""
    if book.touched:
        accounts = [book.accounts[i] for i in sorted(book.touched)]
        await conn.execute(
            WRITE_ACCOUNTS,
            [a.id for a in accounts],
            [a.debits_pending for a in accounts],
            [a.debits_posted for a in accounts],
            [a.credits_pending for a in accounts],
            [a.credits_posted for a in accounts],
            [a.low_balance_warned for a in accounts],
        )
    if book.transfers:
        ts = book.transfers
        # A plain INSERT: a transfer id that exists already is a contradiction, not a no-op.
        await conn.execute(
            INSERT_TRANSFERS,
            [t.id for t in ts],
            [t.debit for t in ts],
            [t.credit for t in ts],
            [t.amount for t in ts],
            [t.kind for t in ts],
            [t.pending_id for t in ts],
            [t.request_id for t in ts],
            [t.api_id for t in ts],
        )
    if book.created:
        rs = [book.reservations[i] for i in book.created]
        await conn.execute(
            INSERT_RESERVATIONS,
            [r.request_id for r in rs],
            [r.consumer_id for r in rs],
            [r.owner_id for r in rs],
            [r.amount for r in rs],
            [r.fee for r in rs],
            [r.state for r in rs],
            [r.api_id for r in rs],
            [r.deadline for r in rs],
        )
    if book.resolved:
        rs = [book.reservations[i] for i in book.resolved]
        status = await conn.execute(
            RESOLVE_RESERVATIONS, [r.request_id for r in rs], [r.state for r in rs]
        )
        if status != f"UPDATE {len(rs)}":
            raise LedgerInconsistent(f"resolving {len(rs)} reservations: {status}")


@dataclass
class LedgerStep:
    """The ledger work of one unit of work (one consumed batch, or one sweep), applied as one
    book just before the unit's events are written."""

    conn: Any
    low_balance_threshold: int = 0
    # Each staged step with the trace of the event that staged it: the events it emits
    # continue that trace.
    steps: list[tuple[Step, str | None]] = field(default_factory=list)
    requests: set[str] = field(default_factory=set)
    accounts: set[str] = field(default_factory=set)
    transfer_ids: set[str] = field(default_factory=set)

    def add(
        self,
        step: Step,
        *,
        requests: Iterable[str] = (),
        accounts: Iterable[str] = (),
        transfer_ids: Iterable[str] = (),
    ) -> None:
        """Stage `step`. It will find in the book the reservations of `requests` that exist
        (with their accounts), the `accounts`, and which of `transfer_ids` exist already."""
        self.steps.append((step, current_traceparent()))
        self.requests.update(requests)
        self.accounts.update(accounts)
        self.transfer_ids.update(transfer_ids)

    async def apply(self) -> None:
        if not self.steps:
            return
        steps, self.steps = self.steps, []
        reservations = await lock_reservations(self.conn, self.requests)
        accounts = set(self.accounts)
        for r in reservations:
            accounts.update(r.accounts())
        locked = await lock_accounts(self.conn, accounts)
        existing: set[str] = set()
        if self.transfer_ids:
            rows = await self.conn.fetch(EXISTING_TRANSFERS, sorted(self.transfer_ids))
            existing = {r["id"] for r in rows}
        book = Book.of(locked, reservations, existing, self.low_balance_threshold)
        for step, traceparent in steps:
            with continuing(traceparent):
                step(book)
        await save(self.conn, book)
        self.requests.clear()
        self.accounts.clear()
        self.transfer_ids.clear()


def ledger_step(uow: UnitOfWork, low_balance_threshold: int = 0) -> LedgerStep:
    """The unit of work's ledger step, where handlers stage their work for `apply_ledger`."""
    step: LedgerStep | None = uow.scratch.get(SCRATCH_KEY)
    if step is None:
        step = uow.scratch[SCRATCH_KEY] = LedgerStep(uow.conn, low_balance_threshold)
    return step


async def apply_ledger(uow: UnitOfWork) -> None:
    """Apply what the unit's handlers staged: the consumer's `after_batch` hook, which runs in
    the batch's transaction before its outbox rows are written."""
    step: LedgerStep | None = uow.scratch.get(SCRATCH_KEY)
    if step is not None:
        await step.apply()

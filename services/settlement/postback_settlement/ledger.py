"""The ledger in Postgres. Every function runs inside the caller's transaction; every transfer is
inserted with its derived id first, so a transfer that already exists moves no money again."""

from __future__ import annotations

from typing import Any

from postback_settlement.domain import FUNDING_ACCOUNT, Leg, resolution_id


async def ensure_account(conn: Any, account_id: str, kind: str) -> None:
    await conn.execute(
        "INSERT INTO accounts (id, kind, debits_must_not_exceed_credits) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        account_id,
        kind,
        kind == "consumer",
    )


async def _insert_transfer(
    conn: Any,
    tid: str,
    debit: str,
    credit: str,
    amount: int,
    kind: str,
    pending_id: str | None,
    request_id: str | None,
) -> bool:
    row = await conn.fetchrow(
        "INSERT INTO transfers (id, debit_account, credit_account, amount, kind, pending_id,"
        " request_id) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING id",
        tid,
        debit,
        credit,
        amount,
        kind,
        pending_id,
        request_id,
    )
    return row is not None


async def reserve(conn: Any, request_id: str, legs: list[Leg]) -> bool:
    """Reserve all legs or none; False when the consumer's available balance is too low."""
    total = sum(leg.amount for leg in legs)
    if not legs:
        return True
    debit = legs[0].debit
    funded = await conn.fetchval(
        "UPDATE accounts SET debits_pending = debits_pending + $2 WHERE id = $1"
        " AND (NOT debits_must_not_exceed_credits"
        "      OR credits_posted - debits_posted - debits_pending >= $2) RETURNING id",
        debit,
        total,
    )
    if funded is None:
        return False
    for leg in legs:
        await _insert_transfer(
            conn, leg.transfer_id, leg.debit, leg.credit, leg.amount, "pending", None, request_id
        )
        await conn.execute(
            "UPDATE accounts SET credits_pending = credits_pending + $2 WHERE id = $1",
            leg.credit,
            leg.amount,
        )
    return True


async def resolve(conn: Any, request_id: str, phase: str) -> list[tuple[str, Leg]]:
    """Post or void every unresolved pending transfer of a call; returns each pending
    transfer's id with the transfer that resolved it."""
    pending = await conn.fetch(
        "SELECT t.id, t.debit_account, t.credit_account, t.amount FROM transfers t"
        " WHERE t.request_id = $1 AND t.kind = 'pending' AND NOT EXISTS"
        " (SELECT 1 FROM transfers r WHERE r.pending_id = t.id) ORDER BY t.id",
        request_id,
    )
    moved = []
    for p in pending:
        tid = resolution_id(p["id"], phase)
        if not await _insert_transfer(
            conn,
            tid,
            p["debit_account"],
            p["credit_account"],
            p["amount"],
            phase,
            p["id"],
            request_id,
        ):
            continue
        posted = p["amount"] if phase == "post" else 0
        await conn.execute(
            "UPDATE accounts SET debits_pending = debits_pending - $2,"
            " debits_posted = debits_posted + $3 WHERE id = $1",
            p["debit_account"],
            p["amount"],
            posted,
        )
        await conn.execute(
            "UPDATE accounts SET credits_pending = credits_pending - $2,"
            " credits_posted = credits_posted + $3 WHERE id = $1",
            p["credit_account"],
            p["amount"],
            posted,
        )
        moved.append((p["id"], Leg(tid, p["debit_account"], p["credit_account"], p["amount"])))
    return moved


async def credit(conn: Any, credit_id: str, account: str, amount: int) -> int | None:
    """Fund an account from operator funding; returns its new balance, None if already done."""
    if not await _insert_transfer(
        conn, f"credit:{credit_id}", FUNDING_ACCOUNT, account, amount, "single", None, None
    ):
        return None
    await conn.execute(
        "UPDATE accounts SET debits_posted = debits_posted + $2 WHERE id = $1",
        FUNDING_ACCOUNT,
        amount,
    )
    balance: int = await conn.fetchval(
        "UPDATE accounts SET credits_posted = credits_posted + $2 WHERE id = $1"
        " RETURNING credits_posted - debits_posted",
        account,
        amount,
    )
    return balance


async def balance(conn: Any, account: str) -> int:
    value = await conn.fetchval(
        "SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account
    )
    return int(value or 0)

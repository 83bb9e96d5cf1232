"""The read model of money, from `postback.ledger`: balances per ledger account, one row per
transfer (statements, earnings per API) and the operator's corrections with their outcome.

A transfer row is inserted once by its id and balances move only when it is new, so a ledger
event read twice — redelivered, or published twice by a relay — changes nothing the second
time, whatever the inbox remembers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from postback_libs.consumer import Handlers
from postback_libs.events import (
    LEDGER,
    AccountCorrected,
    AccountCredited,
    CloudEvent,
    CorrectionRefused,
    CorrectionRequested,
    TransferPosted,
    TransferReserved,
    TransferVoided,
)
from postback_libs.outbox import UnitOfWork

FUNDING_ACCOUNT = "operator:funding"

INSERT_TRANSFER = """
INSERT INTO transfers (transfer_id, type, kind, debit_account, credit_account, amount,
    pending_id, request_id, api_id, note, at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT DO NOTHING RETURNING transfer_id
"""
ADJUST_BALANCE = """
INSERT INTO balances (ledger_account, balance, reserved) VALUES ($1, $2, $3)
ON CONFLICT (ledger_account) DO UPDATE SET balance = balances.balance + EXCLUDED.balance,
    reserved = balances.reserved + EXCLUDED.reserved, updated_at = now()
"""
# A correction is `requested` until settlement decides; a decision is never undone by a
# request read late.
UPSERT_CORRECTION = """
INSERT INTO corrections (correction_id, account_id, role, amount, note, status, reason, detail,
    balance, transfer_id, requested_at, decided_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (correction_id) DO UPDATE SET
    status = CASE WHEN corrections.status = 'requested' THEN EXCLUDED.status
                  ELSE corrections.status END,
    reason = coalesce(corrections.reason, EXCLUDED.reason),
    detail = coalesce(corrections.detail, EXCLUDED.detail),
    balance = coalesce(corrections.balance, EXCLUDED.balance),
    transfer_id = coalesce(corrections.transfer_id, EXCLUDED.transfer_id),
    note = CASE WHEN corrections.note = '' THEN EXCLUDED.note ELSE corrections.note END,
    requested_at = coalesce(corrections.requested_at, EXCLUDED.requested_at),
    decided_at = coalesce(corrections.decided_at, EXCLUDED.decided_at)
"""

Movement = AccountCredited | AccountCorrected | TransferReserved | TransferPosted | TransferVoided


@dataclass(frozen=True)
class TransferRow:
    transfer_id: str
    type: str
    kind: str
    debit_account: str
    credit_account: str
    amount: int
    pending_id: str | None = None
    request_id: str | None = None
    api_id: str | None = None
    note: str | None = None


def transfer_row(event_type: str, e: Movement) -> TransferRow:
    """The transfer an event records."""
    if isinstance(e, AccountCredited):
        return TransferRow(
            f"credit:{e.credit_id}",
            event_type,
            "single",
            FUNDING_ACCOUNT,
            f"consumer:{e.account_id}",
            e.amount,
        )
    if isinstance(e, AccountCorrected):
        return TransferRow(
            e.transfer_id,
            event_type,
            "single",
            e.debit_account,
            e.credit_account,
            abs(e.amount),
            note=e.note or None,
        )
    kind = {TransferReserved: "pending", TransferPosted: "post", TransferVoided: "void"}[type(e)]
    return TransferRow(
        e.transfer_id,
        event_type,
        kind,
        e.debit_account,
        e.credit_account,
        e.amount,
        None if isinstance(e, TransferReserved) else e.pending_id,
        e.request_id,
        e.api_id,
    )


def balance_changes(e: Movement) -> list[tuple[str, int, int]]:
    """(ledger account, balance change, reserved change) of each account the read model keeps
    (operator funding is settlement's business, not an account anyone reads)."""
    if isinstance(e, AccountCredited):
        return [(f"consumer:{e.account_id}", e.amount, 0)]
    if isinstance(e, AccountCorrected):
        return [(f"{e.role}:{e.account_id}", e.amount, 0)]
    if isinstance(e, TransferReserved):
        return [(e.debit_account, 0, e.amount)]
    if isinstance(e, TransferPosted):
        return [(e.debit_account, -e.amount, -e.amount), (e.credit_account, e.amount, 0)]
    return [(e.debit_account, 0, -e.amount)]


def handlers() -> Handlers:
    ledger = Handlers("projection-ledger", LEDGER.name)

    @ledger.on(AccountCredited, AccountCorrected, TransferReserved, TransferPosted, TransferVoided)
    async def project_transfer(event: CloudEvent, e: Movement, uow: UnitOfWork) -> None:
        t = transfer_row(event.type, e)
        inserted = await uow.conn.fetchval(
            INSERT_TRANSFER,
            t.transfer_id,
            t.type,
            t.kind,
            t.debit_account,
            t.credit_account,
            t.amount,
            t.pending_id,
            t.request_id,
            t.api_id,
            t.note,
            event.time,
        )
        if inserted is not None:
            await uow.conn.executemany(ADJUST_BALANCE, balance_changes(e))
        if isinstance(e, AccountCorrected):
            await _correction(uow, e, "applied", event.time, balance=e.balance, transfer=t)

    @ledger.on(CorrectionRequested, CorrectionRefused)
    async def project_correction(
        event: CloudEvent, e: CorrectionRequested | CorrectionRefused, uow: UnitOfWork
    ) -> None:
        if isinstance(e, CorrectionRequested):
            await _correction(uow, e, "requested", event.time, note=e.note)
        else:
            await _correction(uow, e, "refused", event.time, reason=e.reason, detail=e.detail)

    return ledger


async def _correction(
    uow: UnitOfWork,
    e: CorrectionRequested | AccountCorrected | CorrectionRefused,
    status: str,
    at: datetime,
    *,
    note: str = "",
    reason: str | None = None,
    detail: str | None = None,
    balance: int | None = None,
    transfer: TransferRow | None = None,
) -> None:
    requested = status == "requested"
    await uow.conn.execute(
        UPSERT_CORRECTION,
        e.correction_id,
        e.account_id,
        e.role,
        e.amount,
        note or (transfer.note if transfer and transfer.note else ""),
        status,
        reason,
        detail,
        balance,
        transfer.transfer_id if transfer else None,
        at if requested else None,
        None if requested else at,
    )

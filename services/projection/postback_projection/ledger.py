"""The read model of money, from `postback.ledger`: balances per ledger account, one row per
transfer (statements, earnings per API) and the operator's corrections with their outcome.

A transfer row is inserted once by its id and balances move only when it is new, so a ledger
event read twice — redelivered, or published twice by a relay — changes nothing the second
time, whatever the inbox remembers. Handlers only gather rows; the batch is written at its end
with a few statements over arrays (`unnest`), not a round trip per event."""

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
from postback_projection.batching import columns, waves

FUNDING_ACCOUNT = "operator:funding"

# Each statement takes a batch's rows as one array per column.
INSERT_TRANSFERS = """
INSERT INTO transfers (transfer_id, type, kind, debit_account, credit_account, amount,
    pending_id, request_id, api_id, note, at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[])
ON CONFLICT DO NOTHING RETURNING transfer_id
"""
ADJUST_BALANCES = """
INSERT INTO balances (ledger_account, balance, reserved)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
ON CONFLICT (ledger_account) DO UPDATE SET balance = balances.balance + EXCLUDED.balance,
    reserved = balances.reserved + EXCLUDED.reserved, updated_at = now()
"""
# A correction is `requested` until settlement decides; a decision is never undone by a
# request read late.
UPSERT_CORRECTIONS = """
INSERT INTO corrections (correction_id, account_id, role, amount, note, status, reason, detail,
    balance, transfer_id, requested_at, decided_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::bigint[], $10::text[], $11::timestamptz[], $12::timestamptz[])
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
TRANSFERS, CORRECTIONS = "ledger.transfers", "ledger.corrections"

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
    ledger = Handlers(
        "projection-ledger", LEDGER.name, after_batch=_write, idempotent=True, background=True
    )

    @ledger.on(AccountCredited, AccountCorrected, TransferReserved, TransferPosted, TransferVoided)
    async def project_transfer(event: CloudEvent, e: Movement, uow: UnitOfWork) -> None:
        t = transfer_row(event.type, e)
        uow.scratch.setdefault(TRANSFERS, []).append((t, event.time, balance_changes(e)))
        if isinstance(e, AccountCorrected):
            _correction(
                uow,
                e,
                "applied",
                event.time,
                note=e.note,
                balance=e.balance,
                transfer_id=t.transfer_id,
            )

    @ledger.on(CorrectionRequested, CorrectionRefused)
    async def project_correction(
        event: CloudEvent, e: CorrectionRequested | CorrectionRefused, uow: UnitOfWork
    ) -> None:
        if isinstance(e, CorrectionRequested):
            _correction(uow, e, "requested", event.time, note=e.note)
        else:
            _correction(uow, e, "refused", event.time, reason=e.reason, detail=e.detail)

    return ledger


Gathered = tuple[TransferRow, datetime, list[tuple[str, int, int]]]


async def _write(uow: UnitOfWork) -> None:
    gathered: list[Gathered] = uow.scratch.pop(TRANSFERS, [])
    if gathered:
        await _write_transfers(uow, gathered)
    corrections: list[tuple[object, ...]] = uow.scratch.pop(CORRECTIONS, [])
    for wave in waves(corrections, key=lambda row: row[0]):
        await uow.conn.execute(UPSERT_CORRECTIONS, *columns(wave, 12))


async def _write_transfers(uow: UnitOfWork, gathered: list[Gathered]) -> None:
    # A transfer published twice within the batch: the first one read is the one inserted,
    # as when the events were applied one by one.
    first: dict[str, Gathered] = {}
    for g in gathered:
        first.setdefault(g[0].transfer_id, g)
    rows = [
        (t.transfer_id, t.type, t.kind, t.debit_account, t.credit_account, t.amount,
         t.pending_id, t.request_id, t.api_id, t.note, at)
        for t, at, _ in first.values()
    ]  # fmt: skip
    inserted = {
        r["transfer_id"] for r in await uow.conn.fetch(INSERT_TRANSFERS, *columns(rows, 11))
    }
    # Balances move only for the transfers this batch inserted: one already there was
    # counted when it was first read. An account whose changes net to zero still gets its
    # row, as it would one event at a time.
    changes: dict[str, list[int]] = {}
    for t, _, moves in first.values():
        if t.transfer_id in inserted:
            for account, balance, reserved in moves:
                total = changes.setdefault(account, [0, 0])
                total[0] += balance
                total[1] += reserved
    if changes:
        # In account order, so two batches touching the same accounts lock them alike.
        adjust = [(a, b, r) for a, (b, r) in sorted(changes.items())]
        await uow.conn.execute(ADJUST_BALANCES, *columns(adjust, 3))


def _correction(
    uow: UnitOfWork,
    e: CorrectionRequested | AccountCorrected | CorrectionRefused,
    status: str,
    at: datetime,
    *,
    note: str = "",
    reason: str | None = None,
    detail: str | None = None,
    balance: int | None = None,
    transfer_id: str | None = None,
) -> None:
    requested = status == "requested"
    uow.scratch.setdefault(CORRECTIONS, []).append(
        (
            e.correction_id,
            e.account_id,
            e.role,
            e.amount,
            note,
            status,
            reason,
            detail,
            balance,
            transfer_id,
            at if requested else None,
            None if requested else at,
        )
    )

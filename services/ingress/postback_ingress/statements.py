"""Money, read and corrected: statements (every transfer on the caller's accounts), owners'
earnings per API, and operator corrections. Reads come from the read model; a correction is a
`correction.requested` that settlement applies as a transfer, never an edit of the past."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, StrictInt, field_validator

from postback_ingress.auth import ACCOUNT_KEY, Caller, Guards, require_role
from postback_ingress.models import Input, Instant
from postback_ingress.operator_requests import once, require_balance
from postback_ingress.paging import decode_cursor, encode_cursor
from postback_libs.events import MAX_MONEY, CorrectionRequested
from postback_libs.ids import uuid7_hex
from postback_libs.runtime import Service

Role = Literal["consumer", "owner"]


class CorrectionCreate(Input):
    amount: StrictInt = Field(
        description="Minor units, signed: positive adds to the balance, negative takes away.",
        ge=-MAX_MONEY,
        le=MAX_MONEY,
    )
    note: str = Field("", max_length=500, description="Why; kept with the transfer.")
    role: Role = Field("consumer", description="Which of the account's balances to correct.")

    @field_validator("amount")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("a correction must not be zero")
        return v


class CorrectionView(BaseModel):
    correction_id: str
    account_id: str
    role: str
    amount: int
    note: str = ""
    status: Literal["requested", "applied", "refused"]
    reason: str | None = Field(None, description="Why it was refused.")
    detail: str | None = None
    balance: int | None = Field(None, description="The posted balance once applied.")
    transfer_id: str | None = None
    requested_at: datetime | None = None
    decided_at: datetime | None = None


class CorrectionList(BaseModel):
    data: list[CorrectionView]


class StatementEntry(BaseModel):
    transfer_id: str
    type: str = Field(description="The ledger event: transfer.posted, account.credited, ...")
    kind: Literal["single", "pending", "post", "void"] = Field(
        description="pending holds funds for a call in flight; post captures them, void releases "
        "them; single is a credit or a correction."
    )
    account: str = Field(description="Your ledger account, e.g. consumer:acc_...")
    side: Literal["debit", "credit"]
    amount: int = Field(description="Signed from your account's side: credits +, debits -.")
    counterparty: str
    request_id: str | None = None
    api_id: str | None = None
    note: str | None = None
    at: datetime


class Statement(BaseModel):
    data: list[StatementEntry]
    next_cursor: str | None = None


class ApiEarnings(BaseModel):
    api_id: str | None = Field(description="None for movements not tied to an API.")
    earned: int = Field(description="Captured for you, minor units, after the platform fee.")
    calls: int
    pending: int = Field(description="Held for calls in flight, not yet captured.")


class Earnings(BaseModel):
    owner_account: str
    total_earned: int
    total_pending: int
    data: list[ApiEarnings]


# One side at a time, each a range scan of its index; a transfer between two of the caller's own
# accounts (an owner calling its own API) appears once per side, the debit first.
_SIDE = """
(SELECT t.*, {col} AS account, '{side}' AS side, {other} AS counterparty
 FROM projection.transfers t WHERE {col} = ANY($1::text[]) {after}
 ORDER BY at DESC, transfer_id DESC LIMIT $2)
"""


def statement_sql(after_side: str | None) -> str:
    """The statement query; with a cursor ($3 at, $4 transfer id) left on `after_side`, the
    page continues after it (on the same transfer's credit side if the cursor was its debit)."""
    parts = []
    for side, other in (("debit", "credit"), ("credit", "debit")):
        after = ""
        if after_side is not None:
            op = "<=" if side == "credit" and after_side == "debit" else "<"
            after = f"AND (at, transfer_id) {op} ($3::timestamptz, $4::text)"
        parts.append(
            _SIDE.format(col=f"{side}_account", other=f"{other}_account", side=side, after=after)
        )
    return (
        f"SELECT * FROM ({parts[0]} UNION ALL {parts[1]}) s"
        " ORDER BY at DESC, transfer_id DESC, side DESC LIMIT $2"
    )


EARNINGS = """
SELECT t.api_id,
       coalesce(sum(t.amount) FILTER (WHERE t.kind = 'post'), 0) AS earned,
       count(DISTINCT t.request_id) FILTER (WHERE t.kind = 'post') AS calls,
       coalesce(sum(t.amount) FILTER (
           WHERE t.kind = 'pending' AND NOT EXISTS (
               SELECT 1 FROM projection.transfers r WHERE r.pending_id = t.transfer_id)), 0)
           AS pending
FROM projection.transfers t
WHERE t.credit_account = $1 AND t.kind IN ('post', 'pending')
  AND ($2::timestamptz IS NULL OR t.at >= $2) AND ($3::timestamptz IS NULL OR t.at < $3)
GROUP BY t.api_id ORDER BY earned DESC, t.api_id
"""


def _entry(row: Any) -> StatementEntry:
    sign = 1 if row["side"] == "credit" else -1
    return StatementEntry(
        transfer_id=row["transfer_id"],
        type=row["type"],
        kind=row["kind"],
        account=row["account"],
        side=row["side"],
        amount=sign * row["amount"],
        counterparty=row["counterparty"],
        request_id=row["request_id"],
        api_id=row["api_id"],
        note=row["note"],
        at=row["at"],
    )


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["accounts"])
    guards = Guards(service)

    @api.post(
        "/v1/accounts/{account_id}/corrections",
        status_code=202,
        response_model=CorrectionView,
        **guards.operator_only,
    )
    async def request_correction(
        account_id: str, body: CorrectionCreate, request: Request
    ) -> CorrectionView:
        """Correct a balance by a signed amount (operator). Settlement applies it as a transfer
        between operator funding and the account, or refuses it if it would take the account
        below zero; follow it at `GET /v1/accounts/{account_id}/corrections`. Sent again with
        the same `Idempotency-Key`, it is the same correction."""
        await require_balance(service.pool, account_id, body.role, "correct")
        async with service.unit_of_work() as uow:
            correction_id, new = await once(
                uow.conn,
                "correction",
                account_id,
                request.headers.get("idempotency-key"),
                body,
                f"cor_{uuid7_hex()}",
            )
            if new:
                uow.emit(
                    CorrectionRequested(
                        correction_id=correction_id,
                        account_id=account_id,
                        role=body.role,
                        amount=body.amount,
                        note=body.note,
                    )
                )
        return CorrectionView(
            correction_id=correction_id,
            account_id=account_id,
            role=body.role,
            amount=body.amount,
            note=body.note,
            status="requested",
        )

    @api.get(
        "/v1/accounts/{account_id}/corrections",
        response_model=CorrectionList,
        **guards.operator_only,
    )
    async def list_corrections(
        account_id: str, limit: int = Query(50, ge=1, le=200)
    ) -> CorrectionList:
        """An account's corrections, newest first, with what became of each (operator)."""
        rows = await service.pool.fetch(
            "SELECT * FROM projection.corrections WHERE account_id = $1"
            " ORDER BY correction_id DESC LIMIT $2",
            account_id,
            limit,
        )
        return CorrectionList(data=[CorrectionView(**dict(r)) for r in rows])

    @api.get("/v1/accounts/me/transfers", response_model=Statement, openapi_extra=ACCOUNT_KEY)
    async def statement(
        role: Role | None = Query(None, description="One of your balances; both by default."),
        limit: int = Query(50, ge=1, le=200),
        cursor: str | None = None,
        caller: Caller = Depends(guards.caller),
    ) -> Statement:
        """Your statement: every transfer on your balances, newest first; page with
        `next_cursor`."""
        if role is not None:
            require_role(caller, role)
        roles = [role] if role else list(caller.roles)
        accounts = [f"{r}:{caller.account_id}" for r in roles]
        if cursor:
            at, transfer_id, side = decode_cursor(cursor, datetime, str, ("debit", "credit"))
            rows = await service.pool.fetch(
                statement_sql(side), accounts, limit + 1, at, transfer_id
            )
        else:
            rows = await service.pool.fetch(statement_sql(None), accounts, limit + 1)
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = page[-1]
            next_cursor = encode_cursor(last["at"], last["transfer_id"], last["side"])
        return Statement(data=[_entry(r) for r in page], next_cursor=next_cursor)

    @api.get("/v1/accounts/me/earnings", response_model=Earnings, openapi_extra=ACCOUNT_KEY)
    async def earnings(
        since: Instant | None = Query(None, description="Captured at or after (RFC 3339)."),
        until: Instant | None = Query(None, description="Captured before (RFC 3339)."),
        caller: Caller = Depends(guards.caller),
    ) -> Earnings:
        """What your APIs earned (owner): captured after the platform fee, per API."""
        require_role(caller, "owner")
        account = f"owner:{caller.account_id}"
        rows = await service.pool.fetch(EARNINGS, account, since, until)
        data = [
            ApiEarnings(
                api_id=r["api_id"], earned=r["earned"], calls=r["calls"], pending=r["pending"]
            )
            for r in rows
        ]
        return Earnings(
            owner_account=account,
            total_earned=sum(d.earned for d in data),
            total_pending=sum(d.pending for d in data),
            data=data,
        )

    return api

"""Settlement: reserves a call's price when it is routed, captures it when the call completes,
releases it when the call fails or times out, and funds accounts on an operator's request."""

from __future__ import annotations

from typing import Any

from postback_libs.consumer import Handlers
from postback_libs.events import (
    CALLS,
    LEDGER,
    AccountCredited,
    CallAuthorized,
    CallCompleted,
    CallFailed,
    CallRefunded,
    CallRejected,
    CallRouted,
    CallSettled,
    CallTimedOut,
    CloudEvent,
    CreditRequested,
    TransferPosted,
    TransferReserved,
    TransferVoided,
)
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_settlement import ledger
from postback_settlement.domain import (
    consumer_account,
    owner_account,
    reservation_legs,
    split,
)


def build(settings: Settings) -> Service:
    service = Service("settlement", "postback_settlement", settings)
    calls = Handlers("settlement", CALLS.name)
    funding = Handlers("settlement-funding", LEDGER.name)

    @calls.on(CallRouted)
    async def reserve_funds(event: CloudEvent, call: CallRouted, uow: UnitOfWork) -> None:
        conn = uow.conn
        _, fee = split(call.price, call.fee_bps)
        legs = reservation_legs(
            call.request_id, call.consumer_id, call.owner_id, call.price, call.fee_bps
        )
        await ledger.ensure_account(conn, consumer_account(call.consumer_id), "consumer")
        await ledger.ensure_account(conn, owner_account(call.owner_id), "owner")
        if not await ledger.reserve(conn, call.request_id, legs):
            uow.emit(
                CallRejected(
                    request_id=call.request_id,
                    consumer_id=call.consumer_id,
                    api=call.api_id,
                    reason="insufficient_funds",
                    detail=f"the call costs {call.price}",
                    stage="settlement",
                ),
                cause=event.id,
            )
            return
        await conn.execute(
            "INSERT INTO reservations (request_id, consumer_id, owner_id, amount, fee, state)"
            " VALUES ($1, $2, $3, $4, $5, 'reserved') ON CONFLICT DO NOTHING",
            call.request_id,
            call.consumer_id,
            call.owner_id,
            call.price,
            fee,
        )
        for leg in legs:
            uow.emit(
                TransferReserved(
                    transfer_id=leg.transfer_id,
                    request_id=call.request_id,
                    debit_account=leg.debit,
                    credit_account=leg.credit,
                    amount=leg.amount,
                ),
                cause=f"{event.id}:{leg.transfer_id}",
            )
        uow.emit(
            CallAuthorized(
                request_id=call.request_id, consumer_id=call.consumer_id, amount=call.price
            ),
            cause=event.id,
        )

    async def _reservation(conn: Any, request_id: str, state: str) -> Any:
        """Moves a reservation out of `reserved`; None if it was not reserved (any more)."""
        return await conn.fetchrow(
            "UPDATE reservations SET state = $2, updated_at = now()"
            " WHERE request_id = $1 AND state = 'reserved' RETURNING *",
            request_id,
            state,
        )

    @calls.on(CallCompleted)
    async def capture_funds(event: CloudEvent, done: CallCompleted, uow: UnitOfWork) -> None:
        r = await _reservation(uow.conn, done.request_id, "posted")
        if r is None:
            return
        for pending_id, leg in await ledger.resolve(uow.conn, done.request_id, "post"):
            uow.emit(
                TransferPosted(
                    transfer_id=leg.transfer_id,
                    pending_id=pending_id,
                    request_id=done.request_id,
                    debit_account=leg.debit,
                    credit_account=leg.credit,
                    amount=leg.amount,
                ),
                cause=f"{event.id}:{leg.transfer_id}",
            )
        uow.emit(
            CallSettled(
                request_id=done.request_id,
                consumer_id=r["consumer_id"],
                owner_id=r["owner_id"],
                amount=r["amount"],
                fee=r["fee"],
            ),
            cause=event.id,
        )

    @calls.on(CallFailed, CallTimedOut)
    async def release_funds(
        event: CloudEvent, outcome: CallFailed | CallTimedOut, uow: UnitOfWork
    ) -> None:
        r = await _reservation(uow.conn, outcome.request_id, "voided")
        if r is None:
            return
        for pending_id, leg in await ledger.resolve(uow.conn, outcome.request_id, "void"):
            uow.emit(
                TransferVoided(
                    transfer_id=leg.transfer_id,
                    pending_id=pending_id,
                    request_id=outcome.request_id,
                    debit_account=leg.debit,
                    credit_account=leg.credit,
                    amount=leg.amount,
                ),
                cause=f"{event.id}:{leg.transfer_id}",
            )
        uow.emit(
            CallRefunded(
                request_id=outcome.request_id,
                consumer_id=r["consumer_id"],
                amount=r["amount"],
                outcome=event.type,
            ),
            cause=event.id,
        )

    @funding.on(CreditRequested)
    async def fund_account(event: CloudEvent, req: CreditRequested, uow: UnitOfWork) -> None:
        account = consumer_account(req.account_id)
        await ledger.ensure_account(uow.conn, account, "consumer")
        new_balance = await ledger.credit(uow.conn, req.credit_id, account, req.amount)
        if new_balance is not None:
            uow.emit(
                AccountCredited(
                    credit_id=req.credit_id,
                    account_id=req.account_id,
                    amount=req.amount,
                    balance=new_balance,
                ),
                cause=event.id,
            )

    service.consume(calls)
    service.consume(funding)
    return service

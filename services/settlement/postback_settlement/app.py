"""Settlement: reserves a call's price when it is routed, captures it when the call completes,
releases it when the call fails or times out (or, as a safety net, long after its deadline), and
funds or corrects accounts on an operator's request.

Each handler stages its ledger work (`ledger_step`); a consumed batch's work is applied as one
book at the end of the batch's transaction (`apply_ledger`), and the events below are emitted
from there, in the order of their causes."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from postback_libs.consumer import Handlers
from postback_libs.events import (
    CALLS,
    LEDGER,
    AccountCorrected,
    AccountCredited,
    BalanceLow,
    CallAuthorized,
    CallCompleted,
    CallFailed,
    CallRefunded,
    CallRejected,
    CallRouted,
    CallSettled,
    CallTimedOut,
    CloudEvent,
    CorrectionRefused,
    CorrectionRequested,
    CreditRequested,
    TransferPosted,
    TransferReserved,
    TransferVoided,
)
from postback_libs.logging import get_logger
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_settlement.domain import (
    FEE_ACCOUNT,
    FUNDING_ACCOUNT,
    Book,
    CorrectionDenied,
    Phase,
    Refused,
    Reservation,
    check_amount,
    consumer_account,
    correction_transfer_id,
    credit_transfer_id,
    owner_account,
)
from postback_settlement.ledger import apply_ledger, ledger_step

log = get_logger(__name__)
CALLS_GROUP = "settlement"

EXPIRED_RESERVATIONS = """
SELECT request_id FROM reservations
WHERE state = 'reserved'
  AND coalesce(deadline, created_at + $3::interval) + $1::interval
      < coalesce($4::timestamptz, now())
ORDER BY request_id LIMIT $2 FOR UPDATE SKIP LOCKED
"""


def _emit_resolution(
    uow: UnitOfWork, cause: str, book: Book, request_id: str, phase: Phase
) -> Reservation | None:
    """Post or void a call's reservation and emit its transfers; None if the call holds no
    reservation (never authorized, or resolved already)."""
    resolved = book.resolve(request_id, phase)
    if resolved is None:
        return None
    event_type = TransferPosted if phase == "post" else TransferVoided
    for t in resolved.transfers:
        assert t.pending_id is not None
        uow.emit(
            event_type(
                transfer_id=t.id,
                pending_id=t.pending_id,
                request_id=request_id,
                debit_account=t.debit,
                credit_account=t.credit,
                amount=t.amount,
                api_id=t.api_id,
            ),
            cause=f"{cause}:{t.id}",
        )
    return resolved.reservation


def call_handlers(settings: Settings) -> Handlers:
    calls = Handlers(CALLS_GROUP, CALLS.name, after_batch=apply_ledger)
    threshold = settings.low_balance_threshold

    @calls.on(CallRouted)
    async def reserve_funds(event: CloudEvent, call: CallRouted, uow: UnitOfWork) -> None:
        check_amount(call.price, "price")  # a price the ledger cannot hold is a poison event

        def reserve(book: Book) -> None:
            result = book.reserve(
                call.request_id,
                call.consumer_id,
                call.owner_id,
                call.price,
                call.fee_bps,
                api_id=call.api_id,
                deadline=call.deadline,
            )
            if result is None:
                return
            if isinstance(result, Refused):
                uow.emit(
                    CallRejected(
                        request_id=call.request_id,
                        consumer_id=call.consumer_id,
                        api=call.api_id,
                        reason="insufficient_funds",
                        api_id=call.api_id,
                        detail=f"the call costs {call.price}, the balance available is "
                        f"{result.available}",
                        stage="settlement",
                    ),
                    cause=event.id,
                )
                return
            for t in result.transfers:
                uow.emit(
                    TransferReserved(
                        transfer_id=t.id,
                        request_id=call.request_id,
                        debit_account=t.debit,
                        credit_account=t.credit,
                        amount=t.amount,
                        api_id=t.api_id,
                    ),
                    cause=f"{event.id}:{t.id}",
                )
            uow.emit(
                CallAuthorized(
                    request_id=call.request_id, consumer_id=call.consumer_id, amount=call.price
                ),
                cause=event.id,
            )
            if result.low is not None:
                uow.emit(
                    BalanceLow(
                        account_id=call.consumer_id, balance=result.low, threshold=threshold
                    ),
                    cause=event.id,
                )

        ledger_step(uow, threshold).add(
            reserve,
            requests=[call.request_id],
            accounts=[
                consumer_account(call.consumer_id),
                owner_account(call.owner_id),
                FEE_ACCOUNT,
            ],
        )

    @calls.on(CallCompleted)
    async def capture_funds(event: CloudEvent, done: CallCompleted, uow: UnitOfWork) -> None:
        def capture(book: Book) -> None:
            r = _emit_resolution(uow, event.id, book, done.request_id, "post")
            if r is None:
                released = book.reservations.get(done.request_id)
                if released is not None and released.state == "voided":
                    # A result after the reservation was released: the consumer was refunded,
                    # so nobody pays for it. Only a result long past its deadline lands here.
                    log.warning(
                        "call completed after its funds were released", request_id=done.request_id
                    )
                return
            uow.emit(
                CallSettled(
                    request_id=done.request_id,
                    consumer_id=r.consumer_id,
                    owner_id=r.owner_id,
                    amount=r.amount,
                    fee=r.fee,
                    api_id=r.api_id,
                ),
                cause=event.id,
            )

        ledger_step(uow, threshold).add(capture, requests=[done.request_id])

    @calls.on(CallFailed, CallTimedOut)
    async def release_funds(
        event: CloudEvent, outcome: CallFailed | CallTimedOut, uow: UnitOfWork
    ) -> None:
        outcome_type = "call.failed" if isinstance(outcome, CallFailed) else "call.timed_out"

        def release(book: Book) -> None:
            r = _emit_resolution(uow, event.id, book, outcome.request_id, "void")
            if r is None:
                return
            uow.emit(
                CallRefunded(
                    request_id=outcome.request_id,
                    consumer_id=r.consumer_id,
                    amount=r.amount,
                    outcome=outcome_type,
                    api_id=r.api_id,
                ),
                cause=event.id,
            )

        ledger_step(uow, threshold).add(release, requests=[outcome.request_id])

    return calls


def funding_handlers(settings: Settings) -> Handlers:
    # Requests on a topic kept for ever; a refused correction leaves no transfer to know it by,
    # so its id stays in the inbox for good (a handful of rows per operator action).
    funding = Handlers(
        "settlement-funding", LEDGER.name, after_batch=apply_ledger, remember_forever=True
    )
    threshold = settings.low_balance_threshold

    @funding.on(CreditRequested)
    async def fund_account(event: CloudEvent, req: CreditRequested, uow: UnitOfWork) -> None:
        account = consumer_account(req.account_id)
        check_amount(req.amount)

        def credit(book: Book) -> None:
            done = book.credit(req.credit_id, account, req.amount)
            if done is not None:
                uow.emit(
                    AccountCredited(
                        credit_id=req.credit_id,
                        account_id=req.account_id,
                        amount=req.amount,
                        balance=done.balance,
                    ),
                    cause=event.id,
                )

        ledger_step(uow, threshold).add(
            credit,
            accounts=[FUNDING_ACCOUNT, account],
            transfer_ids=[credit_transfer_id(req.credit_id)],
        )

    @funding.on(CorrectionRequested)
    async def correct_account(event: CloudEvent, req: CorrectionRequested, uow: UnitOfWork) -> None:
        account = f"{req.role}:{req.account_id}"
        check_amount(req.amount)

        def correct(book: Book) -> None:
            done = book.correct(req.correction_id, account, req.amount)
            if done is None:
                return
            if isinstance(done, CorrectionDenied):
                uow.emit(
                    CorrectionRefused(
                        correction_id=req.correction_id,
                        account_id=req.account_id,
                        role=req.role,
                        amount=req.amount,
                        reason=done.reason,
                        available=done.available,
                        detail=(
                            f"the account can give up {done.available}, the correction asks for "
                            f"{-req.amount}"
                            if done.reason == "insufficient_funds"
                            else "a correction must not be zero"
                        ),
                    ),
                    cause=event.id,
                )
                log.warning(
                    "correction refused",
                    correction_id=req.correction_id,
                    account=account,
                    reason=done.reason,
                )
                return
            uow.emit(
                AccountCorrected(
                    correction_id=req.correction_id,
                    transfer_id=done.transfer.id,
                    account_id=req.account_id,
                    role=req.role,
                    debit_account=done.transfer.debit,
                    credit_account=done.transfer.credit,
                    amount=req.amount,
                    balance=done.balance,
                    note=req.note,
                ),
                cause=event.id,
            )
            if done.low is not None:
                uow.emit(
                    BalanceLow(account_id=req.account_id, balance=done.low, threshold=threshold),
                    cause=event.id,
                )

        ledger_step(uow, threshold).add(
            correct,
            accounts=[FUNDING_ACCOUNT, account],
            transfer_ids=[correction_transfer_id(req.correction_id)],
        )

    return funding


async def release_expired(
    uow: UnitOfWork, settings: Settings, *, limit: int = 200, now: datetime | None = None
) -> int:
    """Release reservations whose call never got an outcome, long after its deadline: the
    safety net behind owner-adapter's `call.timed_out`. Returns how many it found.

    Rows another transaction holds are skipped, not waited for: a replica already releasing
    them, or a batch settling them right now."""
    rows = await uow.conn.fetch(
        EXPIRED_RESERVATIONS,
        timedelta(seconds=settings.reservation_grace_seconds),
        limit,
        # Reservations made before deadlines were stored: the longest a call may take.
        timedelta(seconds=settings.default_max_duration_seconds),
        now,
    )
    step = ledger_step(uow, settings.low_balance_threshold)
    for row in rows:
        request_id = row["request_id"]
        # Derived from the reservation, so a release that runs twice emits the same events.
        cause = f"settlement:expired:{request_id}"

        def expire(book: Book, request_id: str = request_id, cause: str = cause) -> None:
            r = _emit_resolution(uow, cause, book, request_id, "void")
            if r is None:
                return
            uow.emit(
                CallRefunded(
                    request_id=request_id,
                    consumer_id=r.consumer_id,
                    amount=r.amount,
                    outcome="call.timed_out",
                ),
                cause=cause,
            )
            log.warning("reservation released without an outcome", request_id=request_id)

        step.add(expire, requests=[request_id])
    await apply_ledger(uow)
    return len(rows)


def build(settings: Settings) -> Service:
    service = Service("settlement", "postback_settlement", settings)
    service.consume(call_handlers(settings))
    service.consume(funding_handlers(settings))

    stopping = asyncio.Event()

    @service.on_stop
    async def stop_sweeping() -> None:
        stopping.set()

    @service.worker
    async def release_expired_reservations() -> None:
        # Only reservations that expired before a moment whose whole log the calls group has
        # applied: an outcome written in time but not yet read (settlement down or behind)
        # must be captured, not find its reservation released. Each round notes where the
        # log ends; a later round sweeps up to that moment once the group is past it.
        [calls] = [s for s in service.subscriptions if s.applier.group == CALLS_GROUP]
        mark: tuple[dict[Any, int], datetime] | None = None
        while not stopping.is_set():
            try:
                if mark is not None and await calls.group_has_read(mark[0]):
                    while not stopping.is_set():
                        async with service.unit_of_work() as uow:
                            found = await release_expired(uow, settings, now=mark[1])
                        if not found:
                            break
                    mark = None
                if mark is None:
                    mark = (await calls.log_ends(), datetime.now(UTC))
            except Exception as e:  # the next round retries; a failed sweep changed nothing
                log.warning("sweeping expired reservations failed", error=repr(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), settings.reservation_sweep_seconds)

    return service

"""Projection: builds the queryable read model of calls from the `postback.calls` topic."""

from __future__ import annotations

import json

from postback_libs.consumer import Handlers
from postback_libs.events import (
    CALLS,
    EVENT_TYPES,
    LEDGER,
    AccountCredited,
    CloudEvent,
    TransferPosted,
    TransferReserved,
    TransferVoided,
)
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_projection.domain import COLUMNS, STAGES, call_fields

JSON_COLUMNS = {"result", "error"}
_cols = ", ".join(COLUMNS)
_params = ", ".join(f"${i}" for i in range(5, 5 + len(COLUMNS)))
UPSERT_CALL = f"""
INSERT INTO calls (request_id, status, stage, updated_at, {_cols})
VALUES ($1, $2, $3, $4, {_params})
ON CONFLICT (request_id) DO UPDATE SET
    status = CASE WHEN EXCLUDED.stage >= calls.stage THEN EXCLUDED.status ELSE calls.status END,
    stage = greatest(calls.stage, EXCLUDED.stage),
    updated_at = greatest(calls.updated_at, EXCLUDED.updated_at),
    {", ".join(f"{c} = coalesce(EXCLUDED.{c}, calls.{c})" for c in COLUMNS)}
"""
ADJUST_BALANCE = """
INSERT INTO balances (ledger_account, balance, reserved) VALUES ($1, $2, $3)
ON CONFLICT (ledger_account) DO UPDATE SET balance = balances.balance + EXCLUDED.balance,
    reserved = balances.reserved + EXCLUDED.reserved, updated_at = now()
"""
INSERT_EVENT = """
INSERT INTO call_events (event_id, request_id, type, time, source, data, partition, "offset")
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING
"""


def build(settings: Settings) -> Service:
    service = Service("projection", "postback_projection", settings)
    calls = Handlers("projection", CALLS.name)
    call_types = [m for t, m in EVENT_TYPES.items() if t in STAGES]

    @calls.on(*call_types)
    async def project_call(event: CloudEvent, _: object, uow: UnitOfWork) -> None:
        partition, offset = uow.position
        await uow.conn.execute(
            INSERT_EVENT,
            event.id,
            event.subject,
            event.type,
            event.time,
            event.source,
            json.dumps(event.data),
            partition,
            offset,
        )
        stage, status = STAGES[event.type]
        fields = call_fields(event.type, event.time, event.data)
        values = [
            json.dumps(fields[c]) if c in JSON_COLUMNS and c in fields else fields.get(c)
            for c in COLUMNS
        ]
        await uow.conn.execute(UPSERT_CALL, event.subject, status, stage, event.time, *values)

    ledger = Handlers("projection-ledger", LEDGER.name)

    @ledger.on(AccountCredited, TransferReserved, TransferPosted, TransferVoided)
    async def project_balance(event: CloudEvent, e: object, uow: UnitOfWork) -> None:
        """(ledger account, balance change, reserved change) for each side of the movement."""
        changes: list[tuple[str, int, int]]
        if isinstance(e, AccountCredited):
            changes = [(f"consumer:{e.account_id}", e.amount, 0)]
        elif isinstance(e, TransferReserved):
            changes = [(e.debit_account, 0, e.amount)]
        elif isinstance(e, TransferPosted):
            changes = [(e.debit_account, -e.amount, -e.amount), (e.credit_account, e.amount, 0)]
        else:
            assert isinstance(e, TransferVoided)
            changes = [(e.debit_account, 0, -e.amount)]
        await uow.conn.executemany(ADJUST_BALANCE, changes)

    service.consume(calls)
    service.consume(ledger)
    return service

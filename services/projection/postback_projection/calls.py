"""The calls read model: one row per call (its current state) and its timeline of events.

A batch's events are folded per call in memory and written with two statements over arrays, one
row per call and one per event; the upsert applies the same merge rules against the stored
row, so order of arrival never matters, and an event applied twice changes nothing."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json

from postback_libs.consumer import Handlers
from postback_libs.events import CALLS, EVENT_TYPES, CloudEvent
from postback_libs.outbox import UnitOfWork
from postback_projection.batching import columns
from postback_projection.domain import COLUMNS, STAGES, call_fields, fold

JSON_COLUMNS = {"result", "error"}
# Postgres types of the columns events set, for the arrays a batch is written from.
TYPES = {"result": "jsonb", "error": "jsonb", "cost": "bigint", "fee": "bigint"} | {
    c: "timestamptz" for c in ("requested_at", "completed_at", "delivered_at")
}
_cols = ", ".join(COLUMNS)
_arrays = ", ".join(f"${i}::{TYPES.get(c, 'text')}[]" for i, c in enumerate(COLUMNS, start=5))
# One row per call: the batch is folded per call first, so no row is touched twice.
UPSERT_CALLS = f"""
INSERT INTO calls (request_id, status, stage, updated_at, {_cols})
SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::timestamptz[], {_arrays})
ON CONFLICT (request_id) DO UPDATE SET
    status = CASE WHEN EXCLUDED.stage >= calls.stage THEN EXCLUDED.status ELSE calls.status END,
    stage = greatest(calls.stage, EXCLUDED.stage),
    updated_at = greatest(calls.updated_at, EXCLUDED.updated_at),
    {", ".join(f"{c} = coalesce(EXCLUDED.{c}, calls.{c})" for c in COLUMNS)}
"""
INSERT_EVENTS = """
INSERT INTO call_events (event_id, request_id, type, time, source, data, partition, "offset")
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
    $6::jsonb[], $7::int[], $8::bigint[])
ON CONFLICT DO NOTHING
"""
# Taken shared by every batch, exclusively by a rebuild while it swaps the tables.
SWAP_LOCK = 7_310_551_020


async def hold_swap_lock(uow: UnitOfWork) -> None:
    await uow.conn.execute("SELECT pg_advisory_xact_lock_shared($1)", SWAP_LOCK)


def _json(value: Any) -> str:
    return to_json(value).decode()


async def _gather(event: CloudEvent, _: object, uow: UnitOfWork) -> None:
    uow.scratch.setdefault("calls", []).append((event, *uow.position))


async def _write(uow: UnitOfWork) -> None:
    gathered: list[tuple[CloudEvent, int, int]] = uow.scratch.pop("calls", [])
    if not gathered:
        return
    events = [
        (e.id, e.subject, e.type, e.time, e.source, _json(e.data), partition, offset)
        for e, partition, offset in gathered
    ]
    await uow.conn.execute(INSERT_EVENTS, *columns(events, 8))
    folded: dict[str, tuple[int, str, Any, dict[str, Any]]] = {}
    for e, _, _ in gathered:
        stage, status = STAGES[e.type]
        folded[e.subject] = fold(
            folded.get(e.subject), stage, status, e.time, call_fields(e.type, e.time, e.data)
        )
    rows = [
        (
            request_id,
            status,
            stage,
            updated_at,
            *[
                _json(fields[c]) if c in JSON_COLUMNS and c in fields else fields.get(c)
                for c in COLUMNS
            ],
        )
        for request_id, (stage, status, updated_at, fields) in folded.items()
    ]
    await uow.conn.execute(UPSERT_CALLS, *columns(rows, 4 + len(COLUMNS)))


def handlers() -> Handlers:
    calls = Handlers(
        "projection", CALLS.name, after_batch=_write, typed=False, idempotent=True, background=True
    )
    calls.on(*[m for t, m in EVENT_TYPES.items() if t in STAGES])(_gather)
    return calls

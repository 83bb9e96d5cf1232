"""The calls read model: one row per call (its current state) and its timeline of events.

A batch's events are folded per call in memory and written with two pipelined statements, one
row per call and one per event; the upsert applies the same merge rules against the stored
row, so order of arrival never matters."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json

from postback_libs.consumer import Handlers
from postback_libs.events import CALLS, EVENT_TYPES, CloudEvent
from postback_libs.outbox import UnitOfWork
from postback_projection.domain import COLUMNS, STAGES, call_fields, fold

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
INSERT_EVENT = """
INSERT INTO call_events (event_id, request_id, type, time, source, data, partition, "offset")
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING
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
    await uow.conn.executemany(
        INSERT_EVENT,
        [
            (e.id, e.subject, e.type, e.time, e.source, _json(e.data), partition, offset)
            for e, partition, offset in gathered
        ],
    )
    rows: dict[str, tuple[int, str, Any, dict[str, Any]]] = {}
    for e, _, _ in gathered:
        stage, status = STAGES[e.type]
        rows[e.subject] = fold(
            rows.get(e.subject), stage, status, e.time, call_fields(e.type, e.time, e.data)
        )
    await uow.conn.executemany(
        UPSERT_CALL,
        [
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
            for request_id, (stage, status, updated_at, fields) in rows.items()
        ],
    )


def handlers() -> Handlers:
    calls = Handlers("projection", CALLS.name, after_batch=_write, typed=False)
    calls.on(*[m for t, m in EVENT_TYPES.items() if t in STAGES])(_gather)
    return calls

"""Recording the work a batch of call events brings, set-based: the handlers only gather, and
`write` applies the whole batch with one insert and one update before the batch commits.

The result is the same as applying the events one by one: a `call.routed` inserts its dispatch
(once), and the first `call.authorized` or `call.rejected` that finds the dispatch still
'routed' moves it to 'pending' or 'cancelled'. An authorization that comes before its call's
row exists finds nothing, as it would have one event at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from postback_libs.outbox import UnitOfWork
from postback_libs.telemetry import current_traceparent
from postback_libs.workqueue import LEASE_SLACK_SECONDS

INSERT = """
INSERT INTO dispatches (request_id, api_id, upstream_url, method, path, params, body, entry,
    max_result_bytes, deadline, answer_within_seconds, traceparent, status)
SELECT r.*, 'routed' FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
    $6::jsonb[], $7::jsonb[], $8::text[], $9::int[], $10::timestamptz[], $11::float8[],
    $12::text[]) AS r
ON CONFLICT DO NOTHING
RETURNING request_id
"""


def lease_until(cap: str, slack: str) -> str:
    """SQL for when a claim's lease ends, given the parameters holding the operator's cap on a
    request (NULL: none) and the slack: the request's end (its deadline, or sooner if its owner
    must answer sooner or the cap cuts it short), then the slack. `least` skips NULLs."""
    return (
        "least(deadline, now() + make_interval(secs => answer_within_seconds),"
        f" now() + make_interval(secs => {cap})) + make_interval(secs => {slack})"
    )


# Authorized calls are due at once; only a dispatch still 'routed' moves. Those this replica has
# room for it claims at once, as the work queue's claim would: leased, so that if this replica
# dies before it dispatches them another claims them when the lease runs out.
MOVE = """
UPDATE dispatches d SET status = m.status, updated_at = now(),
    next_attempt_at = CASE WHEN m.status <> 'cancelled' THEN now() END,
    attempts = d.attempts + (m.status = 'dispatching')::int,
    lease_until = CASE WHEN m.status = 'dispatching' THEN {lease} END
FROM unnest($1::text[], $2::text[]) AS m(request_id, status)
WHERE d.request_id = m.request_id AND d.status = 'routed'
RETURNING d.*
""".format(lease=lease_until("$3", "$4"))

Move = Literal["pending", "cancelled"]


@dataclass
class Gathered:
    """A batch's dispatches to insert and, per call, its moves in event order (each tagged
    with whether it came after the call's `call.routed` in this batch)."""

    rows: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    moves: dict[str, list[tuple[Move, bool]]] = field(default_factory=dict)


def gathered(uow: UnitOfWork) -> Gathered:
    found: Gathered = uow.scratch.setdefault("dispatches", Gathered())
    return found


def routed(uow: UnitOfWork, call: Any, answer_within: float | None) -> None:
    g = gathered(uow)
    g.rows.setdefault(
        call.request_id,
        (
            call.request_id,
            call.api_id,
            call.upstream_url,
            call.method,
            call.path,
            json.dumps(call.params),
            json.dumps(call.body),
            call.entry,
            call.max_result_bytes,
            call.deadline,
            answer_within,
            current_traceparent(),  # the call.routed handler's: the call's trace
        ),
    )


def moved(uow: UnitOfWork, request_id: str, to: Move) -> None:
    g = gathered(uow)
    g.moves.setdefault(request_id, []).append((to, request_id in g.rows))


def first_moves(g: Gathered, inserted: set[str]) -> list[tuple[str, Move]]:
    """Each call's first move that would have found its row: for a row inserted by this batch,
    the first after its `call.routed`; for a row that already existed, the first of all."""
    out: list[tuple[str, Move]] = []
    for request_id, moves in g.moves.items():
        fresh = request_id in inserted
        to = next((m for m, after_insert in moves if after_insert or not fresh), None)
        if to is not None:
            out.append((request_id, to))
    return out


async def write(uow: UnitOfWork, *, claim: int = 0, request_cap: float | None = None) -> list[Any]:
    """Write what the batch gathered, claiming up to `claim` of the calls it makes due; returns
    the dispatches it made due, claimed ones with status 'dispatching'. A claim's lease lasts
    as long as its request may (until the deadline, its `answer_within_seconds` or
    `request_cap`), and then `LEASE_SLACK_SECONDS`."""
    g: Gathered | None = uow.scratch.pop("dispatches", None)
    if g is None:
        return []
    inserted: set[str] = set()
    if g.rows:
        columns = list(zip(*(g.rows[k] for k in sorted(g.rows)), strict=True))
        inserted = {r[0] for r in await uow.conn.fetch(INSERT, *map(list, columns))}
    moves = sorted(first_moves(g, inserted))  # in key order: concurrent batches cannot deadlock
    if not moves:
        return []
    statuses: list[str] = []
    for _, to in moves:
        claimed = to == "pending" and claim > 0
        claim -= claimed
        statuses.append("dispatching" if claimed else to)
    rows = await uow.conn.fetch(
        MOVE, [m[0] for m in moves], statuses, request_cap, LEASE_SLACK_SECONDS
    )
    return sorted((r for r in rows if r["status"] != "cancelled"), key=lambda r: r["request_id"])

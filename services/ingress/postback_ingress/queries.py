"""Reading calls back from the read model: the request-reply status resource and the history.
A consumer sees its own calls, an owner the calls made to its APIs, nobody anything else."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from postback_ingress.auth import ACCOUNT_KEY, Caller, Guards
from postback_ingress.models import CallView, Instant, TimelineEntry
from postback_ingress.paging import decode_cursor, encode_cursor
from postback_libs.http import Problem, problem_type
from postback_libs.runtime import Service

RETRY_AFTER_SECONDS = "1"
CallStatus = Literal[
    "accepted",
    "routed",
    "authorized",
    "dispatched",
    "processing",
    "completed",
    "failed",
    "timed_out",
    "rejected",
    "settled",
    "refunded",
    "delivered",
    "delivery_failed",
]
DONE_STAGE = 7  # delivered or delivery failed: nothing more will happen to the call
# What the owner's side of a call's events holds and its consumer is not shown: where the owner's
# API runs, and the platform's share of the price.
OWNER_ONLY_FIELDS = frozenset({"upstream_url", "fee_bps", "fee"})
# And what the consumer's side holds that the owner is not shown: where its webhooks go (a URL
# that may carry a token of the consumer's), and the most it would pay (a price to ask).
CONSUMER_ONLY_FIELDS = frozenset({"webhook_url", "max_price"})


def error_as_problem(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """A failed call's error in RFC 9457 form, with a stable type per reason."""
    if not error:
        return None
    kind = str(error.get("type", "call.failed")).removeprefix("call.")
    reason = str(error.get("reason") or kind)
    problem: dict[str, Any] = {
        "type": problem_type(f"call-{reason.replace('_', '-')}"),
        "title": reason.replace("_", " ").capitalize(),
    }
    if error.get("detail"):
        problem["detail"] = error["detail"]
    if error.get("status_code") is not None:
        problem["owner_status"] = error["status_code"]
    if error.get("deadline"):
        problem["deadline"] = error["deadline"]
    return problem


def _view(row: Any, timeline: list[TimelineEntry]) -> CallView:
    fields = {k: row[k] for k in CallView.model_fields if k in row}
    fields["result"] = json.loads(row["result"]) if row["result"] is not None else None
    fields["error"] = error_as_problem(json.loads(row["error"]) if row["error"] else None)
    return CallView(**fields, timeline=timeline)


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["calls"])
    guards = Guards(service)

    @api.get("/v1/calls/{request_id}", response_model=CallView, openapi_extra=ACCOUNT_KEY)
    async def get_call(request_id: str, caller: Caller = Depends(guards.caller)) -> JSONResponse:
        """The call's status, its result when done, and the timeline of its events (the owner's
        upstream URL and the platform fee only for the API's owner, the webhook URL only for the
        consumer). While the call is in progress the answer carries `Retry-After`."""
        row = await service.pool.fetchrow(
            "SELECT * FROM projection.calls WHERE request_id = $1"
            " AND (consumer_id = $2 OR owner_id = $2)",
            request_id,
            caller.account_id,
        )
        if row is None:
            # Accepted, but the read model has not caught up yet: still the caller's call.
            known = await service.pool.fetchrow(
                "SELECT accepted_at FROM calls WHERE request_id = $1 AND consumer_id = $2",
                request_id,
                caller.account_id,
            )
            if known is None:
                raise Problem(
                    404,
                    "call-not-found",
                    "Call not found",
                    f"no call {request_id} for this account",
                )
            view = CallView(
                request_id=request_id, status="accepted", requested_at=known["accepted_at"]
            )
            return JSONResponse(
                view.model_dump(mode="json"), headers={"Retry-After": RETRY_AFTER_SECONDS}
            )
        events = await service.pool.fetch(
            "SELECT type, time, source, data FROM projection.call_events"
            ' WHERE request_id = $1 ORDER BY "offset"',
            request_id,
        )
        hidden: frozenset[str] = frozenset()
        if row["owner_id"] != caller.account_id:
            hidden |= OWNER_ONLY_FIELDS
        if row["consumer_id"] != caller.account_id:
            hidden |= CONSUMER_ONLY_FIELDS
        timeline = []
        for e in events:
            data = {k: v for k, v in json.loads(e["data"]).items() if k not in hidden}
            params = data.get("params")
            if "webhook_url" in hidden and isinstance(params, dict) and "webhook_url" in params:
                # The seed-compatible forms carry it among the call's parameters.
                data["params"] = {k: v for k, v in params.items() if k != "webhook_url"}
            timeline.append(
                TimelineEntry(type=e["type"], time=e["time"], source=e["source"], data=data)
            )
        view = _view(row, timeline)
        headers = {} if row["stage"] >= DONE_STAGE else {"Retry-After": RETRY_AFTER_SECONDS}
        return JSONResponse(view.model_dump(mode="json"), headers=headers)

    @api.get("/v1/calls", openapi_extra=ACCOUNT_KEY)
    async def list_calls(
        role: Literal["consumer", "owner"] = Query(
            "consumer", description="Your calls (consumer) or the calls to your APIs (owner)."
        ),
        status: CallStatus | None = Query(None, description="Where the call stands now."),
        outcome: Literal["completed", "failed", "timed_out", "rejected"] | None = Query(
            None, description="What came of the call, whatever happened to it since."
        ),
        api_ref: str | None = Query(None, alias="api", max_length=200),
        since: Instant | None = Query(None, description="Requested at or after (RFC 3339)."),
        until: Instant | None = Query(None, description="Requested before (RFC 3339)."),
        limit: int = Query(50, ge=1, le=200),
        cursor: str | None = None,
        caller: Caller = Depends(guards.caller),
    ) -> JSONResponse:
        """Calls, newest first; page with `next_cursor`."""
        after = decode_cursor(cursor, datetime, str) if cursor else None
        column = "consumer_id" if role == "consumer" else "owner_id"
        rows = await service.pool.fetch(
            f"""
            SELECT * FROM projection.calls
            WHERE {column} = $1
              AND ($2::text IS NULL OR status = $2)
              AND ($3::text IS NULL OR api = $3 OR api_id = $3)
              AND ($4::timestamptz IS NULL OR requested_at >= $4)
              AND ($5::timestamptz IS NULL OR requested_at < $5)
              AND ($6::timestamptz IS NULL OR (requested_at, request_id) < ($6, $7))
              AND ($9::text IS NULL OR outcome = $9)
            ORDER BY requested_at DESC, request_id DESC
            LIMIT $8
            """,
            caller.account_id,
            status,
            api_ref,
            since,
            until,
            after[0] if after else None,
            after[1] if after else "",
            limit + 1,
            outcome,
        )
        page = rows[:limit]
        body: dict[str, Any] = {
            "data": [_view(r, []).model_dump(mode="json", exclude={"timeline"}) for r in page]
        }
        if len(rows) > limit and page[-1]["requested_at"] is not None:
            body["next_cursor"] = encode_cursor(page[-1]["requested_at"], page[-1]["request_id"])
        return JSONResponse(body)

    return api

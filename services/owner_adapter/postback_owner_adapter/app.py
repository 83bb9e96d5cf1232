"""Owner-adapter: forwards each authorized call to its owner, with a deadline and a callback, and
turns the owner's answer — in its response or in a later callback — into the call's outcome.

Kafka handlers only record work in `dispatches`; a worker claims due rows (`FOR UPDATE SKIP
LOCKED`, with a lease that a crashed replica's rows outlive) and does the slow HTTP, so a slow
owner never holds a partition. Every outcome is a conditional update from a non-final status, so
each call gets exactly one of completed, failed or timed out, whichever comes first."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from fastapi import Request, Response

from postback_libs.consumer import Handlers
from postback_libs.events import (
    CALLS,
    CallAccepted,
    CallAuthorized,
    CallCompleted,
    CallDispatched,
    CallFailed,
    CallRejected,
    CallRouted,
    CallTimedOut,
    CloudEvent,
)
from postback_libs.http import Problem
from postback_libs.logging import get_logger
from postback_libs.outbound import AddressPolicy, classify_error, guarded_session, read_capped
from postback_libs.outbox import UnitOfWork
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_libs.signing import derive_secret, webhook_headers
from postback_libs.workqueue import WorkQueue
from postback_owner_adapter import domain

log = get_logger(__name__)
OPEN = ("routed", "pending", "dispatching", "accepted")
USER_AGENT = "Postback/0.1.0"
DEADLINE_SLACK = timedelta(milliseconds=50)


def build(settings: Settings) -> Service:
    service = Service("owner-adapter", "postback_owner_adapter", settings)
    master = settings.secret_key.get_secret_value().encode()
    handlers = Handlers("owner-adapter", CALLS.name)
    session: dict[str, aiohttp.ClientSession] = {}

    @handlers.on(CallRouted)
    async def record_call(event: CloudEvent, call: CallRouted, uow: UnitOfWork) -> None:
        await uow.conn.execute(
            "INSERT INTO dispatches (request_id, api_id, upstream_url, method, path, params,"
            " body, entry, max_result_bytes, deadline, status)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'routed') ON CONFLICT DO NOTHING",
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
        )

    @handlers.on(CallAuthorized)
    async def schedule_dispatch(event: CloudEvent, call: CallAuthorized, uow: UnitOfWork) -> None:
        await uow.conn.execute(
            "UPDATE dispatches SET status = 'pending', next_attempt_at = now(), updated_at = now()"
            " WHERE request_id = $1 AND status = 'routed'",
            call.request_id,
        )

    @handlers.on(CallRejected)
    async def cancel_dispatch(event: CloudEvent, call: CallRejected, uow: UnitOfWork) -> None:
        await uow.conn.execute(
            "UPDATE dispatches SET status = 'cancelled', updated_at = now()"
            " WHERE request_id = $1 AND status = 'routed'",
            call.request_id,
        )

    async def finish(
        request_id: str,
        from_status: str | tuple[str, ...],
        to_status: str,
        *events: Any,
        digest: str | None = None,
        retry_at: datetime | None = None,
        facts: tuple[Any, ...] = (),
    ) -> bool:
        """Move a dispatch on and emit its events, unless another outcome got there first.
        `facts` (an attempt made) are emitted either way: they happened, whoever won."""
        statuses = [from_status] if isinstance(from_status, str) else list(from_status)
        async with service.unit_of_work() as uow:
            for fact in facts:
                uow.emit(fact)
            moved = await uow.conn.fetchval(
                "UPDATE dispatches SET status = $3, result_digest = coalesce($4, result_digest),"
                " next_attempt_at = $5, lease_until = NULL, updated_at = now()"
                " WHERE request_id = $1 AND status = ANY($2::text[]) RETURNING request_id",
                request_id,
                statuses,
                to_status,
                digest,
                retry_at,
            )
            if moved is None:
                return False
            for e in events:
                uow.emit(e)
        return True

    async def dispatch(row: Any) -> None:
        rid, attempt = row["request_id"], row["attempts"]
        token = domain.callback_token(master, rid)
        fwd = domain.build_forward(
            request_id=rid,
            method=row["method"],
            upstream_url=row["upstream_url"],
            path=row["path"],
            params=json.loads(row["params"]),
            body=json.loads(row["body"]),
            entry=row["entry"],
            deadline=row["deadline"],
            callback_url=f"{settings.callback_url}/v1/callbacks/{rid}",
            token=token,
        )
        msg_id = f"{rid}-{attempt}"
        secret = derive_secret(master, "api", row["api_id"])
        headers = {
            **fwd.headers,
            **webhook_headers([secret], msg_id, int(time.time()), fwd.body or b"", USER_AGENT),
        }
        if fwd.body is None:
            headers.pop("content-type", None)
        dispatched = CallDispatched(request_id=rid, attempt=attempt, upstream_url=fwd.url)
        remaining = (row["deadline"] - datetime.now(UTC)).total_seconds()
        timeout = aiohttp.ClientTimeout(
            total=max(0.1, min(settings.owner_timeout_seconds, remaining))
        )
        try:
            async with session["http"].request(
                fwd.method,
                fwd.url,
                data=fwd.body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                raw = await read_capped(resp, row["max_result_bytes"] + 1)
                status, ctype = resp.status, resp.headers.get("content-type", "")
        except Exception as e:  # connection errors and timeouts alike: retry while time allows
            await retry_or_fail(row, dispatched, f"{classify_error(e)}: {e!r}"[:500], None)
            return
        verdict = domain.judge_response(status, len(raw), row["max_result_bytes"])
        if verdict == "completed":
            await finish(
                rid,
                "dispatching",
                "completed",
                CallCompleted(
                    request_id=rid,
                    via="response",
                    upstream_url=row["upstream_url"],
                    status_code=status,
                    content_type=ctype or "application/json",
                    result=domain.parse_result(raw, ctype),
                ),
                digest=domain.result_digest(ctype, raw),
                facts=(dispatched,),
            )
        elif verdict == "accepted":
            await finish(
                rid,
                "dispatching",
                "accepted",
                CallAccepted(request_id=rid, deadline=row["deadline"]),
                facts=(dispatched,),
            )
        elif verdict == "retry":
            await retry_or_fail(row, dispatched, f"owner answered {status}", status)
        else:
            reason = "result_too_large" if verdict == "too_large" else "owner_refused"
            await finish(
                rid,
                "dispatching",
                "failed",
                CallFailed(
                    request_id=rid,
                    reason=reason,
                    upstream_url=row["upstream_url"],
                    status_code=status,
                    detail=raw[:500].decode(errors="replace"),
                ),
                facts=(dispatched,),
            )

    async def retry_or_fail(
        row: Any, dispatched: CallDispatched, detail: str, status: int | None
    ) -> None:
        rid, attempt, deadline = row["request_id"], row["attempts"], row["deadline"]
        now = datetime.now(UTC)
        retry_at = now + timedelta(seconds=domain.retry_delay(attempt))
        if attempt < settings.owner_max_attempts and retry_at < deadline:
            await finish(rid, "dispatching", "pending", retry_at=retry_at, facts=(dispatched,))
            return
        # The request's timeout is capped at the deadline: an owner still silent then has
        # timed out, whatever the client library calls it.
        outcome: CallFailed | CallTimedOut
        if now >= deadline - DEADLINE_SLACK:
            outcome = CallTimedOut(request_id=rid, deadline=deadline)
        else:
            outcome = CallFailed(
                request_id=rid,
                reason="owner_unreachable" if status is None else "owner_error",
                upstream_url=row["upstream_url"],
                status_code=status,
                detail=detail,
            )
        terminal = "timed_out" if isinstance(outcome, CallTimedOut) else "failed"
        await finish(rid, "dispatching", terminal, outcome, facts=(dispatched,))

    async def claim(n: int) -> list[Any]:
        rows: list[Any] = await service.pool.fetch(
            "UPDATE dispatches SET status = 'dispatching', attempts = attempts + 1,"
            " lease_until = now() + make_interval(secs => $2), updated_at = now()"
            " WHERE request_id IN (SELECT request_id FROM dispatches"
            "   WHERE (status = 'pending' AND next_attempt_at <= now())"
            "      OR (status = 'dispatching' AND lease_until < now())"
            "   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING *",
            n,
            settings.owner_timeout_seconds + 5,
        )
        return rows

    queue = WorkQueue(claim, dispatch, concurrency=settings.dispatch_concurrency)
    service.worker(queue.run)

    @service.worker
    async def deadline_keeper() -> None:
        while not service.stopping:
            rows = await service.pool.fetch(
                "SELECT request_id, deadline FROM dispatches"
                " WHERE status = ANY($1::text[]) AND deadline < now() LIMIT 500",
                list(OPEN),
            )
            for r in rows:
                await finish(
                    r["request_id"],
                    OPEN,
                    "timed_out",
                    CallTimedOut(request_id=r["request_id"], deadline=r["deadline"]),
                )
            if not rows:
                await asyncio.sleep(1)

    @service.on_start
    async def open_session() -> None:
        session["http"] = guarded_session(
            AddressPolicy(settings.allowed_network_list),
            connect_timeout=5,
            total_timeout=settings.owner_timeout_seconds,
            limit=settings.dispatch_concurrency,
            user_agent=USER_AGENT,
        )

    @service.on_stop
    async def drain() -> None:
        await queue.drain(settings.shutdown_grace_seconds / 2)
        await session["http"].close()

    @service.app.post("/v1/callbacks/{request_id}", status_code=200)
    async def receive_callback(request_id: str, request: Request) -> Response:
        token = request.headers.get("x-postback-callback-token") or request.query_params.get(
            "token", ""
        )
        if not domain.token_is_valid(master, request_id, token):
            raise Problem(
                401,
                "invalid-callback-token",
                "Invalid callback token",
                "the token does not match this request id",
            )
        row = await service.pool.fetchrow(
            "SELECT status, result_digest, max_result_bytes FROM dispatches WHERE request_id = $1",
            request_id,
        )
        if row is None:
            raise Problem(404, "unknown-request", "Unknown request", f"no call {request_id}")
        raw = await request.body()
        if len(raw) > row["max_result_bytes"]:
            raise Problem(
                413,
                "result-too-large",
                "Result too large",
                f"{len(raw)} bytes; this API accepts {row['max_result_bytes']}",
            )
        ctype = request.headers.get("content-type", "application/json")
        digest = domain.result_digest(ctype, raw)
        completed = CallCompleted(
            request_id=request_id,
            via="callback",
            content_type=ctype,
            result=domain.parse_result(raw, ctype),
        )
        if await finish(
            request_id,
            ("pending", "dispatching", "accepted"),
            "completed",
            completed,
            digest=digest,
        ):
            return Response(status_code=200)
        row = await service.pool.fetchrow(
            "SELECT status, result_digest FROM dispatches WHERE request_id = $1", request_id
        )
        if row["status"] == "completed" and row["result_digest"] == digest:
            return Response(status_code=200)  # the same result again: accepted once
        raise Problem(
            409,
            "call-already-settled",
            "The call already has an outcome",
            f"the call is {row['status']}; a different result cannot replace it",
        )

    handlers.after_commit = queue.wake.set  # authorized calls are due at once
    service.consume(handlers)
    return service

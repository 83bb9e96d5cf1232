"""Owner-adapter: forwards each authorized call to its owner, with a deadline and a callback, and
turns the owner's answer — in its response or in a later callback — into the call's outcome.

Kafka handlers only record work in `dispatches`, a batch at a time (intake.py); a worker claims
due rows (`FOR UPDATE SKIP LOCKED`, with a lease that a crashed replica's rows outlive) and does
the slow HTTP, so a slow owner never holds a partition. The batch that makes calls due claims
those this replica has room for itself, saving the worker a round trip. Every outcome is a
conditional update from a non-final status, written many to a transaction (outcomes.py), so each
call gets exactly one of completed, failed or timed out, whichever comes first."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from prometheus_client import Counter, Histogram

from postback_libs.consumer import Handlers
from postback_libs.db import DATABASE_ERRORS, delete_in_chunks
from postback_libs.events import (
    CALLS,
    CATALOG,
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
from postback_libs.logging import get_logger
from postback_libs.outbound import (
    AddressPolicy,
    classify_error,
    describe_failure,
    guarded_session,
    read_capped,
    retry_after_seconds,
)
from postback_libs.outbox import UnitOfWork
from postback_libs.rotation import SecretVersions, signing_secret_versions
from postback_libs.runtime import Service
from postback_libs.settings import Settings
from postback_libs.signing import derive_secret, webhook_headers
from postback_libs.telemetry import continuing, current_traceparent
from postback_libs.workqueue import LEASE_SLACK_SECONDS, WorkQueue, fits_lease
from postback_owner_adapter import callbacks, domain, intake
from postback_owner_adapter.outcomes import OutcomeWriter

log = get_logger(__name__)
OPEN = ("routed", "pending", "dispatching", "accepted")
USER_AGENT = "Postback/0.1.0"
DEADLINE_SLACK = timedelta(milliseconds=50)
CONNECT_TIMEOUT_SECONDS = 5.0
OWNER_REQUESTS = Counter(
    "postback_owner_requests_total",
    "Calls forwarded to owners, by what came of them: completed, accepted (the owner calls "
    "back), retry (a 5xx), refused, too_large, or the error that stopped the request "
    "(timeout, connect, dns, tls, blocked_address, other).",
    ["result"],
)
OWNER_REQUEST_SECONDS = Histogram(
    "postback_owner_request_seconds",
    "Time from forwarding a call to the owner's answer (or error).",
    ["result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
HAND_BACK = """
UPDATE dispatches SET status = 'pending', attempts = attempts - 1, lease_until = NULL,
    next_attempt_at = now(), updated_at = now()
WHERE request_id = $1 AND status = 'dispatching' AND attempts = $2
"""


def build(settings: Settings) -> Service:
    service = Service("owner-adapter", "postback_owner_adapter", settings)
    master = settings.master_key()
    handlers = Handlers("owner-adapter", CALLS.name)
    # The operator's cap on any one request, applied when a dispatch is claimed: a change
    # reaches the calls already routed too.
    request_cap = settings.owner_timeout_seconds
    # Which signing secrets of each API sign its forwarded calls, followed in every replica.
    api_secrets = SecretVersions(signing_secret_versions)
    service.follow(CATALOG, api_secrets.apply)
    session: dict[str, aiohttp.ClientSession] = {}

    # Handlers only gather; the batch is written at once before it commits (intake.py).
    @handlers.on(CallRouted)
    async def record_call(event: CloudEvent, call: CallRouted, uow: UnitOfWork) -> None:
        answer_within = domain.answer_within(
            call.delivery_mode, settings.owner_accept_timeout_seconds
        )
        intake.routed(uow, call, answer_within)

    @handlers.on(CallAuthorized)
    async def schedule_dispatch(event: CloudEvent, call: CallAuthorized, uow: UnitOfWork) -> None:
        intake.moved(uow, call.request_id, "pending")

    @handlers.on(CallRejected)
    async def cancel_dispatch(event: CloudEvent, call: CallRejected, uow: UnitOfWork) -> None:
        intake.moved(uow, call.request_id, "cancelled")

    # Claimed at intake: `claiming` holds what the batch being written claimed, `claimed` what
    # committed batches claimed and the queue has not yet started; a failed batch's claims are
    # dropped when the next batch overwrites them (its rows were never leased).
    claiming: list[Any] = []
    claimed: list[Any] = []
    busy: set[str] = set()  # dispatches in flight

    async def write_intake(uow: UnitOfWork) -> None:
        room = settings.dispatch_concurrency - len(busy) - len(claimed)
        rows = await intake.write(uow, claim=max(0, room), request_cap=request_cap)
        claiming[:] = [r for r in rows if r["status"] == "dispatching"]

    def intake_committed() -> None:
        claimed.extend(claiming)
        claiming.clear()
        queue.wake.set()  # for the claimed calls, and for those left pending: due at once

    handlers.after_batch = write_intake
    handlers.after_commit = intake_committed
    outcomes = OutcomeWriter(service.unit_of_work)
    finish = outcomes.finish

    async def hand_back(request_id: str, attempt: int) -> None:
        """An attempt not made: the call is due again now, the attempt not counted."""
        await service.pool.execute(HAND_BACK, request_id, attempt)

    async def dispatch(row: Any) -> None:
        rid, attempt = row["request_id"], row["attempts"]
        if row["deadline"] <= datetime.now(UTC) + DEADLINE_SLACK:
            # Claimed late (a backlog, a dead replica's lease): the owner would work unpaid.
            outcome = CallTimedOut(request_id=rid, deadline=row["deadline"])
            await finish(rid, "dispatching", "timed_out", outcome, attempt=attempt)
            return
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
        msg_id = rid  # the same message on every attempt: an owner may dedupe by it
        secrets = [
            derive_secret(master, "api", row["api_id"], v)
            for v in api_secrets.valid(row["api_id"], datetime.now(UTC))
        ]
        headers = {
            **fwd.headers,
            **webhook_headers(secrets, msg_id, int(time.time()), fwd.signed, USER_AGENT),
        }
        if traceparent := current_traceparent():  # the owner may continue the call's trace
            headers["traceparent"] = traceparent
        if fwd.body is None:
            headers.pop("content-type", None)
        dispatched = CallDispatched(request_id=rid, attempt=attempt, upstream_url=fwd.target)
        now = datetime.now(UTC)
        # A request may take until the call's deadline, or as long as the owner has to answer:
        # a claimed dispatch's lease outlives it, so only a dead replica loses one.
        total = domain.request_seconds(
            max(0.1, (row["deadline"] - now).total_seconds()),
            row["answer_within_seconds"],
            request_cap,
        )
        if not fits_lease((row["lease_until"] - now).total_seconds(), total):
            # It waited for a slot so long that its lease could run out mid-request, and
            # another replica forward it too: handed back instead, due again at once.
            await hand_back(rid, attempt)
            return
        # Per request, with the session's connect bound kept: a blackholed owner costs 5 s,
        # not the system's connect timeout, each attempt.
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=CONNECT_TIMEOUT_SECONDS)
        started = time.perf_counter()
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
                retry_after = resp.headers.get("retry-after") if status in (429, 503) else None
        except Exception as e:  # connection errors and timeouts alike: retry while time allows
            if service.stopping:  # cut off by our own shutdown: not the owner's failure
                await hand_back(rid, attempt)
                return
            failure = classify_error(e)
            OWNER_REQUESTS.labels(failure).inc()
            OWNER_REQUEST_SECONDS.labels(failure).observe(time.perf_counter() - started)
            # The consumer sees the detail: the exception's text names the owner's host.
            log.warning("owner request failed", request_id=rid, attempt=attempt, error=repr(e))
            await retry_or_fail(row, dispatched, describe_failure(e), None)
            return
        verdict = domain.judge_response(status, len(raw), row["max_result_bytes"])
        OWNER_REQUESTS.labels(verdict).inc()
        OWNER_REQUEST_SECONDS.labels(verdict).observe(time.perf_counter() - started)
        if verdict not in ("completed", "accepted"):
            log.warning("owner answered", request_id=rid, attempt=attempt, status_code=status)
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
                attempt=attempt,
            )
        elif verdict == "accepted":
            await finish(
                rid,
                "dispatching",
                "accepted",
                CallAccepted(request_id=rid, deadline=row["deadline"]),
                facts=(dispatched,),
                attempt=attempt,
            )
        elif verdict == "retry":
            wait = retry_after_seconds(retry_after, datetime.now(UTC))
            await retry_or_fail(row, dispatched, f"owner answered {status}", status, wait)
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
                attempt=attempt,
            )

    async def retry_or_fail(
        row: Any,
        dispatched: CallDispatched,
        detail: str,
        status: int | None,
        at_least: float | None = None,
    ) -> None:
        """Due again after the retry delay, or the owner's `Retry-After` (`at_least`) if
        longer, while the deadline allows; else the call fails (or times out)."""
        rid, attempt, deadline = row["request_id"], row["attempts"], row["deadline"]
        now = datetime.now(UTC)
        delay = max(domain.retry_delay(attempt), at_least or 0.0)
        retry_at = now + timedelta(seconds=delay)
        if attempt < settings.owner_max_attempts and retry_at < deadline:
            await finish(
                rid,
                "dispatching",
                "pending",
                retry_at=retry_at,
                facts=(dispatched,),
                attempt=attempt,
            )
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
        await finish(rid, "dispatching", terminal, outcome, facts=(dispatched,), attempt=attempt)

    async def claim(n: int) -> list[Any]:
        rows: list[Any]
        if claimed:  # claimed at intake already: no round trip
            rows = claimed[:n]
            del claimed[:n]
            return rows
        rows = await service.pool.fetch(
            "UPDATE dispatches SET status = 'dispatching', attempts = attempts + 1,"
            f" lease_until = {intake.lease_until('$2', '$3')}, updated_at = now()"
            " WHERE request_id IN (SELECT request_id FROM dispatches"
            "   WHERE ((status = 'pending' AND next_attempt_at <= now())"
            "      OR (status = 'dispatching' AND lease_until < now()))"
            "     AND deadline > now()"  # past it, the deadline keeper's
            "   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING *",
            n,
            request_cap,
            LEASE_SLACK_SECONDS,
        )
        return rows

    async def dispatch_claimed(row: Any) -> None:
        busy.add(row["request_id"])
        try:
            with continuing(row["traceparent"]):  # the request and the outcomes it makes
                await dispatch(row)
        finally:
            busy.discard(row["request_id"])

    queue = WorkQueue(claim, dispatch_claimed, concurrency=settings.dispatch_concurrency)
    service.worker(queue.run)

    @service.purge
    async def forget_finished_dispatches() -> None:
        # They hold each call's parameters and body: kept no longer than results are.
        await delete_in_chunks(
            service.pool,
            "dispatches",
            "status IN ('completed', 'failed', 'timed_out', 'cancelled')"
            " AND updated_at < now() - make_interval(days => $1)",
            settings.result_retention_days,
        )

    @service.worker
    async def deadline_keeper() -> None:
        while not service.stopping:
            try:
                rows = await service.pool.fetch(
                    "SELECT request_id, deadline, traceparent FROM dispatches"
                    " WHERE status = ANY($1::text[]) AND deadline < now() LIMIT 500",
                    list(OPEN),
                )

                async def time_out(r: Any) -> None:
                    with continuing(r["traceparent"]):
                        outcome = CallTimedOut(request_id=r["request_id"], deadline=r["deadline"])
                        await finish(r["request_id"], OPEN, "timed_out", outcome)

                # Together, so they are written as a few batches rather than one by one.
                await asyncio.gather(*(time_out(r) for r in rows))
            except DATABASE_ERRORS as e:
                log.warning("deadline check failed", error=repr(e))
                rows = []
            if not rows:
                await asyncio.sleep(1)

    @service.on_start
    async def open_session() -> None:
        session["http"] = guarded_session(
            AddressPolicy(settings.allowed_network_list),
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            total_timeout=settings.owner_timeout_seconds,
            limit=settings.dispatch_concurrency,
            user_agent=USER_AGENT,
        )

    @service.on_stop
    async def drain() -> None:
        await queue.drain(service.drain_time_left())
        await session["http"].close()
        if claimed:  # claimed at intake but never started: due again now, not when leases end
            await service.pool.executemany(
                HAND_BACK, [(r["request_id"], r["attempts"]) for r in claimed]
            )
            claimed.clear()

    callbacks.install(service, master, outcomes)
    service.consume(handlers)
    return service

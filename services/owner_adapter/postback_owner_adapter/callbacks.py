"""Owners' callbacks: `POST /v1/callbacks/{request_id}` with the call's token posts its result.
The first outcome wins; the same result again is accepted once, a different one refused."""

from __future__ import annotations

from fastapi import Request, Response

from postback_libs.events import CallCompleted
from postback_libs.http import Problem
from postback_libs.runtime import Service
from postback_libs.telemetry import continuing
from postback_owner_adapter import domain
from postback_owner_adapter.outcomes import OutcomeWriter

# The call's token, in the header the forwarded request named or in the callback URL's query.
CALLBACK_TOKEN_SCHEMES = {
    "callbackToken": {"type": "apiKey", "in": "header", "name": "X-Postback-Callback-Token"},
    "callbackTokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
}


def install(service: Service, master: bytes, outcomes: OutcomeWriter) -> None:
    service.app.security_schemes = CALLBACK_TOKEN_SCHEMES

    @service.app.post(
        "/v1/callbacks/{request_id}",
        status_code=200,
        openapi_extra={"security": [{name: []} for name in CALLBACK_TOKEN_SCHEMES]},
    )
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
            "SELECT status, result_digest, max_result_bytes, traceparent FROM dispatches"
            " WHERE request_id = $1",
            request_id,
        )
        if row is None:
            raise Problem(404, "unknown-request", "Unknown request", f"no call {request_id}")
        # Read no further than the cap: the body is the owner's to size, not the memory's.
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > row["max_result_bytes"]:
                raise Problem(
                    413,
                    "result-too-large",
                    "Result too large",
                    f"more than {row['max_result_bytes']} bytes, the most this API accepts",
                )
        raw = bytes(body)
        sent_type = request.headers.get("content-type")
        ctype = sent_type or "application/json"
        if sent_type and "json" in sent_type and raw and not domain.is_json(raw):
            raise Problem(
                400,
                "invalid-json",
                "The result is not JSON",
                f"the body is not the JSON its content-type ({ctype}) says; send valid JSON, "
                "or another content-type for a result that is not JSON",
            )
        digest = domain.result_digest(ctype, raw)
        completed = CallCompleted(
            request_id=request_id,
            via="callback",
            content_type=ctype,
            result=domain.parse_result(raw, ctype),
        )
        with continuing(row["traceparent"]):  # the call's trace, not the callback request's
            won = await outcomes.finish(
                request_id,
                ("pending", "dispatching", "accepted"),
                "completed",
                completed,
                digest=digest,
            )
        if won:
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

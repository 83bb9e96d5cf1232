"""Accepting calls: the `/v1` form and the two seed-compatible forms."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from postback_ingress.auth import Caller, authenticate
from postback_ingress.models import CallAccepted, CallRequest
from postback_libs.events import CallRequested, Entry
from postback_libs.http import Problem
from postback_libs.ids import new_request_id
from postback_libs.runtime import Service

RETRY_AFTER_SECONDS = "1"


def digest(req: CallRequest) -> str:
    canonical = json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def accept_call(
    service: Service, caller: Caller, req: CallRequest, idempotency_key: str | None, entry: Entry
) -> tuple[str, bool]:
    """Make the call durable (row + outbox event in one transaction); returns its request id
    and whether it was accepted just now (False: an earlier call with the same key)."""
    if caller.status != "active":
        raise Problem(
            403,
            "account-suspended",
            "Account suspended",
            "this account is suspended and cannot make calls",
        )
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 characters",
        )
    request_digest = digest(req)
    request_id = new_request_id()
    async with service.unit_of_work() as uow:
        inserted = await uow.conn.fetchval(
            "INSERT INTO calls (request_id, consumer_id, idempotency_key, request_digest)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING request_id",
            request_id,
            caller.account_id,
            idempotency_key,
            request_digest,
        )
        if inserted is None:
            earlier = await uow.conn.fetchrow(
                "SELECT request_id, request_digest FROM calls"
                " WHERE consumer_id = $1 AND idempotency_key = $2",
                caller.account_id,
                idempotency_key,
            )
            if earlier["request_digest"] != request_digest:
                raise Problem(
                    422,
                    "idempotency-key-reused",
                    "Idempotency-Key reused",
                    "this key was used for a different request",
                )
            return str(earlier["request_id"]), False
        uow.emit(
            CallRequested(
                request_id=request_id,
                consumer_id=caller.account_id,
                api=req.api,
                mode=req.mode,
                method=req.method,
                path=req.path,
                params=req.params,
                body=req.body,
                webhook_url=str(req.webhook_url) if req.webhook_url else None,
                idempotency_key=idempotency_key,
                entry=entry,
            )
        )
    return request_id, True


def router(service: Service) -> APIRouter:
    api = APIRouter()

    def accepted(request_id: str, body: dict[str, Any], fresh: bool) -> JSONResponse:
        location = f"/v1/calls/{request_id}"
        return JSONResponse(
            body,
            202 if fresh else 200,
            headers={"Location": location, "Retry-After": RETRY_AFTER_SECONDS},
        )

    @api.post("/v1/calls", status_code=202, response_model=CallAccepted, tags=["calls"])
    async def create_call(
        req: CallRequest,
        request: Request,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> JSONResponse:
        """Accept a call; its outcome is delivered to `webhook_url` and readable at Location."""
        caller = await authenticate(service.pool, request)
        rid, fresh = await accept_call(service, caller, req, idempotency_key, "v1")
        return accepted(
            rid, CallAccepted(request_id=rid, status_url=f"/v1/calls/{rid}").model_dump(), fresh
        )

    @api.post("/internal/call", status_code=202, tags=["seed-compatible"])
    async def internal_call(
        request: Request, idempotency_key: str | None = Header(None, alias="Idempotency-Key")
    ) -> JSONResponse:
        """`{"api_id_public", "method", "path", "params": {..., "webhook_url"}}`."""
        caller = await authenticate(service.pool, request)
        body = await _json_object(request)
        params = body.get("params") or {}
        req = _call_request(
            api=body.get("api_id_public"),
            method=body.get("method", "POST"),
            path=body.get("path", "/"),
            params=params,
            webhook_url=params.get("webhook_url") if isinstance(params, dict) else None,
        )
        rid, fresh = await accept_call(service, caller, req, idempotency_key, "internal_call")
        return accepted(rid, {"result": {"requestId": rid}}, fresh)

    @api.post("/api/{mode}/api/{slug}", status_code=202, tags=["seed-compatible"])
    async def api_path_call(
        mode: str,
        slug: str,
        request: Request,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> JSONResponse:
        """A flat JSON body holding `webhook_url`, with `X-Consumer-Key`."""
        if mode not in ("demo", "production"):
            raise Problem(404, "not-found", "Not found", "mode must be demo or production")
        caller = await authenticate(service.pool, request)
        body = await _json_object(request)
        req = _call_request(
            api=slug,
            mode=mode,
            method="POST",
            path="/",
            params=body,
            webhook_url=body.get("webhook_url"),
        )
        rid, fresh = await accept_call(service, caller, req, idempotency_key, "api_path")
        return accepted(rid, {"requestId": rid}, fresh)

    return api


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise Problem(
            400,
            "invalid-json",
            "Body is not JSON",
            "send a JSON object with Content-Type: application/json",
        ) from None
    if not isinstance(body, dict):
        raise Problem(400, "invalid-json", "Body is not a JSON object", "send a JSON object")
    return body


def _call_request(**fields: Any) -> CallRequest:
    try:
        return CallRequest(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Problem(
            422, "validation-error", "The request is not valid", f"{where}: {first['msg']}"
        ) from None

"""What was sent to webhooks and how to send it again: a call's deliveries, an endpoint's
messages and attempts (`status=exhausted` lists the dead letters), one message by id, and the
replay commands `POST /v1/deliveries/{id}/resend` and `POST /v1/webhooks/{id}/recover`.

The history is read from the projection's tables; resend and recover travel to delivery as
events on `postback.deliveries` (decision 0011)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query

from postback_ingress.auth import ACCOUNT_KEY, Caller, Guards
from postback_ingress.models import Input, Instant
from postback_ingress.webhooks import load_endpoint, require_enabled
from postback_libs.events import DeliveryRecoverRequested, DeliveryResendRequested, EndpointState
from postback_libs.http import Problem
from postback_libs.ids import uuid7_hex
from postback_libs.runtime import Service


class Recovery(Input):
    since: Instant
    until: Instant | None = None


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["webhooks"])
    guards = Guards(service)

    async def load(caller: Caller, delivery_id: str) -> Any:
        """The caller's message (its row in the read model), or 404."""
        d = await service.pool.fetchrow(
            "SELECT * FROM projection.deliveries WHERE delivery_id = $1 AND account_id = $2",
            delivery_id,
            caller.account_id,
        )
        if d is None:
            raise Problem(
                404, "delivery-not-found", "Delivery not found", f"no delivery {delivery_id}"
            )
        return d

    @api.post("/v1/webhooks/{endpoint_id}/recover", status_code=202, openapi_extra=ACCOUNT_KEY)
    async def recover(
        endpoint_id: str, body: Recovery, caller: Caller = Depends(guards.caller)
    ) -> dict[str, Any]:
        """Send again every message that failed or was exhausted for this endpoint since a
        time (each with a fresh retry cycle)."""
        if body.until is not None and body.until <= body.since:
            raise Problem(422, "invalid-time-range", "Invalid time range", "until <= since")
        row = await load_endpoint(service.pool, caller, endpoint_id)
        require_enabled(EndpointState.model_validate_json(row["state"]))
        recovery_id = f"rcv_{uuid7_hex()}"
        async with service.unit_of_work() as uow:
            uow.emit(
                DeliveryRecoverRequested(
                    endpoint_id=endpoint_id,
                    account_id=caller.account_id,
                    recovery_id=recovery_id,
                    since=body.since,
                    until=body.until,
                )
            )
        return {"recovery_id": recovery_id, "endpoint_id": endpoint_id, "status": "requested"}

    @api.post("/v1/deliveries/{delivery_id}/resend", status_code=202, openapi_extra=ACCOUNT_KEY)
    async def resend(delivery_id: str, caller: Caller = Depends(guards.caller)) -> dict[str, Any]:
        """Send one message again to its destination, with a fresh retry cycle."""
        d = await load(caller, delivery_id)
        if d["status"] == "pending":
            raise Problem(
                409, "delivery-in-progress", "Delivery in progress", "it is still being retried"
            )
        kept = timedelta(days=service.settings.result_retention_days)
        if d["updated_at"] is not None and d["updated_at"] < datetime.now(UTC) - kept:
            raise Problem(
                410,
                "message-expired",
                "Message expired",
                f"a message is kept {kept.days} days after its last attempt",
            )
        if d["endpoint_id"] is not None:
            row = await service.pool.fetchrow(
                "SELECT state, deleted_at FROM webhook_endpoints WHERE endpoint_id = $1",
                d["endpoint_id"],
            )
            if row is None or row["deleted_at"] is not None:
                raise Problem(409, "endpoint-deleted", "Endpoint deleted", "it was deleted")
            require_enabled(EndpointState.model_validate_json(row["state"]))
        async with service.unit_of_work() as uow:
            uow.emit(
                DeliveryResendRequested(
                    delivery_id=delivery_id,
                    message_id=d["message_id"],
                    request_id=d["request_id"],
                    endpoint_id=d["endpoint_id"],
                    account_id=caller.account_id,
                )
            )
        return {"delivery_id": delivery_id, "status": "resend_requested"}

    @api.get("/v1/deliveries/{delivery_id}", openapi_extra=ACCOUNT_KEY)
    async def get_delivery(
        delivery_id: str, caller: Caller = Depends(guards.caller)
    ) -> dict[str, Any]:
        d = await load(caller, delivery_id)
        attempts = await service.pool.fetch(
            "SELECT * FROM projection.delivery_attempts WHERE delivery_id = $1"
            " ORDER BY attempted_at",
            delivery_id,
        )
        return _delivery(d) | {"attempts": [_attempt(a) for a in attempts]}

    @api.get("/v1/calls/{request_id}/deliveries", openapi_extra=ACCOUNT_KEY)
    async def call_deliveries(
        request_id: str, caller: Caller = Depends(guards.caller)
    ) -> dict[str, Any]:
        """Every destination the call's outcome went to, with every attempt."""
        known = await service.pool.fetchval(
            "SELECT 1 FROM calls WHERE request_id = $1 AND consumer_id = $2",
            request_id,
            caller.account_id,
        )
        if known is None:
            raise Problem(404, "call-not-found", "Call not found", f"no call {request_id}")
        rows = await service.pool.fetch(
            "SELECT * FROM projection.deliveries WHERE request_id = $1 AND account_id = $2"
            " ORDER BY created_at",
            request_id,
            caller.account_id,
        )
        attempts = await service.pool.fetch(
            "SELECT * FROM projection.delivery_attempts WHERE request_id = $1"
            " AND delivery_id = ANY($2::text[]) ORDER BY attempted_at",
            request_id,
            [r["delivery_id"] for r in rows],
        )
        by_delivery: dict[str, list[dict[str, Any]]] = {}
        for a in attempts:
            by_delivery.setdefault(a["delivery_id"], []).append(_attempt(a))
        return {
            "data": [
                _delivery(r) | {"attempts": by_delivery.get(r["delivery_id"], [])} for r in rows
            ]
        }

    @api.get("/v1/webhooks/{endpoint_id}/attempts", openapi_extra=ACCOUNT_KEY)
    async def endpoint_attempts(
        endpoint_id: str,
        limit: int = Query(50, ge=1, le=100),
        before: Instant | None = Query(None, description="Only attempts made before this."),
        caller: Caller = Depends(guards.caller),
    ) -> dict[str, Any]:
        """The endpoint's attempts, newest first (test messages included)."""
        await load_endpoint(service.pool, caller, endpoint_id)
        rows = await service.pool.fetch(
            "SELECT * FROM projection.delivery_attempts WHERE endpoint_id = $1"
            " AND ($2::timestamptz IS NULL OR attempted_at < $2)"
            " ORDER BY attempted_at DESC LIMIT $3",
            endpoint_id,
            before,
            limit,
        )
        return {"data": [_attempt(r) for r in rows]}

    @api.get("/v1/webhooks/{endpoint_id}/deliveries", openapi_extra=ACCOUNT_KEY)
    async def endpoint_deliveries(
        endpoint_id: str,
        status: Literal["pending", "succeeded", "failed", "exhausted"] | None = None,
        limit: int = Query(50, ge=1, le=100),
        before: Instant | None = Query(None, description="Only messages made before this."),
        caller: Caller = Depends(guards.caller),
    ) -> dict[str, Any]:
        """The endpoint's messages, newest first; `status=exhausted` lists the dead letters."""
        await load_endpoint(service.pool, caller, endpoint_id)
        rows = await service.pool.fetch(
            "SELECT * FROM projection.deliveries WHERE endpoint_id = $1"
            " AND ($2::text IS NULL OR status = $2)"
            " AND ($3::timestamptz IS NULL OR created_at < $3)"
            " ORDER BY created_at DESC LIMIT $4",
            endpoint_id,
            status,
            before,
            limit,
        )
        return {"data": [_delivery(r) for r in rows]}

    return api


def _delivery(r: Any) -> dict[str, Any]:
    return {
        "delivery_id": r["delivery_id"],
        "message_id": r["message_id"],
        "request_id": r["request_id"],
        "endpoint_id": r["endpoint_id"],
        "event_type": r["event_type"],
        "url": r["url"],
        "status": r["status"],
        "attempt_count": r["attempts"],
        "last_status_code": r["last_status_code"],
        "last_error": r["last_error"],
        "next_attempt_at": r["next_attempt_at"].isoformat() if r["next_attempt_at"] else None,
        "created_at": r["created_at"].isoformat() if r["created_at"] else None,
        "updated_at": r["updated_at"].isoformat() if r["updated_at"] else None,
    }


def _attempt(r: Any) -> dict[str, Any]:
    return {
        "attempt_id": r["event_id"],
        "delivery_id": r["delivery_id"],
        "message_id": r["message_id"],
        "endpoint_id": r["endpoint_id"],
        "url": r["url"],
        "attempt": r["attempt"],
        "attempted_at": r["attempted_at"].isoformat(),
        "status_code": r["status_code"],
        "latency_ms": r["latency_ms"],
        "error_class": r["error_class"],
        "response_headers": json.loads(r["response_headers"]) if r["response_headers"] else {},
        "response_excerpt": r["response_excerpt"],
        "next_attempt_at": r["next_attempt_at"].isoformat() if r["next_attempt_at"] else None,
        "test": r["test"],
    }

"""Webhook endpoints (`/v1/webhooks`), their test message and secret rotation; what was sent
to them is in `deliveries.py`.

Ingress owns the endpoints: each change is a row update plus a full-state event on
`postback.webhooks` in one transaction. The test message is the one request ingress sends
itself (decision 0007)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from fastapi import APIRouter, Depends, Query, Response

from postback_ingress.auth import ACCOUNT_KEY, Caller, Guards
from postback_ingress.destinations import check_url
from postback_ingress.models import SecretRotation, overlap_of
from postback_ingress.webhook_models import (
    EndpointCreate,
    EndpointPage,
    EndpointUpdate,
    EndpointView,
    EndpointWithSecret,
    EventTypeList,
    RetryPolicy,
    Rotated,
    SentTestMessage,
    documented,
    view,
)
from postback_libs.consumer import Handlers
from postback_libs.events import (
    DELIVERIES,
    CloudEvent,
    DeliveryAttempted,
    EndpointCreated,
    EndpointDeleted,
    EndpointDisabled,
    EndpointSecretRotated,
    EndpointState,
    EndpointUpdated,
    ErrorClass,
)
from postback_libs.http import Problem
from postback_libs.ids import uuid7_hex
from postback_libs.outbound import AddressPolicy, guarded_session
from postback_libs.outbox import UnitOfWork
from postback_libs.rotation import rotate
from postback_libs.runtime import Service
from postback_libs.webhooks import (
    SUBSCRIBABLE_EVENTS,
    TEST_EVENT,
    endpoint_secret,
    endpoint_signature,
    message_headers,
    post_message,
    public_key,
    unknown_patterns,
    valid_versions,
)

USER_AGENT = "Postback/0.1.0"
MAX_ENDPOINTS_PER_ACCOUNT = 100


def _policy_fields(policy: RetryPolicy | None) -> dict[str, Any]:
    p = policy or RetryPolicy()
    return {
        "retry_schedule": p.schedule,
        "max_attempts": p.max_attempts,
        "retry_window_seconds": p.window_seconds,
    }


def _check_event_types(patterns: list[str]) -> None:
    unknown = unknown_patterns(patterns)
    if unknown:
        raise Problem(
            422,
            "unknown-event-type",
            "Unknown event type",
            f"{', '.join(unknown)} match no event; see GET /v1/webhooks/event-types",
        )


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["webhooks"])
    guards = Guards(service)
    settings = service.settings
    master = settings.master_key()
    guard = AddressPolicy(settings.allowed_network_list)
    http: dict[str, aiohttp.ClientSession] = {}

    def secrets_of(state: EndpointState) -> dict[str, str]:
        if state.signing == "asymmetric":
            return {"public_key": public_key(master, state.endpoint_id, state.secret_version)}
        return {"secret": endpoint_secret(master, state.endpoint_id, state.secret_version)}

    async def load(caller: Caller, endpoint_id: str, conn: Any = None, lock: bool = False) -> Any:
        return await load_endpoint(conn or service.pool, caller, endpoint_id, lock=lock)

    async def save(
        uow: UnitOfWork, state: EndpointState, change: type[Any], **extra: Any
    ) -> datetime:
        """Store and announce the endpoint's new state; returns its `updated_at`."""
        updated_at: datetime = await uow.conn.fetchval(
            "UPDATE webhook_endpoints SET state = $2, updated_at = now()"
            + (", deleted_at = now()" if change is EndpointDeleted else "")
            + " WHERE endpoint_id = $1 RETURNING updated_at",
            state.endpoint_id,
            state.model_dump_json(),
        )
        uow.emit(change(endpoint=state, **extra))
        return updated_at

    @api.get("/v1/webhooks/event-types", **documented(EventTypeList))
    async def event_types() -> dict[str, Any]:
        """The event types an endpoint can subscribe to (names, `prefix.*` or `*`)."""
        return {"data": [{"type": t, "description": d} for t, d in SUBSCRIBABLE_EVENTS.items()]}

    @api.post(
        "/v1/webhooks",
        status_code=201,
        **documented(EndpointWithSecret, 201),
        openapi_extra=ACCOUNT_KEY,
    )
    async def create_endpoint(
        body: EndpointCreate, caller: Caller = Depends(guards.caller)
    ) -> dict[str, Any]:
        """Subscribe an endpoint. The secret (or public key) is shown here and on rotation."""
        _check_event_types(body.event_types)
        check_url(str(body.url), guard)
        fields = body.model_dump(mode="json", exclude={"retry_policy"})
        state = EndpointState(
            endpoint_id=f"ep_{uuid7_hex()}",
            account_id=caller.account_id,
            **fields,
            **_policy_fields(body.retry_policy),
        )
        async with service.unit_of_work() as uow:
            count = await uow.conn.fetchval(
                "SELECT count(*) FROM webhook_endpoints WHERE account_id = $1"
                " AND deleted_at IS NULL",
                caller.account_id,
            )
            if count >= MAX_ENDPOINTS_PER_ACCOUNT:
                raise Problem(
                    409,
                    "endpoint-limit-reached",
                    "Too many endpoints",
                    f"an account may have {MAX_ENDPOINTS_PER_ACCOUNT} endpoints",
                )
            row = await uow.conn.fetchrow(
                "INSERT INTO webhook_endpoints (endpoint_id, account_id, state)"
                " VALUES ($1, $2, $3) RETURNING created_at, updated_at",
                state.endpoint_id,
                caller.account_id,
                state.model_dump_json(),
            )
            uow.emit(EndpointCreated(endpoint=state))
        return view(state, row) | secrets_of(state)

    @api.get("/v1/webhooks", **documented(EndpointPage), openapi_extra=ACCOUNT_KEY)
    async def list_endpoints(
        limit: int = Query(50, ge=1, le=100),
        after: str | None = Query(None, description="next_cursor of the previous page"),
        caller: Caller = Depends(guards.caller),
    ) -> dict[str, Any]:
        rows = await service.pool.fetch(
            "SELECT endpoint_id, state, created_at, updated_at FROM webhook_endpoints"
            " WHERE account_id = $1 AND deleted_at IS NULL AND ($2::text IS NULL"
            " OR endpoint_id > $2) ORDER BY endpoint_id LIMIT $3",
            caller.account_id,
            after,
            limit + 1,
        )
        page = rows[:limit]
        return {
            "data": [view(EndpointState.model_validate_json(r["state"]), r) for r in page],
            "next_cursor": page[-1]["endpoint_id"] if len(rows) > limit else None,
        }

    @api.get("/v1/webhooks/{endpoint_id}", **documented(EndpointView), openapi_extra=ACCOUNT_KEY)
    async def get_endpoint(
        endpoint_id: str, caller: Caller = Depends(guards.caller)
    ) -> dict[str, Any]:
        row = await load(caller, endpoint_id)
        return view(EndpointState.model_validate_json(row["state"]), row)

    @api.patch("/v1/webhooks/{endpoint_id}", **documented(EndpointView), openapi_extra=ACCOUNT_KEY)
    async def update_endpoint(
        endpoint_id: str, body: EndpointUpdate, caller: Caller = Depends(guards.caller)
    ) -> dict[str, Any]:
        sent = body.model_fields_set
        if body.event_types is not None:
            _check_event_types(body.event_types)
        if body.url is not None:
            check_url(str(body.url), guard)
        async with service.unit_of_work() as uow:
            row = await load(caller, endpoint_id, uow.conn, lock=True)
            state = EndpointState.model_validate_json(row["state"])
            # Null is possible only where it clears (EndpointUpdate refuses it elsewhere).
            changes: dict[str, Any] = {
                k: v
                for k, v in body.model_dump(mode="json", exclude={"retry_policy"}).items()
                if k in sent
            }
            if "retry_policy" in sent:
                changes |= _policy_fields(body.retry_policy)
            if changes.get("enabled"):
                changes["disabled_reason"] = None  # enabled again by the account
            if not changes:  # nothing to change: no new revision, no event
                return view(state, row)
            state = state.model_copy(update=changes | {"revision": state.revision + 1})
            state = EndpointState.model_validate(state.model_dump())
            updated_at = await save(uow, state, EndpointUpdated)
        return view(state, {"created_at": row["created_at"], "updated_at": updated_at})

    @api.delete("/v1/webhooks/{endpoint_id}", status_code=204, openapi_extra=ACCOUNT_KEY)
    async def delete_endpoint(
        endpoint_id: str, caller: Caller = Depends(guards.caller)
    ) -> Response:
        async with service.unit_of_work() as uow:
            row = await load(caller, endpoint_id, uow.conn, lock=True)
            state = EndpointState.model_validate_json(row["state"])
            state = state.model_copy(update={"enabled": False, "revision": state.revision + 1})
            await save(uow, state, EndpointDeleted)
        return Response(status_code=204)

    @api.post(
        "/v1/webhooks/{endpoint_id}/rotate-secret", **documented(Rotated), openapi_extra=ACCOUNT_KEY
    )
    async def rotate_secret(
        endpoint_id: str,
        body: SecretRotation | None = None,
        caller: Caller = Depends(guards.current_key_caller),
    ) -> dict[str, Any]:
        """A new secret version; the old one keeps signing (every message carries both
        signatures) for the overlap, so receivers can switch without dropping a message. No
        older secret signs past the overlap: `overlap_seconds: 0` revokes every one at once."""
        overlap = overlap_of(body, settings.webhook_secret_overlap_seconds)
        now = datetime.now(UTC)
        until = now + timedelta(seconds=overlap)
        async with service.unit_of_work() as uow:
            row = await load(caller, endpoint_id, uow.conn, lock=True)
            old = EndpointState.model_validate_json(row["state"])
            version, retired = rotate(old.secret_version, old.retired_secrets, overlap, now)
            state = old.model_copy(
                update={
                    "secret_version": version,
                    "retired_secrets": retired,
                    "revision": old.revision + 1,
                }
            )
            await save(uow, state, EndpointSecretRotated, previous_secret_valid_until=until)
        return {
            "endpoint_id": endpoint_id,
            "secret_version": state.secret_version,
            "previous_secret_valid_until": until.isoformat() if overlap > 0 else None,
        } | secrets_of(state)

    @api.post(
        "/v1/webhooks/{endpoint_id}/test", **documented(SentTestMessage), openapi_extra=ACCOUNT_KEY
    )
    async def send_test(
        endpoint_id: str, caller: Caller = Depends(guards.caller)
    ) -> dict[str, Any]:
        """Send a `webhook.test` message with an empty payload, once, never retried, and
        answer with what the endpoint did. The attempt is also kept in its history."""
        row = await load(caller, endpoint_id)
        state = EndpointState.model_validate_json(row["state"])
        now = datetime.now(UTC)
        msg_id, timestamp = f"msg_{uuid7_hex()}", int(now.timestamp())
        body = json.dumps(
            {"type": TEST_EVENT, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": {}},
            separators=(",", ":"),
        ).encode()
        signature = endpoint_signature(
            master,
            endpoint_id,
            state.signing,
            valid_versions(state, now),
            msg_id,
            timestamp,
            body,
        )
        headers = message_headers(signature, msg_id, timestamp, USER_AGENT)
        result = await post_message(http["session"], state.url, body, headers)
        error_class: ErrorClass | None = result.error_class
        if result.status_code is not None and not result.succeeded:
            error_class = "http_status"
        async with service.unit_of_work() as uow:
            uow.emit(
                DeliveryAttempted(
                    delivery_id=f"tst_{uuid7_hex()}",
                    message_id=msg_id,
                    endpoint_id=endpoint_id,
                    url=state.url,
                    attempt=1,
                    status_code=result.status_code,
                    latency_ms=result.latency_ms,
                    error_class=error_class,
                    response_excerpt=result.excerpt,
                    response_headers=result.headers or None,
                    test=True,
                )
            )
        return {
            "message_id": msg_id,
            "success": result.succeeded,
            "status_code": result.status_code,
            "latency_ms": result.latency_ms,
            "error_class": error_class,
            "response_excerpt": result.excerpt,
            "response_headers": result.headers,
        }

    @service.on_start
    async def open_session() -> None:
        http["session"] = guarded_session(
            guard,
            connect_timeout=settings.delivery_connect_timeout_seconds,
            total_timeout=settings.delivery_timeout_seconds,
            limit=20,
            user_agent=USER_AGENT,
        )

    @service.on_stop
    async def close_session() -> None:
        if "session" in http:
            await http["session"].close()

    service.consume(_disabled_endpoints())
    return api


async def load_endpoint(db: Any, caller: Caller, endpoint_id: str, *, lock: bool = False) -> Any:
    """The caller's endpoint row (state, created_at, updated_at), or 404."""
    row = await db.fetchrow(
        "SELECT state, created_at, updated_at FROM webhook_endpoints WHERE endpoint_id = $1"
        " AND account_id = $2 AND deleted_at IS NULL" + (" FOR UPDATE" if lock else ""),
        endpoint_id,
        caller.account_id,
    )
    if row is None:
        raise Problem(404, "endpoint-not-found", "Endpoint not found", f"no endpoint {endpoint_id}")
    return row


def require_enabled(state: EndpointState) -> None:
    if not state.enabled:
        why = f" ({state.disabled_reason})" if state.disabled_reason else ""
        raise Problem(
            409,
            "endpoint-disabled",
            "Endpoint disabled",
            f"enable the endpoint first (PATCH enabled=true){why}",
        )


def _disabled_endpoints() -> Handlers:
    """Delivery disables an endpoint (410, continuous failure) with `endpoint.disabled`;
    ingress, the endpoint's owner, records it and publishes the new state."""
    h = Handlers("ingress-webhooks", DELIVERIES.name, background=True)

    @h.on(EndpointDisabled)
    async def record_disable(event: CloudEvent, e: EndpointDisabled, uow: UnitOfWork) -> None:
        row = await uow.conn.fetchrow(
            "SELECT state FROM webhook_endpoints WHERE endpoint_id = $1 AND deleted_at IS NULL"
            " FOR UPDATE",
            e.endpoint_id,
        )
        if row is None:
            return
        state = EndpointState.model_validate_json(row["state"])
        state = state.model_copy(
            update={"enabled": False, "disabled_reason": e.reason, "revision": state.revision + 1}
        )
        await uow.conn.execute(
            "UPDATE webhook_endpoints SET state = $2, updated_at = now() WHERE endpoint_id = $1",
            e.endpoint_id,
            state.model_dump_json(),
        )
        uow.emit(EndpointUpdated(endpoint=state), cause=event.id)

    return h

"""The catalog: owners register, update and retire APIs; anyone searches it. Ingress keeps the
source of truth and publishes every change as the API's full state on `postback.catalog`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from postback_ingress.auth import (
    ACCOUNT_KEY,
    ACCOUNT_KEY_OPTIONAL,
    Caller,
    Guards,
    authenticate,
    has_credentials,
    require_active,
    require_role,
)
from postback_ingress.destinations import check_url
from postback_ingress.models import (
    ApiCreate,
    ApiFee,
    ApiRegisteredView,
    ApiUpdate,
    SecretRotation,
    SigningSecretRotated,
    overlap_of,
)
from postback_ingress.paging import decode_cursor, encode_cursor
from postback_libs.events import (
    ApiChange,
    ApiRegistered,
    ApiRetired,
    ApiSigningSecretRotated,
    ApiState,
    ApiUpdated,
)
from postback_libs.http import Problem
from postback_libs.ids import uuid7_hex
from postback_libs.outbound import AddressPolicy
from postback_libs.rotation import rotate
from postback_libs.runtime import Service
from postback_libs.signing import derive_secret

# Where an API runs and the platform's share of its price are its owner's: a caller who knew
# the upstream could go around the gateway.
OWNER_ONLY_FIELDS = (
    "endpoint",
    "endpoints",
    "demo_endpoint",
    "fee_bps",
    # When the owner rotated, and whether at once (after a leak), is the owner's business.
    "signing_secret_version",
    "retired_signing_secrets",
)


def public_view(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in OWNER_ONLY_FIELDS}


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["catalog"])
    master = service.settings.master_key()
    guards = Guards(service)
    guard = AddressPolicy(service.settings.allowed_network_list)

    async def owned(ref: str, caller: Caller) -> ApiState:
        row = await service.pool.fetchrow(
            "SELECT state FROM apis WHERE api_id = $1 OR slug = $1", ref
        )
        if row is None:
            raise Problem(404, "api-not-found", "API not found", f"no API {ref!r}")
        state = ApiState.model_validate_json(row["state"])
        if state.owner_id != caller.account_id:
            raise Problem(
                403,
                "not-api-owner",
                "Not your API",
                f"API {state.slug!r} belongs to another account",
            )
        return state

    def check_endpoints(fields: ApiCreate | ApiUpdate) -> None:
        """An endpoint at an address no forwarded call may reach fails every call: say so now."""
        for url in (fields.endpoint, *(fields.endpoints or ()), fields.demo_endpoint):
            if url is not None:
                check_url(str(url), guard)

    async def save(state: ApiState, change: type[ApiChange], **facts: Any) -> None:
        async with service.unit_of_work() as uow:
            holder = await uow.conn.fetchval(
                "INSERT INTO slug_history (slug, api_id) VALUES ($1, $2)"
                " ON CONFLICT (slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING api_id",
                state.slug,
                state.api_id,
            )
            if holder != state.api_id:
                raise Problem(
                    409,
                    "slug-taken",
                    "Slug taken",
                    f"the slug {state.slug!r} is or was another API's: calls by it must not "
                    "reach a different API",
                )
            # The slug is this API's (above), so only a concurrent change can stop these.
            if change is ApiRegistered:
                await uow.conn.execute(
                    "INSERT INTO apis (api_id, slug, owner_id, state) VALUES ($1, $2, $3, $4)",
                    state.api_id,
                    state.slug,
                    state.owner_id,
                    state.model_dump_json(),
                )
            elif not await uow.conn.fetchval(
                "UPDATE apis SET slug = $2, state = $3, updated_at = now()"
                " WHERE api_id = $1 AND (state->>'version')::int = $4 - 1 RETURNING api_id",
                state.api_id,
                state.slug,
                state.model_dump_json(),
                state.version,
            ):
                raise Problem(
                    409,
                    "concurrent-update",
                    "Changed meanwhile",
                    "the API changed while this request ran; read it and retry",
                )
            uow.emit(change(api=state, **facts))

    @api.post(
        "/v1/apis", status_code=201, response_model=ApiRegisteredView, openapi_extra=ACCOUNT_KEY
    )
    async def register_api(
        body: ApiCreate, caller: Caller = Depends(guards.caller)
    ) -> ApiRegisteredView:
        """Register an API (owner). The signing secret is shown here only."""
        require_role(caller, "owner")
        require_active(caller)
        check_endpoints(body)
        state = ApiState(
            api_id=f"api_{uuid7_hex()}",
            owner_id=caller.account_id,
            **body.model_dump(mode="json"),
        )
        await save(state, ApiRegistered)
        return ApiRegisteredView(
            api=state.model_dump(mode="json"),
            signing_secret=derive_secret(master, "api", state.api_id),
        )

    @api.patch("/v1/apis/{ref}", openapi_extra=ACCOUNT_KEY)
    async def update_api(
        ref: str, body: ApiUpdate, caller: Caller = Depends(guards.caller)
    ) -> JSONResponse:
        """Change some of an API's settings (its owner). Calls in flight keep their terms."""
        require_active(caller)
        current = await owned(ref, caller)
        if current.status == "retired":
            raise Problem(409, "api-retired", "API retired", "a retired API cannot change")
        check_endpoints(body)
        changes = body.model_dump(mode="json", exclude_unset=True)
        state = ApiState.model_validate(
            {**current.model_dump(mode="json"), **changes, "version": current.version + 1}
        )
        await save(state, ApiUpdated)
        return JSONResponse(state.model_dump(mode="json"))

    @api.post(
        "/v1/apis/{ref}/signing-secret/rotate",
        response_model=SigningSecretRotated,
        openapi_extra=ACCOUNT_KEY,
    )
    async def rotate_signing_secret(
        ref: str,
        body: SecretRotation | None = None,
        caller: Caller = Depends(guards.current_key_caller),
    ) -> SigningSecretRotated:
        """A new signing secret for the API's forwarded calls (its owner), shown once. The
        previous one keeps signing for the overlap (every call carries both signatures), so the
        upstream can switch without refusing a call; `overlap_seconds: 0` revokes every older
        secret at once."""
        current = await owned(ref, caller)
        overlap = overlap_of(body, service.settings.webhook_secret_overlap_seconds)
        now = datetime.now(UTC)
        version, retired = rotate(
            current.signing_secret_version, current.retired_signing_secrets, overlap, now
        )
        state = current.model_copy(
            update={
                "signing_secret_version": version,
                "retired_signing_secrets": retired,
                "version": current.version + 1,
            }
        )
        until = now + timedelta(seconds=overlap)
        await save(state, ApiSigningSecretRotated, previous_secret_valid_until=until)
        return SigningSecretRotated(
            api_id=state.api_id,
            signing_secret=derive_secret(master, "api", state.api_id, version),
            signing_secret_version=version,
            previous_secret_valid_until=until if overlap else None,
        )

    @api.put("/v1/apis/{ref}/fee", **guards.operator_only)
    async def set_fee(ref: str, body: ApiFee) -> JSONResponse:
        """Set the platform's fee on one API (operator); calls in flight keep theirs."""
        row = await service.pool.fetchrow(
            "SELECT state FROM apis WHERE api_id = $1 OR slug = $1", ref
        )
        if row is None:
            raise Problem(404, "api-not-found", "API not found", f"no API {ref!r}")
        current = ApiState.model_validate_json(row["state"])
        state = current.model_copy(update={"fee_bps": body.fee_bps, "version": current.version + 1})
        await save(state, ApiUpdated)
        return JSONResponse(state.model_dump(mode="json"))

    @api.delete("/v1/apis/{ref}", openapi_extra=ACCOUNT_KEY)
    async def retire_api(ref: str, caller: Caller = Depends(guards.caller)) -> JSONResponse:
        """Retire an API (its owner): new calls are refused, calls in flight finish."""
        current = await owned(ref, caller)
        if current.status == "retired":
            return JSONResponse(current.model_dump(mode="json"))
        state = current.model_copy(update={"status": "retired", "version": current.version + 1})
        await save(state, ApiRetired)
        return JSONResponse(state.model_dump(mode="json"))

    @api.get("/v1/apis/{ref}", openapi_extra=ACCOUNT_KEY_OPTIONAL)
    async def get_api(ref: str, request: Request) -> JSONResponse:
        """An API as its callers see it; its owner (authenticated) sees where it runs too."""
        row = await service.pool.fetchrow(
            "SELECT state FROM apis WHERE api_id = $1 OR slug = $1", ref
        )
        if row is None:
            raise Problem(404, "api-not-found", "API not found", f"no API {ref!r}")
        state = json.loads(row["state"])
        if has_credentials(request):
            caller = await authenticate(service.pool, request)
            if caller.account_id == state["owner_id"]:
                return JSONResponse(state)
        return JSONResponse(public_view(state))

    @api.get("/v1/apis")
    async def search_apis(
        q: str = Query("", max_length=200, description="Words to find in name, tags, text."),
        tag: str | None = Query(None, max_length=100),
        owner: str | None = Query(None, max_length=100),
        status: Literal["active", "retired", "all"] = "active",
        limit: int = Query(20, ge=1, le=100),
        cursor: str | None = None,
    ) -> JSONResponse:
        """Search the catalog, best matches first; page with `next_cursor`."""
        after = decode_cursor(cursor, float, str) if cursor else (float("inf"), "")
        rows = await service.pool.fetch(
            """
            SELECT * FROM (
                SELECT api_id, state,
                       CASE WHEN $1 = '' THEN 0
                            ELSE ts_rank(search, websearch_to_tsquery('english', $1)) END
                       AS rank
                FROM apis
                WHERE ($1 = '' OR search @@ websearch_to_tsquery('english', $1))
                  AND ($2::text IS NULL OR state->'tags' ? $2)
                  AND ($3::text IS NULL OR owner_id = $3)
                  AND ($4 = 'all' OR state->>'status' = $4)
            ) found
            WHERE (rank::float8, api_id) < ($5::float8, $6) OR $6 = ''
            ORDER BY rank DESC, api_id DESC
            LIMIT $7
            """,
            q.strip(),
            tag,
            owner,
            status,
            after[0],
            after[1],
            limit + 1,
        )
        page = rows[:limit]
        body: dict[str, Any] = {"data": [public_view(json.loads(r["state"])) for r in page]}
        if len(rows) > limit:
            last = page[-1]
            body["next_cursor"] = encode_cursor(float(last["rank"]), last["api_id"])
        return JSONResponse(body)

    return api

"""Accounts, operator credits and the catalog: the state ingress owns and publishes."""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from postback_ingress.auth import authenticate, require_operator, require_role
from postback_ingress.models import (
    AccountCreate,
    AccountView,
    ApiCreate,
    ApiRegisteredView,
    Balance,
    CreditAccepted,
    CreditCreate,
)
from postback_ingress.models import AccountCreated as AccountCreatedView
from postback_libs.events import (
    AccountCreated,
    AccountState,
    ApiRegistered,
    ApiState,
    CreditRequested,
)
from postback_libs.http import Problem
from postback_libs.ids import uuid7
from postback_libs.runtime import Service
from postback_libs.signing import derive_secret, generate_api_key, hash_secret, parse_api_key


def router(service: Service) -> APIRouter:
    api = APIRouter()
    settings = service.settings
    master = settings.secret_key.get_secret_value().encode()

    def operator(request: Request) -> None:
        require_operator(request, settings.operator_token.get_secret_value())

    @api.post("/v1/accounts", status_code=201, response_model=AccountCreatedView, tags=["accounts"])
    async def create_account(body: AccountCreate, request: Request) -> AccountCreatedView:
        """Create a consumer and/or owner account (operator). The secret is shown only here."""
        operator(request)
        account_id = f"acc_{uuid7().hex}"
        key_id = secrets.token_hex(8)
        secret = generate_api_key(key_id)
        parsed = parse_api_key(secret)
        assert parsed is not None
        state = AccountState(
            account_id=account_id,
            name=body.name,
            roles=sorted(set(body.roles)),
            key_id=key_id,
            key_hash=hash_secret(parsed[1]),
        )
        async with service.unit_of_work() as uow:
            await uow.conn.execute(
                "INSERT INTO accounts (account_id, name, roles, key_id, key_hash)"
                " VALUES ($1, $2, $3, $4, $5)",
                account_id,
                state.name,
                state.roles,
                key_id,
                state.key_hash,
            )
            uow.emit(AccountCreated(account=state))
        return AccountCreatedView(
            account_id=account_id,
            name=state.name,
            roles=list(state.roles),
            secret=secret,
            webhook_secret=derive_secret(master, "consumer", account_id),
        )

    @api.get("/v1/accounts/me", response_model=AccountView, tags=["accounts"])
    async def me(request: Request) -> AccountView:
        caller = await authenticate(service.pool, request)
        row = await service.pool.fetchrow(
            "SELECT account_id, name, roles, status FROM accounts WHERE account_id = $1",
            caller.account_id,
        )
        balances = await service.pool.fetch(
            "SELECT ledger_account, balance, reserved FROM projection.balances"
            " WHERE ledger_account = ANY($1::text[])",
            [f"{role}:{caller.account_id}" for role in row["roles"]],
        )
        by_role = {b["ledger_account"].split(":", 1)[0]: b for b in balances}
        return AccountView(
            **dict(row),
            balances={
                role: Balance(balance=b["balance"], reserved=b["reserved"])
                for role, b in by_role.items()
            },
        )

    @api.post(
        "/v1/accounts/{account_id}/credits",
        status_code=202,
        response_model=CreditAccepted,
        tags=["accounts"],
    )
    async def credit(account_id: str, body: CreditCreate, request: Request) -> CreditAccepted:
        """Credit an account from operator funding (operator); settlement applies it."""
        operator(request)
        if (
            await service.pool.fetchval("SELECT 1 FROM accounts WHERE account_id = $1", account_id)
            is None
        ):
            raise Problem(404, "account-not-found", "Account not found", f"no account {account_id}")
        credit_id = f"cr_{uuid7().hex}"
        async with service.unit_of_work() as uow:
            uow.emit(
                CreditRequested(
                    credit_id=credit_id, account_id=account_id, amount=body.amount, note=body.note
                )
            )
        return CreditAccepted(credit_id=credit_id, account_id=account_id, amount=body.amount)

    @api.post("/v1/apis", status_code=201, response_model=ApiRegisteredView, tags=["catalog"])
    async def register_api(body: ApiCreate, request: Request) -> ApiRegisteredView:
        """Register an API (owner)."""
        caller = await authenticate(service.pool, request)
        require_role(caller, "owner")
        fields: dict[str, Any] = body.model_dump(mode="json")
        state = ApiState(api_id=f"api_{uuid7().hex}", owner_id=caller.account_id, **fields)
        async with service.unit_of_work() as uow:
            taken = await uow.conn.fetchval(
                "INSERT INTO apis (api_id, slug, owner_id, state) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (slug) DO NOTHING RETURNING api_id",
                state.api_id,
                state.slug,
                caller.account_id,
                state.model_dump_json(),
            )
            if taken is None:
                raise Problem(
                    409,
                    "slug-taken",
                    "Slug taken",
                    f"another API already uses the slug {state.slug!r}",
                )
            uow.emit(ApiRegistered(api=state))
        return ApiRegisteredView(
            api=state.model_dump(mode="json"),
            signing_secret=derive_secret(master, "api", state.api_id),
        )

    @api.get("/v1/apis/{ref}", tags=["catalog"])
    async def get_api(ref: str) -> JSONResponse:
        row = await service.pool.fetchrow(
            "SELECT state FROM apis WHERE api_id = $1 OR slug = $1", ref
        )
        if row is None:
            raise Problem(404, "api-not-found", "API not found", f"no API {ref!r}")
        return JSONResponse(json.loads(row["state"]))

    @api.get("/v1/apis", tags=["catalog"])
    async def list_apis(q: str = Query("", max_length=200)) -> JSONResponse:
        rows = await service.pool.fetch(
            "SELECT state FROM apis WHERE $1 = '' OR state->>'name' ILIKE '%' || $1 || '%'"
            " OR state->>'description' ILIKE '%' || $1 || '%' ORDER BY slug LIMIT 100",
            q,
        )
        return JSONResponse({"data": [json.loads(r["state"]) for r in rows]})

    return api

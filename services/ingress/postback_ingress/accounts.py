"""Accounts and operator credits: the account state ingress owns and publishes (hashes only)."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from postback_ingress.auth import ACCOUNT_KEY, Caller, Guards
from postback_ingress.models import (
    AccountCreate,
    AccountPage,
    AccountView,
    Balance,
    CreditAccepted,
    CreditCreate,
    KeyRotated,
    KeyRotation,
    SecretRotation,
    Suspension,
    WebhookSecretRotated,
    overlap_of,
)
from postback_ingress.models import AccountCreated as AccountCreatedView
from postback_ingress.operator_requests import once, require_balance
from postback_ingress.paging import decode_cursor, encode_cursor
from postback_libs.events import (
    AccountCreated,
    AccountKeyRotated,
    AccountReinstated,
    AccountState,
    AccountSuspended,
    AccountWebhookSecretRotated,
    CreditRequested,
)
from postback_libs.http import Problem
from postback_libs.ids import uuid7_hex
from postback_libs.rotation import rotate
from postback_libs.runtime import Service
from postback_libs.signing import derive_secret, generate_api_key, hash_secret, parse_api_key

VIEW = "SELECT account_id, name, roles, status FROM accounts"


def new_key() -> tuple[str, str, str]:
    """(key id, secret to show once, hash to keep)."""
    key_id = secrets.token_hex(8)
    secret = generate_api_key(key_id)
    parsed = parse_api_key(secret)
    assert parsed is not None
    return key_id, secret, hash_secret(parsed[1])


def router(service: Service) -> APIRouter:
    api = APIRouter()
    settings = service.settings
    master = settings.master_key()

    guards = Guards(service)

    @api.post(
        "/v1/accounts",
        status_code=201,
        response_model=AccountCreatedView,
        tags=["accounts"],
        **guards.operator_only,
    )
    async def create_account(body: AccountCreate) -> AccountCreatedView:
        """Create a consumer and/or owner account (operator). The secret is shown only here."""
        account_id = f"acc_{uuid7_hex()}"
        key_id, secret, key_hash = new_key()
        state = AccountState(
            account_id=account_id,
            name=body.name,
            roles=sorted(set(body.roles)),
            key_id=key_id,
            key_hash=key_hash,
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

    async def views(rows: list[Any]) -> list[AccountView]:
        """Accounts with their balances, as the read model has them."""
        wanted = [f"{role}:{r['account_id']}" for r in rows for role in r["roles"]]
        balances: dict[str, dict[str, Balance]] = {}
        for b in await service.pool.fetch(
            "SELECT ledger_account, balance, reserved FROM projection.balances"
            " WHERE ledger_account = ANY($1::text[])",
            wanted,
        ):
            role, account_id = b["ledger_account"].split(":", 1)
            balances.setdefault(account_id, {})[role] = Balance(
                balance=b["balance"], reserved=b["reserved"]
            )
        return [AccountView(**dict(r), balances=balances.get(r["account_id"], {})) for r in rows]

    @api.get(
        "/v1/accounts/me", response_model=AccountView, tags=["accounts"], openapi_extra=ACCOUNT_KEY
    )
    async def me(caller: Caller = Depends(guards.caller)) -> AccountView:
        row = await service.pool.fetchrow(VIEW + " WHERE account_id = $1", caller.account_id)
        return (await views([row]))[0]

    @api.get(
        "/v1/accounts/{account_id}",
        response_model=AccountView,
        tags=["accounts"],
        **guards.operator_only,
    )
    async def read_account(account_id: str) -> AccountView:
        """One account with its balances (operator)."""
        row = await service.pool.fetchrow(VIEW + " WHERE account_id = $1", account_id)
        if row is None:
            raise Problem(404, "account-not-found", "Account not found", f"no account {account_id}")
        return (await views([row]))[0]

    @api.get("/v1/accounts", response_model=AccountPage, tags=["accounts"], **guards.operator_only)
    async def list_accounts(
        status: Literal["active", "suspended"] | None = None,
        role: Literal["consumer", "owner"] | None = None,
        limit: int = Query(50, ge=1, le=200),
        cursor: str | None = None,
    ) -> AccountPage:
        """Every account, oldest first, with its balances (operator); page with `next_cursor`."""
        after = decode_cursor(cursor, str)[0] if cursor else ""
        rows = await service.pool.fetch(
            VIEW + " WHERE account_id > $1 AND ($2::text IS NULL OR status = $2)"
            " AND ($3::text IS NULL OR $3 = ANY(roles)) ORDER BY account_id LIMIT $4",
            after,
            status,
            role,
            limit + 1,
        )
        page = await views(rows[:limit])
        more = len(rows) > limit
        return AccountPage(
            data=page, next_cursor=encode_cursor(page[-1].account_id) if more else None
        )

    @api.post(
        "/v1/accounts/{account_id}/credits",
        status_code=202,
        response_model=CreditAccepted,
        tags=["accounts"],
        **guards.operator_only,
    )
    async def credit(account_id: str, body: CreditCreate, request: Request) -> CreditAccepted:
        """Credit a consumer's balance from operator funding (operator); settlement applies
        it. Sent again with the same `Idempotency-Key`, it is the same credit."""
        await require_balance(service.pool, account_id, "consumer", "credit")
        async with service.unit_of_work() as uow:
            credit_id, new = await once(
                uow.conn,
                "credit",
                account_id,
                request.headers.get("idempotency-key"),
                body,
                f"cr_{uuid7_hex()}",
            )
            if new:
                uow.emit(
                    CreditRequested(
                        credit_id=credit_id,
                        account_id=account_id,
                        amount=body.amount,
                        note=body.note,
                    )
                )
        return CreditAccepted(credit_id=credit_id, account_id=account_id, amount=body.amount)

    async def account_state(conn: Any, account_id: str) -> AccountState:
        row = await conn.fetchrow(
            "SELECT account_id, name, roles, status, key_id, key_hash, webhook_secret_version,"
            " retired_webhook_secrets FROM accounts WHERE account_id = $1 FOR UPDATE",
            account_id,
        )
        if row is None:
            raise Problem(404, "account-not-found", "Account not found", f"no account {account_id}")
        return AccountState.model_validate(
            {**dict(row), "retired_webhook_secrets": json.loads(row["retired_webhook_secrets"])}
        )

    @api.post(
        "/v1/accounts/me/keys/rotate",
        response_model=KeyRotated,
        tags=["accounts"],
        openapi_extra=ACCOUNT_KEY,
    )
    async def rotate_key(
        body: KeyRotation | None = None, caller: Caller = Depends(guards.current_key_caller)
    ) -> KeyRotated:
        """A new secret, shown once; the previous one keeps working for the overlap so clients
        can switch without downtime (`overlap_seconds: 0` revokes it at once). Only the current
        key may rotate."""
        key_id, secret, key_hash = new_key()
        overlap = overlap_of(body, settings.key_rotation_overlap_seconds)
        valid_until = datetime.now(UTC) + timedelta(seconds=overlap)
        async with service.unit_of_work() as uow:
            current = await account_state(uow.conn, caller.account_id)
            await uow.conn.execute(
                "UPDATE accounts SET previous_key_id = key_id, previous_key_hash = key_hash,"
                " previous_valid_until = $2, key_id = $3, key_hash = $4 WHERE account_id = $1",
                caller.account_id,
                valid_until,
                key_id,
                key_hash,
            )
            state = current.model_copy(update={"key_id": key_id, "key_hash": key_hash})
            uow.emit(AccountKeyRotated(account=state, previous_key_valid_until=valid_until))
        return KeyRotated(secret=secret, previous_key_valid_until=valid_until)

    @api.post(
        "/v1/accounts/me/webhook-secret/rotate",
        response_model=WebhookSecretRotated,
        tags=["accounts"],
        openapi_extra=ACCOUNT_KEY,
    )
    async def rotate_webhook_secret(
        body: SecretRotation | None = None, caller: Caller = Depends(guards.current_key_caller)
    ) -> WebhookSecretRotated:
        """A new secret for the messages to your calls' `webhook_url`, shown once. The previous
        one keeps signing for the overlap (every message carries both signatures), so your
        receiver can switch without dropping a message; `overlap_seconds: 0` revokes every
        older secret at once."""
        overlap = overlap_of(body, settings.webhook_secret_overlap_seconds)
        now = datetime.now(UTC)
        until = now + timedelta(seconds=overlap)
        async with service.unit_of_work() as uow:
            current = await account_state(uow.conn, caller.account_id)
            version, retired = rotate(
                current.webhook_secret_version, current.retired_webhook_secrets, overlap, now
            )
            await uow.conn.execute(
                "UPDATE accounts SET webhook_secret_version = $2, retired_webhook_secrets = $3"
                " WHERE account_id = $1",
                caller.account_id,
                version,
                json.dumps([r.model_dump(mode="json") for r in retired]),
            )
            state = current.model_copy(
                update={"webhook_secret_version": version, "retired_webhook_secrets": retired}
            )
            uow.emit(AccountWebhookSecretRotated(account=state, previous_secret_valid_until=until))
        return WebhookSecretRotated(
            webhook_secret=derive_secret(master, "consumer", caller.account_id, version),
            webhook_secret_version=version,
            previous_secret_valid_until=until if overlap > 0 else None,
        )

    async def set_status(account_id: str, status: str, reason: str) -> AccountView:
        async with service.unit_of_work() as uow:
            current = await account_state(uow.conn, account_id)
            if current.status != status:
                await uow.conn.execute(
                    "UPDATE accounts SET status = $2 WHERE account_id = $1", account_id, status
                )
                state = current.model_copy(update={"status": status})
                uow.emit(
                    AccountSuspended(account=state, reason=reason)
                    if status == "suspended"
                    else AccountReinstated(account=state)
                )
        return AccountView(
            account_id=account_id, name=current.name, roles=list(current.roles), status=status
        )

    @api.post(
        "/v1/accounts/{account_id}/suspend",
        response_model=AccountView,
        tags=["accounts"],
        **guards.operator_only,
    )
    async def suspend(account_id: str, body: Suspension) -> AccountView:
        """Suspend an account (operator): its new calls are refused with `account_suspended`."""
        return await set_status(account_id, "suspended", body.reason)

    @api.post(
        "/v1/accounts/{account_id}/reinstate",
        response_model=AccountView,
        tags=["accounts"],
        **guards.operator_only,
    )
    async def reinstate(account_id: str) -> AccountView:
        """Lift a suspension (operator)."""
        return await set_status(account_id, "active", "")

    return api

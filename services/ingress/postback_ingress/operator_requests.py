"""The operator's money requests (credits, corrections): to a balance that exists, and made
once per Idempotency-Key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from postback_libs.http import Problem


async def require_balance(pool: Any, account_id: str, role: str, action: str) -> None:
    """404 for an unknown account; 422 if it has no `role` balance (money moved to it would
    land where nobody can use it)."""
    roles = await pool.fetchval("SELECT roles FROM accounts WHERE account_id = $1", account_id)
    if roles is None:
        raise Problem(404, "account-not-found", "Account not found", f"no account {account_id}")
    if role not in roles:
        raise Problem(
            422,
            "role-required",
            f"The account is not a {role}",
            f"account {account_id} has no {role} balance to {action}",
        )


async def once(
    conn: Any, kind: str, account_id: str, key: str | None, body: BaseModel, new_id: str
) -> tuple[str, bool]:
    """The id of this request: `new_id` and True if it is new, or the id of the first request
    sent with the same `key` and False; 422 if that one had another body. Without a key every
    request is new. Runs in the transaction that emits the request, so a key is taken only
    with its request."""
    if key is None:
        return new_id, True
    if not 1 <= len(key) <= 255 or "\x00" in key:
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 characters, none of them NUL",
        )
    digest = hashlib.sha256(
        json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()
    taken = await conn.fetchval(
        "INSERT INTO operator_requests (kind, account_id, idempotency_key, request_id, digest)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING request_id",
        kind,
        account_id,
        key,
        new_id,
        digest,
    )
    if taken is not None:
        return new_id, True
    first = await conn.fetchrow(
        "SELECT request_id, digest FROM operator_requests"
        " WHERE kind = $1 AND account_id = $2 AND idempotency_key = $3",
        kind,
        account_id,
        key,
    )
    if first["digest"] != digest:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this key was used for a different request",
        )
    return first["request_id"], False

"""Who is calling: consumers and owners by their secret, the operator by its token.
Secrets are compared as hashes, in constant time; a secret is never logged or stored."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from postback_libs.http import Problem
from postback_libs.signing import parse_api_key, secret_matches


@dataclass(frozen=True)
class Caller:
    account_id: str
    roles: tuple[str, ...]
    status: str


def presented_secret(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-consumer-key") or None


def _unauthorized(detail: str) -> Problem:
    p = Problem(401, "unauthorized", "Authentication required", detail)
    p.headers["WWW-Authenticate"] = 'Bearer realm="postback"'
    return p


async def authenticate(pool: Any, request: Request) -> Caller:
    raw = presented_secret(request)
    if not raw:
        raise _unauthorized(
            "send your secret as `Authorization: Bearer <secret>` or `X-Consumer-Key`"
        )
    parsed = parse_api_key(raw)
    if parsed is None:
        raise _unauthorized("the secret is not a Postback key (pbk_...)")
    key_id, secret = parsed
    row = await pool.fetchrow(
        "SELECT account_id, roles, status, key_id, key_hash, previous_key_hash,"
        " previous_valid_until > now() AS previous_valid FROM accounts"
        " WHERE key_id = $1 OR previous_key_id = $1",
        key_id,
    )
    if row is None:
        raise _unauthorized("unknown or revoked secret")
    stored = row["key_hash"] if row["key_id"] == key_id else row["previous_key_hash"]
    current = row["key_id"] == key_id or bool(row["previous_valid"])
    if not (secret_matches(secret, stored) and current):
        raise _unauthorized("unknown or revoked secret")
    return Caller(row["account_id"], tuple(row["roles"]), row["status"])


def require_role(caller: Caller, role: str) -> None:
    if role not in caller.roles:
        raise Problem(
            403,
            "role-required",
            f"This needs a {role} account",
            f"account {caller.account_id} is not a {role}",
        )


def require_operator(request: Request, token: str) -> None:
    if not token:
        raise Problem(
            403,
            "operator-disabled",
            "Operator actions are disabled",
            "set POSTBACK_OPERATOR_TOKEN to enable them",
        )
    presented = presented_secret(request) or ""
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise _unauthorized("this needs the operator token")

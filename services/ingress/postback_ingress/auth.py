"""Who is calling: consumers and owners by their secret, the operator by its token.
Secrets are compared as hashes, in constant time; a secret is never logged or stored."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request

from postback_libs.http import Problem, authenticates
from postback_libs.signing import parse_api_key, secret_matches

if TYPE_CHECKING:
    from postback_libs.runtime import Service

# How each route authenticates, for the OpenAPI document (route option `openapi_extra`): an
# account's secret as a bearer token or as `X-Consumer-Key`, or the operator token.
SECURITY_SCHEMES: dict[str, Any] = {
    "accountKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The account's secret (`pbk_...`), shown once at creation or rotation.",
    },
    "consumerKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Consumer-Key",
        "description": "The account's secret, in the header the seed-compatible forms use.",
    },
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The operator token (`POSTBACK_OPERATOR_TOKEN`).",
    },
}
ACCOUNT_KEY: dict[str, Any] = {"security": [{"accountKey": []}, {"consumerKey": []}]}
ACCOUNT_KEY_OPTIONAL: dict[str, Any] = {"security": [{}, *ACCOUNT_KEY["security"]]}
OPERATOR_TOKEN: dict[str, Any] = {"security": [{"operatorToken": []}]}


@dataclass(frozen=True)
class Caller:
    account_id: str
    roles: tuple[str, ...]
    status: str


def presented_secret(headers: Mapping[str, str]) -> str | None:
    """The secret in `headers` (names in lower case, as HTTP/2 and ASGI write them)."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-consumer-key") or None


def _unauthorized(detail: str) -> Problem:
    p = Problem(401, "unauthorized", "Authentication required", detail)
    p.headers["WWW-Authenticate"] = 'Bearer realm="postback"'
    return p


@dataclass(frozen=True)
class _StoredKey:
    """What authenticating one key id needs: the hash of its secret (never the secret) and,
    for the previous key of a rotation, until when it is still honoured."""

    caller: Caller
    key_hash: str
    valid_until: datetime | None  # None: the account's current key


def _presented_key(headers: Mapping[str, str]) -> tuple[str, str]:
    raw = presented_secret(headers)
    if not raw:
        raise _unauthorized(
            "send your secret as `Authorization: Bearer <secret>` or `X-Consumer-Key`"
        )
    parsed = parse_api_key(raw)
    if parsed is None:
        raise _unauthorized("the secret is not a Postback key (pbk_...)")
    return parsed


async def _stored_key(pool: Any, key_id: str) -> _StoredKey | None:
    row = await pool.fetchrow(
        "SELECT account_id, roles, status, key_id, key_hash, previous_key_hash,"
        " previous_valid_until FROM accounts WHERE key_id = $1 OR previous_key_id = $1",
        key_id,
    )
    if row is None:
        return None
    caller = Caller(row["account_id"], tuple(row["roles"]), row["status"])
    if row["key_id"] == key_id:
        return _StoredKey(caller, row["key_hash"], None)
    # A previous key with no end date is not honoured (as `previous_valid_until > now()`).
    until = row["previous_valid_until"] or datetime.min.replace(tzinfo=UTC)
    return _StoredKey(caller, row["previous_key_hash"], until)


def _verified(stored: _StoredKey | None, secret: str) -> Caller:
    if stored is None:
        raise _unauthorized("unknown or revoked secret")
    current = stored.valid_until is None or datetime.now(UTC) < stored.valid_until
    if not (secret_matches(secret, stored.key_hash) and current):
        raise _unauthorized("unknown or revoked secret")
    return stored.caller


def has_credentials(request: Request) -> bool:
    """Whether the request presents a secret at all (routes open to anyone show more to some)."""
    return bool(presented_secret(request.headers))


async def authenticate(pool: Any, request: Request) -> Caller:
    """The caller, read from the database: for everything but accepting calls, so a change
    to an account (a rotation, a suspension) shows in its very next request."""
    key_id, secret = _presented_key(request.headers)
    return _verified(await _stored_key(pool, key_id), secret)


async def authenticate_current_key(pool: Any, request: Request) -> Caller:
    """The caller, by its current key only. A previous key still honoured for a rotation's
    overlap must not rotate again: whoever leaked it would take the account's new key over."""
    key_id, secret = _presented_key(request.headers)
    stored = await _stored_key(pool, key_id)
    caller = _verified(stored, secret)
    assert stored is not None
    if stored.valid_until is not None:
        raise Problem(
            403,
            "current-key-required",
            "The current key is required",
            "this is the account's previous key, honoured only until its overlap ends; use "
            "the current one",
        )
    return caller


class KeyCache:
    """Accounts by key id for the call-accepting hot path, kept `ttl` seconds, so accepting a
    call does not read the account per request.

    Only what the database holds is cached (the hash of the secret), and every request's
    secret is still hashed and compared in constant time. The price is staleness: a suspension
    or a key rotation reaches this cache within `ttl` seconds (in every replica; routing
    refuses calls of suspended accounts in any case). Unknown keys and accounts that are not
    active are never cached, so a new account, a new key and a reinstatement count at once.
    Concurrent misses of one key share one query."""

    def __init__(self, ttl: float = 2.0, max_keys: int = 10_000) -> None:
        self.ttl, self.max_keys = ttl, max_keys
        self._keys: dict[str, tuple[float, asyncio.Future[_StoredKey | None]]] = {}

    async def authenticate(self, pool: Any, headers: Mapping[str, str]) -> Caller:
        key_id, secret = _presented_key(headers)
        return _verified(await self._stored_key(pool, key_id), secret)

    async def _stored_key(self, pool: Any, key_id: str) -> _StoredKey | None:
        now = time.monotonic()
        hit = self._keys.get(key_id)
        if hit is not None and hit[0] > now:
            if hit[1].done():
                return hit[1].result()
            return await asyncio.shield(hit[1])
        if len(self._keys) >= self.max_keys:
            del self._keys[next(iter(self._keys))]  # the oldest
        lookup = asyncio.ensure_future(_stored_key(pool, key_id))
        self._keys.pop(key_id, None)  # re-inserted last, so eviction stays oldest-first
        self._keys[key_id] = (now + self.ttl, lookup)
        try:
            stored = await asyncio.shield(lookup)
        except BaseException:
            self._forget(key_id, lookup)
            raise
        if stored is None or stored.caller.status != "active":
            self._forget(key_id, lookup)
        return stored

    def _forget(self, key_id: str, lookup: asyncio.Future[_StoredKey | None]) -> None:
        hit = self._keys.get(key_id)
        if hit is not None and hit[1] is lookup:
            del self._keys[key_id]


def require_active(caller: Caller) -> None:
    if caller.status != "active":
        raise Problem(
            403,
            "account-suspended",
            "Account suspended",
            f"account {caller.account_id} is suspended and cannot change the catalog",
        )


def require_role(caller: Caller, role: str) -> None:
    if role not in caller.roles:
        raise Problem(
            403,
            "role-required",
            f"This needs a {role} account",
            f"account {caller.account_id} is not a {role}",
        )


class Guards:
    """Who may call a route, as FastAPI dependencies: `caller: Caller = Depends(guards.caller)`
    for an account, `**guards.operator_only` for the operator. A request without valid
    credentials is refused (401) before anything of its body is judged: FastAPI solves
    dependencies before it validates a body's fields, and a body it cannot read at all is
    answered only once these have run (`authenticates`)."""

    def __init__(self, service: Service) -> None:
        self._service = service

    @authenticates
    async def caller(self, request: Request) -> Caller:
        return await authenticate(self._service.pool, request)

    @authenticates
    async def current_key_caller(self, request: Request) -> Caller:
        return await authenticate_current_key(self._service.pool, request)

    @authenticates
    async def operator(self, request: Request) -> None:
        require_operator(request, self._service.settings.operator_token.get_secret_value())

    @property
    def operator_only(self) -> dict[str, Any]:
        """The options of an operator's route: its check and its documentation together."""
        return {"dependencies": [Depends(self.operator)], "openapi_extra": OPERATOR_TOKEN}


def require_operator(request: Request, token: str) -> None:
    if not token:
        raise Problem(
            403,
            "operator-disabled",
            "Operator actions are disabled",
            "set POSTBACK_OPERATOR_TOKEN to enable them",
        )
    presented = presented_secret(request.headers) or ""
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise _unauthorized("this needs the operator token")

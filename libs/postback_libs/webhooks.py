"""Signing and sending one webhook message to a subscribed endpoint.

Delivery signs and sends every attempt with these; ingress sends the one-off test message with
them. Endpoint secrets are derived (decision 0003), never stored:

* symmetric (`v1`): `whsec_` secret = derive_secret(master, "endpoint", endpoint id, version);
* asymmetric (`v1a`, Ed25519): the 32-byte seed is derived the same way under the purpose
  "endpoint-ed25519"; the account is shown only the `whpk_` public key, so whoever holds it can
  verify messages but never forge one.

During a rotation an endpoint has several valid secret versions and every message carries one
signature per version, so the receiver may switch at any moment within the overlap.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from postback_libs import rotation
from postback_libs.events import EndpointState
from postback_libs.outbound import ErrorKind, classify_error, read_capped
from postback_libs.signing import (
    DEFAULT_TOLERANCE_SECONDS,
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SECRET_PREFIX,
    SignatureError,
    derive_secret,
    sign,
)
from postback_libs.text import recordable

# What an endpoint can subscribe to: these names, `prefix.*` or `*`.
SUBSCRIBABLE_EVENTS: dict[str, str] = {
    "call.completed": "A call's result arrived (after settlement; carries the cost).",
    "call.failed": "The owner could not produce a result; the reservation was refunded.",
    "call.timed_out": "No result by the call's deadline; the reservation was refunded.",
    "call.rejected": "The call was refused before reaching the owner (reason inside).",
    "call.settled": "The consumer was debited for a completed call.",
    "balance.low": "The account's balance fell below its threshold.",
    "delivery.exhausted": "A message could not be delivered after every retry.",
    "endpoint.disabled": "One of the account's endpoints was disabled by Postback.",
}
# Messages about delivery itself: one that fails is never announced again, so a failing
# endpoint subscribed to them cannot feed a loop.
NOTIFICATION_EVENTS = frozenset({"delivery.exhausted", "endpoint.disabled"})
TEST_EVENT = "webhook.test"


def pattern_matches(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


def subscribed(patterns: Iterable[str], event_type: str) -> bool:
    """Whether an endpoint with these event-type patterns receives `event_type`."""
    return any(pattern_matches(p, event_type) for p in patterns)


def unknown_patterns(patterns: Iterable[str]) -> list[str]:
    """Patterns that match no subscribable event type (a typo would silently receive nothing)."""
    return [p for p in patterns if not any(pattern_matches(p, t) for t in SUBSCRIBABLE_EVENTS)]


ENDPOINT_PURPOSE = "endpoint"
ED25519_PURPOSE = "endpoint-ed25519"
SECRET_KEY_PREFIX = "whsk_"  # noqa: S105 -- a format marker, not a credential
PUBLIC_KEY_PREFIX = "whpk_"
ASYMMETRIC_VERSION = "v1a"
EXCERPT_BYTES = 20_000  # of the response body kept with each attempt
_HEADER_BUDGET = 4_000  # characters of response headers kept with each attempt


def endpoint_secret(master: bytes, endpoint_id: str, version: int) -> str:
    """The `whsec_` secret of one version of an endpoint's symmetric key."""
    return _endpoint_secret(master, endpoint_id, version)


@lru_cache(maxsize=8192)
def _endpoint_secret(master: bytes, endpoint_id: str, version: int) -> str:
    # Cached: every attempt signs, and deriving costs an HMAC plus base64 each time.
    return derive_secret(master, ENDPOINT_PURPOSE, endpoint_id, version)


@lru_cache(maxsize=8192)
def _signing_key(master: bytes, endpoint_id: str, version: int) -> Ed25519PrivateKey:
    seed = base64.b64decode(
        derive_secret(master, ED25519_PURPOSE, endpoint_id, version).removeprefix(SECRET_PREFIX)
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def secret_key(master: bytes, endpoint_id: str, version: int) -> str:
    """The `whsk_` Ed25519 secret key (base64 of the 32-byte seed). Postback never shows it: it
    signs with it, and the account verifies with the public key."""
    seed = base64.b64decode(
        derive_secret(master, ED25519_PURPOSE, endpoint_id, version).removeprefix(SECRET_PREFIX)
    )
    return SECRET_KEY_PREFIX + base64.b64encode(seed).decode("ascii")


def public_key(master: bytes, endpoint_id: str, version: int) -> str:
    """The `whpk_` Ed25519 public key (base64 of the raw 32 bytes) receivers verify `v1a` with."""
    raw = (
        _signing_key(master, endpoint_id, version)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def sign_asymmetric(key: Ed25519PrivateKey, msg_id: str, timestamp: int, body: bytes) -> str:
    signature = key.sign(f"{msg_id}.{timestamp}.".encode() + body)
    return f"{ASYMMETRIC_VERSION},{base64.b64encode(signature).decode('ascii')}"


def valid_versions(endpoint: EndpointState, now: datetime) -> list[int]:
    """The endpoint's current secret version first, then those still within their overlap."""
    return rotation.valid_versions(endpoint.secret_version, endpoint.retired_secrets, now)


def endpoint_signature(
    master: bytes,
    endpoint_id: str,
    signing: str,
    versions: Iterable[int],
    msg_id: str,
    timestamp: int,
    body: bytes,
) -> str:
    """The `webhook-signature` value: one signature per valid secret version."""
    if signing == "asymmetric":
        parts = [
            sign_asymmetric(_signing_key(master, endpoint_id, v), msg_id, timestamp, body)
            for v in versions
        ]
    else:
        parts = [
            sign(_endpoint_secret(master, endpoint_id, v), msg_id, timestamp, body)
            for v in versions
        ]
    if not parts:
        raise ValueError("at least one secret version is needed to sign")
    return " ".join(parts)


def message_headers(signature: str, msg_id: str, timestamp: int, user_agent: str) -> dict[str, str]:
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: signature,
        "content-type": "application/json",
        "user-agent": user_agent,
    }


def verify_asymmetric(
    public: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: int | None = None,
) -> None:
    """Check a `v1a` delivery against a `whpk_` public key; raise `SignatureError` if invalid.

    What a receiver runs; Postback uses it in its own tests."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, raw_ts = lowered.get(HEADER_ID), lowered.get(HEADER_TIMESTAMP, "")
    if not msg_id or not raw_ts.isascii() or not raw_ts.isdigit():
        raise SignatureError("missing or invalid webhook-id / webhook-timestamp")
    timestamp = int(raw_ts)
    current = int(time.time()) if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise SignatureError("message timestamp outside the tolerance")
    try:
        raw = base64.b64decode(public.removeprefix(PUBLIC_KEY_PREFIX), validate=True)
        key = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise SignatureError("invalid public key") from e
    signed = f"{msg_id}.{timestamp}.".encode() + body
    for candidate in lowered.get(HEADER_SIGNATURE, "").split():
        version, _, encoded = candidate.partition(",")
        if version != ASYMMETRIC_VERSION:
            continue
        try:
            key.verify(base64.b64decode(encoded, validate=True), signed)
            return
        except (InvalidSignature, binascii.Error, ValueError):
            continue
    raise SignatureError("no matching signature found")


@dataclass(frozen=True)
class AttemptResult:
    """What one HTTP attempt gave: a status, or the class of error that stopped it."""

    status_code: int | None
    latency_ms: float
    excerpt: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error_class: ErrorKind | None = None
    retry_after: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    kept: dict[str, str] = {}
    budget = _HEADER_BUDGET
    for name, value in headers.items():
        cost = len(name) + len(value)
        if name in kept or cost > budget:
            continue
        kept[recordable(name)] = recordable(value)
        budget -= cost
    return kept


async def post_message(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    excerpt_bytes: int = EXCERPT_BYTES,
    keep_headers: bool = True,
) -> AttemptResult:
    """POST one message and report what happened; never raises for the endpoint's failures.

    Redirects are not followed (a 3xx has not accepted the message), the session's connect and
    total timeouts bound the attempt, and at most `excerpt_bytes` of the body are read.
    """
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            excerpt = (await read_capped(resp, excerpt_bytes)).decode(errors="replace")
            retry_after = resp.headers.get("retry-after")
            return AttemptResult(
                status_code=resp.status,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
                excerpt=recordable(excerpt),
                headers=_kept_headers(resp.headers) if keep_headers else {},
                retry_after=recordable(retry_after) if retry_after is not None else None,
            )
    except Exception as e:  # any failure to get an answer is the attempt's outcome
        return AttemptResult(
            status_code=None,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
            excerpt=repr(e)[:500],
            error_class=classify_error(e),
        )

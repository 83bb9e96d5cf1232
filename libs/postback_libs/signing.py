"""Standard Webhooks signatures (https://www.standardwebhooks.com) and API-key helpers.

A webhook signature is `v1,` + base64(HMAC-SHA256(key, f"{msg_id}.{timestamp}.{body}")), where
the key is the base64-decoded part of a `whsec_` secret. Several signatures separated by spaces
let a receiver roll its secret over without dropping deliveries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from secrets import token_bytes, token_urlsafe

SECRET_PREFIX = "whsec_"  # noqa: S105 -- a format marker, not a credential
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300
API_KEY_PREFIX = "pbk_"

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"

_SECRET_BYTES = 32
_API_KEY_SECRET_CHARS = 43  # token_urlsafe(32): 256 bits, unpadded
_KEY_ID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_KEY_ID_RE = re.compile(_KEY_ID)
_API_KEY_RE = re.compile(rf"{API_KEY_PREFIX}({_KEY_ID})_([A-Za-z0-9_-]{{{_API_KEY_SECRET_CHARS}}})")


class SignatureError(ValueError):
    """A webhook failed verification; the message says which check failed."""


def generate_secret() -> str:
    """A fresh random `whsec_` secret with 256 bits of key material."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(_SECRET_BYTES)).decode("ascii")


def derive_secret(master_key: bytes, purpose: str, subject: str, version: int = 1) -> str:
    """A `whsec_` secret derived from the master key, stable for (purpose, subject, version).

    Postback derives every per-account and per-API signing secret from one master key, so no
    plaintext secret is ever stored: the secret is recomputed whenever it is needed, rotating
    means bumping `version`, and revealing one derived secret reveals neither the master key
    nor any sibling secret. The key material is HMAC-SHA256(master_key,
    f"{purpose}:{subject}:{version}"), 32 bytes, inside the 24..64 bytes the spec allows.

    `purpose` may not contain ':' and `version` must be positive, so that the derivation input
    parses back into exactly one (purpose, subject, version) and two subjects never collide.
    """
    if not master_key:
        raise ValueError("master_key must not be empty")
    if not purpose or ":" in purpose:
        raise ValueError("purpose must be non-empty and contain no ':'")
    if version < 1:
        raise ValueError("version must be at least 1")
    info = f"{purpose}:{subject}:{version}".encode()
    material = hmac.new(master_key, info, hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(material).decode("ascii")


def _secret_key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    # Secrets pasted from elsewhere sometimes lose their '=' padding.
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("webhook secret is not valid base64") from e
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,<base64>` signature of one message; `secret` may omit the `whsec_` prefix."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per secret currently valid for the endpoint.

    During a rotation the endpoint has both its old and new secret, and a receiver accepts the
    message if any signature matches the one secret it knows. Duplicates are dropped.
    """
    unique = list(dict.fromkeys(s for s in secrets if s))
    if not unique:
        raise ValueError("at least one secret is needed to sign")
    return " ".join(sign(s, msg_id, timestamp, body) for s in unique)


def webhook_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes, user_agent: str
) -> dict[str, str]:
    """Every header a Standard Webhooks delivery carries."""
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: signature_header(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": user_agent,
    }


def _required(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise SignatureError(f"missing {name} header")
    return value


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: int | None = None,
) -> None:
    """Check a delivery's headers and body against `secret`; raise `SignatureError` if invalid.

    The timestamp window bounds how long a captured delivery can be replayed.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = _required(lowered, HEADER_ID)
    raw_timestamp = _required(lowered, HEADER_TIMESTAMP)
    raw_signatures = _required(lowered, HEADER_SIGNATURE)

    if not raw_timestamp.isascii() or not raw_timestamp.isdigit():
        raise SignatureError(f"invalid {HEADER_TIMESTAMP} header")
    timestamp = int(raw_timestamp)
    current = int(time.time()) if now is None else now
    if timestamp < current - tolerance_seconds:
        raise SignatureError("message timestamp too old")
    if timestamp > current + tolerance_seconds:
        raise SignatureError("message timestamp too new")

    expected = sign(secret, msg_id, timestamp, body).encode()
    # Check every candidate rather than stopping early so the time taken does not say which
    # position matched.
    matched = False
    for candidate in raw_signatures.split():
        if candidate.startswith(f"{SIGNATURE_VERSION},"):
            matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise SignatureError("no matching signature found")


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest for storing an API key's secret.

    A fast unsalted hash is enough because API-key secrets are 256-bit random tokens, never
    passwords, so there is nothing to brute-force or look up in a table.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether `secret` hashes to `stored_hash`, in constant time."""
    return hmac.compare_digest(hash_secret(secret).encode(), stored_hash.lower().encode())


def generate_api_key(key_id: str) -> str:
    """A new API key `pbk_<key_id>_<43 url-safe chars>`; store only `hash_secret` of the tail.

    Carrying the key id lets the server find the stored hash without a search by secret.
    """
    if not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError("key_id must be 1..64 of [A-Za-z0-9_-] starting with a letter or digit")
    return f"{API_KEY_PREFIX}{key_id}_{token_urlsafe(_SECRET_BYTES)}"


def parse_api_key(raw: str) -> tuple[str, str] | None:
    """(key_id, secret) from a presented API key, or None if it is not one of ours."""
    # The secret is fixed length, so the regex splits correctly even though key ids and
    # secrets may both contain '_'.
    match = _API_KEY_RE.fullmatch(raw.strip())
    if match is None:
        return None
    return match.group(1), match.group(2)

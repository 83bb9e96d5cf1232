"""Identifiers: UUIDv7 event ids, and ids derived deterministically from a cause.

A service that reprocesses an event after a crash must emit the *same* event again, so that
every downstream inbox recognises the duplicate. Derived ids keep the UUIDv7 layout (time-ordered)
with the cause's timestamp, and take their random bits from a hash of (cause, purpose).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid


def _uuid7_from(ms: int, rand: bytes) -> uuid.UUID:
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (int.from_bytes(rand[:2], "big") & 0x0FFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= int.from_bytes(rand[2:10], "big") & ((1 << 62) - 1)  # rand_b
    return uuid.UUID(int=value)


def uuid7() -> uuid.UUID:
    return _uuid7_from(time.time_ns() // 1_000_000, os.urandom(10))


def uuid7_ms(value: uuid.UUID | str) -> int:
    """The Unix milliseconds a UUIDv7 carries."""
    u = value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    return u.int >> 80


def _uuid7_ms_of(text: str) -> int | None:
    """The milliseconds of a UUIDv7 written as 36 or 32 hex digits, else None. Checked by shape
    before parsing: most causes (`<event id>:<transfer id>`, `req_...`) are not UUIDs, and a
    failed parse costs an exception per derived id."""
    if not ((len(text) == 36 and text[14] == "7") or (len(text) == 32 and text[12] == "7")):
        return None
    try:
        u = uuid.UUID(text)
    except ValueError:
        return None
    return u.int >> 80 if u.version == 7 else None


def derived_id(cause: uuid.UUID | str, purpose: str) -> uuid.UUID:
    cause_s = str(cause)
    digest = hashlib.sha256(f"{cause_s}|{purpose}".encode()).digest()
    ms = _uuid7_ms_of(cause_s)
    # A cause without a timestamp still yields the same id every time.
    return _uuid7_from(ms if ms is not None else int.from_bytes(digest[10:16], "big"), digest)


def new_request_id() -> str:
    return f"req_{uuid7().hex}"

"""Identifiers: UUIDv7 event ids, and ids derived deterministically from a cause.

A service that reprocesses an event after a crash must emit the *same* event again, so that
every downstream inbox recognises the duplicate. Derived ids keep the UUIDv7 layout (time-ordered)
with the cause's timestamp, and take their random bits from a hash of (cause, purpose).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid

_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)


def _uuid7_int(ms: int, rand: bytes) -> int:
    """The 128 bits: 48 of milliseconds, version 7, rand_a (12 bits from rand[0:2]), the
    variant, rand_b (62 bits from rand[2:10]). Built as one integer: ids are made for every
    call and event, and a UUID object costs as much again."""
    r = int.from_bytes(rand[:10], "big")
    rand_a, rand_b = (r >> 64) & 0x0FFF, r & ((1 << 62) - 1)
    return ((ms & ((1 << 48) - 1)) << 80) | _VERSION_AND_VARIANT | (rand_a << 64) | rand_b


def _uuid7_from(ms: int, rand: bytes) -> uuid.UUID:
    return uuid.UUID(int=_uuid7_int(ms, rand))


class _Entropy(threading.local):
    """Random bytes from the OS, drawn a few kilobytes at a time: one `getrandom` call per id
    was a twentieth of ingress's CPU under load. Per thread, and dropped in a forked child, so
    no two ids share bytes."""

    def __init__(self) -> None:
        self.drop()

    def drop(self) -> None:
        self.pool, self.at = b"", 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.pool):
            self.pool, self.at = os.urandom(4096), 0
        self.at += n
        return self.pool[self.at - n : self.at]


_entropy = _Entropy()
os.register_at_fork(after_in_child=_entropy.drop)


def _now_uuid7_int() -> int:
    return _uuid7_int(time.time_ns() // 1_000_000, _entropy.take(10))


def uuid7() -> uuid.UUID:
    return uuid.UUID(int=_now_uuid7_int())


def uuid7_hex() -> str:
    """A new UUIDv7 as 32 hex digits, the body of prefixed ids (`req_...`, `acc_...`)."""
    return f"{_now_uuid7_int():032x}"


def new_event_id() -> str:
    """A new UUIDv7 in its canonical 8-4-4-4-12 form."""
    h = uuid7_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_ms(value: uuid.UUID | str) -> int:
    """The Unix milliseconds a UUIDv7 carries."""
    u = value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    return u.int >> 80


def _uuid7_ms_of(cause: str) -> int | None:
    """The milliseconds of the first UUIDv7 a cause names, in any of its `:`-separated parts,
    bare or as the body of a prefixed id (`<event id>:<transfer id>`, `settlement:expired:req_...`);
    None when it names none. Checked by shape before parsing: a failed parse costs an exception."""
    for part in cause.split(":"):
        text = part.rpartition("_")[2]
        if not ((len(text) == 36 and text[14] == "7") or (len(text) == 32 and text[12] == "7")):
            continue
        try:
            u = uuid.UUID(text)
        except ValueError:
            continue
        if u.version == 7:
            return u.int >> 80
    return None


def derived_id(cause: uuid.UUID | str, purpose: str, *, ms: int | None = None) -> uuid.UUID:
    """The same id for the same (cause, purpose), with the time of the first UUIDv7 the cause
    names, else `ms` (say, the log time of the record it stands for). A cause with neither
    still yields the same id every time, with a time taken from the hash: never for an event."""
    cause_s = str(cause)
    digest = hashlib.sha256(f"{cause_s}|{purpose}".encode()).digest()
    at = _uuid7_ms_of(cause_s)
    if at is None:
        at = ms if ms is not None else int.from_bytes(digest[10:16], "big")
    return _uuid7_from(at, digest)


def new_request_id() -> str:
    return f"req_{uuid7_hex()}"

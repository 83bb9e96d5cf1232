"""Cursors of paged lists: opaque to clients, the position just past a page's last item."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from postback_ingress.models import in_range
from postback_libs.http import Problem
from postback_libs.text import unstorable


def encode_cursor(*parts: str | float | datetime) -> str:
    plain = [p.isoformat() if isinstance(p, datetime) else p for p in parts]
    return base64.urlsafe_b64encode(json.dumps(plain).encode()).decode()


def decode_cursor(cursor: str, *kinds: type | tuple[str, ...]) -> tuple[Any, ...]:
    """The parts `encode_cursor` was given, as `kinds` (str, float, datetime, or one of a tuple
    of strings); 400 `invalid-cursor` for anything else, a forged cursor included."""
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(parts, list) or len(parts) != len(kinds) or unstorable(parts):
            raise ValueError(cursor)
        return tuple(_as(kind, part) for kind, part in zip(kinds, parts, strict=True))
    except (ValueError, TypeError):
        raise Problem(
            400,
            "invalid-cursor",
            "Invalid cursor",
            "pass the `next_cursor` of a previous page unchanged",
        ) from None


def _as(kind: type | tuple[str, ...], part: Any) -> Any:
    if isinstance(kind, tuple):
        if part not in kind:
            raise ValueError(part)
        return part
    if kind is datetime:
        return in_range(datetime.fromisoformat(part))
    if kind is float:
        return float(part)
    if not isinstance(part, str):
        raise TypeError(part)
    return part

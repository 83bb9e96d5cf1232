"""The owner contract, free of I/O: what the forwarded request looks like, how the owner's answer
is read, and how callback tokens are made."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from yarl import URL

from postback_libs.text import recordable, unstorable

BODY_METHODS = {"POST", "PUT", "PATCH"}


def callback_token(secret_key: bytes, request_id: str) -> str:
    """Derived, not stored: the adapter can check any token without a lookup."""
    return hmac.new(secret_key, f"callback:{request_id}".encode(), hashlib.sha256).hexdigest()


def token_is_valid(secret_key: bytes, request_id: str, token: str) -> bool:
    return hmac.compare_digest(callback_token(secret_key, request_id).encode(), token.encode())


def upstream_target(upstream_url: str, path: str) -> str:
    """The call's path under the API's endpoint; the endpoint's own query string stays last."""
    if path in ("", "/"):
        return upstream_url
    parts = urlsplit(upstream_url)
    joined = parts.path.rstrip("/") + "/" + path.lstrip("/")
    return urlunsplit(parts._replace(path=joined))


@dataclass(frozen=True)
class Forward:
    method: str
    url: str
    body: bytes | None
    headers: dict[str, str]
    # The URL without the call's parameters: what events may record. The parameters can hold
    # the callback token (seed-compatible `webhook_url`), which must never reach a topic.
    target: str

    @property
    def signed(self) -> bytes:
        """What the Standard Webhooks signature covers: the body, or for a request without
        one the path and query as sent, as a JSON string (so a standard verifier, which
        parses what it verifies, takes it: `verify(json.dumps(raw_path), headers)`)."""
        if self.body is not None:
            return self.body
        return json.dumps(URL(self.url).raw_path_qs).encode()


def build_forward(
    *,
    request_id: str,
    method: str,
    upstream_url: str,
    path: str,
    params: dict[str, Any],
    body: Any,
    entry: str,
    deadline: datetime,
    callback_url: str,
    token: str,
) -> Forward:
    params = dict(params)
    if entry != "v1" and "webhook_url" in params:
        # Seed-compatible form: an owner that posts its result to the `webhook_url` it was
        # given reaches Postback's callback, token included.
        params["webhook_url"] = f"{callback_url}?token={token}"
    url = target = upstream_target(upstream_url, path)
    payload: bytes | None = None
    query = params
    if body is not None:  # ingress takes a body or params, never both
        payload, query = json.dumps(body, separators=(",", ":")).encode(), {}
    elif method in BODY_METHODS:  # no body: the parameters are the body
        payload, query = json.dumps(params, separators=(",", ":")).encode(), {}
    if query:
        url += ("&" if "?" in url else "?") + urlencode(
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in query.items()}
        )
    headers = {
        "X-Postback-Request-Id": request_id,
        "X-Postback-Deadline": deadline.isoformat().replace("+00:00", "Z"),
        "X-Postback-Callback-Url": callback_url,
        "X-Postback-Callback-Token": token,
    }
    if payload is not None:
        headers["Content-Type"] = "application/json"
    return Forward(method, url, payload, headers, target)


Verdict = Literal["completed", "accepted", "retry", "refused", "too_large"]


def answer_within(delivery_mode: str, accept_cap: float) -> float | None:
    """How long the owner of an API in this mode has to answer one forwarded request before it
    is tried again; None: until the call's deadline. An async API answers 202 at once and posts
    its result later, so one that keeps the request open is stuck and is tried again, rather
    than left to use up the call's whole deadline."""
    return accept_cap if delivery_mode == "async" else None


def request_seconds(until_deadline: float, *caps: float | None) -> float:
    """How long one forwarded request may take: until the deadline, or the shortest cap."""
    return min([until_deadline, *(c for c in caps if c is not None)])


def judge_response(status: int, body_size: int, max_result_bytes: int) -> Verdict:
    """2xx with a result completes the call, 202 means a callback will follow, 5xx and 429 are
    worth retrying, any other 4xx is the owner refusing the call."""
    if status == 202:
        return "accepted"
    if 200 <= status < 300:
        return "too_large" if body_size > max_result_bytes else "completed"
    if status >= 500 or status in (408, 429):
        return "retry"
    return "refused"


def parse_result(raw: bytes, content_type: str) -> Any:
    """JSON results are carried as JSON; anything else as text with its content type, and so
    is JSON an event could not carry (`postback_libs.text`)."""
    if "json" in content_type or not content_type:
        try:
            value = json.loads(raw) if raw else None
            if unstorable(value) is None:
                return value
        except (ValueError, RecursionError):
            pass
    return recordable(raw.decode(errors="replace"))


def is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def retry_delay(attempt: int) -> float:
    return float(min(2 ** (attempt - 1), 30))


def result_digest(content_type: str, raw: bytes) -> str:
    """What makes two results the same: their media type (its parameters, a charset, aside)
    and, for JSON, the value rather than its spelling. An owner's client that retries a
    callback may serialise it again: `{"v": 1}` then `{"v":1}` is the same result."""
    media = content_type.split(";", 1)[0].strip().lower()
    if "json" in media:
        with contextlib.suppress(ValueError, RecursionError):
            raw = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(media.encode() + b"\0" + raw).hexdigest()

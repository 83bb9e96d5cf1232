"""Ingress's group commit and key cache against fake connections: when writes gather, how
Idempotency-Key is decided inside one batch, what a failed write answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from postback_ingress.auth import KeyCache
from postback_ingress.group_commit import HOLDERS, WRITE, CallWriter
from postback_libs.events import CallRequested, new_event
from postback_libs.http import Problem
from postback_libs.ids import new_request_id
from postback_libs.signing import generate_api_key, hash_secret, parse_api_key


class FakeCalls:
    """The `calls` table's unique (consumer, key), behind a gate that holds writes in flight."""

    def __init__(self, fail: bool = False) -> None:
        self.held: dict[tuple[str, str], tuple[str, str]] = {}
        self.batches: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        yield self

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        await self.gate.wait()
        if self.fail:
            raise ConnectionError("the database went away")
        if sql == WRITE:
            ids, consumers, keys, digests = args[:4]
            self.batches.append(len(ids))
            inserted = []
            for rid, consumer, key, digest in zip(ids, consumers, keys, digests, strict=True):
                if key is None or (consumer, key) not in self.held:
                    if key is not None:
                        self.held[(consumer, key)] = (rid, digest)
                    inserted.append((rid,))
            return inserted
        assert sql == HOLDERS
        return [(c, k, *self.held[(c, k)]) for c, k in zip(*args, strict=True)]


def writer(calls: FakeCalls, **limits: int) -> CallWriter:
    return CallWriter(calls.connection, lambda: None, **limits)


def write(w: CallWriter, key: str | None = None, digest: str = "d") -> asyncio.Task[Any]:
    call = CallRequested(
        request_id=new_request_id(), consumer_id="acc_1", api="svc", idempotency_key=key
    )
    event = new_event(call, source="ingress")
    return asyncio.ensure_future(w.write(call, digest, "calls", event))


async def test_a_call_alone_is_written_at_once_and_later_ones_gather():
    calls = FakeCalls()
    w = writer(calls, max_writers=1)
    calls.gate.clear()
    first = write(w)
    await asyncio.sleep(0)  # the writer takes the first call and waits on the database
    await asyncio.sleep(0)
    rest = [write(w) for _ in range(5)]
    await asyncio.sleep(0)
    calls.gate.set()
    results = await asyncio.gather(first, *rest)
    assert calls.batches == [1, 5]
    assert all(fresh for _, fresh in results)
    assert len({rid for rid, _ in results}) == 6


async def test_one_key_in_one_batch_answers_as_one_request_after_another():
    calls = FakeCalls()
    w = writer(calls)
    tasks = [write(w, "k", "a"), write(w, "k", "a"), write(w, "k", "b"), write(w, None, "a")]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls.batches == [2]  # the key's first request and the call without a key
    (rid, fresh), (again, fresh_again), reused, (_, other_fresh) = done
    assert fresh and not fresh_again and again == rid
    assert isinstance(reused, Problem) and reused.status == 422
    assert other_fresh
    # Later, in another batch: the key's holder answers.
    assert await write(w, "k", "a") == (rid, False)
    with pytest.raises(Problem) as e:
        await write(w, "k", "b")
    assert e.value.slug == "idempotency-key-reused"


async def test_a_failed_write_fails_every_call_in_it():
    calls = FakeCalls(fail=True)
    w = writer(calls)
    done = await asyncio.gather(*(write(w) for _ in range(4)), return_exceptions=True)
    assert all(isinstance(d, Problem) and d.status == 503 for d in done)
    assert all(isinstance(d, Problem) and d.slug == "accept-failed" for d in done)


async def test_too_many_waiting_calls_are_refused():
    calls = FakeCalls()
    w = writer(calls, max_writers=1, max_waiting=2)
    calls.gate.clear()
    in_flight = write(w)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    waiting = [write(w), write(w)]
    refused = write(w)
    with pytest.raises(Problem) as e:
        await refused
    assert e.value.status == 503 and e.value.headers["Retry-After"]
    calls.gate.set()
    assert len(await asyncio.gather(in_flight, *waiting)) == 3


class FakePool:
    def __init__(self, row: dict[str, Any]) -> None:
        self.row, self.queries = row, 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def fetchrow(self, sql: str, key_id: str) -> dict[str, Any] | None:
        self.queries += 1
        await self.gate.wait()
        return self.row if key_id in (self.row["key_id"], self.row["previous_key_id"]) else None


def presenting(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def account(status: str = "active") -> tuple[str, dict[str, Any]]:
    raw = generate_api_key("key1")
    row = {
        "account_id": "acc_1",
        "roles": ["consumer"],
        "status": status,
        "key_id": "key1",
        "key_hash": hash_secret(parse_api_key(raw)[1]),  # type: ignore[index]
        "previous_key_id": None,
        "previous_key_hash": None,
        "previous_valid_until": None,
    }
    return raw, row


async def test_the_key_cache_reads_an_account_once_per_ttl_and_still_checks_the_secret():
    raw, row = account()
    pool = FakePool(row)
    keys = KeyCache(ttl=60)
    pool.gate.clear()
    concurrent = [keys.authenticate(pool, presenting(raw)) for _ in range(5)]
    tasks = [asyncio.ensure_future(c) for c in concurrent]
    await asyncio.sleep(0)
    pool.gate.set()
    assert {c.account_id for c in await asyncio.gather(*tasks)} == {"acc_1"}
    assert pool.queries == 1
    wrong = raw[:-4] + ("AAAA" if not raw.endswith("AAAA") else "BBBB")
    with pytest.raises(Problem) as e:
        await keys.authenticate(pool, presenting(wrong))
    assert e.value.status == 401
    assert pool.queries == 1
    # With no time to live, every request reads the account.
    keys = KeyCache(ttl=0)
    for _ in range(2):
        await keys.authenticate(pool, presenting(raw))
    assert pool.queries == 3


async def test_the_key_cache_keeps_no_suspended_account_and_honours_rotation_ends():
    raw, row = account("suspended")
    pool = FakePool(row)
    keys = KeyCache(ttl=60)
    for _ in range(2):
        assert (await keys.authenticate(pool, presenting(raw))).status == "suspended"
    assert pool.queries == 2  # not cached: a reinstatement counts at once
    # A previous key is honoured until its end, even from the cache.
    new_raw, new_row = account()
    new_row.update(
        key_id="key2",
        key_hash="0" * 64,
        previous_key_id="key1",
        previous_key_hash=new_row["key_hash"],
        previous_valid_until=datetime.now(UTC) - timedelta(seconds=1),
    )
    with pytest.raises(Problem):
        await KeyCache().authenticate(FakePool(new_row), presenting(new_raw))
    new_row["previous_valid_until"] = datetime.now(UTC) + timedelta(hours=1)
    caller = await KeyCache().authenticate(FakePool(new_row), presenting(new_raw))
    assert caller.account_id == "acc_1"


async def _asgi(app: Any, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """One POST /v1/calls through `app`, as a server would hand it over."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/calls",
        "raw_path": b"/v1/calls",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8080),
        "headers": [(b"content-type", b"application/json")],
    }
    parts = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, *rest = sent
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in rest)


async def test_the_direct_call_answers_the_unexpected_with_a_bare_500():
    from postback_ingress.calls import _DirectCall
    from postback_libs.http import App, install_problem_handlers

    app = App()
    install_problem_handlers(app)

    async def broken(headers: Any, body: bytes) -> tuple[str, bool]:
        raise RuntimeError("secret internals")

    async def fine(headers: Any, body: bytes) -> tuple[str, bool]:
        return f"req_{len(body)}", True

    app.direct("POST", "/v1/calls", _DirectCall(app, 1024, broken))
    status, headers, body = await _asgi(app, b"{}")
    assert (status, headers[b"content-type"]) == (500, b"application/problem+json")
    assert b"internal-error" in body and b"secret internals" not in body
    app.direct("POST", "/v1/calls", _DirectCall(app, 1024, fine))
    assert (await _asgi(app, b"x" * 1025))[0] == 413
    status, headers, body = await _asgi(app, b"x" * 1024)
    assert (status, headers[b"location"]) == (202, b"/v1/calls/req_1024")
    assert json.loads(body)["request_id"] == "req_1024"


def test_a_get_call_carries_no_body_it_would_lose() -> None:
    from pydantic import ValidationError

    from postback_ingress.models import CallRequest

    with pytest.raises(ValidationError, match="a GET carries no body"):
        CallRequest(api="x", method="GET", body={"a": 1})
    assert CallRequest(api="x", method="DELETE", body={"a": 1}).body == {"a": 1}
    with pytest.raises(ValidationError, match="params or a body, not both"):
        CallRequest(api="x", params={"page": 2}, body={"a": 1})  # the params would go unsigned

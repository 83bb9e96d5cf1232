"""Routing decisions: pure functions of the request, the catalog and the consumer's state."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import unquote

from postback_libs.events import (
    AccountState,
    ApiState,
    CallRejected,
    CallRequested,
    CallRouted,
    CloudEvent,
    RejectReason,
)


class Catalog:
    """The APIs and accounts routing knows, built from the compacted topics."""

    def __init__(self) -> None:
        self.apis: dict[str, ApiState] = {}
        # Every API whose current state holds the slug: replaying a compacted catalog, an old
        # state of one API can name a slug another API holds now, until its newer state comes.
        self.by_slug: dict[str, set[str]] = {}
        self.accounts: dict[str, AccountState] = {}

    def apply_api(self, event: CloudEvent) -> None:
        api = ApiState.model_validate(event.data["api"])
        known = self.apis.get(api.api_id)
        if known is not None and known.version > api.version:
            return  # an older state replayed after a newer one
        if known is not None:
            holders = self.by_slug.get(known.slug, set())
            holders.discard(api.api_id)
            if not holders:
                self.by_slug.pop(known.slug, None)
        self.apis[api.api_id] = api
        self.by_slug.setdefault(api.slug, set()).add(api.api_id)

    def apply_account(self, event: CloudEvent) -> None:
        account = AccountState.model_validate(event.data["account"])
        self.accounts[account.account_id] = account

    def find(self, ref: str) -> ApiState | None:
        """The API by id or slug (an active one before a retired one holding it)."""
        if ref in self.apis:
            return self.apis[ref]
        holders = [self.apis[i] for i in self.by_slug.get(ref, ())]
        return max(holders, key=lambda a: (a.status == "active", a.api_id), default=None)


def reject(
    req: CallRequested, reason: RejectReason, detail: str, api: ApiState | None = None
) -> CallRejected:
    return CallRejected(
        request_id=req.request_id,
        consumer_id=req.consumer_id,
        api=req.api,
        reason=reason,
        detail=detail,
        stage="routing",
        api_id=api.api_id if api is not None else None,
    )


def path_allowed(path: str, prefixes: list[str]) -> bool:
    """Whether `path` lies under one of the prefixes. Dot segments (plain or percent-encoded)
    are refused outright: an HTTP client would resolve them and leave the prefix."""
    decoded = unquote(path)
    if posixpath.normpath(decoded) != decoded.rstrip("/") and decoded != "/":
        return False
    for prefix in prefixes:
        if prefix.endswith("/") and path.startswith(prefix):
            return True
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return True
    return False


def request_size(req: CallRequested) -> int:
    return len(json.dumps([req.params, req.body], separators=(",", ":")).encode())


def choose_upstream(request_id: str, candidates: list[str], unhealthy: set[str]) -> str:
    """Spread calls across upstreams by request id (stable, so a replay picks the same one),
    skipping unhealthy ones unless none is healthy."""
    healthy = [c for c in candidates if c not in unhealthy] or candidates
    index = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:4], "big")
    return healthy[index % len(healthy)]


@dataclass
class UpstreamHealth:
    """Failure streaks per upstream, from the outcomes routing reads on the calls topic. An
    upstream that failed `threshold` times in a row is skipped for `cooldown`, then tried again:
    one success resets it."""

    threshold: int = 3
    cooldown: timedelta = timedelta(seconds=30)
    streaks: dict[str, int] = field(default_factory=dict)
    benched_until: dict[str, datetime] = field(default_factory=dict)
    # The outcome events counted lately: one read again (a batch fetched again) must not
    # count twice. Bounded, oldest forgotten first.
    counted: dict[str, None] = field(default_factory=dict)
    remember: int = 10_000

    def record(self, upstream: str, ok: bool, at: datetime, event_id: str = "") -> None:
        if event_id:
            if event_id in self.counted:
                return
            self.counted[event_id] = None
            if len(self.counted) > self.remember:
                del self.counted[next(iter(self.counted))]
        if ok:
            self.streaks.pop(upstream, None)
            self.benched_until.pop(upstream, None)
            return
        self.streaks[upstream] = self.streaks.get(upstream, 0) + 1
        if self.streaks[upstream] >= self.threshold:
            self.benched_until[upstream] = at + self.cooldown

    def unhealthy(self, now: datetime) -> set[str]:
        return {u for u, until in self.benched_until.items() if until > now}


def take_token(
    tokens: float, refilled_at: datetime, at: datetime, rate: float, burst: int
) -> tuple[bool, float, datetime]:
    """Token bucket: refill since `refilled_at` at `rate`/s up to `burst`, then take one.
    Returns (admitted, tokens left, new refill time); time never runs backwards, so events
    read out of order cannot mint tokens."""
    now = max(at, refilled_at)
    available = min(float(burst), tokens + (now - refilled_at).total_seconds() * rate)
    if available >= 1.0:
        return True, available - 1.0, now
    return False, available, now


def quota_periods(api: ApiState, at: datetime) -> list[tuple[str, int]]:
    """(period key, limit) of each quota the API sets, for a call made at `at` (UTC)."""
    periods = []
    if api.quota_per_day is not None:
        periods.append((f"day:{at:%Y-%m-%d}", api.quota_per_day))
    if api.quota_per_month is not None:
        periods.append((f"month:{at:%Y-%m}", api.quota_per_month))
    return periods


BucketKey = tuple[str, str]  # (consumer id, api id)
QuotaKey = tuple[str, str, str]  # (consumer id, api id, period)


def burst_of(api: ApiState) -> int:
    return api.rate_limit_burst or max(1, int(api.rate_limit_per_second or 1))


def limited(api: ApiState) -> bool:
    return (
        api.rate_limit_per_second is not None
        or api.quota_per_day is not None
        or api.quota_per_month is not None
    )


@dataclass
class Limits:
    """The buckets and quota counters a batch's calls touch, as read under their row locks.
    `admit` takes one call's token and quota units, so admitting a batch's calls in event order
    gives what admitting them one transaction at a time would. A key not read yet is a fresh
    row: a full bucket, an unused quota."""

    buckets: dict[BucketKey, tuple[float, datetime]] = field(default_factory=dict)
    used: dict[QuotaKey, int] = field(default_factory=dict)

    def admit(
        self, consumer_id: str, api: ApiState, at: datetime
    ) -> tuple[RejectReason, str] | None:
        """None if admitted, else why not. Nothing is taken from a refused call, but a
        refused call's refill still counts (as it did when the row was written back)."""
        periods = [((consumer_id, api.api_id, p), p, n) for p, n in quota_periods(api, at)]
        for key, period, limit in periods:
            if self.used.setdefault(key, 0) >= limit:
                return "quota_exceeded", f"{limit} calls per {period.split(':')[0]} used"
        if api.rate_limit_per_second is not None:
            burst = burst_of(api)
            bucket = (consumer_id, api.api_id)
            tokens, refilled_at = self.buckets.get(bucket, (float(burst), at))
            ok, tokens, refilled_at = take_token(
                tokens, refilled_at, at, api.rate_limit_per_second, burst
            )
            self.buckets[bucket] = (tokens, refilled_at)
            if not ok:
                return "rate_limited", f"{api.rate_limit_per_second:g} calls/s, burst {burst}"
        for key, _, _ in periods:
            self.used[key] += 1
        return None


def route(
    req: CallRequested,
    api: ApiState | None,
    consumer: AccountState | None,
    *,
    default_fee_bps: int,
    now: datetime,
    unhealthy: set[str] | None = None,
    owner: AccountState | None = None,
) -> CallRouted | CallRejected:
    if consumer is not None and consumer.status == "suspended":
        return reject(req, "account_suspended", "the consumer's account is suspended")
    if api is None:
        return reject(req, "unknown_api", f"no API named {req.api!r}")
    if api.status == "retired":
        return reject(req, "api_retired", f"API {api.slug!r} is retired", api)
    if owner is not None and owner.status == "suspended":
        return reject(req, "owner_suspended", f"the owner of API {api.slug!r} is suspended", api)
    candidates = [api.demo_endpoint] if req.mode == "demo" else [api.endpoint, *api.endpoints]
    if candidates == [None]:
        return reject(req, "mode_not_available", f"API {api.slug!r} has no {req.mode} mode", api)
    upstream = choose_upstream(req.request_id, [c for c in candidates if c], unhealthy or set())
    if req.method.upper() not in {m.upper() for m in api.methods}:
        return reject(
            req, "method_not_allowed", f"{req.method} is not one of {', '.join(api.methods)}", api
        )
    if not path_allowed(req.path, api.path_prefixes):
        return reject(req, "path_not_allowed", f"path {req.path!r} is not allowed", api)
    size = request_size(req)
    if size > api.max_request_bytes:
        return reject(
            req, "payload_too_large", f"{size} bytes, the API accepts {api.max_request_bytes}", api
        )
    price = 0 if req.mode == "demo" else api.price
    if req.max_price is not None and price > req.max_price:
        return reject(req, "price_above_max", f"the call costs {price}, above its max_price", api)
    return CallRouted(
        request_id=req.request_id,
        consumer_id=req.consumer_id,
        owner_id=api.owner_id,
        api_id=api.api_id,
        mode=req.mode,
        upstream_url=upstream,
        method=req.method.upper(),
        path=req.path,
        params=req.params,
        body=req.body,
        delivery_mode=api.delivery_mode,
        price=price,
        fee_bps=api.fee_bps if api.fee_bps is not None else default_fee_bps,
        deadline=now + timedelta(seconds=api.max_duration_seconds),
        entry=req.entry,
        max_result_bytes=api.max_result_bytes,
    )

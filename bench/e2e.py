"""End to end: calls offered to ingress by k6, forwarded to an instant sync owner, delivered to a
fast receiver; the latency from POST /v1/calls to the webhook's arrival, and counts of calls
accepted (ingress's own table, the authority), delivered, lost and duplicated."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.infra import OPERATOR_TOKEN, BenchStack
from bench.loadgen import run_k6
from bench.stats import percentile

API_SLUG = "bench-echo"
PRICE = 10
CREDIT = 1_000_000_000
# Several consumers, as real traffic has: one would make every call of the run contend for one
# balance row and one ledger partition, which is not the load Postback is built for.
CONSUMERS = 8
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

# A phase "keeps up" when nothing is dropped or lost, ingress accepted what was offered, the
# webhooks came at the offered rate, and latency did not grow from the first fifth of the calls
# to the last (a growing backlog makes every later call wait longer). Latency itself is judged
# by its own target, not here.
KEEP_UP_ACCEPTED_SHARE = 0.97
KEEP_UP_DELIVERED_SHARE = 0.9
KEEP_UP_LATENCY_GROWTH = 2.0
KEEP_UP_LATENCY_SLACK_MS = 500.0
# No webhook for this long while calls are missing: the pipeline has stopped, they are lost.
STALL_SECONDS = 15.0


# A call's events in the order they happen, with the service whose work each gap measures. An
# event's `time` is set when its handler emits it, so a gap is one hop: the consumer's fetch, the
# handler and its commit, the relay's publish (and for dispatched/delivered, the work queue's
# pickup and the HTTP request).
HOPS = (
    ("call.requested", "call.routed", "routing"),
    ("call.routed", "call.authorized", "settlement (reserve)"),
    ("call.authorized", "call.dispatched", "owner-adapter (queue pickup + owner HTTP)"),
    ("call.dispatched", "call.completed", "owner-adapter (same transaction)"),
    ("call.completed", "call.settled", "settlement (capture)"),
    ("call.settled", "call.delivered", "delivery (queue pickup + webhook HTTP)"),
)


def slowest_hop_service(hops: dict[str, Any]) -> str | None:
    """The service whose hop has the highest median (the first word of `work_of`)."""
    timed = [
        (v["p50_ms"], v["work_of"].split()[0])
        for v in hops.values()
        if isinstance(v, dict) and v.get("p50_ms") is not None
    ]
    return max(timed)[1] if timed else None


@dataclass
class Tenancy:
    api: str
    keys: list[str]
    consumer_ids: list[str]


@dataclass
class Webhooks:
    """What the receiver got, read incrementally from its /stats."""

    peers_url: str
    # request id -> [(webhook-id, arrival epoch ms, POST epoch ms)]
    by_request: dict[str, list[tuple[str, float, float | None]]] = field(default_factory=dict)
    seen: int = 0

    async def refresh(self, http: aiohttp.ClientSession) -> None:
        async with http.get(f"{self.peers_url}/stats", params={"since": self.seen}) as r:
            body = await r.json()
        for rid, wid, arrived, sent in body["hooks"]:
            self.by_request.setdefault(rid, []).append((wid, arrived, sent))
        self.seen += len(body["hooks"])


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, expect: int, **kw: Any
) -> dict[str, Any]:
    async with http.request(method, url, **kw) as r:
        body: dict[str, Any] = await r.json(content_type=None)
        if r.status != expect:
            raise RuntimeError(f"{method} {url} answered {r.status}: {body}")
        return body


async def setup_tenancy(
    http: aiohttp.ClientSession, ingress: str, owner_url: str, consumers: int = CONSUMERS
) -> Tenancy:
    """An owner with one sync API, and funded consumers (waits until settlement and projection
    have applied the credits)."""
    owner = await _call(
        http,
        "POST",
        f"{ingress}/v1/accounts",
        201,
        headers=OPERATOR,
        json={"name": "bench owner", "roles": ["owner"]},
    )
    await _call(
        http,
        "POST",
        f"{ingress}/v1/apis",
        201,
        headers={"Authorization": f"Bearer {owner['secret']}"},
        json={
            "slug": API_SLUG,
            "name": "Echo",
            "endpoint": owner_url,
            "delivery_mode": "sync",
            "price": PRICE,
            "max_duration_seconds": 120,
        },
    )
    keys, ids = [], []
    for i in range(consumers):
        c = await _call(
            http,
            "POST",
            f"{ingress}/v1/accounts",
            201,
            headers=OPERATOR,
            json={"name": f"bench consumer {i}", "roles": ["consumer"]},
        )
        await _call(
            http,
            "POST",
            f"{ingress}/v1/accounts/{c['account_id']}/credits",
            202,
            headers=OPERATOR,
            json={"amount": CREDIT},
        )
        keys.append(c["secret"])
        ids.append(c["account_id"])
    deadline = time.monotonic() + 90
    for key in keys:
        while True:
            me = await _call(
                http,
                "GET",
                f"{ingress}/v1/accounts/me",
                200,
                headers={"Authorization": f"Bearer {key}"},
            )
            if me["balances"].get("consumer", {}).get("balance", 0) >= CREDIT:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("consumer credits not applied within 90 s")
            await asyncio.sleep(0.2)
    return Tenancy(API_SLUG, keys, ids)


class EndToEnd:
    """One running stack with its tenancy, driven phase after phase."""

    def __init__(
        self,
        stack: BenchStack,
        tenancy: Tenancy,
        peers_url: str,
        http: aiohttp.ClientSession,
        db: asyncpg.Connection,
        logs: Path,
    ) -> None:
        self.stack, self.tenancy, self.http, self.db, self.logs = stack, tenancy, http, db, logs
        self.hooks = Webhooks(peers_url)
        self.hook_url = f"{peers_url}/hook"
        # How long a phase waits for its backlog after the load stops (bounds the run).
        self.drain_timeout = 180.0
        # When the last phase's load began and ended (monotonic clock, as the sampler's).
        self.load_window = (0.0, 0.0)

    def ingress_urls(self) -> list[str]:
        return [self.stack.url(k) for k in self.stack.instances("ingress")]

    async def accepted_ids(self) -> set[str]:
        rows = await self.db.fetch(
            "SELECT request_id FROM ingress.calls WHERE consumer_id = ANY($1::text[])",
            self.tenancy.consumer_ids,
        )
        return {r["request_id"] for r in rows}

    async def warm_up(self, calls: int, timeout: float = 60) -> None:
        """A few calls through every hop (connections, caches, consumer groups), waited for."""
        before = await self.accepted_ids()
        ingress = self.ingress_urls()[0]
        for i in range(calls):
            await _call(
                self.http,
                "POST",
                f"{ingress}/v1/calls",
                202,
                headers={
                    "Authorization": f"Bearer {self.tenancy.keys[i % len(self.tenancy.keys)]}"
                },
                json={
                    "api": self.tenancy.api,
                    "params": {"warm": i, "t": time.time() * 1000},
                    "webhook_url": self.hook_url,
                },
            )
        fresh = await self.accepted_ids() - before
        lost, late = await self._wait_delivered(fresh, timeout, stall=timeout)
        if lost or late:
            raise RuntimeError(f"warm-up: {len(lost | late)} of {calls} calls not delivered")

    async def _wait_delivered(
        self, ids: set[str], timeout: float, stall: float = STALL_SECONDS
    ) -> tuple[set[str], set[str]]:
        """Wait until every id has a webhook. Returns (lost, in flight): the ids still missing
        when no webhook had come for `stall` seconds (the pipeline stopped: lost), or when
        `timeout` ran out while webhooks were still coming (a backlog, not a loss)."""
        deadline = time.monotonic() + timeout
        last_progress, last_missing = time.monotonic(), len(ids) + 1
        while True:
            await self.hooks.refresh(self.http)
            missing = {rid for rid in ids if rid not in self.hooks.by_request}
            if not missing:
                return set(), set()
            now = time.monotonic()
            if len(missing) < last_missing:
                last_progress, last_missing = now, len(missing)
            if now - last_progress > stall:
                return missing, set()
            if now > deadline:
                return set(), missing
            await asyncio.sleep(0.25)

    async def phase(self, name: str, *, rate: float, seconds: float) -> dict[str, Any]:
        """Offer `rate` calls/s for `seconds`, wait for their webhooks, and account for each."""
        before = await self.accepted_ids()
        started = time.time() * 1000
        load_began = time.monotonic()
        load = await run_k6(
            self.ingress_urls(),
            rate=rate,
            seconds=seconds,
            vus=min(256, max(32, int(rate // 4))),
            keys=self.tenancy.keys,
            api=self.tenancy.api,
            hook=self.hook_url,
            log=self.logs / f"k6-{name.replace(' ', '-')}.log",
        )
        ended = time.time() * 1000
        self.load_window = (load_began, time.monotonic())
        accepted = await self.accepted_ids() - before
        lost, late = await self._wait_delivered(accepted, self.drain_timeout)
        missing = lost | late
        delivered = accepted - missing
        webhooks = [self.hooks.by_request[rid] for rid in delivered]
        first = [min(h, key=lambda x: x[1]) for h in webhooks]
        timed = sorted((sent, arrived - sent) for _, arrived, sent in first if sent is not None)
        latencies = [latency for _, latency in timed]
        fifth = max(1, len(timed) // 5)
        early = percentile([x for _, x in timed[:fifth]], 50)
        late_p50 = percentile([x for _, x in timed[-fifth:]], 50)
        arrivals = sorted(arrived for _, arrived, _ in first)
        load_s = max(0.001, (ended - started) / 1000)
        last = arrivals[-1] if arrivals else ended
        drain_s = max(0.0, (last - ended) / 1000)
        # Between the first webhook and the last: the offered rate when the pipeline keeps up,
        # its own pace when a backlog forms (the span then runs past the end of the load).
        span_s = (arrivals[-1] - arrivals[0]) / 1000 if len(arrivals) > 1 else 0.0
        out: dict[str, Any] = {
            "name": name,
            "offered_per_second": rate,
            "seconds": round(load_s, 2),
            "sent": load.sent,
            "accepted": len(accepted),
            "accepted_k6": load.accepted,
            "refused": load.refused,
            "dropped": load.dropped,
            "delivered": len(delivered),
            "lost": len(lost),
            "in_flight_at_wait_end": len(late),
            "duplicated": sum(len(h) - 1 for h in webhooks),
            # n arrivals span n - 1 intervals.
            "delivered_per_second": round((len(delivered) - 1) / span_s, 1) if span_s else None,
            "drain_seconds": round(drain_s, 2),
            "latency_ms": {
                "p50": percentile(latencies, 50),
                "p95": percentile(latencies, 95),
                "p99": percentile(latencies, 99),
                "max": percentile(latencies, 100),
                "p50_first_fifth": early,
                "p50_last_fifth": late_p50,
            },
            "accept_latency_ms": {"p50": load.p50_ms, "p95": load.p95_ms, "p99": load.p99_ms},
        }
        out["hops"] = await self.hops(delivered) if delivered else {}
        rate_ok = (out["delivered_per_second"] or 0) >= KEEP_UP_DELIVERED_SHARE * rate
        steady = (
            early is not None
            and late_p50 is not None
            and late_p50 <= KEEP_UP_LATENCY_GROWTH * early + KEEP_UP_LATENCY_SLACK_MS
        )
        out["kept_up"] = bool(
            not load.dropped
            and not missing
            and len(accepted) >= KEEP_UP_ACCEPTED_SHARE * rate * seconds
            and rate_ok
            and steady
        )
        return out

    async def hops(self, request_ids: set[str], timeout: float = 20) -> dict[str, Any]:
        """Where the end-to-end latency goes: percentiles of the gap between consecutive events
        of each call, from the read model (waits for projection to catch up)."""
        ids = list(request_ids)
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.db.fetch(
                "SELECT request_id, type, time FROM projection.call_events"
                " WHERE request_id = ANY($1::text[])",
                ids,
            )
            done = {r["request_id"] for r in rows if r["type"] == "call.delivered"}
            if len(done) >= len(ids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        at: dict[str, dict[str, float]] = {}
        for r in rows:
            at.setdefault(r["request_id"], {}).setdefault(r["type"], r["time"].timestamp() * 1000)
        out: dict[str, Any] = {}
        for before, after, who in HOPS:
            gaps = [t[after] - t[before] for t in at.values() if before in t and after in t]
            out[f"{before} -> {after}"] = {
                "work_of": who,
                "p50_ms": percentile(gaps, 50),
                "p95_ms": percentile(gaps, 95),
                "p99_ms": percentile(gaps, 99),
            }
        arrival = []
        for rid, t in at.items():
            hooks = self.hooks.by_request.get(rid)
            if hooks and "call.requested" in t:
                sent = hooks[0][2]
                if sent is not None:
                    arrival.append(t["call.requested"] - sent)
        out["POST sent -> call.requested"] = {
            "work_of": "ingress (accept and commit)",
            "p50_ms": percentile(arrival, 50),
            "p95_ms": percentile(arrival, 95),
            "p99_ms": percentile(arrival, 99),
        }
        out["calls"] = len(at)
        return out

    async def capacity(self, *, rate: float, seconds: float) -> dict[str, Any]:
        """Offer more than the pipeline can take, so a backlog forms, and measure how fast the
        pipeline works it off: delivered calls/s between the first and the last webhook."""
        before = await self.accepted_ids()
        load = await run_k6(
            self.ingress_urls(),
            rate=rate,
            seconds=seconds,
            vus=256,
            keys=self.tenancy.keys,
            api=self.tenancy.api,
            hook=self.hook_url,
            log=self.logs / "k6-capacity.log",
        )
        accepted = await self.accepted_ids() - before
        lost, late = await self._wait_delivered(accepted, self.drain_timeout)
        delivered = accepted - lost - late
        arrivals = sorted(min(a for _, a, _ in self.hooks.by_request[rid]) for rid in delivered)
        span = (arrivals[-1] - arrivals[0]) / 1000 if len(arrivals) > 1 else 0.0
        return {
            "offered_per_second": rate,
            "offered_seconds": seconds,
            "accepted": len(accepted),
            "accepted_per_second": load.accepted_per_second,
            "delivered": len(delivered),
            "lost": len(lost),
            "in_flight_at_wait_end": len(late),
            "duplicated": sum(len(self.hooks.by_request[rid]) - 1 for rid in delivered),
            "delivered_per_second": round((len(delivered) - 1) / span, 1) if span else None,
            "seconds": round(span, 2),
        }

"""The figures drawn from a run: each beside its baseline (as a ratio) and beside its target
(stated, never asserted)."""

from __future__ import annotations

from typing import Any

from bench.stats import ratio
from postback_libs.settings import SERVICES

TARGETS = {
    "e2e_sustained_calls_per_second": 300,
    "e2e_p99_ms_at_200": 500,
    "ingress_share_of_bare": 0.60,
    "delivery_share_of_raw_client": 0.80,
    "service_peak_rss_mb": 200,
    "settlement_calls_per_second": 2_000,
    "projection_events_per_second": 20_000,
    # A rebuild of at least this many events, in under this many seconds.
    "rebuild_events": 1_000_000,
    "rebuild_seconds": 60,
}


def get_path(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _pick(d: dict[str, Any], want: tuple[str, ...], avoid: tuple[str, ...] = ()) -> Any:
    """The first number in a (nested) result whose key holds every word of `want` and none of
    `avoid`: the delivery module's keys are its own."""
    for key, value in flatten(d).items():
        k = key.lower()
        if (
            all(w in k for w in want)
            and not any(a in k for a in avoid)
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            return key, value
    return None, None


def delivery_figures(r: dict[str, Any]) -> dict[str, Any]:
    d = r.get("delivery") or {}
    if not isinstance(d, dict) or "skipped" in d or "error" in d:
        return {}
    raw_words = ("raw", "client", "baseline")
    key, value = _pick(d, ("per_second",), avoid=raw_words)
    raw_key, raw = None, None
    for word in raw_words:
        raw_key, raw = _pick(d, (word, "per_second"))
        if raw is not None:
            break
    source = "bench/delivery.py"
    if raw is None:
        raw, raw_key = get_path(r, "baselines", "http_client", "requests_per_second"), None
        source = "baselines.http_client"
    return {"key": key, "value": value, "raw_key": raw_key, "raw": raw, "raw_source": source}


def ratios(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: Any, baseline: str, base: Any, unit: str) -> None:
        rows.append(
            {
                "figure": figure,
                "value": value,
                "unit": unit,
                "baseline": baseline,
                "baseline_value": base,
                "ratio": ratio(value, base),
            }
        )

    kafka = get_path(r, "baselines", "kafka") or {}
    pg = get_path(r, "baselines", "postgres") or {}
    sat = get_path(r, "ingress", "saturation") or {}
    add(
        "ingress accept, saturation",
        sat.get("ingress_per_second"),
        "bare FastAPI endpoint, same uvicorn stack, saturation",
        sat.get("bare_per_second"),
        "calls/s",
    )
    add(
        "ingress accept, saturation",
        sat.get("ingress_per_second"),
        "raw asyncpg, a transaction per row, 16 connections",
        pg.get("commit_per_row_rows_per_second"),
        "calls/s vs rows/s",
    )
    sustained = get_path(r, "e2e", "sustained", "calls_per_second")
    per_call = get_path(r, "e2e", "events_per_call", "per_call")
    add(
        "end to end, sustained",
        sustained,
        "ingress accept alone, saturation",
        sat.get("ingress_per_second"),
        "calls/s",
    )
    add(
        "end to end, sustained: broker records/s",
        round(sustained * per_call) if sustained and per_call else None,
        "raw aiokafka produce (one producer, acks=all)",
        kafka.get("produce_per_second"),
        "records/s",
    )
    dl = delivery_figures(r)
    add(
        "delivery (one process)",
        dl.get("value"),
        f"raw aiohttp client ({dl.get('raw_source', 'n/a')})",
        dl.get("raw"),
        "deliveries/s vs requests/s",
    )
    proj = get_path(r, "projection", "events_per_second")
    add(
        "projection rebuild (`postback projection rebuild`)",
        get_path(r, "projection", "rebuild", "events_per_second"),
        "raw aiokafka consume",
        kafka.get("consume_per_second"),
        "events/s vs records/s",
    )
    add(
        "projection events applied",
        proj,
        "raw asyncpg batched insert (500 rows/transaction)",
        pg.get("batched_rows_per_second"),
        "events/s vs rows/s",
    )
    add(
        "projection events applied",
        proj,
        "raw aiokafka consume",
        kafka.get("consume_per_second"),
        "events/s vs records/s",
    )
    settled = r.get("settlement") or {}
    add(
        "settlement events consumed",
        settled.get("events_consumed_per_second"),
        "raw aiokafka consume",
        kafka.get("consume_per_second"),
        "events/s vs records/s",
    )
    add(
        "settlement calls settled",
        settled.get("calls_settled_per_second"),
        "raw asyncpg batched insert (500 rows/transaction)",
        pg.get("batched_rows_per_second"),
        "calls/s vs rows/s",
    )
    return rows


def peak_rss(r: dict[str, Any]) -> tuple[str | None, float | None]:
    """The largest RSS any service process reached in any window of the run."""
    worst: tuple[str | None, float | None] = (None, None)
    for usage in (r.get("resources") or {}).values():
        for label, u in usage.items():
            rss = u.get("peak_rss_mb")
            if label in SERVICES and rss is not None and (worst[1] is None or rss > worst[1]):
                worst = (label, rss)
    return worst


def p99_target_holds_up_to(r: dict[str, Any]) -> float | None:
    """The highest offered rate up to which every light-load step and the latency phase kept
    up with a p99 under the target; None when none did (or none ran)."""
    e2e = r.get("e2e") or {}
    phases = [*(e2e.get("light") or []), *([e2e["latency"]] if e2e.get("latency") else [])]
    held = None
    for x in sorted(phases, key=lambda x: x["offered_per_second"]):
        p99 = get_path(x, "latency_ms", "p99")
        if p99 is None or p99 >= TARGETS["e2e_p99_ms_at_200"] or not x.get("kept_up"):
            break
        held = x["offered_per_second"]
    return held


def _light_note(r: dict[str, Any]) -> str:
    if not get_path(r, "e2e", "light"):
        return ""  # no light-load steps in this mode
    held = p99_target_holds_up_to(r)
    if held is None:
        return f"; p99 >= {TARGETS['e2e_p99_ms_at_200']} ms at every rate measured"
    return f"; p99 < {TARGETS['e2e_p99_ms_at_200']} ms up to {held:g} calls/s"


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    sustained = get_path(r, "e2e", "sustained") or {}
    latency = get_path(r, "e2e", "latency") or {}
    rate = latency.get("offered_per_second")
    p99 = get_path(latency, "latency_ms", "p99")
    share = get_path(r, "ingress", "saturation", "ratio")
    dl = delivery_figures(r)
    dl_share = ratio(dl.get("value"), dl.get("raw"))
    who, rss = peak_rss(r)
    calls = sustained.get("calls_per_second")
    lost = sustained.get("lost")
    settled = get_path(r, "settlement", "calls_settled_per_second")
    applied = get_path(r, "projection", "events_per_second")
    rebuilt = get_path(r, "projection", "rebuild") or {}
    rebuilt_events, rebuilt_seconds = rebuilt.get("events"), rebuilt.get("seconds")

    def met(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "not met")

    return [
        {
            "target": "end to end >= 300 calls/s sustained, 0 lost",
            "measured": f"{calls} calls/s, lost {lost}, kept up: {sustained.get('kept_up')}",
            "status": met(
                None
                if calls is None
                else calls >= TARGETS["e2e_sustained_calls_per_second"]
                and lost == 0
                and bool(sustained.get("kept_up"))
            ),
        },
        {
            "target": "end to end p99 < 500 ms at 200 calls/s",
            "measured": f"p99 {p99} ms at {rate} calls/s{_light_note(r)}",
            "status": met(
                None if p99 is None or rate != 200 else p99 < TARGETS["e2e_p99_ms_at_200"]
            ),
        },
        {
            "target": "ingress accept >= 60 % of the bare endpoint",
            "measured": f"{share}",
            "status": met(None if share is None else share >= TARGETS["ingress_share_of_bare"]),
        },
        {
            "target": "delivery >= 80 % of the raw client",
            "measured": f"{dl_share}",
            "status": met(
                None if dl_share is None else dl_share >= TARGETS["delivery_share_of_raw_client"]
            ),
        },
        {
            "target": "settlement >= 2,000 calls/s (one process)",
            "measured": f"{settled} calls/s",
            "status": met(
                None if settled is None else settled >= TARGETS["settlement_calls_per_second"]
            ),
        },
        {
            "target": "projection >= 20,000 events/s applied (one process)",
            "measured": f"{applied} events/s",
            "status": met(
                None if applied is None else applied >= TARGETS["projection_events_per_second"]
            ),
        },
        {
            "target": "projection rebuild of 1,000,000 events < 60 s",
            "measured": f"{rebuilt_events} events in {rebuilt_seconds} s",
            "status": met(
                None
                if rebuilt_seconds is None or (rebuilt_events or 0) < TARGETS["rebuild_events"]
                else rebuilt_seconds < TARGETS["rebuild_seconds"]
            ),
        },
        {
            "target": "every service < 200 MB RSS under load",
            "measured": f"largest: {who} {rss} MB",
            "status": met(None if rss is None else rss < TARGETS["service_peak_rss_mb"]),
        },
    ]

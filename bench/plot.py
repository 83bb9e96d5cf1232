"""Latency percentiles against offered load, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.markdown import failed


def plot(r: dict[str, Any], path: Path) -> bool:
    """Latency percentiles against offered load: ingress beside the bare endpoint, and end to
    end. Returns False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ing = r.get("ingress") or {}
    e2e = r.get("e2e") or {}
    if failed(ing) and failed(e2e):
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"p50": ":", "p95": "--", "p99": "-"}
    if not failed(ing):
        for which, color in (("bare", "tab:gray"), ("ingress", "tab:blue")):
            fixed = [x for x in ing[which] if x["offered_per_second"]]
            sat = [x for x in ing[which] if not x["offered_per_second"]]
            for q, style in styles.items():
                xs = [x["offered_per_second"] for x in fixed]
                ys = [x[f"{q}_ms"] for x in fixed]
                left.plot(xs, ys, style, color=color, marker="o", label=f"{which} {q}")
                for s in sat:
                    left.plot(
                        s["accepted_per_second"], s[f"{q}_ms"], marker="*", ms=12, color=color
                    )
        left.set_title("Accept latency (POST answered); * = saturation at its achieved rate")
        left.set_xlabel("offered calls/s (k6, open loop), log scale")
        left.set_xscale("log")
        left.set_ylabel("latency, ms")
        left.set_yscale("log")
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=8)
    if not failed(e2e):
        # One point per offered rate (the latest phase at it), the sustained minute apart.
        phases = [*e2e.get("light", []), e2e["latency"], *e2e.get("ramp", [])]
        by_rate = {x["offered_per_second"]: x for x in phases}
        points = [by_rate[k] for k in sorted(by_rate)]
        su = e2e["sustained"]
        for q, style in styles.items():
            right.plot(
                [x["offered_per_second"] for x in points],
                [x["latency_ms"][q] for x in points],
                style,
                marker="o",
                color="tab:green",
                label=f"end to end {q} (10-15 s phases)",
            )
            if su.get("separate_phase"):
                right.plot(
                    su["offered_per_second"], su["latency_ms"][q], marker="*", ms=12, color="k"
                )
        if su.get("separate_phase"):
            right.plot([], [], "k*", ms=12, label="sustained minute (p50, p95, p99)")
        right.axhline(500, color="tab:red", lw=0.8, label="target p99 at 200/s")
        right.set_title("POST /v1/calls to webhook arrival")
        right.set_xlabel("offered calls/s")
        right.set_ylabel("latency, ms")
        right.set_yscale("log")
        right.grid(True, which="both", alpha=0.3)
        right.legend(fontsize=8)
    meta = r.get("meta", {})
    fig.suptitle(f"Postback {meta.get('mode')} benchmark, {meta.get('started')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

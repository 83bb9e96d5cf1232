"""Section 1: ingress accepting calls, beside a bare endpoint on the same HTTP server stack, at
the same offered rates and at saturation, in the same run."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp

from bench.e2e import CONSUMERS, OPERATOR
from bench.infra import BenchStack
from bench.loadgen import Load, run_k6, run_wrk, wrk_binary
from bench.pgwait import WaitSampler
from bench.procs import Helper
from bench.profile import record
from bench.stats import ratio
from postback.embedded import free_port

if TYPE_CHECKING:
    from bench.run import Run


async def measure(run: Run) -> dict[str, Any]:
    """Section 1: ingress accept beside the bare endpoint, at the same offered rates."""
    p = run.plan
    place = await run.infra.place("ingress")
    # Ingress alone: nothing downstream competes for the CPU, and the calls it accepts
    # stay on this phase's broker.
    stack = await run.start_stack(place, "ingress-stack", ("ingress",))
    port = free_port()
    bare = Helper("bench.bare", ["--port", str(port)], run.logs / "bare.log")
    try:
        await asyncio.to_thread(bare.wait_http, f"http://127.0.0.1:{port}/readyz")
        bare_url = f"http://127.0.0.1:{port}"
        keys = await consumer_keys(stack.url("ingress"), CONSUMERS)
        common: dict[str, Any] = {
            "keys": keys,
            "api": "bench-echo",
            "hook": f"{run.peers_url}/hook",
        }
        rows: dict[str, list[dict[str, Any]]] = {"bare": [], "ingress": []}
        steps: list[tuple[int | None, int]] = [(r, 64) for r in p.ingress_rates]
        steps.append((None, p.saturation_vus))
        for rate, vus in steps:
            # Interleaved, so anything that drifts during the run touches both alike.
            for which, url in (("bare", bare_url), ("ingress", stack.url("ingress"))):
                with run.sampler.window(f"{which} {rate or 'saturation'}") as w:
                    async with WaitSampler(place.database_url) as waits:
                        load = await _load(run, url, rate, vus, which, common)
                row = load.as_dict()
                if which == "ingress":
                    row["postgres_sessions"] = waits.result()
                usage = run.usage(w)
                label = "bare endpoint" if which == "bare" else "ingress"
                row["server_cpu_ms_per_request"] = _ms_per(usage, label, load)
                row["load_generator"] = GENERATOR if rate is None else "k6"
                row["load_generator_cpu_ms_per_request"] = _ms_per(
                    usage, f"{row['load_generator']} (load generator)", load
                )
                rows[which].append(row)
                run.say(
                    f"  {which:>7} offered {rate or 'max':>5}/s: "
                    f"{load.accepted_per_second:.0f}/s accepted, p99 {load.p99_ms} ms"
                )
        profile = await _profile(run, stack, common)
    finally:
        bare.stop()
        await asyncio.to_thread(stack.stop)
    sat_bare, sat_ingress = rows["bare"][-1], rows["ingress"][-1]
    return {
        "profile": profile,
        "bare": rows["bare"],
        "ingress": rows["ingress"],
        "saturation": {
            "bare_per_second": sat_bare["accepted_per_second"],
            "ingress_per_second": sat_ingress["accepted_per_second"],
            "ratio": ratio(sat_ingress["accepted_per_second"], sat_bare["accepted_per_second"]),
            "connections": p.saturation_vus,
            "load_generator": GENERATOR,
        },
    }


# Saturation is driven by wrk where it is installed (bench/loadgen.py says why).
GENERATOR = "wrk" if wrk_binary() else "k6"


async def _load(
    run: Run, url: str, rate: int | None, vus: int, which: str, common: dict[str, Any]
) -> Load:
    """k6 at a fixed rate; at saturation (`rate` None), GENERATOR flat out."""
    seconds = run.plan.ingress_seconds
    if rate is None and GENERATOR == "wrk":
        return await run_wrk(
            url, seconds=seconds, connections=vus, log=run.logs / f"wrk-{which}.log", **common
        )
    return await run_k6(
        [url], rate=rate, vus=vus, seconds=seconds, log=run.logs / f"k6-{which}.log", **common
    )


def _ms_per(usage: dict[str, Any], label: str, load: Load) -> float | None:
    cpu = usage.get(label, {}).get("cpu_seconds")
    return round(1000 * cpu / load.accepted, 3) if cpu and load.accepted else None


async def _profile(run: Run, stack: BenchStack, common: dict[str, Any]) -> dict[str, Any]:
    """Ingress at saturation once more, under py-spy (apart from the measured runs, which
    py-spy's sampling would slow down)."""
    p = run.plan
    if not p.profile_seconds:
        return {"skipped": "not in this mode"}
    pid = stack.pids()["ingress"]
    seconds = max(1.0, p.ingress_seconds - 1)

    async def sample() -> dict[str, Any]:
        await asyncio.sleep(0.5)  # the load generator starting up
        out = run.out / f"{run.stamp}-ingress-alone-profile.txt"
        return await record(pid, seconds, out)

    _, prof = await asyncio.gather(
        _load(run, stack.url("ingress"), None, p.saturation_vus, "ingress-profile", common),
        sample(),
    )
    return {"service": "ingress", "load": "saturation, ingress alone", **prof}


async def consumer_keys(ingress: str, n: int) -> list[str]:
    keys = []
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            async with http.post(
                f"{ingress}/v1/accounts",
                headers=OPERATOR,
                json={"name": f"bench {i}", "roles": ["consumer"]},
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"creating an account answered {r.status}")
                keys.append((await r.json())["secret"])
    return keys

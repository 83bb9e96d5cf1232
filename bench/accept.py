"""Section 1: ingress accepting calls, beside a bare endpoint on the same HTTP server stack, at
the same offered rates and at saturation, in the same run."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp

from bench.e2e import CONSUMERS, OPERATOR
from bench.infra import BenchStack, listen_port
from bench.loadgen import run_k6
from bench.pgwait import WaitSampler
from bench.procs import Helper
from bench.profile import record
from bench.stats import ratio

if TYPE_CHECKING:
    from bench.run import Run


async def measure(run: Run) -> dict[str, Any]:
    """Section 1: ingress accept beside the bare endpoint, at the same offered rates."""
    p = run.plan
    place = await run.infra.place("ingress")
    # Ingress alone: nothing downstream competes for the CPU, and the calls it accepts
    # stay on this phase's broker.
    stack = await run.start_stack(place, "ingress-stack", ("ingress",))
    port = listen_port()
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
                        load = await run_k6(
                            [url],
                            rate=rate,
                            vus=vus,
                            seconds=p.ingress_seconds,
                            log=run.logs / f"k6-{which}.log",
                            **common,
                        )
                row = load.as_dict()
                if which == "ingress":
                    row["postgres_sessions"] = waits.result()
                label = "bare endpoint" if which == "bare" else "ingress"
                cpu = run.usage(w).get(label, {}).get("cpu_seconds")
                row["server_cpu_ms_per_request"] = (
                    round(1000 * cpu / load.accepted, 3) if cpu and load.accepted else None
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
            "vus": p.saturation_vus,
        },
    }


async def _profile(run: Run, stack: BenchStack, common: dict[str, Any]) -> dict[str, Any]:
    """Ingress at saturation once more, under py-spy (apart from the measured runs, which
    py-spy's sampling would slow down)."""
    p = run.plan
    if not p.profile_seconds:
        return {"skipped": "not in this mode"}
    pid = stack.pids()["ingress"]
    seconds = max(1.0, p.ingress_seconds - 1)

    async def sample() -> dict[str, Any]:
        await asyncio.sleep(0.5)  # k6 starting up
        out = run.out / f"{run.stamp}-ingress-alone-profile.txt"
        return await record(pid, seconds, out)

    _, prof = await asyncio.gather(
        run_k6(
            [stack.url("ingress")],
            vus=p.saturation_vus,
            seconds=p.ingress_seconds,
            log=run.logs / "k6-ingress-profile.log",
            **common,
        ),
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

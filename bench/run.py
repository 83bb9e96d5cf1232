"""The benchmark run: every section in turn, each on a fresh broker and database, with the
processes' CPU and memory sampled throughout. A section that fails is recorded as failed and the
run goes on, so one broken part does not hide the figures of the others."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench import accept, baselines, components, loadgen
from bench.e2e import EndToEnd, setup_tenancy, slowest_hop_service
from bench.infra import BenchStack, Infra, Place, topic_partitions
from bench.machine import (
    classify,
    git_commit,
    load_generators,
    machine_busy_seconds,
    uncommitted_files,
)
from bench.pgwait import WaitSampler
from bench.plan import Plan
from bench.procs import Helper
from bench.profile import record
from bench.resources import Sampler, Window
from postback.embedded import free_port
from postback_libs.settings import SERVICES

GROWTH_WARMUP = 4


def _round5(x: float) -> int:
    return 5 * max(1, round(x / 5))


class Run:
    def __init__(self, plan: Plan, infra: Infra, out: Path, stamp: str) -> None:
        self.plan, self.infra, self.out, self.stamp = plan, infra, out, stamp
        self.logs = infra.root / "logs"
        self.sampler = Sampler(classify=classify)
        self.notes: list[str] = []
        self.report: dict[str, Any] = {}
        self.peers: Helper | None = None
        self.peers_url = ""
        self.busiest: str | None = None
        self.growth: list[dict[str, Any]] = []

    # --- scaffolding -------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    async def section(self, key: str, title: str, body: Callable[[], Awaitable[Any]]) -> None:
        self.say(title)
        started = time.monotonic()
        try:
            self.report[key] = await body()
        except Exception as e:
            self.report[key] = {"error": f"{e.__class__.__name__}: {e}"}
            self.note(f"{title} failed: {e.__class__.__name__}: {e}")
            traceback.print_exc()
        if isinstance(self.report.get(key), dict):
            self.report[key]["section_seconds"] = round(time.monotonic() - started, 1)

    def usage(self, w: Window) -> dict[str, Any]:
        return self.sampler.usage(w)

    async def start_stack(
        self, place: Place, name: str, services: tuple[str, ...] = SERVICES
    ) -> BenchStack:
        stack = BenchStack(place, self.logs / name)
        try:
            took = await asyncio.to_thread(stack.start, services)
        except BaseException:
            await asyncio.to_thread(stack.stop)
            raise
        self.say(f"  {name}: {', '.join(services)} ready in {took:.1f} s")
        return stack

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        begun = datetime.now(UTC)
        load_before = os.getloadavg()
        busy_before = machine_busy_seconds()
        self.out.mkdir(parents=True, exist_ok=True)
        self.sampler.start()
        self.sampler.track("harness", os.getpid())
        loadgen.ON_START.append(lambda _pid: self.sampler.discover())
        port = free_port()
        self.peers = Helper("bench.peers", ["--port", str(port)], self.logs / "peers.log")
        try:
            self.peers.first_line()
            self.peers_url = f"http://127.0.0.1:{port}"
            await self.section(
                "baselines", "6. baselines: raw broker, database, HTTP client", self.baselines
            )
            await self.section(
                "ingress", "1. ingress accept beside the bare endpoint", self.ingress
            )
            await self.section("e2e", "2. end to end", self.end_to_end)
            await self.section(
                "growth", "8. growth with instances of the busiest service", self.growth_section
            )
            await self.section("delivery", "3. delivery", self.delivery)
            await self.section("settlement", "5. settlement", self.settlement)
            await self.section("projection", "4. projection", self.projection)
        finally:
            self.peers.stop()
            self.sampler.stop()
        busy_after = machine_busy_seconds()
        busy = busy_after[0] - busy_before[0]
        interrupts = busy_after[1] - busy_before[1]
        tracked = self.sampler.tracked_cpu_seconds()
        self.report["resources"] = self.resources()
        self.report["ratios"] = self.ratios()
        self.report["meta"] = {
            "mode": self.plan.mode,
            "started": begun.isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 1),
            "commit": git_commit(),
            "uncommitted_files": uncommitted_files(),
            "machine": {
                "cpus": os.cpu_count(),
                "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            # Other work on the machine competes for the same 2 cores: this says how much.
            "load_average_before": [round(x, 2) for x in load_before],
            "machine_busy_cpu_seconds": round(busy, 1),
            "run_cpu_seconds": round(tracked, 1),
            "interrupt_cpu_seconds": round(interrupts, 1),
            "other_cpu_seconds": round(max(0.0, busy - tracked - interrupts), 1),
            "load_generator": load_generators(),
            "embedded": self.infra.embedded,
            "plan": dataclasses.asdict(self.plan),
        }
        self.report["notes"] = self.notes
        return self.report

    # --- 6. baselines ------------------------------------------------------------------------

    async def baselines(self) -> dict[str, Any]:
        p = self.plan
        place = await self.infra.place("baselines")
        settings = place.settings()
        kafka = await baselines.kafka(settings, p.kafka_messages)
        hop = await baselines.kafka_hop(settings, p.hop_messages)
        pg = await baselines.postgres(place.database_url, p.pg_commit_rows, p.pg_batch_rows)
        http = await baselines.http_client(f"{self.peers_url}/sink", p.http_requests)
        return {"kafka": kafka, "kafka_hop": hop, "postgres": pg, "http_client": http}

    # --- 1. ingress --------------------------------------------------------------------------

    async def ingress(self) -> dict[str, Any]:
        return await accept.measure(self)

    # --- 2. end to end -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _e2e(self, name: str, extra: dict[str, int] | None = None) -> Any:
        """A fresh full stack with its tenancy, warmed up."""
        place = await self.infra.place(name)
        stack = await self.start_stack(place, f"{name}-stack")
        try:
            for service, n in (extra or {}).items():
                for i in range(2, n + 1):
                    stack.spawn_extra(service, i)
            if extra:
                await asyncio.to_thread(stack.wait_ready)
            db = await asyncpg.connect(
                place.database_url, server_settings={"application_name": "bench"}
            )
            try:
                connector = aiohttp.TCPConnector(limit=32)
                async with aiohttp.ClientSession(connector=connector) as http:
                    tenancy = await setup_tenancy(
                        http, stack.url("ingress"), f"{self.peers_url}/owner"
                    )
                    e = EndToEnd(stack, tenancy, self.peers_url, http, db, self.logs)
                    e.drain_timeout = self.plan.drain_timeout
                    await e.warm_up(self.plan.warmup_calls)
                    yield e
            finally:
                await db.close()
        finally:
            await asyncio.to_thread(stack.stop)

    def _growth_point(self, n: int, cap: dict[str, Any], w: Window) -> dict[str, Any]:
        use = self.usage(w)
        delivered = cap["delivered"] or 0
        services = {k: v for k, v in use.items() if k in SERVICES}
        per_call = {
            k: round(1000 * v["cpu_seconds"] / delivered, 3) if delivered else None
            for k, v in services.items()
        }
        total = sum(v["cpu_seconds"] for v in services.values())
        return {
            "instances": n,
            "service": self.busiest,
            **cap,
            "cpu_ms_per_call": per_call,
            "services_cpu_ms_per_call": round(1000 * total / delivered, 3) if delivered else None,
            "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in services.items()},
        }

    async def _step(
        self, e: EndToEnd, name: str, rate: float, seconds: float
    ) -> tuple[dict[str, Any], Window]:
        """One end-to-end phase with its resources and its database sessions sampled."""
        with self.sampler.window(f"e2e {name}") as w:
            async with WaitSampler(e.stack.place.database_url) as waits:
                result = await e.phase(name, rate=rate, seconds=seconds)
        result["resources"] = self.usage(w)
        result["cpu_first_and_last_fifth"] = self._drift(*e.load_window)
        result["postgres_sessions"] = waits.result()
        self._say_phase(f"{name} at {rate:g}/s", result)
        return result, w

    def _drift(self, began: float, ended: float) -> dict[str, dict[str, float | None]]:
        """Each process's share of one core in the first and in the last fifth of a phase's
        load. The offered rate is the same throughout, so what grows is work that grows with
        what the stack holds, such as the embedded broker's: it reads through every batch a
        partition holds on each fetch that finds news."""
        fifth = (ended - began) / 5
        first = self.usage(Window("first fifth", began, began + fifth))
        last = self.usage(Window("last fifth", ended - fifth, ended))
        return {
            label: {
                "first": u["cpu_percent_of_one_core"],
                "last": (last.get(label) or {}).get("cpu_percent_of_one_core"),
            }
            for label, u in first.items()
        }

    async def end_to_end(self) -> dict[str, Any]:
        p = self.plan
        out: dict[str, Any] = {}
        # The latency phase, the search for a rate that keeps up and the sustained minute each
        # run on a fresh stack: the embedded broker's CPU per record grows with its in-memory
        # log, so a phase run on the stack of another would pay for that one's records.
        with self.sampler.window("e2e whole stack") as whole:
            async with self._e2e("e2e") as e:
                with self.sampler.window("e2e capacity") as w_cap:
                    cap = await e.capacity(rate=p.capacity_rate, seconds=p.capacity_seconds)
                out["capacity"] = cap
                self.say(f"  capacity (backlog worked off): {cap['delivered_per_second']} calls/s")
                seconds = p.latency_seconds
                if (cap.get("delivered_per_second") or 0) < 0.9 * p.latency_rate:
                    seconds = min(seconds, p.overload_seconds)
                    self.note(
                        f"capacity {cap.get('delivered_per_second')} calls/s is below the "
                        f"latency phase's {p.latency_rate}/s: that phase ran {seconds:g} s, "
                        f"not {p.latency_seconds:g} s"
                    )
                lat, _ = await self._step(e, "latency", p.latency_rate, seconds)
                out["latency"] = lat
            out["light"] = await self._light_load()
            best = lat if lat["kept_up"] else None
            ramp: list[dict[str, Any]] = []
            if best is None or p.ramp_rates:
                async with self._e2e("e2e-search") as e:
                    best = await self._search(e, cap, best, ramp)
            out["ramp"] = ramp
            # At the best rate that kept up; else at the lowest tried, which still says what the
            # pipeline delivers over a minute.
            tried = [lat, *ramp]
            rate = (best or min(tried, key=lambda x: x["offered_per_second"]))["offered_per_second"]
            lower = [x for x in tried if x["kept_up"] and x["offered_per_second"] < rate]
            for first_try in (True, False):
                async with self._e2e("e2e-sustained") as e:
                    measured: dict[str, Any] | None = None
                    if p.sustained_seconds:
                        measured, _ = await self._step(e, "sustained", rate, p.sustained_seconds)
                        if first_try and not measured["kept_up"]:
                            # A minute is longer than a step: fall back once, on a fresh stack,
                            # to the next rate below that kept up (or to three quarters of this
                            # one), and keep the failed minute in the table.
                            ramp.append({**measured, "name": f"sustained at {rate:g}/s, first try"})
                            rate = (
                                max(x["offered_per_second"] for x in lower)
                                if lower
                                else max(5, _round5(0.75 * rate))
                            )
                            continue
                    out["sustained"] = self._sustained_figure(measured, best, tried)
                    await self._study_sustained_stack(e, out, cap, w_cap)
                    break
        out["resources"] = self.usage(whole)  # once the window has closed: it has an end
        return out

    async def _light_load(self) -> list[dict[str, Any]]:
        """Steps below the latency phase's rate, lowest first, on a stack of their own: where
        the latency target still holds, and what a call costs when the cores are not full."""
        steps: list[dict[str, Any]] = []
        if self.plan.light_rates:
            async with self._e2e("e2e-light") as e:
                for rate in self.plan.light_rates:
                    step, _ = await self._step(e, f"light {rate}", rate, self.plan.ramp_seconds)
                    steps.append(step)
        return steps

    def _sustained_figure(
        self,
        measured: dict[str, Any] | None,
        best: dict[str, Any] | None,
        tried: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The sustained figure: the minute measured, else (a mode without one) the best phase
        that kept up, else the best delivered rate."""
        if measured is not None:
            figure, note = measured, None
            if not measured["kept_up"]:
                note = "it did not keep up at this rate: the figure is what it delivered"
        elif best is not None:
            figure = best
            note = f"{self.plan.mode} mode: the best phase above that kept up stands as sustained"
        else:
            figure = max(tried, key=lambda x: x.get("delivered_per_second") or 0)
            note = "no rate was kept up: the figure is the best delivered rate above"
        return {
            **figure,
            "calls_per_second": figure["delivered_per_second"],
            "separate_phase": measured is not None,
            **({"note": note} if note else {}),
        }

    async def _study_sustained_stack(
        self, e: EndToEnd, out: dict[str, Any], cap: dict[str, Any], w_cap: Window
    ) -> None:
        """On the sustained phase's stack: its busiest service and slowest hop, their profiles,
        the broker records per call, and the first point of the growth section."""
        sustained = out["sustained"]
        self.busiest = self._busiest(sustained["resources"])
        out["busiest_service"] = self.busiest
        out["slowest_hop_service"] = slowest_hop_service(sustained.get("hops") or {})
        out["profiles"] = await self._profile(
            e, sustained["offered_per_second"], out["slowest_hop_service"]
        )
        out["events_per_call"] = await self._events_per_call(e)
        self.growth.append(self._growth_point(1, cap, w_cap))
        if not self.plan.growth_fresh_stack:
            for n in self.plan.growth_instances[1:]:
                await self._grow_in_place(e, n)

    async def _search(
        self,
        e: EndToEnd,
        cap: dict[str, Any],
        best: dict[str, Any] | None,
        ramp: list[dict[str, Any]],
    ) -> dict[str, Any] | None:
        """The highest rate the pipeline keeps up with, in steps appended to `ramp`: up the
        ramp from a latency phase that kept up, else from below the measured capacity."""
        p = self.plan
        # Above a rate that did not keep up, higher ones will not either.
        for rate in p.ramp_rates if best is not None else ():
            step, _ = await self._step(e, f"ramp {rate}", rate, p.ramp_seconds)
            ramp.append(step)
            if not step["kept_up"]:
                return best
            best = step
        if best is not None:
            return best
        # Nothing kept up: find a rate below the measured capacity that does (then at half
        # that), and climb from it while it keeps up.
        rate = max(5, _round5(0.8 * (cap.get("delivered_per_second") or 10)))
        for _ in range(2):
            step, _ = await self._step(e, f"below capacity {rate}", rate, p.ramp_seconds)
            ramp.append(step)
            if step["kept_up"]:
                best = step
                break
            rate = max(5, _round5(rate / 2))
        for _ in range(p.climb_steps if best is not None else 0):
            rate = _round5(1.3 * rate)
            step, _ = await self._step(e, f"climb {rate}", rate, p.ramp_seconds)
            ramp.append(step)
            if not step["kept_up"]:
                break
            best = step
        return best

    def _say_phase(self, what: str, r: dict[str, Any]) -> None:
        self.say(
            f"  {what}: delivered {r['delivered']}/{r['accepted']} "
            f"({r['delivered_per_second']}/s), lost {r['lost']}, "
            f"dup {r['duplicated']}, p50/p99 {r['latency_ms']['p50']}/{r['latency_ms']['p99']} ms,"
            f" kept up: {r['kept_up']}"
        )

    @staticmethod
    def _busiest(use: dict[str, Any]) -> str:
        services = {k: v["cpu_seconds"] for k, v in use.items() if k in SERVICES}
        return max(services, key=lambda k: services[k]) if services else "ingress"

    async def _profile(
        self, e: EndToEnd, rate: float, slowest: str | None
    ) -> dict[str, dict[str, Any]]:
        """py-spy on the busiest service and on the service of the slowest hop (if another),
        at once, under the sustained load."""
        p = self.plan
        assert self.busiest is not None
        services = list(dict.fromkeys(s for s in (self.busiest, slowest) if s))
        if not p.profile_seconds:
            return {"busiest": {"skipped": "not in this mode"}}
        pids = e.stack.pids()

        async def sample(service: str) -> dict[str, Any]:
            if service not in pids:
                return {"skipped": f"{service} is not running"}
            await asyncio.sleep(1)  # k6 starting up
            out = self.out / f"{self.stamp}-{service}-profile.txt"
            return await record(pids[service], p.profile_seconds, out)

        load, *profiles = await asyncio.gather(
            e.phase("profile", rate=rate, seconds=p.profile_seconds + 2),
            *(sample(s) for s in services),
        )
        out: dict[str, dict[str, Any]] = {}
        for role, service, prof in zip(
            ("busiest", "slowest hop"), services, profiles, strict=False
        ):
            out[role] = {
                "service": service,
                "load": f"end to end at {rate:g} calls/s offered",
                "offered_per_second": rate,
                "seconds": p.profile_seconds,
                "lost_during_profile": load["lost"],
                **prof,
            }
        return out

    async def _events_per_call(self, e: EndToEnd) -> dict[str, Any]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        place = e.stack.place
        consumer = AIOKafkaConsumer(bootstrap_servers=place.kafka_bootstrap, group_id=None)
        await consumer.start()
        try:
            topics = [t for t in await consumer.topics() if t.startswith(place.topic_prefix)]
            parts = [
                TopicPartition(t, n) for t in topics for n in consumer.partitions_for_topic(t) or ()
            ]
            ends = await consumer.end_offsets(parts)
            begins = await consumer.beginning_offsets(parts)
        finally:
            await consumer.stop()
        per_topic: dict[str, int] = {}
        for tp in parts:
            name = tp.topic.removeprefix(place.topic_prefix)
            per_topic[name] = per_topic.get(name, 0) + ends[tp] - begins[tp]
        calls = len(await e.accepted_ids())
        total = sum(per_topic.values())
        return {
            "calls": calls,
            "records": per_topic,
            "per_call": round(total / calls, 2) if calls else None,
        }

    async def _grow_in_place(self, e: EndToEnd, n: int) -> None:
        """Quick mode: more instances join the running stack (no fresh broker)."""
        assert self.busiest is not None
        have = len(e.stack.instances(self.busiest))
        for i in range(have + 1, n + 1):
            e.stack.spawn_extra(self.busiest, i)
        await asyncio.to_thread(e.stack.wait_ready)
        await e.warm_up(GROWTH_WARMUP)
        with self.sampler.window(f"growth {n}") as w:
            cap = await e.capacity(rate=self.plan.capacity_rate, seconds=self.plan.capacity_seconds)
        point = self._growth_point(n, cap, w)
        point["note"] = "joined the running stack (quick mode), not a fresh one"
        self.growth.append(point)
        self.say(f"  {n} x {self.busiest}: {cap['delivered_per_second']} calls/s")

    # --- 8. growth ---------------------------------------------------------------------------

    async def growth_section(self) -> dict[str, Any]:
        p = self.plan
        if self.busiest is None:
            raise RuntimeError("no busiest service: the end-to-end section did not finish")
        if p.growth_fresh_stack:
            for n in p.growth_instances[1:]:
                async with self._e2e(f"growth{n}", {self.busiest: n}) as e:
                    with self.sampler.window(f"growth {n}") as w:
                        cap = await e.capacity(rate=p.capacity_rate, seconds=p.capacity_seconds)
                    self.growth.append(self._growth_point(n, cap, w))
                    self.say(f"  {n} x {self.busiest}: {cap['delivered_per_second']} calls/s")
        return {
            "service": self.busiest,
            "topic_partitions": topic_partitions(embedded=self.infra.embedded),
            "points": self.growth,
            "measure": "capacity: calls/s delivered while working off a backlog offered at "
            f"{p.capacity_rate}/s for {p.capacity_seconds:g} s",
        }

    # --- 3, 4, 5 -----------------------------------------------------------------------------

    async def _component_place(self, name: str) -> Place:
        return await self.infra.place(name)

    async def delivery(self) -> dict[str, Any]:
        place = await self._component_place("delivery")
        return await components.delivery(place, self.plan.delivery_messages, self.note)

    async def settlement(self) -> dict[str, Any]:
        place = await self._component_place("settlement")
        return await components.settlement(place, self.plan.settlement_calls, self.note)

    async def projection(self) -> dict[str, Any]:
        place = await self._component_place("projection")
        stack = BenchStack(place, self.logs / "projection-stack")
        try:
            return await components.projection(stack, self.plan.projection_calls)
        finally:
            await asyncio.to_thread(stack.stop)

    # --- 7. resources and the ratios ---------------------------------------------------------

    def resources(self) -> dict[str, Any]:
        return {w.name: self.usage(w) for w in self.sampler.windows}

    def ratios(self) -> list[dict[str, Any]]:
        from bench.figures import ratios

        return ratios(self.report)

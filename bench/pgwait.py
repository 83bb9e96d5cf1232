"""What the services' PostgreSQL sessions are doing under load, sampled from pg_stat_activity ten
times a second: on CPU, waiting (and on what: a lock, the WAL flush, I/O), or idle inside a
transaction (the service is working between statements). When the services' CPU is not
saturated and throughput still stops growing, this says where the time goes."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import asyncpg

INTERVAL = 0.1


class WaitSampler:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.samples = 0
        # (service, state) -> sessions seen in that state, summed over samples
        self.seen: Counter[tuple[str, str]] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None

    async def __aenter__(self) -> WaitSampler:
        self._conn = await asyncpg.connect(self.dsn, server_settings={"application_name": "bench"})
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            rows = await self._conn.fetch(
                "SELECT application_name, state, wait_event_type, wait_event FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            )
            self.samples += 1
            for r in rows:
                # Pools name their sessions after the service's schema; the outbox relays
                # connect without a name.
                who = r["application_name"] or "outbox relays"
                if r["state"] == "idle" or who == "bench":
                    continue
                if r["state"] == "active":
                    what = (
                        f"waiting: {r['wait_event_type']}:{r['wait_event']}"
                        if r["wait_event_type"]
                        else "on CPU"
                    )
                else:
                    what = str(r["state"])  # idle in transaction: the service's turn
                self.seen[(who, what)] += 1
            await asyncio.sleep(INTERVAL)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._conn.close()

    def result(self, top: int = 6) -> dict[str, Any]:
        """Per service: busy sessions on average, and the states they were in (shares)."""
        if not self.samples:
            return {}
        out: dict[str, Any] = {"samples": self.samples, "services": {}}
        by_service: dict[str, Counter[str]] = {}
        for (who, what), n in self.seen.items():
            by_service.setdefault(who, Counter())[what] += n
        for who, states in sorted(by_service.items(), key=lambda kv: -sum(kv[1].values())):
            busy = sum(states.values())
            out["services"][who] = {
                "busy_sessions_avg": round(busy / self.samples, 2),
                "states": {what: round(n / busy, 3) for what, n in states.most_common(top)},
            }
        return out

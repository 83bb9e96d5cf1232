"""What services keep is forgotten past its retention, by each service's hourly purge: finished
webhook messages (their bodies hold results) and finished dispatches (they hold each call's
parameters), while what is still in progress stays."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from postback_delivery.app import build as delivery
from postback_owner_adapter.app import build as owner_adapter
from tests.helpers import fetch, running, uid

OLD = timedelta(days=31)  # past the default result retention of 30 days


async def _purge(service) -> None:
    for purge in service.purges:
        await purge()


async def test_delivery_forgets_finished_messages_past_retention(settings):
    async with running(settings, delivery) as [svc]:
        rows = [
            (uid("dlv"), status, OLD if old else timedelta(0))
            for status, old in [
                ("succeeded", True),
                ("exhausted", True),
                ("succeeded", False),
                ("pending", True),  # still being retried: kept, however old
            ]
        ]
        for delivery_id, status, age in rows:
            await svc.pool.execute(
                "INSERT INTO deliveries (delivery_id, message_id, account_id, event_type, body,"
                " url, status, updated_at) VALUES ($1, $2, 'acc', 'call.completed', '{}',"
                " 'https://x.example/', $3, now() - $4::interval)",
                delivery_id,
                uid("msg"),
                status,
                age,
            )
        await _purge(svc)
        kept = {r["delivery_id"] for r in await fetch(svc, "SELECT delivery_id FROM deliveries")}
        assert kept == {rows[2][0], rows[3][0]}


async def test_owner_adapter_forgets_finished_dispatches_past_retention(settings):
    async with running(settings, owner_adapter) as [svc]:
        rows = [
            (uid("req"), status, OLD if old else timedelta(0))
            for status, old in [
                ("completed", True),
                ("timed_out", True),
                ("completed", False),
                ("accepted", True),  # waiting for the owner's callback: kept
            ]
        ]
        for request_id, status, age in rows:
            await svc.pool.execute(
                "INSERT INTO dispatches (request_id, api_id, upstream_url, method, path, params,"
                " entry, max_result_bytes, deadline, status, updated_at) VALUES ($1, 'api',"
                " 'https://o.example/', 'POST', '/', $2, 'v1', 1000, $3, $4, now() - $5::interval)",
                request_id,
                json.dumps({"secret_param": "x"}),
                datetime.now(UTC) + timedelta(hours=1),
                status,
                age,
            )
        await _purge(svc)
        kept = {r["request_id"] for r in await fetch(svc, "SELECT request_id FROM dispatches")}
        assert kept == {rows[2][0], rows[3][0]}

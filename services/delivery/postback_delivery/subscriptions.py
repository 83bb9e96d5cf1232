"""Subscriptions: delivery's view of every account's webhook endpoints, built from the
compacted `postback.webhooks` topic, and which destinations a message goes to."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from postback_libs.events import DeliveryScheduled, EndpointState
from postback_libs.ids import derived_id
from postback_libs.outbox import UnitOfWork
from postback_libs.telemetry import current_traceparent
from postback_libs.webhooks import subscribed


@dataclass(frozen=True)
class Destination:
    url: str
    endpoint_id: str | None = None  # None: a call's own webhook_url


@dataclass(frozen=True)
class Message:
    """One message (one `webhook-id`, one body), sent to one or more destinations."""

    message_id: str
    account_id: str
    event_type: str
    body: bytes
    request_id: str | None = None


def delivery_id(message_id: str, destination: Destination) -> str:
    # Derived, so a handler that runs again finds the delivery it made the first time.
    return f"dlv_{derived_id(message_id, destination.endpoint_id or destination.url).hex}"


# --- applying endpoint states ------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    revision: int
    enabled: bool
    deleted: bool
    disabled_at: Any
    disable_acked_revision: int | None


@dataclass(frozen=True)
class Change:
    """What an incoming endpoint state does to delivery's view of it."""

    write: bool
    ack_disable: bool = False  # ingress has recorded delivery's disable
    clear_disable: bool = False  # the account enabled the endpoint again after that
    reset_health: bool = False
    fail_open: str | None = None  # why the endpoint's queued messages stop


def apply_state(stored: Stored | None, state: EndpointState, deleted: bool) -> Change:
    """Pure: the newest revision wins; an older one (a replay) changes nothing."""
    if stored is not None and state.revision < stored.revision:
        return Change(write=False)
    if deleted:
        return Change(write=True, fail_open="endpoint deleted")
    locally_disabled = stored is not None and stored.disabled_at is not None
    if not state.enabled:
        return Change(
            write=True,
            ack_disable=locally_disabled and state.disabled_reason is not None,
            fail_open="endpoint disabled",
        )
    # Enabled. A state written before ingress saw delivery's disable does not undo it; one
    # written after (a revision above the acknowledged one) is the account re-enabling it.
    if locally_disabled:
        acked = stored.disable_acked_revision if stored is not None else None
        if acked is not None and state.revision > acked:
            return Change(write=True, clear_disable=True, reset_health=True)
        return Change(write=True)
    was_off = stored is not None and (not stored.enabled or stored.deleted)
    return Change(write=True, reset_health=was_off)


UPSERT = """
INSERT INTO endpoints (endpoint_id, account_id, revision, state, event_types, enabled, deleted,
                       fifo, rate_limit, max_in_flight)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (endpoint_id) DO UPDATE SET
    account_id = EXCLUDED.account_id, revision = EXCLUDED.revision, state = EXCLUDED.state,
    event_types = EXCLUDED.event_types, enabled = EXCLUDED.enabled, deleted = EXCLUDED.deleted,
    fifo = EXCLUDED.fifo, rate_limit = EXCLUDED.rate_limit,
    max_in_flight = EXCLUDED.max_in_flight, updated_at = now()
"""
RESET_HEALTH = """
UPDATE endpoints SET blocked_until = NULL, blocked_for = NULL, circuit = 'closed',
    opened_count = 0, consecutive_failures = 0, failing_since = NULL
WHERE endpoint_id = $1
"""


async def record_state(conn: Any, state: EndpointState, deleted: bool) -> Change:
    """Apply one endpoint state to the view (in the consumer's transaction)."""
    row = await conn.fetchrow(
        "SELECT revision, enabled, deleted, disabled_at, disable_acked_revision"
        " FROM endpoints WHERE endpoint_id = $1 FOR UPDATE",
        state.endpoint_id,
    )
    change = apply_state(Stored(**dict(row)) if row else None, state, deleted)
    if not change.write:
        return change
    await conn.execute(
        UPSERT,
        state.endpoint_id,
        state.account_id,
        state.revision,
        state.model_dump_json(),
        state.event_types,
        state.enabled,
        deleted,
        state.fifo,
        float(state.rate_limit_per_second) if state.rate_limit_per_second else None,
        state.max_in_flight,
    )
    if change.ack_disable:
        await conn.execute(
            "UPDATE endpoints SET disable_acked_revision = $2 WHERE endpoint_id = $1",
            state.endpoint_id,
            state.revision,
        )
    if change.clear_disable:
        await conn.execute(
            "UPDATE endpoints SET disabled_at = NULL, disabled_reason = NULL,"
            " disable_acked_revision = NULL WHERE endpoint_id = $1",
            state.endpoint_id,
        )
    if change.reset_health:
        await conn.execute(RESET_HEALTH, state.endpoint_id)
    return change


# --- fan-out -----------------------------------------------------------------------------------


ENABLED_OF_ACCOUNT = """
SELECT endpoint_id, state->>'url' AS url, event_types FROM endpoints
WHERE account_id = $1 AND enabled AND NOT deleted AND disabled_at IS NULL
"""
# The same as a JSON array, for queries that fetch them along with something else.
ENABLED_AS_JSON = """
(SELECT coalesce(json_agg(json_build_object('endpoint_id', e.endpoint_id,
    'url', e.state->>'url', 'event_types', e.event_types)), '[]')
 FROM endpoints e WHERE e.account_id = {account}
    AND e.enabled AND NOT e.deleted AND e.disabled_at IS NULL)
"""


def pick(endpoints: list[Any], event_type: str, exclude: str | None = None) -> list[Destination]:
    """The endpoints (rows or dicts of endpoint_id, url, event_types) subscribed to
    `event_type`."""
    return [
        Destination(e["url"], e["endpoint_id"])
        for e in endpoints
        if e["endpoint_id"] != exclude and subscribed(e["event_types"], event_type)
    ]


async def destinations(
    conn: Any, account_id: str, event_type: str, exclude: str | None = None
) -> list[Destination]:
    """The account's enabled endpoints subscribed to `event_type`."""
    return pick(await conn.fetch(ENABLED_OF_ACCOUNT, account_id), event_type, exclude)


ENQUEUE = """
INSERT INTO deliveries (delivery_id, message_id, request_id, account_id, endpoint_id, url,
                        event_type, body, traceparent, status, next_attempt_at)
SELECT u.id, $2, $3, $4, u.endpoint_id, u.url, $5, $6, $9, 'pending', now()
FROM unnest($1::text[], $7::text[], $8::text[]) AS u(id, endpoint_id, url)
ON CONFLICT DO NOTHING
RETURNING delivery_id, endpoint_id, url
"""


async def enqueue(
    uow: UnitOfWork, message: Message, to: list[Destination], cause: str | None = None
) -> int:
    """Queue `message` for each destination (once each, however often this runs) and announce
    every delivery made. The caller wakes the dispatcher once the transaction has committed."""
    if not to:
        return 0
    rows = await uow.conn.fetch(
        ENQUEUE,
        [delivery_id(message.message_id, d) for d in to],
        message.message_id,
        message.request_id,
        message.account_id,
        message.event_type,
        message.body,
        [d.endpoint_id for d in to],
        [d.url for d in to],
        current_traceparent(),
    )
    for r in rows:
        scheduled = DeliveryScheduled(
            delivery_id=r["delivery_id"],
            message_id=message.message_id,
            request_id=message.request_id,
            endpoint_id=r["endpoint_id"],
            account_id=message.account_id,
            message_type=message.event_type,
            url=r["url"],
        )
        uow.emit(scheduled, cause=str(derived_id(cause, r["delivery_id"])) if cause else None)
    return len(rows)


def state_of(raw: str | dict[str, Any]) -> EndpointState:
    return EndpointState.model_validate(json.loads(raw) if isinstance(raw, str) else raw)

"""How each call event changes the call's row in the read model, free of I/O."""

from __future__ import annotations

from typing import Any

# Each event type's place in a call's life. The row's status only moves to a later stage, so
# an event redelivered or read late never moves a call backwards.
STAGES: dict[str, tuple[int, str]] = {
    "call.requested": (0, "accepted"),
    "call.routed": (1, "routed"),
    "call.authorized": (2, "authorized"),
    "call.dispatched": (3, "dispatched"),
    "call.accepted": (4, "processing"),
    "call.completed": (5, "completed"),
    "call.failed": (5, "failed"),
    "call.timed_out": (5, "timed_out"),
    "call.rejected": (5, "rejected"),
    "call.settled": (6, "settled"),
    "call.refunded": (6, "refunded"),
    "call.delivered": (7, "delivered"),
    "call.delivery_failed": (7, "delivery_failed"),
}
OUTCOMES = {"call.completed", "call.failed", "call.timed_out", "call.rejected"}
COLUMNS = (
    "consumer_id",
    "owner_id",
    "api",
    "api_id",
    "mode",
    "outcome",
    "webhook_url",
    "result",
    "result_content_type",
    "error",
    "cost",
    "fee",
    "requested_at",
    "completed_at",
    "delivered_at",
)


def call_fields(event_type: str, time: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The columns an event sets; the rest stay as they are."""
    f: dict[str, Any] = {}
    if event_type == "call.requested":
        f.update(
            consumer_id=data["consumer_id"],
            api=data["api"],
            mode=data.get("mode"),
            webhook_url=data.get("webhook_url"),
            requested_at=time,
        )
    elif event_type == "call.routed":
        f.update(
            consumer_id=data["consumer_id"],
            owner_id=data["owner_id"],
            api_id=data["api_id"],
            mode=data["mode"],
        )
    elif event_type == "call.completed":
        f.update(
            result=data.get("result"),
            completed_at=time,
            result_content_type=data.get("content_type"),
        )
    elif event_type in ("call.failed", "call.timed_out", "call.rejected"):
        f.update(
            error={"type": event_type, **{k: v for k, v in data.items() if k != "request_id"}},
            completed_at=time,
        )
    elif event_type == "call.settled":
        f.update(cost=data["amount"], fee=data["fee"])
    elif event_type == "call.refunded":
        f.update(cost=0)
    elif event_type == "call.delivered":
        f.update(delivered_at=time)
    if event_type in OUTCOMES:
        f["outcome"] = event_type.removeprefix("call.")
    return f


def fold(
    current: tuple[int, str, Any, dict[str, Any]] | None,
    stage: int,
    status: str,
    time: Any,
    fields: dict[str, Any],
) -> tuple[int, str, Any, dict[str, Any]]:
    """Merge one event into a call's (stage, status, updated_at, columns) by the rules the
    upsert applies in SQL: the status of the furthest stage, the latest time, and each column
    the newest value that is set. A batch folded first writes one row per call."""
    if current is None:
        return stage, status, time, dict(fields)
    c_stage, c_status, c_time, c_fields = current
    merged = {**c_fields, **{k: v for k, v in fields.items() if v is not None}}
    return (
        max(c_stage, stage),
        status if stage >= c_stage else c_status,
        max(c_time, time),
        merged,
    )

"""The calls read model: each event's columns, and a merge that ignores delivery order."""

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postback_libs import events as ev
from postback_libs.events import EVENT_TYPES, EventData
from postback_projection.domain import COLUMNS, OUTCOMES, STAGES, call_fields

pytestmark = pytest.mark.unit

REQ = "req_1"
T0 = datetime(2025, 8, 1, 12, 0, tzinfo=UTC)
DEADLINE = T0 + timedelta(minutes=5)
JSON_COLUMNS = {"result", "error"}  # as the projection service writes them


def requested(**over: Any) -> ev.CallRequested:
    fields = {
        "request_id": REQ,
        "consumer_id": "acct_c",
        "api": "weather",
        "mode": "production",
        "webhook_url": "https://c.example/hook",
    }
    return ev.CallRequested(**{**fields, **over})


ROUTED = ev.CallRouted(
    request_id=REQ,
    consumer_id="acct_c",
    owner_id="acct_o",
    api_id="api_1",
    mode="production",
    upstream_url="https://o.example",
    method="POST",
    path="/",
    price=100,
    fee_bps=500,
    deadline=DEADLINE,
)
AUTHORIZED = ev.CallAuthorized(request_id=REQ, consumer_id="acct_c", amount=100)
DISPATCHED_1 = ev.CallDispatched(request_id=REQ, attempt=1, upstream_url="https://o.example")
DISPATCHED_2 = ev.CallDispatched(request_id=REQ, attempt=2, upstream_url="https://o.example")
ACCEPTED = ev.CallAccepted(request_id=REQ, deadline=DEADLINE)
COMPLETED = ev.CallCompleted(request_id=REQ, via="response", status_code=200, result={"t": 21})
COMPLETED_CALLBACK = ev.CallCompleted(request_id=REQ, via="callback", result=None)
FAILED = ev.CallFailed(request_id=REQ, reason="owner_error", status_code=500, detail="boom")
TIMED_OUT = ev.CallTimedOut(request_id=REQ, deadline=DEADLINE)
REJECTED_ROUTING = ev.CallRejected(
    request_id=REQ, consumer_id="acct_c", api="weather", reason="unknown_api", stage="routing"
)
REJECTED_FUNDS = ev.CallRejected(
    request_id=REQ,
    consumer_id="acct_c",
    api="api_1",
    reason="insufficient_funds",
    stage="settlement",
)
SETTLED = ev.CallSettled(request_id=REQ, consumer_id="acct_c", owner_id="acct_o", amount=100, fee=5)
REFUNDED_FAILED = ev.CallRefunded(
    request_id=REQ, consumer_id="acct_c", amount=100, outcome="call.failed"
)
REFUNDED_TIMEOUT = ev.CallRefunded(
    request_id=REQ, consumer_id="acct_c", amount=100, outcome="call.timed_out"
)
DELIVERED = ev.CallDelivered(request_id=REQ, message_id="msg_1", attempts=2)
DELIVERY_FAILED = ev.CallDeliveryFailed(request_id=REQ, message_id="msg_1", attempts=5)

# Whole lives of a call, in the order they happen, and where each ends.
LIVES: dict[str, tuple[list[EventData], str]] = {
    "sync": (
        [requested(), ROUTED, AUTHORIZED, DISPATCHED_1, COMPLETED, SETTLED, DELIVERED],
        "delivered",
    ),
    "async": (
        [requested(), ROUTED, AUTHORIZED, DISPATCHED_1, ACCEPTED, COMPLETED_CALLBACK, SETTLED],
        "settled",
    ),
    "failed after retries": (
        [
            requested(),
            ROUTED,
            AUTHORIZED,
            DISPATCHED_1,
            DISPATCHED_2,
            FAILED,
            REFUNDED_FAILED,
            DELIVERY_FAILED,
        ],
        "delivery_failed",
    ),
    "timed out": (
        [requested(), ROUTED, AUTHORIZED, DISPATCHED_1, ACCEPTED, TIMED_OUT, REFUNDED_TIMEOUT],
        "refunded",
    ),
    "rejected by routing": ([requested(), REJECTED_ROUTING, DELIVERED], "delivered"),
    "rejected by settlement": ([requested(), ROUTED, REJECTED_FUNDS], "rejected"),
    "in flight": ([requested(webhook_url=None), ROUTED, AUTHORIZED, DISPATCHED_1], "dispatched"),
    "just asked": ([requested()], "accepted"),
}


def timed(life: list[EventData]) -> list[tuple[str, datetime, dict[str, Any]]]:
    """(type, time, data) as the projection reads them off the envelope."""
    return [
        (
            e.event_type,
            T0 + timedelta(seconds=i),
            json.loads(e.model_dump_json(exclude_none=True)),
        )
        for i, e in enumerate(life)
    ]


def merge(row: dict[str, Any] | None, type_: str, time: Any, data: dict) -> dict[str, Any]:
    """The projection's upsert, in Python: status follows the highest stage (ties go to the
    newcomer), and each column is coalesce(new, old). JSON columns the event sets are written
    as JSON text, so an event that sets one to None still writes a (JSON null) value."""
    stage, status = STAGES[type_]
    fields = call_fields(type_, time, data)
    new = {
        c: json.dumps(fields[c]) if c in JSON_COLUMNS and c in fields else fields.get(c)
        for c in COLUMNS
    }
    if row is None:
        return {"status": status, "stage": stage, **new}
    merged = dict(row)
    if stage >= row["stage"]:
        merged["status"] = status
    merged["stage"] = max(stage, row["stage"])
    merged.update({c: v for c, v in new.items() if v is not None})
    return merged


def project(events: list[tuple[str, datetime, dict[str, Any]]]) -> dict[str, Any]:
    row = None
    for type_, time, data in events:
        row = merge(row, type_, time, data)
    assert row is not None
    return row


# Stages -------------------------------------------------------------------------------------


def test_stages_cover_exactly_the_call_events():
    call_types = {t for t, cls in EVENT_TYPES.items() if cls.topic is ev.CALLS}
    assert set(STAGES) == call_types


def test_each_status_belongs_to_one_event_type():
    statuses = [status for _, status in STAGES.values()]
    assert len(set(statuses)) == len(statuses)


def test_outcomes_share_a_stage():
    assert set(STAGES) >= OUTCOMES
    assert {STAGES[t][0] for t in OUTCOMES} == {5}


@pytest.mark.parametrize("life", sorted(LIVES))
def test_stages_only_rise_along_a_call_life(life):
    events, _ = LIVES[life]
    stages = [STAGES[e.event_type][0] for e in events]
    assert stages == sorted(stages)
    # Only a repeated attempt stays on the same stage.
    for a, b in itertools.pairwise(events):
        same = STAGES[a.event_type][0] == STAGES[b.event_type][0]
        assert not same or a.event_type == b.event_type == "call.dispatched"


def test_stage_order_of_a_call():
    order = [
        "call.requested",
        "call.routed",
        "call.authorized",
        "call.dispatched",
        "call.accepted",
        "call.completed",
        "call.settled",
        "call.delivered",
    ]
    stages = [STAGES[t][0] for t in order]
    assert stages == sorted(set(stages))
    assert STAGES["call.failed"][0] < STAGES["call.refunded"][0] < STAGES["call.delivered"][0]
    assert STAGES["call.rejected"][0] < STAGES["call.delivery_failed"][0]


# Columns per event --------------------------------------------------------------------------


def fields_of(e: EventData, time: Any = T0) -> dict[str, Any]:
    return call_fields(e.event_type, time, json.loads(e.model_dump_json(exclude_none=True)))


def test_requested_fields():
    assert fields_of(requested()) == {
        "consumer_id": "acct_c",
        "api": "weather",
        "mode": "production",
        "webhook_url": "https://c.example/hook",
        "requested_at": T0,
    }


def test_requested_without_webhook():
    f = call_fields("call.requested", T0, {"request_id": REQ, "consumer_id": "c", "api": "a"})
    assert f["webhook_url"] is None
    assert f["mode"] is None


def test_routed_fields():
    assert fields_of(ROUTED) == {
        "consumer_id": "acct_c",
        "owner_id": "acct_o",
        "api_id": "api_1",
        "mode": "production",
    }


def test_completed_fields():
    assert fields_of(COMPLETED) == {
        "result": {"t": 21},
        "result_content_type": "application/json",
        "completed_at": T0,
        "outcome": "completed",
    }


def test_text_result_keeps_its_content_type():
    done = ev.CallCompleted(request_id=REQ, via="callback", content_type="text/plain", result="ok")
    f = fields_of(done)
    assert f["result"] == "ok"
    assert f["result_content_type"] == "text/plain"


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (
            FAILED,
            {
                "type": "call.failed",
                "reason": "owner_error",
                "status_code": 500,
                "detail": "boom",
            },
        ),
        (TIMED_OUT, {"type": "call.timed_out", "deadline": "2025-08-01T12:05:00Z"}),
        (
            REJECTED_FUNDS,
            {
                "type": "call.rejected",
                "consumer_id": "acct_c",
                "api": "api_1",
                "reason": "insufficient_funds",
                "detail": "",
                "stage": "settlement",
            },
        ),
    ],
)
def test_unsuccessful_outcome_fields(event, error):
    f = fields_of(event)
    assert f == {
        "error": error,
        "completed_at": T0,
        "outcome": event.event_type.removeprefix("call."),
    }
    assert "request_id" not in f["error"]


def test_settled_and_refunded_fields():
    assert fields_of(SETTLED) == {"cost": 100, "fee": 5}
    assert fields_of(REFUNDED_FAILED) == {"cost": 0}


def test_delivered_fields():
    assert fields_of(DELIVERED) == {"delivered_at": T0}


@pytest.mark.parametrize(
    "event", [AUTHORIZED, DISPATCHED_1, ACCEPTED, DELIVERY_FAILED], ids=lambda e: e.event_type
)
def test_events_that_only_move_the_status(event):
    assert fields_of(event) == {}


def test_fields_are_known_columns():
    for events, _ in LIVES.values():
        for e in events:
            assert set(fields_of(e)) <= set(COLUMNS)


def test_outcome_is_set_only_by_outcomes():
    for type_ in STAGES:
        sample = next(
            (e for events, _ in LIVES.values() for e in events if e.event_type == type_), None
        )
        if sample is None:
            continue
        assert ("outcome" in fields_of(sample)) == (type_ in OUTCOMES)


# Merge --------------------------------------------------------------------------------------


@pytest.mark.parametrize("life", sorted(LIVES))
def test_a_life_in_order_ends_in_its_status(life):
    events, status = LIVES[life]
    row = project(timed(events))
    assert row["status"] == status
    assert row["stage"] == STAGES[events[-1].event_type][0]


def test_the_row_of_a_settled_call():
    events, _ = LIVES["sync"]
    row = project(timed(events))
    assert row == {
        "status": "delivered",
        "stage": 7,
        "consumer_id": "acct_c",
        "owner_id": "acct_o",
        "api": "weather",
        "api_id": "api_1",
        "mode": "production",
        "outcome": "completed",
        "webhook_url": "https://c.example/hook",
        "result": '{"t": 21}',
        "result_content_type": "application/json",
        "error": None,
        "cost": 100,
        "fee": 5,
        "requested_at": T0,
        "completed_at": T0 + timedelta(seconds=4),
        "delivered_at": T0 + timedelta(seconds=6),
    }


def test_a_late_event_never_moves_a_call_back():
    events = timed(LIVES["sync"][0])
    row = project(events)
    for late in events:
        assert project([*events, late]) == row


@st.composite
def shuffled_life(draw):
    name = draw(st.sampled_from(sorted(LIVES)))
    events = timed(LIVES[name][0])
    # Any order, with any events redelivered.
    redelivered = draw(st.lists(st.sampled_from(events), max_size=4))
    return name, events, draw(st.permutations(events + redelivered))


@given(shuffled_life())
def test_any_order_of_a_call_events_ends_in_the_same_row(case):
    name, in_order, shuffled = case
    final = project(shuffled)
    assert final["status"] == LIVES[name][1]
    assert final == project(in_order)


async def test_a_rebuild_is_refused_when_a_topic_lost_its_oldest_events():
    """Retention took the start of a topic: replaying what is left would drop every older
    call from the read model, so the rebuild refuses and says why."""
    from aiokafka import TopicPartition

    from postback_libs.settings import Settings
    from postback_projection.rebuild import IncompleteHistory, Replay

    class Log:
        async def start(self) -> None: ...

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1}

        def assign(self, partitions) -> None: ...

        def seek(self, partition, offset) -> None: ...

        async def beginning_offsets(self, partitions):
            return {tp: 40 if tp == TopicPartition("postback.calls", 1) else 0 for tp in partitions}

    replay = Replay(Settings(), None, None)
    replay.consumer = Log()  # type: ignore[assignment]
    with pytest.raises(IncompleteHistory, match=r"postback\.calls no longer"):
        await replay.start({})


def test_the_statuses_a_call_list_filters_by_are_the_read_models():
    from typing import get_args

    from postback_ingress.queries import CallStatus
    from postback_projection.domain import STAGES

    assert set(get_args(CallStatus)) == {status for _, status in STAGES.values()}

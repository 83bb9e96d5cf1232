"""The event catalog: envelope round trips, derived ids, partition keys and published schemas."""

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from postback_libs import events as ev
from postback_libs import ids
from postback_libs.events import (
    ACCOUNTS,
    CALLS,
    CATALOG,
    DELIVERIES,
    DLQ,
    EVENT_TYPES,
    LEDGER,
    TOPICS,
    WEBHOOKS,
    CloudEvent,
    EventData,
    envelope_model,
    new_event,
)

pytestmark = pytest.mark.unit

T0 = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
REQ = "req_0193c8a0f00070008000000000000001"

API = ev.ApiState(
    api_id="api_1", slug="weather", owner_id="acct_owner", name="Weather", endpoint="https://o/x"
)
ACCOUNT = ev.AccountState(
    account_id="acct_1", name="Alice", roles=["consumer"], key_id="key_1", key_hash="ab" * 32
)
ENDPOINT = ev.EndpointState(endpoint_id="ep_1", account_id="acct_1", url="https://c/hook")
DELIVERY = {"delivery_id": "dlv_1", "message_id": "msg_1"}

# One minimal valid instance of every event type.
MINIMAL: dict[str, EventData] = {
    "call.requested": ev.CallRequested(request_id=REQ, consumer_id="acct_1", api="weather"),
    "call.routed": ev.CallRouted(
        request_id=REQ,
        consumer_id="acct_1",
        owner_id="acct_owner",
        api_id="api_1",
        mode="production",
        upstream_url="https://o/x",
        method="POST",
        path="/",
        price=10,
        fee_bps=500,
        deadline=T0,
    ),
    "call.rejected": ev.CallRejected(
        request_id=REQ, consumer_id="acct_1", api="weather", reason="unknown_api", stage="routing"
    ),
    "call.authorized": ev.CallAuthorized(request_id=REQ, consumer_id="acct_1", amount=0),
    "call.dispatched": ev.CallDispatched(request_id=REQ, attempt=1, upstream_url="https://o/x"),
    "call.accepted": ev.CallAccepted(request_id=REQ, deadline=T0),
    "call.completed": ev.CallCompleted(request_id=REQ, via="response"),
    "call.failed": ev.CallFailed(request_id=REQ, reason="owner_error"),
    "call.timed_out": ev.CallTimedOut(request_id=REQ, deadline=T0),
    "call.settled": ev.CallSettled(
        request_id=REQ, consumer_id="acct_1", owner_id="acct_owner", amount=10, fee=0
    ),
    "call.refunded": ev.CallRefunded(
        request_id=REQ, consumer_id="acct_1", amount=10, outcome="call.failed"
    ),
    "call.delivered": ev.CallDelivered(request_id=REQ, message_id="msg_1", attempts=1),
    "call.delivery_failed": ev.CallDeliveryFailed(request_id=REQ, message_id="msg_1", attempts=0),
    "delivery.attempted": ev.DeliveryAttempted(**DELIVERY, url="https://c/hook", attempt=1),
    "delivery.succeeded": ev.DeliverySucceeded(**DELIVERY, attempts=1),
    "delivery.failed": ev.DeliveryFailed(**DELIVERY, attempts=0, reason="endpoint deleted"),
    "delivery.exhausted": ev.DeliveryExhausted(**DELIVERY, attempts=1),
    "endpoint.disabled": ev.EndpointDisabled(endpoint_id="ep_1", account_id="acct_1", reason="x"),
    "delivery.scheduled": ev.DeliveryScheduled(
        **DELIVERY, account_id="acct_1", message_type="call.completed", url="https://c/hook"
    ),
    "delivery.resend_requested": ev.DeliveryResendRequested(**DELIVERY, account_id="acct_1"),
    "delivery.recover_requested": ev.DeliveryRecoverRequested(
        endpoint_id="ep_1", account_id="acct_1", recovery_id="rcv_1", since=T0
    ),
    "credit.requested": ev.CreditRequested(credit_id="cr_1", account_id="acct_1", amount=1),
    "correction.requested": ev.CorrectionRequested(
        correction_id="co_1", account_id="acct_1", amount=-1
    ),
    "account.corrected": ev.AccountCorrected(
        correction_id="co_1",
        account_id="acct_1",
        transfer_id="correction:co_1",
        debit_account="consumer:acct_1",
        credit_account="operator:funding",
        amount=-1,
        balance=0,
    ),
    "correction.refused": ev.CorrectionRefused(
        correction_id="co_1",
        account_id="acct_1",
        amount=-5,
        reason="insufficient_funds",
        available=0,
    ),
    "account.credited": ev.AccountCredited(
        credit_id="cr_1", account_id="acct_1", amount=1, balance=1
    ),
    "transfer.reserved": ev.TransferReserved(
        transfer_id=f"{REQ}:reserve:owner",
        request_id=REQ,
        debit_account="consumer:acct_1",
        credit_account="owner:acct_owner",
        amount=0,
    ),
    "transfer.posted": ev.TransferPosted(
        transfer_id=f"{REQ}:post:owner",
        pending_id=f"{REQ}:reserve:owner",
        request_id=REQ,
        debit_account="consumer:acct_1",
        credit_account="owner:acct_owner",
        amount=0,
    ),
    "transfer.voided": ev.TransferVoided(
        transfer_id=f"{REQ}:void:owner",
        pending_id=f"{REQ}:reserve:owner",
        request_id=REQ,
        debit_account="consumer:acct_1",
        credit_account="owner:acct_owner",
        amount=0,
    ),
    "balance.low": ev.BalanceLow(account_id="acct_1", balance=0, threshold=100),
    "api.registered": ev.ApiRegistered(api=API),
    "api.updated": ev.ApiUpdated(api=API),
    "api.signing_secret_rotated": ev.ApiSigningSecretRotated(
        api=API, previous_secret_valid_until=T0
    ),
    "api.retired": ev.ApiRetired(api=API),
    "account.created": ev.AccountCreated(account=ACCOUNT),
    "account.key_rotated": ev.AccountKeyRotated(account=ACCOUNT, previous_key_valid_until=T0),
    "account.webhook_secret_rotated": ev.AccountWebhookSecretRotated(
        account=ACCOUNT, previous_secret_valid_until=T0
    ),
    "account.suspended": ev.AccountSuspended(account=ACCOUNT),
    "account.reinstated": ev.AccountReinstated(account=ACCOUNT),
    "endpoint.created": ev.EndpointCreated(endpoint=ENDPOINT),
    "endpoint.updated": ev.EndpointUpdated(endpoint=ENDPOINT),
    "endpoint.deleted": ev.EndpointDeleted(endpoint=ENDPOINT),
    "endpoint.secret_rotated": ev.EndpointSecretRotated(
        endpoint=ENDPOINT, previous_secret_valid_until=T0
    ),
    "dead_letter.recorded": ev.DeadLetterRecorded(
        consumer_group="g",
        original_topic="postback.calls",
        partition=0,
        offset=7,
        original_key="k_1",
        error="boom",
        attempts=3,
        original="{}",
    ),
}
ALL_TYPES = sorted(EVENT_TYPES)


def test_every_event_type_has_a_minimal_instance_here():
    assert set(MINIMAL) == set(EVENT_TYPES)
    for type_, data in MINIMAL.items():
        assert type(data) is EVENT_TYPES[type_]
        assert data.event_type == type_


def test_every_event_type_is_on_a_known_topic():
    for cls in EVENT_TYPES.values():
        assert cls.topic in TOPICS


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_envelope_round_trips_through_bytes(type_):
    data = MINIMAL[type_]
    event = new_event(data, source="test", at=T0, traceparent="00-" + "1" * 32 + "-" + "2" * 16)
    raw = event.to_bytes()
    wire = json.loads(raw)
    assert wire["specversion"] == "1.0"
    assert wire["type"] == type_
    assert wire["datacontenttype"] == "application/json"
    back = CloudEvent.from_bytes(raw)
    assert back == event
    assert back.time == T0
    assert back.payload() == data
    assert type(back.payload()) is EVENT_TYPES[type_]


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_envelope_validates_against_its_published_model(type_):
    event = new_event(MINIMAL[type_], source="test", at=T0)
    model = envelope_model(type_)
    parsed = model.model_validate_json(event.to_bytes())
    assert parsed.type == type_
    assert parsed.data == MINIMAL[type_]


def test_to_bytes_omits_absent_optional_attributes():
    event = new_event(MINIMAL["call.completed"], source="test", at=T0)
    wire = json.loads(event.to_bytes())
    assert "traceparent" not in wire
    assert "result" not in wire["data"]  # None fields are left out of data too
    assert "status_code" not in wire["data"]


def test_payload_of_an_unknown_type_raises_key_error():
    event = CloudEvent(id="x", source="s", type="call.unheard_of", subject="k", time=T0, data={})
    with pytest.raises(KeyError):
        event.payload()


def test_new_event_without_cause_uses_fresh_ids_and_now():
    data = MINIMAL["call.requested"]
    before = datetime.now(UTC)
    a = new_event(data, source="test")
    b = new_event(data, source="test")
    after = datetime.now(UTC)
    assert a.id != b.id
    assert before <= a.time <= after
    assert a.source == "test"


def test_new_event_with_a_cause_is_idempotent():
    cause = str(ids.uuid7())
    data = MINIMAL["call.routed"]
    first = new_event(data, source="routing", cause=cause)
    again = new_event(data, source="routing", cause=cause)
    assert first.id == again.id


def test_new_event_ids_differ_by_purpose_and_by_cause():
    cause, other_cause = str(ids.uuid7()), str(ids.uuid7())
    routed = new_event(MINIMAL["call.routed"], source="routing", cause=cause)
    rejected = new_event(MINIMAL["call.rejected"], source="routing", cause=cause)
    other = new_event(MINIMAL["call.routed"], source="routing", cause=other_cause)
    assert len({routed.id, rejected.id, other.id}) == 3


@given(cause=st.uuids(), purpose_a=st.text(), purpose_b=st.text())
def test_derived_id_is_a_function_of_cause_and_purpose(cause, purpose_a, purpose_b):
    assert ids.derived_id(cause, purpose_a) == ids.derived_id(str(cause), purpose_a)
    if purpose_a != purpose_b:
        assert ids.derived_id(cause, purpose_a) != ids.derived_id(cause, purpose_b)


@given(cause_a=st.text(min_size=1), cause_b=st.text(min_size=1))
def test_derived_ids_of_different_causes_differ(cause_a, cause_b):
    if cause_a != cause_b:
        assert ids.derived_id(cause_a, "p") != ids.derived_id(cause_b, "p")


def _is_uuid7(value: uuid.UUID | str) -> bool:
    u = value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    return u.version == 7 and u.variant == uuid.RFC_4122


@given(cause=st.one_of(st.uuids().map(str), st.text(min_size=1)), purpose=st.text())
def test_derived_ids_are_uuid7(cause, purpose):
    assert _is_uuid7(ids.derived_id(cause, purpose))


def test_fresh_ids_are_uuid7_carrying_the_current_time():
    before = datetime.now(UTC)
    u = ids.uuid7()
    after = datetime.now(UTC)
    assert _is_uuid7(u)
    ms = ids.uuid7_ms(u)
    assert int(before.timestamp() * 1000) - 1 <= ms <= int(after.timestamp() * 1000) + 1
    assert ids.uuid7_ms(str(u)) == ms


def test_a_derived_id_keeps_the_time_of_a_uuid7_cause():
    cause = ids.uuid7()
    assert ids.uuid7_ms(ids.derived_id(cause, "call.routed")) == ids.uuid7_ms(cause)


@pytest.mark.parametrize(
    "shape",
    [
        "{event}:{transfer}",  # settlement's transfers: <event id>:<transfer id>
        "settlement:expired:req_{hex}",  # the sweeper's refunds name the request id
        "ep_{hex}:2025-01-01T00:00:00+00:00",
    ],
)
def test_a_derived_id_keeps_the_time_of_the_first_uuid7_its_cause_names(shape):
    first = ids.uuid7()
    cause = shape.format(event=first, transfer="tr_x", hex=first.hex)
    assert ids.uuid7_ms(ids.derived_id(cause, "transfer.reserved")) == ids.uuid7_ms(first)


def test_a_cause_without_a_uuid7_takes_the_time_given():
    cause = "postback.calls:3:1234:delivery"  # a dead letter: the record's place in the log
    derived = ids.derived_id(cause, "dead_letter.recorded", ms=1_700_000_000_000)
    assert ids.uuid7_ms(derived) == 1_700_000_000_000
    assert derived == ids.derived_id(cause, "dead_letter.recorded", ms=1_700_000_000_000)


def test_new_request_id_format():
    rid = ids.new_request_id()
    assert rid.startswith("req_")
    assert _is_uuid7(uuid.UUID(hex=rid.removeprefix("req_")))
    assert rid != ids.new_request_id()


class _Clock:
    def __init__(self, ns: int) -> None:
        self.ns = ns

    def time_ns(self) -> int:
        return self.ns


@given(
    ms=st.integers(min_value=0, max_value=(1 << 48) - 2),
    step=st.integers(min_value=1, max_value=10_000_000),
)
def test_uuid7_ids_sort_by_creation_time(ms, step):
    later_ms = min(ms + step, (1 << 48) - 1)
    clock = _Clock(ms * 1_000_000)
    real_time = ids.time
    ids.time = clock  # type: ignore[assignment]
    try:
        early = ids.uuid7()
        clock.ns = later_ms * 1_000_000 + 999_999  # sub-millisecond part is dropped
        late = ids.uuid7()
    finally:
        ids.time = real_time
    assert ids.uuid7_ms(early) == ms
    assert ids.uuid7_ms(late) == later_ms
    assert _is_uuid7(early)
    assert _is_uuid7(late)
    assert early < late
    assert str(early) < str(late)  # the text form sorts the same way


# Partition keys -------------------------------------------------------------------------------

EXPECTED_SUBJECT = {
    CALLS: lambda d: d.request_id,
    CATALOG: lambda d: d.api.api_id,
    ACCOUNTS: lambda d: d.account.account_id,
    WEBHOOKS: lambda d: d.endpoint.endpoint_id,
    DLQ: lambda d: d.original_key,
}


def test_topic_table():
    assert {t.cleanup for t in (CATALOG, ACCOUNTS, WEBHOOKS)} == {"compact"}
    assert len({t.name for t in TOPICS}) == len(TOPICS)


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_every_type_says_how_its_key_is_made_and_what_it_is(type_):
    """The topics guide other teams read is made from these."""
    model = ev.EVENT_TYPES[type_]
    assert model.key_doc.startswith("`")
    assert "__doc__" in vars(model) and model.__doc__


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_subject_is_the_partition_key_the_topic_names(type_):
    data = MINIMAL[type_]
    subject = new_event(data, source="test", at=T0).subject
    assert subject == data.key()
    topic = type(data).topic  # the class attribute: see the dead-letter test below
    if topic in EXPECTED_SUBJECT:
        assert subject == EXPECTED_SUBJECT[topic](data)
    elif topic is DELIVERIES:
        # endpoint.disabled and delivery.recover_requested concern a whole endpoint: they are
        # keyed by it.
        by_endpoint = ("endpoint.disabled", "delivery.recover_requested")
        want = data.endpoint_id if type_ in by_endpoint else data.delivery_id
        assert subject == want
    else:
        assert topic is LEDGER
        want = (
            data.debit_account if type_.startswith("transfer.") else f"consumer:{data.account_id}"
        )
        assert subject == want


def test_call_events_of_one_request_share_a_partition_key():
    subjects = {
        new_event(d, source="t", at=T0).subject for d in MINIMAL.values() if type(d).topic is CALLS
    }
    assert subjects == {REQ}


def test_api_change_is_keyed_by_id_not_slug():
    renamed = ev.ApiUpdated(api=API.model_copy(update={"slug": "climate", "version": 2}))
    assert new_event(renamed, source="t").subject == "api_1"


def test_ledger_events_of_one_account_share_a_partition_key():
    subjects = {
        new_event(MINIMAL[t], source="t", at=T0).subject
        for t in ("credit.requested", "account.credited", "balance.low", "transfer.reserved")
    }
    assert subjects == {"consumer:acct_1"}


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_every_event_instance_names_its_topic(type_):
    data = MINIMAL[type_]
    assert data.topic is type(data).topic
    assert data.topic.name.startswith("postback.")


# Published schemas and forward compatibility ----------------------------------------------------


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_envelope_schema_pins_the_type(type_):
    schema = envelope_model(type_).model_json_schema()
    assert schema["properties"]["type"]["const"] == type_
    assert {"id", "source", "type", "subject", "time", "data"} <= set(schema["required"])
    data_ref = schema["properties"]["data"]["$ref"]
    assert data_ref.endswith("/" + EVENT_TYPES[type_].__name__)


def test_envelope_model_rejects_another_type():
    event = new_event(MINIMAL["call.failed"], source="t", at=T0)
    wrong = json.loads(event.to_bytes())
    wrong["type"] = "call.completed"
    with pytest.raises(ValidationError):
        envelope_model("call.failed").model_validate(wrong)


def test_envelope_model_checks_data_against_the_type():
    event = new_event(MINIMAL["call.failed"], source="t", at=T0)
    wire = json.loads(event.to_bytes())
    wire["data"]["reason"] = "not_a_reason"
    with pytest.raises(ValidationError):
        envelope_model("call.failed").model_validate(wire)


def test_envelope_model_names_are_distinct():
    names = {envelope_model(t).__name__ for t in EVENT_TYPES}
    assert len(names) == len(EVENT_TYPES)
    assert envelope_model("call.timed_out").__name__ == "CallTimedOutEvent"


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_unknown_fields_in_data_are_ignored(type_):
    event = new_event(MINIMAL[type_], source="t", at=T0)
    wire = json.loads(event.to_bytes())
    wire["data"]["added_in_a_later_version"] = {"nested": [1, 2]}
    wire["an_extension_attribute"] = "x"
    back = CloudEvent.from_bytes(json.dumps(wire).encode())
    assert back.payload() == MINIMAL[type_]
    assert envelope_model(type_).model_validate(wire).data == MINIMAL[type_]


def test_unknown_fields_in_nested_state_are_ignored():
    event = new_event(MINIMAL["api.updated"], source="t", at=T0)
    wire = json.loads(event.to_bytes())
    wire["data"]["api"]["rate_card"] = {"per_minute": 10}
    assert CloudEvent.from_bytes(json.dumps(wire).encode()).payload() == MINIMAL["api.updated"]


def test_invalid_data_is_refused():
    with pytest.raises(ValidationError):
        ev.CallSettled(request_id=REQ, consumer_id="a", owner_id="b", amount=-1, fee=0)
    with pytest.raises(ValidationError):
        ev.CreditRequested(credit_id="c", account_id="a", amount=0)
    with pytest.raises(ValidationError):
        ev.CallRouted(**{**MINIMAL["call.routed"].model_dump(), "fee_bps": 10_001})
    event = new_event(MINIMAL["call.dispatched"], source="t", at=T0)
    wire = json.loads(event.to_bytes())
    wire["data"]["attempt"] = 0
    with pytest.raises(ValidationError):
        CloudEvent.model_validate(wire).payload()


def test_event_time_round_trips_with_its_offset():
    at = datetime(2025, 6, 1, 12, 0, tzinfo=UTC) + timedelta(microseconds=123456)
    event = new_event(MINIMAL["call.accepted"], source="t", at=at)
    assert CloudEvent.from_bytes(event.to_bytes()).time == at


@pytest.mark.parametrize(
    ("cause", "purpose", "expected"),
    [
        (
            "0193a6e2-d4f0-7c3b-9a1e-5f2d8c4b6a90",
            "call.routed",
            "0193a6e2-d4f0-7605-891a-6c5ea3ee6bbd",
        ),
        ("req_abc", "transfer", "9b67eacc-c687-74a2-bf2d-b14897b91dc6"),
    ],
)
def test_derived_ids_stay_the_same_across_versions(cause, purpose, expected):
    # A replay after an upgrade must emit the ids the earlier version emitted.
    assert str(ids.derived_id(cause, purpose)) == expected


def test_new_ids_are_uuid7_in_their_written_forms():
    event_id, request_id = ids.new_event_id(), ids.new_request_id()
    assert _is_uuid7(event_id) and str(uuid.UUID(event_id)) == event_id
    assert request_id.startswith("req_") and _is_uuid7(request_id[4:])
    assert len(request_id) == 36 and request_id[4:] == request_id[4:].lower()
    before_ms = time.time_ns() // 1_000_000
    assert abs(ids.uuid7_ms(ids.uuid7()) - before_ms) < 1000


def test_new_ids_do_not_repeat_across_threads_or_a_fork():
    import os
    from concurrent.futures import ThreadPoolExecutor

    def draw(_: int) -> list[str]:
        return [ids.uuid7_hex() for _ in range(2000)]

    with ThreadPoolExecutor(4) as pool:
        drawn = [h for batch in pool.map(draw, range(8)) for h in batch]
    ids.uuid7_hex()  # bytes left in this thread's pool, which a forked child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports the ids it draws, then leaves at once
        os.write(write, "".join(draw(0)[:100]).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 32 * 100)
    os.close(read)
    drawn += [child[i : i + 32].decode() for i in range(0, len(child), 32)]
    drawn += draw(0)[:100]
    assert len(drawn) == 16_000 + 200
    # Their random bits, past the millisecond: ids drawn at different times differ anyway.
    assert len({h[13:] for h in drawn}) == len(drawn)


def test_why_an_event_is_unreadable_is_said_without_quoting_it() -> None:
    """A dead letter's error, logged and kept, must not carry the call's data."""
    from postback_libs.consumer import _reason

    raw = b'{"specversion": "1.0", "id": "e", "source": "s", "type": "call.routed",'
    raw += b' "subject": "r", "time": "2025-01-01T00:00:00Z", "data": {"secret-result": 1}}'
    event = CloudEvent.from_bytes(raw)
    try:
        event.payload()
    except ValidationError as e:
        said = _reason(e)
    assert "request_id: Field required" in said
    assert "secret-result" not in said

"""Subscriptions and per-endpoint rules: event-type patterns, retry policy, what an answer
means, endpoint state changes, and endpoint signatures (symmetric and Ed25519)."""

import base64
import random
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from postback_delivery.domain import RetryPolicy, decide, plan_retry
from postback_delivery.outcomes import Context, fold, messages_for
from postback_delivery.subscriptions import Stored, apply_state
from postback_libs.events import (
    CallCompleted,
    CallRejected,
    CallRequested,
    CallSettled,
    CallTimedOut,
    EndpointState,
    RetiredSecret,
    new_event,
)
from postback_libs.signing import SignatureError
from postback_libs.text import recordable
from postback_libs.webhooks import (
    SUBSCRIBABLE_EVENTS,
    endpoint_secret,
    endpoint_signature,
    message_headers,
    public_key,
    secret_key,
    subscribed,
    unknown_patterns,
    valid_versions,
    verify_asymmetric,
)

pytestmark = pytest.mark.unit

T0 = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
MASTER = b"unit-test-master-key"
RNG = random.Random(7)


# Event types ----------------------------------------------------------------------------------


def test_the_required_event_types_are_subscribable():
    required = {
        "call.completed",
        "call.failed",
        "call.timed_out",
        "call.rejected",
        "call.settled",
        "balance.low",
        "delivery.exhausted",
        "endpoint.disabled",
    }
    assert required <= set(SUBSCRIBABLE_EVENTS)


@pytest.mark.parametrize(
    ("patterns", "event_type", "expected"),
    [
        (["call.*"], "call.completed", True),
        (["call.*"], "balance.low", False),
        (["*"], "endpoint.disabled", True),
        (["call.failed", "balance.low"], "balance.low", True),
        (["call.failed"], "call.failed_later", False),
        (["call"], "call.completed", False),
        ([], "call.completed", False),
    ],
)
def test_patterns(patterns, event_type, expected):
    assert subscribed(patterns, event_type) is expected


def test_unknown_patterns_are_reported():
    assert unknown_patterns(["call.*", "*", "balance.low"]) == []
    assert unknown_patterns(["call.complete", "nope.*", "call.completed"]) == [
        "call.complete",
        "nope.*",
    ]


# Retry policy ---------------------------------------------------------------------------------


def test_default_policy_follows_the_schedule_then_stops():
    policy = RetryPolicy((0, 5, 300))
    assert plan_retry(policy, 1, T0, T0, RNG) is not None
    due = plan_retry(policy, 2, T0, T0, RNG)
    assert due is not None
    assert 240 <= (due - T0).total_seconds() <= 360  # 300 s +- 20 %
    assert plan_retry(policy, 3, T0, T0, RNG) is None


def test_max_attempts_repeats_the_last_step():
    policy = RetryPolicy((0, 1), max_attempts=5)
    for made in range(1, 5):
        due = plan_retry(policy, made, T0, T0, RNG)
        assert due is not None and (due - T0).total_seconds() <= 1.2
    assert plan_retry(policy, 5, T0, T0, RNG) is None


def test_a_window_bounds_the_retries_in_time():
    policy = RetryPolicy((0, 10), window_seconds=60)
    now = T0 + timedelta(seconds=45)
    assert plan_retry(policy, 9, T0, now, RNG) is not None  # no attempt limit of its own
    assert plan_retry(policy, 9, T0, T0 + timedelta(seconds=55), RNG) is None


def test_retry_after_wins_when_longer_and_the_window_still_applies():
    policy = RetryPolicy((0, 1), window_seconds=100)
    due = plan_retry(policy, 1, T0, T0, RNG, retry_after=50)
    assert due is not None and (due - T0).total_seconds() >= 50
    assert plan_retry(policy, 1, T0, T0, RNG, retry_after=500) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, "succeeded"), (204, "succeeded"), (302, "pending"), (400, "pending"), (410, "failed")],
)
def test_decide(status, expected):
    d = decide(status, None, "", None, RetryPolicy((0, 1)), 1, T0, T0, RNG)
    assert d.status == expected


def test_decide_429_reads_retry_after_and_a_network_error_retries():
    d = decide(429, None, "", "120", RetryPolicy((0, 1)), 1, T0, T0, RNG)
    assert d.status == "pending" and d.retry_after == 120
    assert d.retry_at is not None and (d.retry_at - T0).total_seconds() >= 120
    # Retry-After means nothing on other statuses.
    assert decide(500, None, "", "120", RetryPolicy((0, 1)), 1, T0, T0, RNG).retry_after is None
    d = decide(None, "timeout", "TimeoutError()", None, RetryPolicy((0,)), 1, T0, T0, RNG)
    assert d.status == "exhausted" and d.error is not None and d.error.startswith("timeout")


# Endpoint state -------------------------------------------------------------------------------


def state(**over):
    fields = {"endpoint_id": "ep_1", "account_id": "acc_1", "url": "https://x.example/h"}
    return EndpointState(**(fields | over))


def stored(**over):
    fields = {
        "revision": 1,
        "enabled": True,
        "deleted": False,
        "disabled_at": None,
        "disable_acked_revision": None,
    }
    return Stored(**(fields | over))


def test_newest_revision_wins():
    assert apply_state(stored(revision=3), state(revision=2), deleted=False).write is False
    assert apply_state(stored(revision=3), state(revision=4), deleted=False).write is True
    assert apply_state(None, state(), deleted=False).write is True


def test_delete_and_disable_stop_queued_messages():
    assert apply_state(stored(), state(revision=2), deleted=True).fail_open == "endpoint deleted"
    off = apply_state(stored(), state(revision=2, enabled=False), deleted=False)
    assert off.fail_open == "endpoint disabled" and not off.ack_disable


def test_a_local_disable_holds_until_the_account_enables_after_ingress_saw_it():
    disabled = stored(revision=3, disabled_at=T0)
    # Written before ingress recorded the disable: does not undo it.
    early = apply_state(disabled, state(revision=4), deleted=False)
    assert early.write and not early.clear_disable
    # Ingress records it.
    acked = apply_state(disabled, state(revision=5, enabled=False, disabled_reason="410"), False)
    assert acked.ack_disable
    # The account enables it again.
    again = apply_state(
        stored(revision=5, enabled=False, disabled_at=T0, disable_acked_revision=5),
        state(revision=6),
        deleted=False,
    )
    assert again.clear_disable and again.reset_health


def test_enabling_an_endpoint_the_account_had_disabled_resets_its_health():
    assert apply_state(stored(enabled=False), state(revision=2), deleted=False).reset_health


# Signatures -----------------------------------------------------------------------------------


def test_endpoint_secret_is_a_standard_whsec_secret():
    secret = endpoint_secret(MASTER, "ep_1", 1)
    assert secret.startswith("whsec_")
    assert 24 <= len(base64.b64decode(secret.removeprefix("whsec_"))) <= 64
    assert secret != endpoint_secret(MASTER, "ep_1", 2)
    assert secret != endpoint_secret(MASTER, "ep_2", 1)


def test_symmetric_signatures_verify_with_two_independent_libraries_during_rotation():
    body, msg_id = b'{"type":"call.completed"}', "msg_1"
    now = datetime.now(UTC)
    ts = int(now.timestamp())  # the verifiers refuse timestamps more than 5 minutes off
    endpoint = state(
        secret_version=2,
        retired_secrets=[RetiredSecret(version=1, valid_until=now + timedelta(hours=1))],
    )
    versions = valid_versions(endpoint, now)
    assert versions == [2, 1]
    signature = endpoint_signature(MASTER, "ep_1", "symmetric", versions, msg_id, ts, body)
    assert len(signature.split()) == 2
    headers = message_headers(signature, msg_id, ts, "Postback/test")
    for version in (1, 2):
        secret = endpoint_secret(MASTER, "ep_1", version)
        StandardWebhook(secret).verify(body, headers)
        SvixWebhook(secret).verify(body, headers)
    with pytest.raises(Exception):  # noqa: B017,PT011 -- each library raises its own type
        StandardWebhook(endpoint_secret(MASTER, "ep_1", 3)).verify(body, headers)
    # After the overlap only the new version signs.
    assert valid_versions(endpoint, now + timedelta(hours=2)) == [2]


def test_asymmetric_signatures_verify_with_the_public_key_only():
    body, msg_id, ts = b'{"type":"call.completed"}', "msg_1", 1_700_000_000
    signature = endpoint_signature(MASTER, "ep_1", "asymmetric", [1], msg_id, ts, body)
    assert signature.startswith("v1a,")
    headers = message_headers(signature, msg_id, ts, "Postback/test")
    pk = public_key(MASTER, "ep_1", 1)
    assert pk.startswith("whpk_") and len(base64.b64decode(pk[5:])) == 32
    assert secret_key(MASTER, "ep_1", 1).startswith("whsk_")
    verify_asymmetric(pk, headers, body, now=ts)
    with pytest.raises(SignatureError):
        verify_asymmetric(pk, headers, body + b" ", now=ts)
    with pytest.raises(SignatureError):
        verify_asymmetric(public_key(MASTER, "ep_2", 1), headers, body, now=ts)
    with pytest.raises(SignatureError):
        verify_asymmetric(pk, headers, body, now=ts + 3600)


# A batch of call events -----------------------------------------------------------------------


def _ev(data):
    return new_event(data, source="test", at=T0), data


def test_fold_resolves_calls_inside_the_batch_and_leaves_the_rest_to_the_table():
    whole = [
        _ev(CallRequested(request_id="r1", consumer_id="c", api="a", webhook_url="https://h/")),
        _ev(CallCompleted(request_id="r1", via="response", result=1)),
        _ev(CallCompleted(request_id="r1", via="callback", result=2)),  # the first one counts
        _ev(CallSettled(request_id="r1", consumer_id="c", owner_id="o", amount=3, fee=0)),
    ]
    started = [_ev(CallRequested(request_id="r2", consumer_id="c", api="a"))]
    earlier = [
        _ev(CallTimedOut(request_id="r3", deadline=T0)),
        _ev(CallSettled(request_id="r3", consumer_id="c", owner_id="o", amount=0, fee=0)),
    ]
    outcome_only = [_ev(CallCompleted(request_id="r4", via="response"))]
    plan = fold(whole + started + earlier + outcome_only)
    assert set(plan.new) == {"r2"}  # r1 began and ended here: nothing to store
    [(_, _, ctx1), (_, _, ctx3)] = plan.finals
    assert ctx1 is not None and ctx1.outcome_type == "call.completed"
    assert ctx1.outcome is not None and ctx1.outcome["result"] == 1
    assert ctx3 is None and plan.stored_finals == ["r3"]  # from the table
    assert set(plan.outcomes) == {"r3", "r4"}


def test_messages_for_a_final_event():
    endpoints = [
        {"endpoint_id": "ep_all", "url": "https://a/", "event_types": ["call.*"]},
        {"endpoint_id": "ep_low", "url": "https://b/", "event_types": ["balance.low"]},
    ]
    ctx = Context("c", "weather", "https://hook/", "call.completed", {"result": {"t": 1}})
    event, settled = _ev(
        CallSettled(request_id="r1", consumer_id="c", owner_id="o", amount=5, fee=1)
    )
    [(outcome, to), (money, to2)] = messages_for(event, settled, ctx, endpoints)
    assert outcome.event_type == "call.completed"
    assert [d.endpoint_id for d in to] == [None, "ep_all"]
    assert b'"cost":5' in outcome.body
    assert money.event_type == "call.settled" and [d.endpoint_id for d in to2] == ["ep_all"]
    assert outcome.message_id != money.message_id
    # Rejected before routing: no webhook_url, no subscriber of call.rejected: nothing.
    quiet = Context("c", "weather", None)
    event, rejected = _ev(
        CallRejected(
            request_id="r2", consumer_id="c", api="x", reason="unknown_api", stage="routing"
        )
    )
    assert messages_for(event, rejected, quiet, endpoints[1:]) == []


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("plain é", "plain é"),
        ("caf\udce9\udcff", "caf\ufffd\ufffd"),  # bytes not UTF-8, as the HTTP parser keeps them
        ("a\x00b", "a\ufffdb"),  # PostgreSQL text and jsonb refuse NUL
        ("lone \ud800", "lone \ufffd\ufffd\ufffd"),  # a surrogate that stands for no byte
        ("\udcc3\udca9", "é"),  # UTF-8 bytes a parser kept as surrogates are UTF-8 again
    ],
)
def test_a_receivers_answer_is_made_recordable(text, kept):
    assert recordable(text) == kept
    recordable(text).encode("utf-8")  # and JSON-encodable: no surrogate left

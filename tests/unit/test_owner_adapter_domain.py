"""The owner contract: forwarded requests, reading the owner's answer, callback tokens."""

import itertools
import json
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postback_libs.events import CallCompleted
from postback_owner_adapter.domain import (
    BODY_METHODS,
    answer_within,
    build_forward,
    callback_token,
    judge_response,
    parse_result,
    request_seconds,
    result_digest,
    retry_delay,
    token_is_valid,
    upstream_target,
)

pytestmark = pytest.mark.unit

SECRET = b"k" * 32
DEADLINE = datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC)
CALLBACK = "https://postback.example/v1/callbacks/req_1"


# Callback tokens ----------------------------------------------------------------------------


def test_token_is_valid_for_its_request_only():
    token = callback_token(SECRET, "req_1")
    assert len(token) == 64
    int(token, 16)  # hex
    assert token_is_valid(SECRET, "req_1", token)
    assert not token_is_valid(SECRET, "req_2", token)
    assert not token_is_valid(b"other" * 8, "req_1", token)
    assert not token_is_valid(SECRET, "req_1", token[:-1])
    assert not token_is_valid(SECRET, "req_1", token.upper())
    assert not token_is_valid(SECRET, "req_1", "")


def test_token_is_derived_not_random():
    assert callback_token(SECRET, "req_1") == callback_token(SECRET, "req_1")
    assert callback_token(SECRET, "req_1") != callback_token(SECRET, "req_2")
    assert callback_token(SECRET, "req_1") != callback_token(b"x" + SECRET, "req_1")


@given(request_id=st.text(), other=st.text())
def test_token_of_one_request_never_opens_another(request_id, other):
    token = callback_token(SECRET, request_id)
    assert token_is_valid(SECRET, request_id, token)
    assert token_is_valid(SECRET, other, token) == (other == request_id)


def test_a_non_ascii_token_is_simply_invalid():
    assert token_is_valid(SECRET, "req_1", "é" * 64) is False


# Forwarded requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "path", "expected"),
    [
        ("https://o.example/api", "", "https://o.example/api"),
        ("https://o.example/api", "/", "https://o.example/api"),
        ("https://o.example/api/", "/", "https://o.example/api/"),
        ("https://o.example/api", "/v1/x", "https://o.example/api/v1/x"),
        ("https://o.example/api/", "/v1/x", "https://o.example/api/v1/x"),
        ("https://o.example/api/", "v1/x", "https://o.example/api/v1/x"),
        ("https://o.example/api//", "//v1/x", "https://o.example/api/v1/x"),
    ],
)
def test_upstream_target(upstream, path, expected):
    assert upstream_target(upstream, path) == expected


def test_upstream_target_keeps_the_endpoint_query_string():
    target = urlsplit(upstream_target("https://o.example/api?key=abc", "/v1/x"))
    assert target.path == "/api/v1/x"
    assert parse_qs(target.query) == {"key": ["abc"]}


def forward(**over):
    fields = {
        "request_id": "req_1",
        "method": "POST",
        "upstream_url": "https://o.example/api",
        "path": "/v1/run",
        "params": {},
        "body": None,
        "entry": "v1",
        "deadline": DEADLINE,
        "callback_url": CALLBACK,
        "token": "t0ken",
    }
    return build_forward(**{**fields, **over})


def test_headers():
    fwd = forward()
    assert fwd.headers["X-Postback-Request-Id"] == "req_1"
    assert fwd.headers["X-Postback-Deadline"] == "2025-05-06T07:08:09Z"
    assert fwd.headers["X-Postback-Callback-Url"] == CALLBACK
    assert fwd.headers["X-Postback-Callback-Token"] == "t0ken"


def test_get_puts_params_in_the_query_string():
    params = {"q": "a b&c", "n": 3, "flag": True, "obj": {"x": [1, 2]}, "none": None}
    fwd = forward(method="GET", params=params)
    assert fwd.method == "GET"
    assert fwd.body is None
    assert "Content-Type" not in fwd.headers
    url = urlsplit(fwd.url)
    assert url.path == "/api/v1/run"
    query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    assert query["q"] == "a b&c"  # strings as they are
    assert json.loads(query["n"]) == 3  # anything else as JSON
    assert json.loads(query["flag"]) is True
    assert json.loads(query["obj"]) == {"x": [1, 2]}
    assert json.loads(query["none"]) is None
    assert set(query) == set(params)


def test_get_without_params_has_no_query_string():
    fwd = forward(method="GET", path="/")
    assert fwd.url == "https://o.example/api"


def test_get_params_join_a_query_already_in_the_path():
    fwd = forward(method="GET", path="/v1/run?x=1", params={"y": "2"})
    assert parse_qs(urlsplit(fwd.url).query) == {"x": ["1"], "y": ["2"]}


@pytest.mark.parametrize("method", [*sorted(BODY_METHODS), "DELETE"])
def test_a_body_is_sent_as_json(method):
    fwd = forward(method=method, body={"a": [1, "é"]})
    assert fwd.method == method
    assert urlsplit(fwd.url).query == ""
    assert json.loads(fwd.body) == {"a": [1, "é"]}
    assert fwd.signed == fwd.body  # what a standard verifier checks
    assert fwd.headers["Content-Type"] == "application/json"


def test_post_without_body_sends_the_params():
    fwd = forward(params={"city": "Oslo", "days": 3})
    assert json.loads(fwd.body) == {"city": "Oslo", "days": 3}
    assert urlsplit(fwd.url).query == ""


def test_post_with_a_falsy_body_sends_the_body_not_the_params():
    assert json.loads(forward(params={"p": 1}, body=0).body) == 0
    assert json.loads(forward(params={"p": 1}, body=[]).body) == []
    assert json.loads(forward(params={"p": 1}, body="").body) == ""


def test_post_with_nothing_sends_an_empty_object():
    assert json.loads(forward().body) == {}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_target_events_record_never_holds_the_callback_token(method):
    fwd = forward(
        method=method, entry="internal_call", params={"webhook_url": "https://c.example/h"}
    )
    assert fwd.target == "https://o.example/api/v1/run"
    assert "t0ken" not in fwd.target
    if method == "GET":  # the owner itself still gets its token in the query string
        assert parse_qs(urlsplit(fwd.url).query)["webhook_url"] == [f"{CALLBACK}?token=t0ken"]


@pytest.mark.parametrize("entry", ["internal_call", "api_path"])
def test_seed_compatible_entries_point_webhook_url_at_the_callback(entry):
    params = {"webhook_url": "https://consumer.example/hook", "x": 1}
    fwd = forward(entry=entry, params=params)
    sent = json.loads(fwd.body)
    assert sent["webhook_url"] == f"{CALLBACK}?token=t0ken"
    assert sent["x"] == 1
    # The caller's dict is not modified.
    assert params["webhook_url"] == "https://consumer.example/hook"


@pytest.mark.parametrize("entry", ["internal_call", "api_path"])
def test_seed_compatible_get_rewrites_webhook_url_in_the_query(entry):
    fwd = forward(entry=entry, method="GET", params={"webhook_url": "https://c/h"})
    query = parse_qs(urlsplit(fwd.url).query)
    assert query["webhook_url"] == [f"{CALLBACK}?token=t0ken"]


def test_seed_compatible_entry_without_webhook_url_adds_none():
    fwd = forward(entry="internal_call", params={"x": 1})
    assert json.loads(fwd.body) == {"x": 1}


def test_v1_entry_leaves_webhook_url_alone():
    fwd = forward(entry="v1", params={"webhook_url": "https://consumer.example/hook"})
    assert json.loads(fwd.body) == {"webhook_url": "https://consumer.example/hook"}


def test_seed_compatible_body_is_sent_as_is():
    fwd = forward(
        entry="internal_call",
        params={"webhook_url": "https://c/h"},
        body={"webhook_url": "https://c/h"},
    )
    assert json.loads(fwd.body) == {"webhook_url": "https://c/h"}


# The owner's answer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "completed"),
        (201, "completed"),
        (202, "accepted"),
        (204, "completed"),
        (301, "refused"),
        (400, "refused"),
        (404, "refused"),
        (408, "retry"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_judge_response(status, verdict):
    assert judge_response(status, 10, 100) == verdict


def test_too_large_results():
    assert judge_response(200, 101, 100) == "too_large"
    assert judge_response(200, 100, 100) == "completed"
    assert judge_response(204, 0, 0) == "completed"
    # A 202's body is not the result, so its size does not matter.
    assert judge_response(202, 10**9, 100) == "accepted"
    # Neither does an error's.
    assert judge_response(500, 10**9, 100) == "retry"
    assert judge_response(404, 10**9, 100) == "refused"


@given(status=st.integers(min_value=100, max_value=599), size=st.integers(0, 10**7))
def test_judge_response_classes(status, size):
    verdict = judge_response(status, size, 1000)
    if status == 202:
        assert verdict == "accepted"
    elif 200 <= status < 300:
        assert verdict == ("too_large" if size > 1000 else "completed")
    elif status >= 500 or status in (408, 429):
        assert verdict == "retry"
    else:
        assert verdict == "refused"


@pytest.mark.parametrize(
    ("raw", "content_type", "expected"),
    [
        (b'{"a": [1, 2]}', "application/json", {"a": [1, 2]}),
        (b'{"a": 1}', "application/json; charset=utf-8", {"a": 1}),
        (b'{"title": "x"}', "application/problem+json", {"title": "x"}),
        (b"[1, 2]", "", [1, 2]),
        (b"42", "application/json", 42),
        (b"", "application/json", None),
        (b"not json", "application/json", "not json"),
        (b"not json", "", "not json"),
        (b'{"a": 1}', "text/plain", '{"a": 1}'),
        (b"<p>hi</p>", "text/html", "<p>hi</p>"),
        (b"", "text/plain", ""),
        ("héllo".encode(), "text/plain; charset=utf-8", "héllo"),
        (b"\xff\xfe", "application/octet-stream", "\ufffd\ufffd"),
        (b"\xff{", "application/json", "\ufffd{"),
    ],
)
def test_parse_result(raw, content_type, expected):
    assert parse_result(raw, content_type) == expected


def test_retry_delay_grows_and_is_capped():
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert all(isinstance(d, float) for d in delays)
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert max(delays) == 30.0
    assert retry_delay(1000) == 30.0


def test_result_digest_separates_type_and_body():
    assert result_digest("application/json", b"{}") == result_digest("application/json", b"{}")
    assert result_digest("a", b"bc") != result_digest("ab", b"c")
    assert result_digest("text/plain", b"x") != result_digest("text/plain", b"y")


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 256 + b"]" * 256,  # deeper than an event's JSON is read downstream
        b"[" * 1000 + b"]" * 1000,  # deeper than Python's parser goes
        b'"\\ud800"',  # a lone surrogate: not UTF-8
        b'{"x": "a\\u0000b"}',  # PostgreSQL's text and jsonb refuse NUL
    ],
)
def test_json_an_event_cannot_carry_is_carried_as_text(raw):
    """Such a result once failed every write of the call's outcome: the call was forwarded
    again and again until its deadline."""
    result = parse_result(raw, "application/json")
    assert isinstance(result, str)
    CallCompleted(request_id="r", via="response", result=result).model_dump_json().encode()


def test_an_async_owner_answers_at_once_a_sync_one_until_the_deadline():
    assert answer_within("async", 30.0) == 30.0
    assert answer_within("sync", 30.0) is None


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ((None, None), 100.0),  # until the deadline
        ((30.0, None), 30.0),  # an async owner's answer
        ((30.0, 10.0), 10.0),  # the operator's cap, when it is shorter
        ((None, 500.0), 100.0),  # never past the deadline
    ],
)
def test_how_long_one_forwarded_request_may_take(caps, expected):
    assert request_seconds(100.0, *caps) == expected

"""Routing decisions and the catalog routing builds from the compacted topics."""

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postback_libs.events import (
    AccountCreated,
    AccountState,
    AccountSuspended,
    ApiRegistered,
    ApiRetired,
    ApiState,
    ApiUpdated,
    CallRejected,
    CallRequested,
    CallRouted,
    new_event,
)
from postback_routing.domain import Catalog, Limits, request_size, route

pytestmark = pytest.mark.unit

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
DEFAULT_FEE = 250


def api(**over) -> ApiState:
    fields = {
        "api_id": "api_1",
        "slug": "weather",
        "owner_id": "acct_owner",
        "name": "Weather",
        "endpoint": "https://owner.example/api",
        "demo_endpoint": "https://owner.example/demo",
        "methods": ["POST", "GET"],
        "path_prefixes": ["/v1/"],
        "price": 120,
        "max_duration_seconds": 90,
        "max_request_bytes": 1000,
        "max_result_bytes": 5000,
    }
    return ApiState(**{**fields, **over})


def consumer(status="active") -> AccountState:
    return AccountState(
        account_id="acct_c",
        name="C",
        roles=["consumer"],
        status=status,
        key_id="k",
        key_hash="0" * 64,
    )


def request(**over) -> CallRequested:
    fields = {
        "request_id": "req_1",
        "consumer_id": "acct_c",
        "api": "weather",
        "mode": "production",
        "method": "POST",
        "path": "/v1/forecast",
        "params": {"city": "Oslo"},
        "body": None,
    }
    return CallRequested(**{**fields, **over})


def do_route(req=None, the_api=None, who=None, fee=DEFAULT_FEE):
    return route(
        req or request(),
        the_api if the_api is not None else api(),
        who if who is not None else consumer(),
        default_fee_bps=fee,
        now=NOW,
    )


def rejected(result, reason: str) -> CallRejected:
    assert isinstance(result, CallRejected), result
    assert result.reason == reason
    assert result.stage == "routing"
    assert result.request_id == "req_1"
    assert result.consumer_id == "acct_c"
    assert result.detail
    return result


# Rejections ---------------------------------------------------------------------------------


def test_suspended_consumer_is_rejected_before_anything_else():
    result = route(request(), None, consumer("suspended"), default_fee_bps=0, now=NOW)
    rejected(result, "account_suspended")


def test_a_suspended_owner_sells_nothing():
    owner = consumer("suspended").model_copy(update={"account_id": "acct_owner"})
    result = route(request(), api(), consumer(), default_fee_bps=0, now=NOW, owner=owner)
    rejected(result, "owner_suspended")
    active = owner.model_copy(update={"status": "active"})
    assert isinstance(
        route(request(), api(), consumer(), default_fee_bps=0, now=NOW, owner=active), CallRouted
    )


def test_unknown_consumer_is_not_rejected_for_being_unknown():
    assert isinstance(route(request(), api(), None, default_fee_bps=0, now=NOW), CallRouted)


def test_unknown_api():
    result = rejected(
        route(request(api="nope"), None, consumer(), default_fee_bps=0, now=NOW), "unknown_api"
    )
    assert result.api == "nope"
    assert "nope" in result.detail


def test_retired_api():
    result = rejected(do_route(the_api=api(status="retired")), "api_retired")
    assert result.api_id == "api_1"  # found, so named: the consumer's webhook says which


def test_a_call_naming_no_api_names_none():
    assert (
        rejected(route(request(), None, None, default_fee_bps=0, now=NOW), "unknown_api").api_id
        is None
    )


def test_demo_mode_without_demo_endpoint():
    rejected(
        do_route(request(mode="demo"), api(demo_endpoint=None)),
        "mode_not_available",
    )


def test_production_mode_does_not_need_a_demo_endpoint():
    assert isinstance(do_route(request(mode="production"), api(demo_endpoint=None)), CallRouted)


def test_method_not_allowed():
    rejected(do_route(request(method="DELETE")), "method_not_allowed")


@pytest.mark.parametrize("method", ["get", "Get", "post"])
def test_method_match_ignores_case_and_is_uppercased(method):
    result = do_route(request(method=method))
    assert isinstance(result, CallRouted)
    assert result.method == method.upper()


def test_method_match_ignores_case_of_the_catalog_too():
    assert isinstance(do_route(request(method="PUT"), api(methods=["put"])), CallRouted)


@pytest.mark.parametrize("path", ["/", "/v2/forecast", "/v1", "v1/forecast", "/V1/forecast"])
def test_path_not_allowed(path):
    rejected(do_route(request(path=path)), "path_not_allowed")


@pytest.mark.parametrize("path", ["/v1/", "/v1/forecast", "/v1/a/b?c=d"])
def test_path_under_a_prefix_is_allowed(path):
    assert isinstance(do_route(request(path=path)), CallRouted)


def test_any_of_several_prefixes():
    the_api = api(path_prefixes=["/a/", "/b/"])
    assert isinstance(do_route(request(path="/b/x"), the_api), CallRouted)
    rejected(do_route(request(path="/c/x"), the_api), "path_not_allowed")


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/%2e%2e/admin"])
def test_dot_segments_cannot_escape_the_allowed_prefix(path):
    rejected(do_route(request(path=path)), "path_not_allowed")


def test_payload_too_large_counts_params_and_body():
    req = request(params={"q": "x" * 600}, body={"b": "y" * 600})
    assert request_size(req) > 1000
    result = rejected(do_route(req), "payload_too_large")
    assert str(request_size(req)) in result.detail


def test_payload_at_the_limit_is_accepted_and_one_byte_more_is_not():
    base = request(params={}, body="")
    overhead = request_size(base)  # '[{},""]'
    exact = request(params={}, body="x" * (1000 - overhead))
    assert request_size(exact) == 1000
    assert isinstance(do_route(exact), CallRouted)
    over = request(params={}, body="x" * (1001 - overhead))
    rejected(do_route(over), "payload_too_large")


def test_a_call_dearer_than_its_max_price_is_rejected():
    result = rejected(do_route(request(max_price=119)), "price_above_max")
    assert "120" in result.detail
    assert result.api_id == "api_1"


def test_max_price_at_the_price_is_routed_and_a_demo_call_costs_nothing():
    assert isinstance(do_route(request(max_price=120)), CallRouted)
    assert isinstance(do_route(request(mode="demo", max_price=0)), CallRouted)


def test_request_size_is_compact_utf8_json():
    assert request_size(request(params={"a": 1}, body=[1, 2])) == len(b'[{"a":1},[1,2]]')


def test_checks_come_in_order():
    # Retired beats a bad mode, a bad mode beats a bad method, and so on.
    bad = request(mode="demo", method="DELETE", path="/zzz", body="x" * 5000)
    rejected(do_route(bad, api(status="retired", demo_endpoint=None)), "api_retired")
    rejected(do_route(bad, api(demo_endpoint=None)), "mode_not_available")
    rejected(do_route(bad), "method_not_allowed")
    rejected(do_route(request(path="/zzz", body="x" * 5000)), "path_not_allowed")


# Routed -------------------------------------------------------------------------------------


def test_production_call_is_routed_to_the_endpoint_at_the_api_price():
    req = request(params={"city": "Oslo"}, body={"days": 3}, entry="internal_call")
    result = do_route(req)
    assert isinstance(result, CallRouted)
    assert result.request_id == "req_1"
    assert result.consumer_id == "acct_c"
    assert result.owner_id == "acct_owner"
    assert result.api_id == "api_1"
    assert result.mode == "production"
    assert result.upstream_url == "https://owner.example/api"
    assert result.method == "POST"
    assert result.path == "/v1/forecast"
    assert result.params == {"city": "Oslo"}
    assert result.body == {"days": 3}
    assert result.price == 120
    assert result.fee_bps == DEFAULT_FEE
    assert result.deadline == NOW + timedelta(seconds=90)
    assert result.entry == "internal_call"
    assert result.max_result_bytes == 5000
    assert result.delivery_mode == "sync"


def test_demo_call_is_free_and_goes_to_the_demo_endpoint():
    result = do_route(request(mode="demo"))
    assert isinstance(result, CallRouted)
    assert result.mode == "demo"
    assert result.price == 0
    assert result.upstream_url == "https://owner.example/demo"


def test_per_api_fee_overrides_the_default():
    result = do_route(the_api=api(fee_bps=1234))
    assert isinstance(result, CallRouted)
    assert result.fee_bps == 1234


def test_zero_fee_override_is_not_the_default():
    result = do_route(the_api=api(fee_bps=0))
    assert isinstance(result, CallRouted)
    assert result.fee_bps == 0


def test_delivery_mode_comes_from_the_api():
    result = do_route(the_api=api(delivery_mode="async"))
    assert isinstance(result, CallRouted)
    assert result.delivery_mode == "async"


@given(
    seconds=st.integers(min_value=1, max_value=7 * 24 * 3600),
    price=st.integers(min_value=0, max_value=10**12),
    mode=st.sampled_from(["demo", "production"]),
)
def test_deadline_and_price_rule(seconds, price, mode):
    result = do_route(request(mode=mode), api(max_duration_seconds=seconds, price=price))
    assert isinstance(result, CallRouted)
    assert result.deadline - NOW == timedelta(seconds=seconds)
    assert result.price == (0 if mode == "demo" else price)


# Catalog ------------------------------------------------------------------------------------


def api_event(cls=ApiUpdated, **over):
    return new_event(cls(api=api(**over)), source="test")


def test_catalog_finds_by_id_and_by_slug():
    cat = Catalog()
    assert cat.find("api_1") is None
    cat.apply_api(api_event(ApiRegistered))
    assert cat.find("api_1") == api()
    assert cat.find("weather") == api()
    assert cat.find("") is None
    assert cat.find("other") is None


def test_catalog_takes_a_newer_version():
    cat = Catalog()
    cat.apply_api(api_event(ApiRegistered, version=1, price=1))
    cat.apply_api(api_event(version=2, price=2))
    assert cat.find("weather").price == 2


def test_catalog_ignores_an_older_version_replayed_after_a_newer_one():
    cat = Catalog()
    cat.apply_api(api_event(version=3, price=3, slug="weather-v3"))
    cat.apply_api(api_event(ApiRegistered, version=1, price=1))
    assert cat.find("api_1").price == 3
    assert cat.find("weather-v3").price == 3
    assert cat.find("weather") is None


def test_catalog_retirement_is_kept():
    cat = Catalog()
    cat.apply_api(api_event(ApiRegistered, version=1))
    cat.apply_api(api_event(ApiRetired, version=2, status="retired"))
    cat.apply_api(api_event(ApiUpdated, version=1))  # a late replay
    assert cat.find("weather").status == "retired"


def test_catalog_forgets_the_old_slug_on_rename():
    cat = Catalog()
    cat.apply_api(api_event(ApiRegistered, version=1, slug="weather"))
    cat.apply_api(api_event(version=2, slug="climate"))
    assert cat.find("climate").version == 2
    assert cat.find("weather") is None
    assert cat.find("api_1").slug == "climate"


def test_a_slug_passed_on_survives_a_replay_of_the_catalog_in_any_order():
    """A renamed `foo` to `bar`, then B took `foo`. A compacted catalog may still hold A's old
    state: read in any order, `foo` ends as B's."""
    events = [
        api_event(ApiRegistered, api_id="api_a", slug="foo", version=1),
        api_event(api_id="api_a", slug="bar", version=2),
        api_event(ApiRegistered, api_id="api_b", slug="foo", version=1),
    ]
    for order in itertools.permutations(events):
        cat = Catalog()
        for e in order:
            cat.apply_api(e)
        assert cat.find("foo").api_id == "api_b"
        assert cat.find("bar").api_id == "api_a"


def test_catalog_keeps_apis_apart():
    cat = Catalog()
    cat.apply_api(api_event(ApiRegistered))
    cat.apply_api(api_event(ApiRegistered, api_id="api_2", slug="tides", price=7))
    assert cat.find("tides").api_id == "api_2"
    assert cat.find("weather").api_id == "api_1"
    assert cat.find("api_2").price == 7


@given(versions=st.permutations([1, 2, 3, 4, 5]))
def test_catalog_ends_at_the_newest_version_in_any_order(versions):
    cat = Catalog()
    for v in versions:
        cat.apply_api(api_event(version=v, slug=f"s{v}", price=v))
    assert cat.find("api_1").version == 5
    assert cat.find("s5").price == 5
    # A slug of an older state was either never taken (replayed late) or forgotten on rename.
    assert [cat.find(f"s{v}") for v in (1, 2, 3, 4)] == [None] * 4
    assert set(cat.by_slug) == {"s5"}


def test_catalog_accounts():
    cat = Catalog()
    cat.apply_account(new_event(AccountCreated(account=consumer()), source="t"))
    assert cat.accounts["acct_c"].status == "active"
    cat.apply_account(new_event(AccountSuspended(account=consumer("suspended")), source="t"))
    assert cat.accounts["acct_c"].status == "suspended"
    result = route(
        request(), cat.find("weather"), cat.accounts["acct_c"], default_fee_bps=0, now=NOW
    )
    rejected(result, "account_suspended")


def test_limits_take_nothing_from_a_refused_call():
    limits = Limits()
    both = api(rate_limit_per_second=1, rate_limit_burst=2, quota_per_day=3)
    outcomes = [limits.admit("acct_c", both, NOW + timedelta(seconds=s)) for s in (0, 0, 0, 1, 2)]
    reasons = [o[0] if o else "admitted" for o in outcomes]
    # The rate-limited third call takes no quota, so the call a second later still fits it.
    assert reasons == ["admitted", "admitted", "rate_limited", "admitted", "quota_exceeded"]
    assert limits.used[("acct_c", "api_1", f"day:{NOW:%Y-%m-%d}")] == 3


def test_a_full_bucket_refilled_at_the_epoch_reads_as_a_fresh_one():
    limited = api(rate_limit_per_second=0.5, rate_limit_burst=3)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    fresh, stored = Limits(), Limits(buckets={("acct_c", "api_1"): (3.0, epoch)})
    for s in (0, 0, 0, 0, 1, 2, 5):
        at = NOW + timedelta(seconds=s)
        assert fresh.admit("acct_c", limited, at) == stored.admit("acct_c", limited, at)
    assert fresh.buckets == stored.buckets


def test_an_upstream_is_benched_after_three_failures_each_counted_once():
    from postback_routing.domain import UpstreamHealth

    health = UpstreamHealth()
    for _ in range(3):  # one failure read three times (its batch fetched again)
        health.record("https://a", ok=False, at=NOW, event_id="evt_1")
    assert health.unhealthy(NOW) == set()
    health.record("https://a", ok=False, at=NOW, event_id="evt_2")
    health.record("https://a", ok=False, at=NOW, event_id="evt_3")
    assert health.unhealthy(NOW) == {"https://a"}
    assert health.unhealthy(NOW + timedelta(seconds=31)) == set()  # tried again after
    health.record("https://a", ok=True, at=NOW, event_id="evt_4")
    assert health.unhealthy(NOW) == set()

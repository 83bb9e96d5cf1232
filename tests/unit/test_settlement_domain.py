"""Settlement rules: how a price splits and which pending transfers a reservation makes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postback_settlement.domain import (
    FEE_ACCOUNT,
    Leg,
    consumer_account,
    owner_account,
    reservation_legs,
    resolution_id,
    split,
)

pytestmark = pytest.mark.unit

prices = st.integers(min_value=0, max_value=10**15)
bps = st.integers(min_value=0, max_value=10_000)


@given(price=prices, fee_bps=bps)
def test_split_adds_up_and_the_fee_rounds_down(price, fee_bps):
    owner, fee = split(price, fee_bps)
    assert owner + fee == price
    assert 0 <= fee <= price
    assert owner >= 0
    # The fee is the largest whole unit not above price * bps / 10000.
    assert fee * 10_000 <= price * fee_bps < (fee + 1) * 10_000


@given(price=prices, a=bps, b=bps)
def test_fee_grows_with_the_rate(price, a, b):
    low, high = sorted((a, b))
    assert split(price, low)[1] <= split(price, high)[1]


@pytest.mark.parametrize(
    ("price", "fee_bps", "expected"),
    [
        (0, 500, (0, 0)),
        (100, 0, (100, 0)),
        (100, 10_000, (0, 100)),
        (100, 250, (98, 2)),  # 2.5 rounds down to 2
        (199, 100, (198, 1)),  # 1.99 rounds down to 1
        (99, 100, (99, 0)),  # 0.99 rounds down to 0
        (10_000, 1, (9_999, 1)),
    ],
)
def test_split_examples(price, fee_bps, expected):
    assert split(price, fee_bps) == expected


@given(
    price=st.integers(max_value=-1) | prices,
    fee_bps=st.integers(max_value=-1) | st.integers(min_value=10_001) | bps,
)
def test_split_rejects_bad_input(price, fee_bps):
    if price >= 0 and 0 <= fee_bps <= 10_000:
        split(price, fee_bps)
    else:
        with pytest.raises(ValueError, match="price"):
            split(price, fee_bps)


def test_accounts_are_namespaced():
    assert consumer_account("acct_1") == "consumer:acct_1"
    assert owner_account("acct_1") == "owner:acct_1"
    assert consumer_account("x") != owner_account("x")
    assert FEE_ACCOUNT not in {consumer_account("fee"), owner_account("fee")}


def test_reservation_legs_owner_share_and_fee():
    legs = reservation_legs("req_1", "acct_c", "acct_o", 1000, 250)
    assert legs == [
        Leg("req_1:reserve:owner", "consumer:acct_c", "owner:acct_o", 975),
        Leg("req_1:reserve:fee", "consumer:acct_c", FEE_ACCOUNT, 25),
    ]


def test_zero_amount_legs_are_dropped():
    assert reservation_legs("req_1", "c", "o", 0, 500) == []
    assert [leg.transfer_id for leg in reservation_legs("req_1", "c", "o", 100, 0)] == [
        "req_1:reserve:owner"
    ]
    assert [leg.transfer_id for leg in reservation_legs("req_1", "c", "o", 100, 10_000)] == [
        "req_1:reserve:fee"
    ]
    assert [leg.transfer_id for leg in reservation_legs("req_1", "c", "o", 99, 100)] == [
        "req_1:reserve:owner"
    ]


@given(price=prices, fee_bps=bps, request_id=st.text(min_size=1).map(lambda s: "req_" + s))
def test_reservation_legs_properties(price, fee_bps, request_id):
    legs = reservation_legs(request_id, "c", "o", price, fee_bps)
    assert sum(leg.amount for leg in legs) == price
    assert all(leg.amount > 0 for leg in legs)
    assert all(leg.debit == "consumer:c" for leg in legs)
    ids = [leg.transfer_id for leg in legs]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(f"{request_id}:reserve:") for i in ids)
    # Deterministic: a handler that runs twice reserves the same transfers.
    assert reservation_legs(request_id, "c", "o", price, fee_bps) == legs


def test_reservation_legs_reject_bad_prices():
    with pytest.raises(ValueError, match="price"):
        reservation_legs("req_1", "c", "o", -1, 0)


@pytest.mark.parametrize(
    ("pending", "phase", "expected"),
    [
        ("req_1:reserve:owner", "post", "req_1:post:owner"),
        ("req_1:reserve:fee", "void", "req_1:void:fee"),
        ("a:b:reserve:owner", "post", "a:b:post:owner"),  # the request id may hold colons
    ],
)
def test_resolution_id(pending, phase, expected):
    assert resolution_id(pending, phase) == expected


@given(price=prices, fee_bps=bps, phase=st.sampled_from(["post", "void"]))
def test_resolutions_of_one_reservation_are_distinct_and_phase_specific(price, fee_bps, phase):
    legs = reservation_legs("req_9", "c", "o", price, fee_bps)
    resolved = [resolution_id(leg.transfer_id, phase) for leg in legs]
    assert len(set(resolved)) == len(resolved)
    assert not set(resolved) & {leg.transfer_id for leg in legs}
    assert all(r.startswith(f"req_9:{phase}:") for r in resolved)
    other = "void" if phase == "post" else "post"
    assert not set(resolved) & {resolution_id(leg.transfer_id, other) for leg in legs}

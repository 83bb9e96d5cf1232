"""The ledger's rules without I/OWNER: the `Book` settlement applies a batch to, the low-balance
crossing, and the replay of ledger events that `postback ledger check` rebuilds balances with."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postback.ledger_check import Replay, compare
from postback_libs.events import (
    AccountCorrected,
    AccountCredited,
    TransferPosted,
    TransferReserved,
    TransferVoided,
    new_event,
)
from postback_settlement.domain import (
    FEE_ACCOUNT,
    FUNDING_ACCOUNT,
    Account,
    Authorized,
    Book,
    Corrected,
    CorrectionDenied,
    LedgerInconsistent,
    Refused,
    Reservation,
    account_kind,
    check_amount,
    low_balance_crossed,
)

pytestmark = pytest.mark.unit

CONSUMER, OWNER = "consumer:c", "owner:o"


def book(balance: int = 0, threshold: int = 0) -> Book:
    accounts = [
        Account(CONSUMER, "consumer", credits_posted=balance, floor=True),
        Account(OWNER, "owner"),
        Account(FEE_ACCOUNT, "fee"),
        Account(FUNDING_ACCOUNT, "funding", debits_posted=balance),
    ]
    return Book.of(accounts, low_balance_threshold=threshold)


def test_a_reservation_holds_the_price_then_posts_it_split_between_owner_and_fee():
    b = book(100)
    result = b.reserve("r1", "c", "o", 40, 2500, api_id="api_1")
    assert isinstance(result, Authorized)
    assert [(t.id, t.credit, t.amount, t.kind) for t in result.transfers] == [
        ("r1:reserve:owner", OWNER, 30, "pending"),
        ("r1:reserve:fee", FEE_ACCOUNT, 10, "pending"),
    ]
    assert all(t.api_id == "api_1" for t in result.transfers)
    assert (b.accounts[CONSUMER].available, b.accounts[CONSUMER].balance) == (60, 100)
    resolved = b.resolve("r1", "post")
    assert resolved is not None
    assert [(t.pending_id, t.id, t.kind) for t in resolved.transfers] == [
        ("r1:reserve:owner", "r1:post:owner", "post"),
        ("r1:reserve:fee", "r1:post:fee", "post"),
    ]
    assert (b.accounts[CONSUMER].balance, b.accounts[CONSUMER].debits_pending) == (60, 0)
    assert (b.accounts[OWNER].balance, b.accounts[FEE_ACCOUNT].balance) == (30, 10)
    assert b.resolve("r1", "post") is None  # captured once
    assert b.resolve("r1", "void") is None  # and never released after
    assert b.created == ["r1"] and b.resolved == []


def test_a_void_releases_the_hold_and_moves_nothing():
    b = Book.of(
        [
            Account(CONSUMER, "consumer", credits_posted=50, debits_pending=20, floor=True),
            Account(OWNER, "owner", credits_pending=18),
            Account(FEE_ACCOUNT, "fee", credits_pending=2),
        ],
        [Reservation("r1", "c", "o", 20, 2)],
    )
    resolved = b.resolve("r1", "void")
    assert resolved is not None
    assert {t.id for t in resolved.transfers} == {"r1:void:owner", "r1:void:fee"}
    assert (b.accounts[CONSUMER].balance, b.accounts[CONSUMER].available) == (50, 50)
    assert b.accounts[OWNER].credits_pending == b.accounts[OWNER].balance == 0
    assert b.resolved == ["r1"]  # a stored reservation: its row is updated, not inserted


def test_a_consumer_cannot_reserve_more_than_it_has():
    b = book(30)
    assert b.reserve("r1", "c", "o", 20, 0) is not None
    refused = b.reserve("r2", "c", "o", 11, 0)
    assert refused == Refused(available=10)
    assert b.reserve("r3", "c", "o", 10, 0) is not None
    assert b.accounts[CONSUMER].available == 0
    assert b.reserve("r1", "c", "o", 20, 0) is None  # reserved already: nothing twice
    assert "r2" not in b.reservations


def test_a_free_call_is_authorized_with_no_transfer():
    b = book(0)
    result = b.reserve("r1", "c", "o", 0, 1000)
    assert isinstance(result, Authorized) and result.transfers == []
    resolved = b.resolve("r1", "post")
    assert resolved is not None and resolved.transfers == []


def test_credits_and_corrections_are_transfers_applied_once():
    b = book(0)
    credited = b.credit("cr1", CONSUMER, 70)
    assert credited is not None and credited.balance == 70
    assert credited.transfer.id == "credit:cr1"
    assert b.credit("cr1", CONSUMER, 70) is None
    down = b.correct("k1", CONSUMER, -30)
    assert isinstance(down, Corrected)
    assert (down.transfer.debit, down.transfer.credit, down.transfer.amount) == (
        CONSUMER,
        FUNDING_ACCOUNT,
        30,
    )
    assert b.correct("k1", CONSUMER, -30) is None
    assert b.correct("k2", CONSUMER, -41) == CorrectionDenied("insufficient_funds", 40)
    assert b.correct("k3", CONSUMER, 0) == CorrectionDenied("invalid_amount", 40)
    up = b.correct("k4", CONSUMER, 5)
    assert isinstance(up, Corrected) and up.balance == 45
    assert b.accounts[FUNDING_ACCOUNT].balance == -45


def test_a_correction_counts_what_is_held_for_calls_in_flight():
    b = book(50)
    b.reserve("r1", "c", "o", 30, 0)
    assert b.correct("k1", CONSUMER, -21) == CorrectionDenied("insufficient_funds", 20)
    assert isinstance(b.correct("k2", CONSUMER, -20), Corrected)
    assert b.accounts[CONSUMER].available == 0


def test_an_existing_transfer_whose_cause_is_unapplied_is_a_contradiction():
    b = Book.of(
        [Account(CONSUMER, "consumer", floor=True), Account(FUNDING_ACCOUNT, "funding")],
        existing_transfers={"r1:reserve:owner"},
    )
    assert b.credit("cr1", CONSUMER, 10) is not None
    b2 = book(100)
    b2.existing_transfers.add("r1:reserve:owner")
    with pytest.raises(LedgerInconsistent):
        b2.reserve("r1", "c", "o", 10, 0)


def test_balance_low_fires_once_until_money_added_lifts_the_balance_back():
    b = book(100, threshold=50)

    def low(rid: str, price: int = 20) -> int | None:
        result = b.reserve(rid, "c", "o", price, 0)
        assert isinstance(result, Authorized)
        return result.low

    assert [low(r) for r in ("r1", "r2", "r3", "r4")] == [None, None, 40, None]  # 40 crossed
    b.resolve("r3", "void")
    b.resolve("r4", "void")  # back to 60 by refunds alone
    assert low("r5") is None  # 40: crossed again, but no money came in since the warning
    b.resolve("r5", "void")  # 60
    assert b.credit("cr1", CONSUMER, 5) is not None  # 65: re-armed
    assert low("r6") == 45
    assert low("r7", 30) is None  # 15
    # A top-up while a call holds money re-arms it, though it leaves the balance below.
    assert b.credit("cr2", CONSUMER, 10) is not None  # 25
    b.resolve("r7", "void")  # 55
    assert low("r8", 10) == 45
    b.resolve("r8", "void")  # 55
    assert low("r9", 10) is None  # 45: told already
    corrected = b.correct("cor1", CONSUMER, 10)  # 55: money added, re-armed
    assert isinstance(corrected, Corrected) and corrected.low is None
    assert low("r10", 10) == 45


@given(before=st.integers(-100, 100), after=st.integers(-100, 100), threshold=st.integers(0, 100))
def test_low_balance_crossing(before, after, threshold):
    crossed = low_balance_crossed(before, after, threshold)
    assert crossed == (threshold > 0 and before >= threshold and after < threshold)


def test_accounts_are_typed_by_their_name_and_amounts_bounded():
    assert account_kind("consumer:x") == "consumer"
    assert account_kind("owner:x") == "owner"
    assert account_kind(FEE_ACCOUNT) == "fee"
    assert account_kind(FUNDING_ACCOUNT) == "funding"
    with pytest.raises(ValueError, match="ledger account"):
        account_kind("bank:x")
    check_amount(2**63 - 1)
    with pytest.raises(ValueError, match="int64"):
        check_amount(2**63)


# A random life of a small ledger: whatever happens, the rules hold.
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("reserve"), st.integers(0, 5), st.integers(0, 50), st.integers(0, 10_000)
        ),
        st.tuples(st.sampled_from(["post", "void"]), st.integers(0, 5)),
        st.tuples(st.just("credit"), st.integers(0, 3), st.integers(1, 60)),
        st.tuples(st.just("correct"), st.integers(0, 3), st.integers(-60, 60)),
    ),
    max_size=60,
)


@given(ops=ops)
def test_every_sequence_keeps_the_ledger_balanced_and_no_consumer_below_zero(ops):
    b = book(0)
    for op in ops:
        if op[0] == "reserve":
            b.reserve(f"r{op[1]}", "c", "o", op[2], op[3])
        elif op[0] in ("post", "void"):
            b.resolve(f"r{op[1]}", op[0])
        elif op[0] == "credit":
            b.credit(f"cr{op[1]}", CONSUMER, op[2])
        else:
            b.correct(f"k{op[1]}", CONSUMER, op[2])
        accounts = b.accounts.values()
        assert sum(a.balance for a in accounts) == 0
        assert sum(a.credits_pending - a.debits_pending for a in accounts) == 0
        assert b.accounts[CONSUMER].available >= 0
        open_ = [
            t
            for t in b.transfers
            if t.kind == "pending"
            and not any(r.pending_id == t.id for r in b.transfers if r.pending_id)
        ]
        assert b.accounts[CONSUMER].debits_pending == sum(t.amount for t in open_)
        resolutions = [t.pending_id for t in b.transfers if t.pending_id]
        assert len(resolutions) == len(set(resolutions))
        ids = [t.id for t in b.transfers]
        assert len(ids) == len(set(ids))


def test_the_replay_counts_each_transfer_once_in_any_order():
    reserved = TransferReserved(
        transfer_id="r:reserve:owner",
        request_id="r",
        debit_account=CONSUMER,
        credit_account=OWNER,
        amount=9,
    )
    posted = TransferPosted(
        transfer_id="r:post:owner",
        pending_id="r:reserve:owner",
        request_id="r",
        debit_account=CONSUMER,
        credit_account=OWNER,
        amount=9,
    )
    held = TransferReserved(
        transfer_id="q:reserve:owner",
        request_id="q",
        debit_account=CONSUMER,
        credit_account=OWNER,
        amount=4,
    )
    voided = TransferVoided(
        transfer_id="p:void:owner",
        pending_id="p:reserve:owner",
        request_id="p",
        debit_account=CONSUMER,
        credit_account=OWNER,
        amount=5,
    )
    released = TransferReserved(
        transfer_id="p:reserve:owner",
        request_id="p",
        debit_account=CONSUMER,
        credit_account=OWNER,
        amount=5,
    )
    credited = AccountCredited(credit_id="cr", account_id="c", amount=100, balance=100)
    corrected = AccountCorrected(
        correction_id="k",
        transfer_id="correction:k",
        account_id="c",
        debit_account=CONSUMER,
        credit_account=FUNDING_ACCOUNT,
        amount=-10,
        balance=81,
    )
    events = [new_event(e, source="settlement") for e in (posted, reserved, held, voided, released)]
    events += [new_event(credited, source="settlement"), new_event(corrected, source="settlement")]
    replay = Replay()
    for e in events + events[:3]:  # a relay that published some twice
        replay.add(e)
    totals = replay.totals()
    assert totals[CONSUMER] == (4, 9 + 10, 0, 100)
    assert totals[OWNER] == (0, 0, 4, 9)
    assert totals[FUNDING_ACCOUNT] == (0, 100, 0, 10)
    assert replay.conflicts == []
    assert compare(totals, replay) == []
    off = {**totals, CONSUMER: (4, 9 + 10, 0, 101)}
    [violation] = compare(off, replay)
    assert violation.invariant == "replaying the ledger topic gives the same balances"
    assert CONSUMER in violation.detail

    tampered = new_event(
        TransferReserved(
            transfer_id="q:reserve:owner",
            request_id="q",
            debit_account=CONSUMER,
            credit_account=OWNER,
            amount=40,
        ),
        source="settlement",
        at=datetime.now(UTC),
    )
    replay.add(tampered)
    assert replay.conflicts and "q:reserve:owner" in replay.conflicts[0].detail

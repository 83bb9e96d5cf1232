"""Settlement rules, free of I/O: how a price splits, which transfers each phase makes, and a
`Book` that applies them to a slice of the ledger on TigerBeetle's model.

Transfers are immutable and carry ids derived from what caused them (request id and phase,
credit id, correction id), so a cause applied twice finds its transfer already there and moves
no money. A two-phase transfer is `pending`, then resolved exactly once by a `post` or a `void`.
A consumer account's debits (posted and pending) never exceed its credits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

FEE_ACCOUNT = "platform:fee"
FUNDING_ACCOUNT = "operator:funding"
# Amounts are Postgres bigints; anything larger is a poison event, not a ledger decision.
MAX_AMOUNT = 2**63 - 1

TransferKind = Literal["single", "pending", "post", "void"]
Phase = Literal["post", "void"]
ReservationState = Literal["reserved", "posted", "voided"]
AccountKind = Literal["consumer", "owner", "fee", "funding"]


class LedgerInconsistent(RuntimeError):
    """The stored ledger contradicts itself; applying anything on top of it would be wrong."""


def consumer_account(account_id: str) -> str:
    return f"consumer:{account_id}"


def owner_account(account_id: str) -> str:
    return f"owner:{account_id}"


def account_kind(ledger_account: str) -> AccountKind:
    if ledger_account == FEE_ACCOUNT:
        return "fee"
    if ledger_account == FUNDING_ACCOUNT:
        return "funding"
    prefix = ledger_account.split(":", 1)[0]
    if prefix == "consumer":
        return "consumer"
    if prefix == "owner":
        return "owner"
    raise ValueError(f"not a ledger account: {ledger_account!r}")


def check_amount(amount: int, what: str = "amount") -> None:
    if not -MAX_AMOUNT <= amount <= MAX_AMOUNT:
        raise ValueError(f"{what} {amount} is out of the ledger's int64 range")


def split(price: int, fee_bps: int) -> tuple[int, int]:
    """(owner's share, platform fee) of a price; the fee rounds down, so the owner never loses
    a unit to rounding and the two always add up to the price."""
    if price < 0 or not 0 <= fee_bps <= 10_000:
        raise ValueError("price must be >= 0 and fee_bps within 0..10000")
    fee = price * fee_bps // 10_000
    return price - fee, fee


class Leg(NamedTuple):
    """One pending transfer of a reservation."""

    transfer_id: str
    debit: str
    credit: str
    amount: int


def _legs(
    request_id: str, consumer_id: str, owner_id: str, owner_share: int, fee: int
) -> list[Leg]:
    legs = [
        Leg(
            f"{request_id}:reserve:owner",
            consumer_account(consumer_id),
            owner_account(owner_id),
            owner_share,
        ),
        Leg(f"{request_id}:reserve:fee", consumer_account(consumer_id), FEE_ACCOUNT, fee),
    ]
    return [leg for leg in legs if leg.amount > 0]


def reservation_legs(
    request_id: str, consumer_id: str, owner_id: str, price: int, fee_bps: int
) -> list[Leg]:
    owner_share, fee = split(price, fee_bps)
    return _legs(request_id, consumer_id, owner_id, owner_share, fee)


def resolution_id(pending_id: str, phase: str) -> str:
    """`req:reserve:owner` resolved by `post` is `req:post:owner`."""
    request_id, _, leg = pending_id.rsplit(":", 2)
    return f"{request_id}:{phase}:{leg}"


def low_balance_crossed(before: int, after: int, threshold: int) -> bool:
    """Whether a change took a balance from at or above the threshold to below it: the one
    moment to warn, so a consumer hears it once, not on every call below it."""
    return threshold > 0 and before >= threshold > after


@dataclass
class Account:
    id: str
    kind: AccountKind
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    # TigerBeetle's `debits_must_not_exceed_credits`: set on consumer accounts.
    floor: bool = False
    # Told of a low balance since money was last added: a refunded call that lifts the balance
    # back over the threshold must not make the next call warn again; a credit re-arms it.
    low_balance_warned: bool = False

    @property
    def balance(self) -> int:
        """Posted balance."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """What the account can still spend: posted balance less its reservations."""
        return self.balance - self.debits_pending


# Tuples rather than frozen dataclasses: a batch makes thousands, and they are values.
class Transfer(NamedTuple):
    id: str
    debit: str
    credit: str
    amount: int
    kind: TransferKind
    pending_id: str | None = None
    request_id: str | None = None
    api_id: str | None = None


@dataclass
class Reservation:
    """What settlement knows of a call it authorized."""

    request_id: str
    consumer_id: str
    owner_id: str
    amount: int
    fee: int
    state: ReservationState = "reserved"
    api_id: str | None = None
    deadline: datetime | None = None

    def legs(self) -> list[Leg]:
        return _legs(
            self.request_id, self.consumer_id, self.owner_id, self.amount - self.fee, self.fee
        )

    def accounts(self) -> list[str]:
        return [consumer_account(self.consumer_id), owner_account(self.owner_id), FEE_ACCOUNT]


@dataclass(frozen=True)
class Authorized:
    reservation: Reservation
    transfers: list[Transfer]
    low: int | None  # the available balance, when this reservation took it below the threshold


@dataclass(frozen=True)
class Refused:
    available: int


@dataclass(frozen=True)
class Resolved:
    reservation: Reservation
    transfers: list[Transfer]  # each resolves the pending transfer its `pending_id` names


@dataclass(frozen=True)
class Credited:
    transfer: Transfer
    balance: int


@dataclass(frozen=True)
class Corrected:
    transfer: Transfer
    balance: int
    low: int | None


@dataclass(frozen=True)
class CorrectionDenied:
    reason: Literal["insufficient_funds", "invalid_amount"]
    available: int


def credit_transfer_id(credit_id: str) -> str:
    return f"credit:{credit_id}"


def correction_transfer_id(correction_id: str) -> str:
    return f"correction:{correction_id}"


@dataclass
class Book:
    """A slice of the ledger in memory — the accounts, reservations and transfer ids a batch of
    events touches — to which operations apply in order. What changed is then written back in
    a few statements. The caller must hold the rows (locked) for as long as the book lives."""

    accounts: dict[str, Account]
    reservations: dict[str, Reservation]
    existing_transfers: set[str] = field(default_factory=set)
    low_balance_threshold: int = 0
    transfers: list[Transfer] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # reservations new in this book
    resolved: list[str] = field(default_factory=list)  # stored reservations resolved here
    touched: set[str] = field(default_factory=set)
    _new: set[str] = field(default_factory=set)  # `created`, for lookups

    @classmethod
    def of(
        cls,
        accounts: Iterable[Account],
        reservations: Iterable[Reservation] = (),
        existing_transfers: Iterable[str] = (),
        low_balance_threshold: int = 0,
    ) -> Book:
        return cls(
            {a.id: a for a in accounts},
            {r.request_id: r for r in reservations},
            set(existing_transfers),
            low_balance_threshold,
        )

    # --- operations --------------------------------------------------------------------------

    def reserve(
        self,
        request_id: str,
        consumer_id: str,
        owner_id: str,
        price: int,
        fee_bps: int,
        *,
        api_id: str | None = None,
        deadline: datetime | None = None,
    ) -> Authorized | Refused | None:
        """Hold the price on the consumer's balance as pending transfers to the owner and the
        platform fee; None if this call was reserved already."""
        if request_id in self.reservations:
            return None
        check_amount(price, "price")
        _, fee = split(price, fee_bps)
        consumer = self.accounts[consumer_account(consumer_id)]
        before = consumer.available
        if consumer.floor and before < price:
            return Refused(before)
        reservation = Reservation(
            request_id, consumer_id, owner_id, price, fee, api_id=api_id, deadline=deadline
        )
        transfers = [
            Transfer(
                leg.transfer_id,
                leg.debit,
                leg.credit,
                leg.amount,
                "pending",
                None,
                request_id,
                api_id,
            )
            for leg in reservation.legs()
        ]
        for t in transfers:
            self._apply(t)
        self.reservations[request_id] = reservation
        self.created.append(request_id)
        self._new.add(request_id)
        return Authorized(reservation, transfers, self._low(consumer, before))

    def resolve(self, request_id: str, phase: Phase) -> Resolved | None:
        """Post (capture) or void (release) every pending transfer of a reservation; None if the
        call holds no reservation (never authorized, or resolved already)."""
        r = self.reservations.get(request_id)
        if r is None or r.state != "reserved":
            return None
        resolutions = []
        for leg in r.legs():
            resolution = Transfer(
                resolution_id(leg.transfer_id, phase),
                leg.debit,
                leg.credit,
                leg.amount,
                phase,
                leg.transfer_id,
                request_id,
                r.api_id,
            )
            self._apply(resolution)
            resolutions.append(resolution)
        r.state = "posted" if phase == "post" else "voided"
        if request_id not in self._new:
            self.resolved.append(request_id)
        return Resolved(r, resolutions)

    def credit(self, credit_id: str, account: str, amount: int) -> Credited | None:
        """Fund an account from operator funding; None if this credit was applied already."""
        tid = credit_transfer_id(credit_id)
        if tid in self.existing_transfers:
            return None
        check_amount(amount)
        if amount <= 0:
            raise ValueError(f"a credit must be positive, not {amount}")
        t = Transfer(tid, FUNDING_ACCOUNT, account, amount, "single")
        self._apply(t)
        self.accounts[account].low_balance_warned = False  # money added: warn again
        return Credited(t, self.accounts[account].balance)

    def correct(
        self, correction_id: str, account: str, amount: int
    ) -> Corrected | CorrectionDenied | None:
        """Move a signed amount between operator funding and an account, as a new transfer.
        Refused when it would take the account's available balance below zero: a correction
        fixes a balance, it never creates a debt. None if applied already."""
        tid = correction_transfer_id(correction_id)
        if tid in self.existing_transfers:
            return None
        check_amount(amount)
        target = self.accounts[account]
        before = target.available
        if amount == 0:
            return CorrectionDenied("invalid_amount", before)
        if amount > 0:
            t = Transfer(tid, FUNDING_ACCOUNT, account, amount, "single")
        else:
            if before < -amount:
                return CorrectionDenied("insufficient_funds", before)
            t = Transfer(tid, account, FUNDING_ACCOUNT, -amount, "single")
        self._apply(t)
        if amount > 0:
            target.low_balance_warned = False  # money added: warn again
        return Corrected(t, target.balance, self._low(target, before))

    # --- mechanics ---------------------------------------------------------------------------

    def _low(self, account: Account, before: int) -> int | None:
        """The balance to warn of at a crossing, once until money is added."""
        after = account.available
        if (
            account.kind != "consumer"
            or account.low_balance_warned
            or not low_balance_crossed(before, after, self.low_balance_threshold)
        ):
            return None
        account.low_balance_warned = True
        return after

    def _apply(self, t: Transfer) -> None:
        if t.id in self.existing_transfers:
            raise LedgerInconsistent(f"transfer {t.id} exists but its cause was not applied")
        d, c = self.accounts[t.debit], self.accounts[t.credit]
        a = t.amount
        if t.kind == "pending":
            d.debits_pending += a
            c.credits_pending += a
        elif t.kind == "post":
            d.debits_pending -= a
            d.debits_posted += a
            c.credits_pending -= a
            c.credits_posted += a
        elif t.kind == "void":
            d.debits_pending -= a
            c.credits_pending -= a
        else:
            d.debits_posted += a
            c.credits_posted += a
        for acct in (d, c):
            if min(acct.debits_pending, acct.credits_pending) < 0:
                raise LedgerInconsistent(f"{acct.id}: resolving more than was pending")
            if acct.floor and acct.debits_posted + acct.debits_pending > acct.credits_posted:
                raise LedgerInconsistent(f"{acct.id}: debits would exceed credits")
        self.transfers.append(t)
        self.existing_transfers.add(t.id)
        self.touched.update((d.id, c.id))

"""Settlement rules, free of I/O: how a price splits, and which transfers each phase makes."""

from __future__ import annotations

from dataclasses import dataclass

FEE_ACCOUNT = "platform:fee"
FUNDING_ACCOUNT = "operator:funding"


def consumer_account(account_id: str) -> str:
    return f"consumer:{account_id}"


def owner_account(account_id: str) -> str:
    return f"owner:{account_id}"


def split(price: int, fee_bps: int) -> tuple[int, int]:
    """(owner's share, platform fee) of a price; the fee rounds down, so the owner never loses
    a unit to rounding and the two always add up to the price."""
    if price < 0 or not 0 <= fee_bps <= 10_000:
        raise ValueError("price must be >= 0 and fee_bps within 0..10000")
    fee = price * fee_bps // 10_000
    return price - fee, fee


@dataclass(frozen=True)
class Leg:
    """One pending transfer of a reservation."""

    transfer_id: str
    debit: str
    credit: str
    amount: int


def reservation_legs(
    request_id: str, consumer_id: str, owner_id: str, price: int, fee_bps: int
) -> list[Leg]:
    owner_share, fee = split(price, fee_bps)
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


def resolution_id(pending_id: str, phase: str) -> str:
    """`req:reserve:owner` resolved by `post` is `req:post:owner`."""
    request_id, _, leg = pending_id.rsplit(":", 2)
    return f"{request_id}:{phase}:{leg}"

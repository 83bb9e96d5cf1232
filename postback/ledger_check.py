"""`postback ledger check`: every invariant of settlement's ledger, checked against its tables
and against the `postback.ledger` topic, naming what is wrong.

The tables: all balances sum to zero; no consumer is below zero; each account's pending and
posted totals equal the sums of its transfers; a pending transfer is resolved at most once, by a
transfer that matches it; reservations agree with their transfers; no reservation is left
`reserved` past its call's deadline plus a margin. The topic: replaying its transfer, credit and
correction events gives every account the same totals, so the ledger can be rebuilt from it.

Reading a live system, the topic may hold movements newer than the tables just read; a mismatch
with the topic is therefore checked again (`attempts`) before it counts.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import ConsumerRecord

from postback_libs.events import LEDGER, CloudEvent
from postback_libs.settings import Settings
from postback_libs.topics import read_whole_topic
from postback_settlement.domain import FEE_ACCOUNT

Totals = tuple[int, int, int, int]  # debits_pending, debits_posted, credits_pending, credits_posted
SCHEMA = "settlement"


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    accounts: int = 0
    transfers: int = 0
    open_reservations: int = 0
    topic_events: int | None = None

    @property
    def ok(self) -> bool:
        return not self.violations


# --- the tables --------------------------------------------------------------------------------

_SUMS = """
SELECT coalesce(sum(credits_posted - debits_posted), 0) AS posted,
       coalesce(sum(credits_pending - debits_pending), 0) AS pending,
       count(*) AS accounts
FROM {s}.accounts
"""
_OVERDRAWN = """
SELECT id, credits_posted - debits_posted - debits_pending AS available,
       debits_must_not_exceed_credits AS floor
FROM {s}.accounts
WHERE kind = 'consumer'
  AND (NOT debits_must_not_exceed_credits OR credits_posted - debits_posted - debits_pending < 0)
ORDER BY id LIMIT 1
"""
# What each account's totals must be, from its transfers alone.
_FROM_TRANSFERS = """
WITH t AS (
    SELECT t.debit_account, t.credit_account, t.amount,
           t.kind IN ('single', 'post') AS posted,
           t.kind = 'pending'
             AND NOT EXISTS (SELECT 1 FROM {s}.transfers r WHERE r.pending_id = t.id) AS open
    FROM {s}.transfers t
), sides AS (
    SELECT debit_account AS id, CASE WHEN open THEN amount ELSE 0 END AS dp,
           CASE WHEN posted THEN amount ELSE 0 END AS dpo, 0 AS cp, 0 AS cpo FROM t
    UNION ALL
    SELECT credit_account, 0, 0, CASE WHEN open THEN amount ELSE 0 END,
           CASE WHEN posted THEN amount ELSE 0 END FROM t
), expected AS (
    SELECT id, sum(dp) AS dp, sum(dpo) AS dpo, sum(cp) AS cp, sum(cpo) AS cpo
    FROM sides GROUP BY id
)
SELECT coalesce(a.id, e.id) AS id,
       coalesce(a.debits_pending, 0) AS dp, coalesce(e.dp, 0) AS want_dp,
       coalesce(a.debits_posted, 0) AS dpo, coalesce(e.dpo, 0) AS want_dpo,
       coalesce(a.credits_pending, 0) AS cp, coalesce(e.cp, 0) AS want_cp,
       coalesce(a.credits_posted, 0) AS cpo, coalesce(e.cpo, 0) AS want_cpo
FROM {s}.accounts a FULL JOIN expected e ON e.id = a.id
WHERE coalesce(a.debits_pending, 0) <> coalesce(e.dp, 0)
   OR coalesce(a.credits_pending, 0) <> coalesce(e.cp, 0)
   OR coalesce(a.debits_posted, 0) <> coalesce(e.dpo, 0)
   OR coalesce(a.credits_posted, 0) <> coalesce(e.cpo, 0)
ORDER BY 1 LIMIT 1
"""
_RESOLVED_TWICE = """
SELECT pending_id, count(*) AS n FROM {s}.transfers WHERE pending_id IS NOT NULL
GROUP BY pending_id HAVING count(*) > 1 ORDER BY pending_id LIMIT 1
"""
_BAD_RESOLUTION = """
SELECT r.id, r.pending_id, p.kind AS pending_kind FROM {s}.transfers r
LEFT JOIN {s}.transfers p ON p.id = r.pending_id
WHERE r.pending_id IS NOT NULL
  AND (p.id IS NULL OR p.kind <> 'pending' OR p.debit_account <> r.debit_account
       OR p.credit_account <> r.credit_account OR p.amount <> r.amount)
ORDER BY r.id LIMIT 1
"""
_RESERVATIONS_VS_TRANSFERS = """
WITH legs AS (
    SELECT r.request_id, r.state, r.amount,
           coalesce(sum(p.amount), 0) AS held, count(p.id) AS legs,
           count(x.id) FILTER (WHERE x.kind = 'post') AS posts,
           count(x.id) FILTER (WHERE x.kind = 'void') AS voids
    FROM {s}.reservations r
    LEFT JOIN {s}.transfers p ON p.request_id = r.request_id AND p.kind = 'pending'
    LEFT JOIN {s}.transfers x ON x.pending_id = p.id
    GROUP BY r.request_id, r.state, r.amount
)
SELECT * FROM legs
WHERE held <> amount
   OR (state = 'reserved' AND posts + voids > 0)
   OR (state = 'posted' AND (posts <> legs OR voids > 0))
   OR (state = 'voided' AND (voids <> legs OR posts > 0))
ORDER BY request_id LIMIT 1
"""
# Each leg of a reservation debits its consumer and credits its owner (the price less the fee)
# or the platform (the fee): a resolution re-derives the legs from the reservation.
_WRONG_LEGS = """
SELECT r.request_id, p.id, p.debit_account, p.credit_account, p.amount
FROM {s}.reservations r JOIN {s}.transfers p ON p.request_id = r.request_id AND p.kind = 'pending'
WHERE p.debit_account <> 'consumer:' || r.consumer_id
   OR p.credit_account NOT IN ('owner:' || r.owner_id, $1)
   OR (p.credit_account = $1 AND p.amount <> r.fee)
   OR (p.credit_account = 'owner:' || r.owner_id AND p.amount <> r.amount - r.fee)
ORDER BY r.request_id LIMIT 1
"""
# Only operator funding gives more than it got; owners and the platform are paid, never in debt.
_NEGATIVE = """
SELECT id, credits_posted - debits_posted AS balance FROM {s}.accounts
WHERE kind IN ('owner', 'fee') AND credits_posted - debits_posted < 0
ORDER BY id LIMIT 1
"""
_ORPHAN_PENDING = """
SELECT p.id FROM {s}.transfers p
WHERE p.kind = 'pending'
  AND NOT EXISTS (SELECT 1 FROM {s}.reservations r WHERE r.request_id = p.request_id)
ORDER BY p.id LIMIT 1
"""
_STALE_RESERVATION = """
SELECT request_id, coalesce(deadline, created_at + $2::interval) AS due
FROM {s}.reservations
WHERE state = 'reserved' AND coalesce(deadline, created_at + $2::interval) + $1::interval < now()
ORDER BY due LIMIT 1
"""


async def check_tables(
    conn: Any,
    *,
    margin: timedelta,
    default_duration: timedelta = timedelta(seconds=300),
    schema: str = SCHEMA,
    report: Report | None = None,
) -> list[Violation]:
    """Every invariant of the ledger's tables, in one consistent snapshot if `conn` is in a
    repeatable-read transaction; the violations found, at most one per invariant."""
    s = f'"{schema}"'
    out: list[Violation] = []

    def q(sql: str) -> str:
        return sql.format(s=s)

    sums = await conn.fetchrow(q(_SUMS))
    if sums["posted"] != 0:
        out.append(Violation("balances sum to zero", f"posted balances sum to {sums['posted']}"))
    if sums["pending"] != 0:
        out.append(
            Violation(
                "balances sum to zero",
                f"pending credits exceed pending debits by {sums['pending']}",
            )
        )
    row = await conn.fetchrow(q(_OVERDRAWN))
    if row is not None:
        detail = (
            f"{row['id']} has {row['available']} available"
            if row["floor"]
            else f"{row['id']} is not protected by debits_must_not_exceed_credits"
        )
        out.append(Violation("no consumer below zero", detail))
    row = await conn.fetchrow(q(_FROM_TRANSFERS))
    if row is not None:
        pending = (row["dp"], row["cp"]) != (row["want_dp"], row["want_cp"])
        out.append(
            Violation(
                "pending totals equal unresolved pending transfers"
                if pending
                else "posted totals equal the sums of their transfers",
                f"{row['id']}: debits_pending {row['dp']} (transfers say {row['want_dp']}), "
                f"credits_pending {row['cp']} ({row['want_cp']}), debits_posted {row['dpo']} "
                f"({row['want_dpo']}), credits_posted {row['cpo']} ({row['want_cpo']})",
            )
        )
    row = await conn.fetchrow(q(_RESOLVED_TWICE))
    if row is not None:
        out.append(
            Violation(
                "a pending transfer is resolved at most once",
                f"{row['pending_id']} resolved {row['n']} times",
            )
        )
    row = await conn.fetchrow(q(_BAD_RESOLUTION))
    if row is not None:
        out.append(
            Violation(
                "a resolution matches its pending transfer",
                f"{row['id']} resolves {row['pending_id']} ({row['pending_kind'] or 'missing'})",
            )
        )
    row = await conn.fetchrow(q(_RESERVATIONS_VS_TRANSFERS))
    if row is not None:
        out.append(
            Violation(
                "reservations agree with their transfers",
                f"{row['request_id']} is {row['state']} for {row['amount']} but holds "
                f"{row['held']} in {row['legs']} legs ({row['posts']} posted, "
                f"{row['voids']} voided)",
            )
        )
    row = await conn.fetchrow(q(_WRONG_LEGS), FEE_ACCOUNT)
    if row is not None:
        out.append(
            Violation(
                "a reservation's legs go from its consumer to its owner and the platform",
                f"{row['request_id']}: {row['id']} moves {row['amount']} from "
                f"{row['debit_account']} to {row['credit_account']}",
            )
        )
    row = await conn.fetchrow(q(_NEGATIVE))
    if row is not None:
        out.append(
            Violation("no owner or platform balance below zero", f"{row['id']}: {row['balance']}")
        )
    row = await conn.fetchrow(q(_ORPHAN_PENDING))
    if row is not None:
        out.append(
            Violation("reservations agree with their transfers", f"{row['id']} has no reservation")
        )
    row = await conn.fetchrow(q(_STALE_RESERVATION), margin, default_duration)
    if row is not None:
        out.append(
            Violation(
                "no reservation left reserved past its deadline",
                f"{row['request_id']} was due at {row['due'].isoformat()}, still reserved after "
                f"a margin of {margin.total_seconds():.0f} s",
            )
        )
    if report is not None:
        report.accounts = sums["accounts"]
        report.transfers = await conn.fetchval(q("SELECT count(*) FROM {s}.transfers"))
        report.open_reservations = await conn.fetchval(
            q("SELECT count(*) FROM {s}.reservations WHERE state = 'reserved'")
        )
    return out


# --- the topic ---------------------------------------------------------------------------------


@dataclass
class Replay:
    """Account totals rebuilt from ledger events, each transfer counted once by its id."""

    transfers: dict[str, tuple[str, str, int, str, str | None]] = field(default_factory=dict)
    conflicts: list[Violation] = field(default_factory=list)
    events: int = 0

    def add(self, e: CloudEvent) -> None:
        d = e.data
        if e.type == "transfer.reserved":
            t = (d["debit_account"], d["credit_account"], d["amount"], "pending", None)
            tid = d["transfer_id"]
        elif e.type in ("transfer.posted", "transfer.voided"):
            kind = "post" if e.type == "transfer.posted" else "void"
            t = (d["debit_account"], d["credit_account"], d["amount"], kind, d["pending_id"])
            tid = d["transfer_id"]
        elif e.type == "account.credited":
            tid = f"credit:{d['credit_id']}"
            t = ("operator:funding", f"consumer:{d['account_id']}", d["amount"], "single", None)
        elif e.type == "account.corrected":
            tid = d["transfer_id"]
            t = (d["debit_account"], d["credit_account"], abs(d["amount"]), "single", None)
        else:
            return
        self.events += 1
        seen = self.transfers.setdefault(tid, t)
        if seen != t:
            self.conflicts.append(
                Violation(
                    "the topic tells each transfer one way",
                    f"{tid} appears as {seen} and as {t}",
                )
            )

    def totals(self) -> dict[str, Totals]:
        resolved = {t[4] for t in self.transfers.values() if t[4] is not None}
        acc: dict[str, list[int]] = {}
        for tid, (debit, credit, amount, kind, _) in self.transfers.items():
            d, c = acc.setdefault(debit, [0, 0, 0, 0]), acc.setdefault(credit, [0, 0, 0, 0])
            if kind == "pending" and tid not in resolved:
                d[0] += amount
                c[2] += amount
            elif kind in ("post", "single"):
                d[1] += amount
                c[3] += amount
        return {k: (v[0], v[1], v[2], v[3]) for k, v in acc.items()}


async def read_topic(settings: Settings, replay: Replay) -> None:
    """Every event of the ledger topic, from its beginning until caught up."""

    def add(record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value:
            with contextlib.suppress(ValueError):
                replay.add(CloudEvent.from_bytes(record.value))

    await read_whole_topic(settings, LEDGER.name, add)


def compare(tables: dict[str, Totals], replay: Replay) -> list[Violation]:
    out = list(replay.conflicts[:1])
    rebuilt = replay.totals()
    # Accounts a refused call only looked at exist with nothing on them, and no event.
    if any(t != (0, 0, 0, 0) for t in tables.values()) and not rebuilt:
        lost = Violation(
            "replaying the ledger topic gives the same balances",
            "the tables hold balances and the ledger topic no event: the broker "
            "has lost its log (an embedded broker keeps none across restarts). Check the "
            "tables alone with --no-topic.",
        )
        return [*out, lost]
    for account in sorted(set(tables) | set(rebuilt)):
        have, want = tables.get(account, (0, 0, 0, 0)), rebuilt.get(account, (0, 0, 0, 0))
        if have != want:
            out.append(
                Violation(
                    "replaying the ledger topic gives the same balances",
                    f"{account}: tables have (debits pending, posted, credits pending, posted)"
                    f" = {have}, the topic gives {want}",
                )
            )
            break
    return out


async def _tables_snapshot(
    conn: Any, settings: Settings, margin: timedelta, report: Report
) -> tuple[list[Violation], dict[str, Totals], list[bytes]]:
    """Table invariants, account totals and the ledger events still in the outbox, all from
    one snapshot: whatever committed before it is either in that outbox or already published."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        violations = await check_tables(
            conn,
            margin=margin,
            default_duration=timedelta(seconds=settings.default_max_duration_seconds),
            report=report,
        )
        rows = await conn.fetch(
            "SELECT id, debits_pending, debits_posted, credits_pending, credits_posted"
            f' FROM "{SCHEMA}".accounts'
        )
        outbox = await conn.fetch(
            f'SELECT payload FROM "{SCHEMA}".outbox WHERE topic = $1 ORDER BY position',
            settings.topic(LEDGER.name),
        )
    totals = {
        r["id"]: (
            r["debits_pending"],
            r["debits_posted"],
            r["credits_pending"],
            r["credits_posted"],
        )
        for r in rows
    }
    return violations, totals, [bytes(r["payload"]) for r in outbox]


async def check(
    settings: Settings,
    *,
    margin: timedelta | None = None,
    topic: bool = True,
    attempts: int = 3,
) -> Report:
    """Check the ledger of the stack `settings` points at."""
    if margin is None:
        margin = timedelta(
            seconds=settings.reservation_grace_seconds + 2 * settings.reservation_sweep_seconds
        )
    conn = await asyncpg.connect(settings.database_url)
    try:
        for attempt in range(1, attempts + 1):
            report = Report()
            violations, totals, outbox = await _tables_snapshot(conn, settings, margin, report)
            report.violations = violations
            if not topic:
                return report
            replay = Replay()
            for payload in outbox:
                with contextlib.suppress(ValueError):
                    replay.add(CloudEvent.from_bytes(payload))
            await read_topic(settings, replay)
            report.topic_events = replay.events
            mismatch = compare(totals, replay)
            if not mismatch or attempt == attempts:
                report.violations += mismatch
                return report
            await asyncio.sleep(1.0)  # a live system: the topic may have run ahead
        raise AssertionError("unreachable")
    finally:
        await conn.close()

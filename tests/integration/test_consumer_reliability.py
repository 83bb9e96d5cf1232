"""The shared consumer (`postback_libs.consumer`), exercised through settlement against the real
broker and Postgres: redelivery has no second effect, poison records go to the DLQ without
blocking their partition, and offsets and the inbox carry a restart."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg

from postback_libs.consumer import BatchApplier, Handlers, purge_inbox
from postback_libs.db import create_pool
from postback_libs.events import CALLS, CallCompleted, CallRequested, CreditRequested, new_event
from postback_libs.ids import uuid7_ms
from postback_libs.metrics import EVENTS_CONSUMED
from postback_libs.outbox import new_producer
from postback_libs.runtime import Service
from postback_libs.subscription import Subscription
from postback_settlement.app import build as settlement
from tests.helpers import (
    TopicReader,
    call_routed,
    events_of,
    eventually,
    fetch,
    publish,
    republish,
    running,
    uid,
)

UPSTREAM = "http://127.0.0.1:9/api"


def raw_count(reader: TopicReader, type_: str, subject: str) -> int:
    """Records on the topic, duplicates included (a re-emitted event keeps its derived id)."""
    n = 0
    for r in reader.raw:
        try:
            e = json.loads(r.value)
        except ValueError:
            continue
        n += e.get("type") == type_ and e.get("subject") == subject
    return n


def consumed(group: str, type_: str, outcome: str) -> float:
    return EVENTS_CONSUMED.labels(group, type_, outcome)._value.get()


async def fund(settings, ledger: TopicReader, account_id: str, amount: int):
    [credit] = await publish(
        settings, CreditRequested(credit_id=uid("cr"), account_id=account_id, amount=amount)
    )
    await eventually(
        lambda: [
            e
            for e in ledger.of_type("account.credited")
            if e.data["credit_id"] == credit.data["credit_id"]
        ],
        what="credit applied",
    )
    return credit


async def consumer_balance(svc, consumer: str) -> tuple[int, int]:
    [row] = await fetch(
        svc,
        "SELECT credits_posted - debits_posted AS balance, debits_pending FROM accounts"
        " WHERE id = $1",
        f"consumer:{consumer}",
    )
    return row["balance"], row["debits_pending"]


async def test_a_redelivered_event_has_no_second_effect(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement) as [svc],
    ):
        credit = await fund(settings, ledger, consumer, 100)
        routed = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=10)
        rid = routed.request_id
        [routed_event] = await publish(settings, routed)
        await events_of(calls, "call.authorized", rid)
        assert await consumer_balance(svc, consumer) == (100, 10)

        # The same records again, byte for byte, then a new event behind each on its partition:
        # once the new ones are applied, the redelivered ones have been read.
        await republish(settings, routed_event, "postback.calls")
        await republish(settings, credit, "postback.ledger")
        await publish(settings, CallCompleted(request_id=rid, via="response", result=1))
        await fund(settings, ledger, consumer, 1)
        await events_of(calls, "call.settled", rid)
        await events_of(ledger, "transfer.posted", n=2)

        assert raw_count(calls, "call.authorized", rid) == 1
        assert raw_count(calls, "call.settled", rid) == 1
        assert len(ledger.of_type("transfer.reserved")) == 2
        assert len(ledger.of_type("account.credited")) == 2
        assert len(await fetch(svc, "SELECT * FROM reservations")) == 1
        assert len(await fetch(svc, "SELECT * FROM transfers WHERE kind = 'pending'")) == 2
        assert await consumer_balance(svc, consumer) == (91, 0)
        inbox = await fetch(
            svc,
            "SELECT consumer FROM inbox WHERE event_id = ANY($1::text[])",
            [routed_event.id, credit.id],
        )
        assert sorted(r["consumer"] for r in inbox) == ["settlement", "settlement-funding"]


async def test_poison_records_go_to_the_dlq_and_the_partition_moves_on(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        TopicReader(settings, "postback.dlq") as dlq,
        running(settings, settlement),
    ):
        await fund(settings, ledger, consumer, 100)
        good = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=10)
        rid = good.request_id
        topic, key = settings.topic("postback.calls"), rid.encode()
        not_json = b'{"specversion": "1.0", "id": '
        missing_fields = json.dumps(
            {
                "specversion": "1.0",
                "id": uid("evt"),
                "source": "test",
                "type": "call.routed",
                "subject": rid,
                "time": "2025-01-01T00:00:00Z",
                "data": {"request_id": rid},
            }
        ).encode()
        await publish(
            settings,
            (topic, key, not_json, "call.routed"),
            (topic, key, missing_fields, "call.routed"),
            good,
        )

        await events_of(calls, "call.authorized", rid)
        letters = await events_of(dlq, "dead_letter.recorded", n=2)
        assert len(letters) == 2
        by_original = {e.data["original"].encode(): e.data for e in letters}
        assert set(by_original) == {not_json, missing_fields}
        for letter in by_original.values():
            assert letter["consumer_group"] == "settlement"
            assert letter["original_topic"] == topic
            assert letter["original_key"] == rid
            assert letter["error"]
            assert letter["attempts"] >= 1
        assert "JSON" in by_original[not_json]["error"] or "json" in by_original[not_json]["error"]
        assert "owner_id" in by_original[missing_fields]["error"]
        offsets = sorted(letter["offset"] for letter in by_original.values())
        assert offsets[0] != offsets[1]
        # The DLQ is keyed by the original key, so a replay lands on the same partition.
        assert {r.key for r in dlq.raw} == {key}


async def test_an_event_whose_handler_keeps_failing_is_dead_lettered_after_retries(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        TopicReader(settings, "postback.dlq") as dlq,
        running(settings, settlement) as [svc],
    ):
        await fund(settings, ledger, consumer, 100)
        # Valid as an event, but the price does not fit the ledger's bigint: the handler fails
        # every time.
        poison = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=2**63)
        good = call_routed(
            UPSTREAM, consumer_id=consumer, owner_id=owner, price=10, request_id=poison.request_id
        )
        [poison_event, _] = await publish(settings, poison, good)
        rid = poison.request_id

        [authorized] = await events_of(calls, "call.authorized", rid, timeout=30)
        assert authorized.data["amount"] == 10
        [letter] = await events_of(dlq, "dead_letter.recorded")
        assert letter.data["consumer_group"] == "settlement"
        assert letter.data["attempts"] == settings.handler_retries + 1
        assert json.loads(letter.data["original"])["id"] == poison_event.id
        assert "int64" in letter.data["error"] or "range" in letter.data["error"]
        # Time-ordered like every event id, carrying the dead-lettered record's time; read
        # like every topic's records.
        assert abs(uuid7_ms(letter.id) - time.time() * 1000) < 600_000
        [raw] = dlq.raw
        assert dict(raw.headers)["content-type"] == b"application/cloudevents+json"
        assert await consumer_balance(svc, consumer) == (100, 10)
        [reservation] = await fetch(svc, "SELECT amount FROM reservations")
        assert reservation["amount"] == 10


async def test_a_restart_neither_reapplies_nor_misses_events(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
    ):
        before = [call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner) for _ in range(3)]
        async with running(settings, settlement):
            await fund(settings, ledger, consumer, 100)
            await publish(settings, *before)
            for routed in before:
                await events_of(calls, "call.authorized", routed.request_id)

        # Published while settlement is down.
        during = [call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner) for _ in range(2)]
        done = before[0].request_id
        await publish(settings, *during, CallCompleted(request_id=done, via="response", result=1))

        duplicates = consumed("settlement", "call.routed", "duplicate")
        async with running(settings, settlement) as [svc]:
            for routed in during:
                await events_of(calls, "call.authorized", routed.request_id)
            await events_of(calls, "call.settled", done)
            # Every authorization once, none re-emitted after the restart.
            for routed in [*before, *during]:
                assert raw_count(calls, "call.authorized", routed.request_id) == 1
            assert raw_count(calls, "call.settled", done) == 1
            await events_of(ledger, "transfer.reserved", n=2 * 5)
            await events_of(ledger, "transfer.posted", n=2)
            assert len(ledger.of_type("transfer.reserved")) == 2 * 5
            assert len(ledger.of_type("account.credited")) == 1
            assert await consumer_balance(svc, consumer) == (90, 40)
            [n] = await fetch(svc, "SELECT count(*) AS n FROM inbox WHERE consumer = 'settlement'")
            assert n["n"] == 6
        # The offsets committed before the stop held: nothing was even read twice.
        assert consumed("settlement", "call.routed", "duplicate") == duplicates


async def test_an_event_in_flight_at_shutdown_is_finished_and_not_applied_again(settings):
    consumer, owner = uid("acct_c"), uid("acct_o")
    async with (
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
    ):
        routed = call_routed(UPSTREAM, consumer_id=consumer, owner_id=owner, price=10)
        rid = routed.request_id
        blocker = await asyncpg.connect(settings.database_url)
        try:
            async with running(settings, settlement) as [svc]:
                await fund(settings, ledger, consumer, 100)
                # Hold the handler inside its transaction: its effects are not committed yet.
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute("LOCK TABLE settlement.reservations IN EXCLUSIVE MODE")
                await publish(settings, routed)
                await eventually(
                    lambda: blocker.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                        " 'settlement' AND wait_event_type = 'Lock'"
                    ),
                    what="the handler blocked mid-transaction",
                )
                # SIGTERM now: the stop waits for the batch in flight.
                stopping = asyncio.create_task(svc.stop())
                await asyncio.sleep(1.0)
                assert not stopping.done()
                assert raw_count(calls, "call.authorized", rid) == 0
                await tx.rollback()
                await asyncio.wait_for(stopping, 30)
        finally:
            await blocker.close()
        await events_of(calls, "call.authorized", rid)

        async with running(settings, settlement) as [svc]:
            await events_of(calls, "call.authorized", rid)
            await asyncio.sleep(0.5)
            assert raw_count(calls, "call.authorized", rid) == 1
            assert len(await fetch(svc, "SELECT * FROM reservations")) == 1
            assert await consumer_balance(svc, consumer) == (100, 10)


async def test_the_inbox_forgets_event_ids_past_its_retention(settings):
    pool = await asyncpg.create_pool(
        settings.database_url, server_settings={"search_path": "settlement"}
    )
    try:
        await pool.executemany(
            "INSERT INTO inbox (consumer, event_id, processed_at)"
            " VALUES ('g', $1, now() - make_interval(days => $2))",
            [(f"old-{i}", 8) for i in range(5)] + [(f"recent-{i}", 6) for i in range(3)],
        )
        await pool.execute(
            "INSERT INTO inbox (consumer, event_id, processed_at)"
            " VALUES ('kept', 'old-request', now() - interval '400 days')"
        )
        assert await purge_inbox(pool, retention_days=7, chunk=2, keep=["kept"]) == 5
        kept = sorted(r["event_id"] for r in await pool.fetch("SELECT event_id FROM inbox"))
        assert kept == ["old-request", "recent-0", "recent-1", "recent-2"]
    finally:
        await pool.close()


async def test_a_batch_that_fails_is_fetched_again_with_what_was_fetched_after_it(settings):
    """With a backlog, the next batch is fetched and decoded while one is written. When that
    write fails, both are fetched again, from every partition either came from, and each event
    is applied once."""
    first = [new_event(CallRequested(request_id=uid("r"), consumer_id="c", api="a"), source="t")
             for _ in range(5)]  # fmt: skip
    second = [new_event(CallRequested(request_id=uid("r"), consumer_id="c", api="a"), source="t")
              for _ in range(5)]  # fmt: skip
    applied: list[str] = []
    handlers = Handlers(uid("group"), CALLS.name, max_records=len(first))

    @handlers.on(CallRequested)
    async def note(event, _payload, _uow) -> None:
        applied.append(event.id)

    decoded_batches = 0

    class FailsOnce(BatchApplier):
        failed = False

        async def decode(self, records):
            nonlocal decoded_batches
            decoded_batches += 1
            return await super().decode(records)

        async def write(self, decoded):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                await eventually(lambda: decoded_batches >= 2, what="the next batch decoded")
                raise OSError("the database went away")
            await super().write(decoded)

    async def publish_to(partition: int, events) -> None:
        producer = new_producer(settings)
        await producer.start()
        try:
            for e in events:
                await producer.send_and_wait(
                    settings.topic(CALLS.name),
                    value=e.to_bytes(),
                    key=e.subject.encode(),
                    partition=partition,
                    headers=[("ce_type", e.type.encode())],
                )
        finally:
            await producer.stop()

    pool = await create_pool(settings.database_url, "routing")
    producer = new_producer(settings)
    await producer.start()
    subscription = Subscription(
        FailsOnce(handlers, pool, settings, "test", producer), settings, "test"
    )
    await publish_to(0, first)
    await publish_to(1, second)
    try:
        await subscription.start()
        want = sorted(e.id for e in first + second)
        await eventually(lambda: sorted(applied) == want, timeout=30, what="every event applied")
        await asyncio.sleep(0.5)  # a second application would show up here
        assert sorted(applied) == want
    finally:
        await subscription.stop()
        await producer.stop()
        await pool.close()


async def test_offsets_are_committed_once_the_topic_goes_quiet(settings, monkeypatch):
    """Commits are spaced out under load; a group that has caught up still commits what it
    wrote, without waiting for more records or a stop."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from postback_libs import subscription

    monkeypatch.setattr(subscription, "COMMIT_EVERY_SECONDS", 3600.0)
    account = uid("acct_c")
    async with (
        TopicReader(settings, "postback.ledger") as ledger,
        running(settings, settlement),
    ):
        await fund(settings, ledger, account, 5)
        # Written after the first commit: far too soon for a commit of its own.
        credit = await fund(settings, ledger, account, 5)
        [record] = [r for r in ledger.raw if json.loads(r.value)["id"] == credit.id]
        tp = TopicPartition(record.topic, record.partition)
        probe = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=f"{settings.topic_prefix}postback-settlement-funding",
            enable_auto_commit=False,
        )
        await probe.start()
        try:

            async def committed_past_the_credit() -> bool:
                return (await probe.committed(tp) or 0) > record.offset

            await eventually(committed_past_the_credit, timeout=10, what="offset committed")
        finally:
            await probe.stop()


async def test_a_consumer_loop_that_dies_of_a_bug_says_so(settings):
    """A loop that dies of an error it does not handle reports it, so that the service stops
    and is started again instead of living on with a group that no longer consumes."""
    handlers = Handlers(uid("group"), CALLS.name)

    @handlers.on(CallRequested)
    async def note(event, _payload, _uow) -> None:
        pass

    class Buggy(BatchApplier):
        async def decode(self, records):
            raise RuntimeError("a bug in decoding")

    crashes: list[BaseException] = []
    pool = await create_pool(settings.database_url, "routing")
    producer = new_producer(settings)
    await producer.start()
    subscription = Subscription(
        Buggy(handlers, pool, settings, "test", producer), settings, "test", crashes.append
    )
    try:
        await subscription.start()
        await publish(settings, CallRequested(request_id=uid("req"), consumer_id="c", api="a"))
        await eventually(lambda: crashes, timeout=30, what="the crash reported")
        assert isinstance(crashes[0], RuntimeError)
    finally:
        await subscription.stop()  # stops in order even so
        await producer.stop()
        await pool.close()


async def test_a_worker_that_dies_stops_its_service(settings):
    """A background worker (a work queue, a deadline keeper) that dies of an error would leave
    its work undone while the service answers /healthz: the service stops, to be restarted."""

    def build(s):
        service = Service("routing", "postback_routing", s)

        @service.worker
        async def breaks() -> None:
            await asyncio.sleep(0.1)
            raise RuntimeError("a bug")

        return service

    async with running(settings, build) as [svc]:
        await eventually(lambda: svc.crash is not None, timeout=10, what="the crash noted")
        assert "a bug" in repr(svc.crash)


async def test_a_database_restarting_holds_the_partition_not_the_event(settings):
    """Errors PostgreSQL gives while it restarts or has no connection to spare are waited out,
    however many: they say nothing of the event, which must not be dead-lettered for them."""
    handlers = Handlers(uid("group"), CALLS.name)
    failures = [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.CrashShutdownError("terminating connection because of crash"),
        asyncpg.CannotConnectNowError("the database system is in recovery mode"),
    ]  # the batch's attempt, then more than the handler's retries one by one
    applied: list[str] = []
    dead_lettered: list[str] = []

    @handlers.on(CallRequested)
    async def note(event, _payload, _uow) -> None:
        if failures:
            raise failures.pop(0)
        applied.append(event.id)

    class Watched(BatchApplier):
        async def dead_letter(self, record, error, attempts):
            dead_lettered.append(error)

    pool = await create_pool(settings.database_url, "routing")
    producer = new_producer(settings)
    await producer.start()
    subscription = Subscription(Watched(handlers, pool, settings, "test", producer), settings, "t")
    try:
        await subscription.start()
        [event] = await publish(
            settings, CallRequested(request_id=uid("req"), consumer_id="c", api="a")
        )
        await eventually(lambda: applied, timeout=60, what="the event applied")
        assert applied == [event.id] and dead_lettered == []
    finally:
        await subscription.stop()
        await producer.stop()
        await pool.close()

"""Dead letters sent back to the group that gave up on them, against the real broker and
Postgres: once its cause is fixed the event is applied by that group, once, and by no other
again; what cannot be replayed says why."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner

from postback.cli import app
from postback.dlq import letters, refusal, replay
from postback_libs.consumer import BatchApplier, Handlers
from postback_libs.db import create_pool
from postback_libs.events import CALLS, CallRequested
from postback_libs.outbox import new_producer
from postback_libs.settings import get_settings
from postback_libs.subscription import Subscription
from tests.helpers import eventually, publish, uid


async def test_a_dead_letter_replayed_is_applied_by_its_group_alone(settings):
    broken = {"yes": True}
    # "inboxless" keeps no inbox, as the read model: only the replay header keeps it from
    # applying the event a second time.
    applied: dict[str, list[str]] = {"fragile": [], "steady": [], "inboxless": []}
    groups = {name: uid(name) for name in applied}

    def group(name: str) -> Handlers:
        handlers = Handlers(groups[name], CALLS.name, idempotent=name == "inboxless")

        @handlers.on(CallRequested)
        async def note(event, _payload, _uow) -> None:
            if name == "fragile" and broken["yes"]:
                raise RuntimeError("a bug, fixed later")
            applied[name].append(event.id)

        return handlers

    pool = await create_pool(settings.database_url, "routing")
    producer = new_producer(settings)
    await producer.start()
    subscriptions = [
        Subscription(BatchApplier(group(n), pool, settings, "test", producer), settings, "test")
        for n in applied
    ]
    try:
        for s in subscriptions:
            await s.start()
        [event] = await publish(
            settings, CallRequested(request_id=uid("req"), consumer_id="c", api="a")
        )
        await eventually(
            lambda: applied["steady"] and applied["inboxless"], what="the others applied it"
        )

        async def dead_lettered():
            return await letters(settings, groups["fragile"])

        [letter] = await eventually(dead_lettered, what="the fragile group gave up")
        assert letter.data.original_key == event.subject
        assert refusal(settings, letter) is None

        broken["yes"] = False
        await replay(settings, [letter])
        await eventually(lambda: applied["fragile"], what="the replay applied")
        await asyncio.sleep(1)  # a second application, by either group, would show up here
        assert applied == {"fragile": [event.id], "steady": [event.id], "inboxless": [event.id]}

        # Replaying it again changes nothing: the group knows the event now.
        await replay(settings, [letter])
        await asyncio.sleep(1)
        assert applied == {"fragile": [event.id], "steady": [event.id], "inboxless": [event.id]}
    finally:
        for s in subscriptions:
            await s.stop()
        await producer.stop()
        await pool.close()


async def test_the_cli_lists_and_says_what_it_cannot_replay(settings, monkeypatch):
    for name, value in settings.model_dump().items():
        if value is not None and not hasattr(value, "get_secret_value"):
            monkeypatch.setenv(f"POSTBACK_{name.upper()}", str(value))
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str):  # in a thread: the command runs an event loop of its own
        return asyncio.to_thread(runner.invoke, app, list(args))

    try:
        usage = await run("dlq", "replay")
        assert usage.exit_code == 2
        assert "--group" in usage.output
        missing = await run("dlq", "replay", "no-such-letter")
        assert missing.exit_code == 1
        assert "no dead letter no-such-letter" in missing.output
        listed = await run("dlq", "list", "--group", "nobody")
        assert listed.exit_code == 0
        assert "0 dead letters" in listed.output
    finally:
        get_settings.cache_clear()

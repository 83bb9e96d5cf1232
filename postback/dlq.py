"""Dead letters: the events a consumer group gave up on, and sending one back to that group.

`postback dlq list` reads `postback.dlq`. `postback dlq replay` publishes a dead letter's event
again to its topic with the header `postback-replay-for: <group>`: every other group skips it
(it has applied it: the same event id), and the named group applies it afresh (the transaction
that failed rolled back, so its inbox never recorded it). Not for compacted topics, where a
replayed state event would outlive newer ones, nor for the read model's groups, which keep no
inbox and order by log position: rebuild the read model instead (`postback projection
rebuild`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from aiokafka import ConsumerRecord

from postback_libs.consumer import REPLAY_FOR
from postback_libs.events import CONTENT_TYPE, DLQ, TOPICS, CloudEvent, DeadLetterRecorded
from postback_libs.outbox import new_producer
from postback_libs.settings import Settings
from postback_libs.topics import read_whole_topic


@dataclass(frozen=True)
class Letter:
    id: str
    time: datetime
    data: DeadLetterRecorded

    def line(self) -> str:
        d = self.data
        error = d.error.strip().splitlines()[0] if d.error.strip() else ""
        return (
            f"{self.id}  {self.time:%Y-%m-%d %H:%M:%S}  {d.consumer_group}  "
            f"{d.original_topic}[{d.partition}]@{d.offset}  key={d.original_key}  "
            f"attempts={d.attempts}  {error[:120]}"
        )


async def letters(settings: Settings, group: str | None = None) -> list[Letter]:
    """Every dead letter, oldest first (of one consumer group, if named)."""
    found: list[Letter] = []

    def take(record: ConsumerRecord[bytes, bytes]) -> None:
        event = CloudEvent.from_bytes(record.value or b"")
        data = DeadLetterRecorded.model_validate(event.data)
        if group is None or data.consumer_group == group:
            found.append(Letter(event.id, event.time, data))

    await read_whole_topic(settings, DLQ.name, take)
    return sorted(found, key=lambda letter: letter.time)


def refusal(settings: Settings, letter: Letter) -> str | None:
    """Why a dead letter cannot be replayed, or None."""
    d = letter.data
    compacted = {settings.topic(t.name) for t in TOPICS if t.cleanup == "compact"}
    if d.original_topic in compacted:
        return (
            f"{d.original_topic} is compacted: a replayed state event would outlive newer ones; "
            "change the entity again to publish its current state"
        )
    if d.consumer_group in _read_model_groups():
        return (
            "the read model is rebuilt, not replayed: `postback projection rebuild` (with "
            "--partial once retention has removed the topics' oldest events)"
        )
    try:
        event = json.loads(d.original)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return "the original is not a JSON event: there is nothing a consumer could apply"
    return None


def _read_model_groups() -> set[str]:
    from postback_projection.app import handler_sets

    return {h.group for h in handler_sets()}


async def replay(settings: Settings, chosen: list[Letter]) -> None:
    """Publish each letter's event again, for its consumer group alone."""
    producer = new_producer(settings)
    await producer.start()
    try:
        for letter in chosen:
            d = letter.data
            event = json.loads(d.original)
            headers = [
                ("content-type", CONTENT_TYPE.encode()),
                ("ce_type", str(event.get("type", "")).encode()),
                (REPLAY_FOR, d.consumer_group.encode()),
            ]
            if event.get("traceparent"):
                headers.append(("traceparent", str(event["traceparent"]).encode()))
            await producer.send_and_wait(
                d.original_topic,
                value=d.original.encode(),
                key=d.original_key.encode(),
                headers=headers,
            )
    finally:
        await producer.stop()

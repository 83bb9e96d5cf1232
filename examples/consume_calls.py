"""A live view of Postback's calls, for teams that consume its topics.

A plain aiokafka consumer: it reads `postback.calls`, validates every event against the JSON
Schema Postback publishes in `schemas/events/`, and prints one line per call as it moves.
Ignoring unknown fields and unknown event types is part of the contract: Postback only ever
adds optional fields, and a changed meaning is always a new event type.

    python examples/consume_calls.py --bootstrap 127.0.0.1:9092 [--group my-team] [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
from aiokafka import AIOKafkaConsumer

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas" / "events"


def load_validators() -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for path in SCHEMAS.glob("call.*.json"):
        schema = json.loads(path.read_text())
        cls = jsonschema.validators.validator_for(schema)
        validators[path.stem] = cls(schema)
    return validators


def describe(event: dict[str, Any]) -> str:
    data = event["data"]
    extra = ""
    if event["type"] == "call.rejected":
        extra = f" reason={data['reason']}"
    elif event["type"] == "call.settled":
        extra = f" cost={data['amount']} fee={data['fee']}"
    elif event["type"] == "call.failed":
        extra = f" reason={data['reason']}"
    return f"{event['time']}  {event['subject']}  {event['type']}{extra}"


async def watch(bootstrap: str, topic: str, group: str | None, limit: int | None) -> int:
    """Print events until `limit` of them were seen; returns how many failed validation."""
    validators = load_validators()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=group is not None,
    )
    await consumer.start()
    seen = invalid = 0
    try:
        async for record in consumer:
            event = json.loads(record.value)
            validator = validators.get(event.get("type", ""))
            if validator is None:
                print(f"(skipping unknown event type {event.get('type')!r})")
            else:
                errors = list(validator.iter_errors(event))
                if errors:
                    invalid += 1
                    print(f"INVALID {event.get('type')}: {errors[0].message}")
                else:
                    print(describe(event), flush=True)
            seen += 1
            if limit is not None and seen >= limit:
                break
    finally:
        await consumer.stop()
    return invalid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="postback.calls")
    parser.add_argument("--group", default=None, help="consumer group (none: read everything)")
    parser.add_argument("--limit", type=int, default=None, help="stop after N events")
    args = parser.parse_args()
    invalid = asyncio.run(watch(args.bootstrap, args.topic, args.group, args.limit))
    raise SystemExit(1 if invalid else 0)


if __name__ == "__main__":
    main()

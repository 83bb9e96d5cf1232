"""The Prometheus metrics every service shares; service-specific ones live with the service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter(
    "postback_events_consumed_total",
    "Events taken from Kafka by a consumer group.",
    ["group", "type", "outcome"],  # outcome: applied, duplicate, ignored, dead_lettered
)
EVENTS_PRODUCED = Counter(
    "postback_events_produced_total", "Events published to Kafka from the outbox.", ["topic"]
)
HANDLER_SECONDS = Histogram(
    "postback_handler_seconds",
    "Time to apply one batch of events, transaction included.",
    ["group"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
OUTBOX_PENDING = Gauge(
    "postback_outbox_pending",
    "Outbox rows in the batch being published (the batch size while more wait behind it).",
)
OUTBOX_OLDEST_SECONDS = Gauge(
    "postback_outbox_oldest_seconds",
    "Age of the oldest event the relay has yet to publish; grows while the broker is away "
    "(accepted work waits in the outbox, safe, until it is back).",
)
OUTBOX_DELAY_SECONDS = Histogram(
    "postback_outbox_delay_seconds",
    "From the transaction that wrote an event to the broker's acknowledgement of it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OFFSET_GAPS_WAITED = Counter(
    "postback_offset_gaps_waited_total",
    "Fetches whose records came after a gap in the partition's offsets, fetched again.",
    ["group"],
)
OFFSET_GAPS_SKIPPED = Counter(
    "postback_offset_gaps_skipped_total",
    "Offsets a consumer group went on without, once their gap had stood for 5 s.",
    ["group"],
)
CONSUMER_LAG = Gauge(
    "postback_consumer_lag_events", "Events behind the end of the topic.", ["group", "topic"]
)
SECONDS_BEHIND = Gauge(
    "postback_consumer_lag_seconds",
    "Age of the last event applied while events remain behind it; 0 when caught up.",
    ["group", "topic"],
)

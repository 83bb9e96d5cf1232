-- The read model of webhook delivery: one row per message and destination, and every attempt.
-- Every event of a delivery is keyed by its delivery id, so they arrive in order in one
-- partition; `position` (the offset) only rises, so a replay never moves a delivery backwards.
CREATE TABLE deliveries (
    delivery_id      text PRIMARY KEY,
    message_id       text        NOT NULL,
    request_id       text,
    endpoint_id      text,
    account_id       text,
    event_type       text,
    url              text,
    status           text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    last_status_code integer,
    last_error       text,
    next_attempt_at  timestamptz,
    created_at       timestamptz,
    updated_at       timestamptz NOT NULL,
    position         bigint      NOT NULL DEFAULT -1
);
CREATE INDEX deliveries_by_request ON deliveries (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX deliveries_by_endpoint ON deliveries (endpoint_id, created_at DESC)
    WHERE endpoint_id IS NOT NULL;

CREATE TABLE delivery_attempts (
    event_id         text PRIMARY KEY,
    delivery_id      text             NOT NULL,
    message_id       text             NOT NULL,
    request_id       text,
    endpoint_id      text,
    url              text             NOT NULL,
    attempt          integer          NOT NULL,
    attempted_at     timestamptz      NOT NULL,
    status_code      integer,
    latency_ms       double precision NOT NULL,
    error_class      text,
    response_headers jsonb,
    response_excerpt text             NOT NULL,
    next_attempt_at  timestamptz,
    test             boolean          NOT NULL DEFAULT false
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, attempted_at);
CREATE INDEX delivery_attempts_by_endpoint ON delivery_attempts (endpoint_id, attempted_at DESC)
    WHERE endpoint_id IS NOT NULL;
CREATE INDEX delivery_attempts_by_request ON delivery_attempts (request_id)
    WHERE request_id IS NOT NULL;

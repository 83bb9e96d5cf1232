-- What delivery remembers of each call until its outcome is known.
CREATE TABLE call_context (
    request_id   text PRIMARY KEY,
    consumer_id  text NOT NULL,
    api          text NOT NULL,
    webhook_url  text,
    outcome_type text,
    outcome      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per message and destination. The body is fixed when the message is made, so every
-- retry sends the same bytes under the same webhook-id. Pending retries are rows, so they
-- survive restarts, and replicas share them with FOR UPDATE SKIP LOCKED.
CREATE TABLE deliveries (
    delivery_id     text PRIMARY KEY,
    message_id      text        NOT NULL,
    request_id      text,
    account_id      text        NOT NULL,
    endpoint_id     text,
    url             text        NOT NULL,
    event_type      text        NOT NULL,
    body            bytea       NOT NULL,
    status          text        NOT NULL CHECK (status IN (
        'pending', 'delivering', 'succeeded', 'failed', 'exhausted')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    lease_until     timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE status = 'delivering';

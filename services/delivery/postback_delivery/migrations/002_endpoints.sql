-- Subscribed endpoints as delivery last read them from postback.webhooks, and their health.
-- The state columns follow the topic (newest revision wins); the health columns are delivery's
-- own and are shared by every replica: the row is locked (FOR UPDATE SKIP LOCKED) while a
-- replica admits work for the endpoint, so rate limit, concurrency cap and circuit breaker
-- hold across replicas.
CREATE TABLE endpoints (
    endpoint_id          text PRIMARY KEY,
    account_id           text             NOT NULL,
    revision             integer          NOT NULL,
    state                jsonb            NOT NULL,
    event_types          text[]           NOT NULL,
    enabled              boolean          NOT NULL,
    deleted              boolean          NOT NULL DEFAULT false,
    fifo                 boolean          NOT NULL DEFAULT false,
    rate_limit           double precision,
    max_in_flight        integer,
    -- Disabled by delivery (410 or continuous failure) until ingress has recorded it and the
    -- account enables the endpoint again (a revision above disable_acked_revision).
    disabled_at           timestamptz,
    disabled_reason       text,
    disable_acked_revision integer,
    -- Token bucket: `tokens` as of `tokens_at` (NULL: full).
    tokens               double precision,
    tokens_at            timestamptz,
    -- Nothing is claimed for the endpoint before this (circuit open, bucket empty, Retry-After,
    -- or at its concurrency cap); `blocked_for` says which.
    blocked_until        timestamptz,
    blocked_for          text,
    circuit              text             NOT NULL DEFAULT 'closed'
                         CHECK (circuit IN ('closed', 'open', 'half_open')),
    opened_count         integer          NOT NULL DEFAULT 0,
    consecutive_failures integer          NOT NULL DEFAULT 0,
    failing_since        timestamptz,
    last_success_at      timestamptz,
    updated_at           timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX endpoints_by_account ON endpoints (account_id) WHERE NOT deleted;

-- `seq` orders an endpoint's messages for FIFO delivery; `retry_base` is the attempt count at
-- which the current retry cycle began (a resend starts a new cycle).
ALTER TABLE deliveries ADD COLUMN seq bigserial;
ALTER TABLE deliveries ADD COLUMN retry_base integer NOT NULL DEFAULT 0;
CREATE INDEX deliveries_open_by_endpoint ON deliveries (endpoint_id, seq)
    WHERE status IN ('pending', 'delivering');
CREATE INDEX deliveries_by_endpoint ON deliveries (endpoint_id, created_at)
    WHERE endpoint_id IS NOT NULL;
CREATE INDEX deliveries_in_flight ON deliveries (endpoint_id) WHERE status = 'delivering';
-- Held: due, but waiting for its endpoint (at its concurrency cap, or behind the message before
-- it in FIFO order). An attempt finishing releases the next held ones, oldest first.
ALTER TABLE deliveries ADD COLUMN held boolean NOT NULL DEFAULT false;
CREATE INDEX deliveries_held ON deliveries (endpoint_id, seq) WHERE held;

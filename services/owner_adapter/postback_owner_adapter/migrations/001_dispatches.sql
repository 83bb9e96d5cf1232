-- One row per routed call: what to send to the owner, and where the call stands with it.
-- Deadlines are rows, not timers, so they survive any restart.
CREATE TABLE dispatches (
    request_id       text PRIMARY KEY,
    api_id           text        NOT NULL,
    upstream_url     text        NOT NULL,
    method           text        NOT NULL,
    path             text        NOT NULL,
    params           jsonb       NOT NULL,
    body             jsonb,
    entry            text        NOT NULL,
    max_result_bytes integer     NOT NULL,
    deadline         timestamptz NOT NULL,
    status           text        NOT NULL CHECK (status IN (
        'routed', 'pending', 'dispatching', 'accepted',
        'completed', 'failed', 'timed_out', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    lease_until      timestamptz,
    result_digest    text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dispatches_due ON dispatches (next_attempt_at) WHERE status = 'pending';
CREATE INDEX dispatches_leased ON dispatches (lease_until) WHERE status = 'dispatching';
CREATE INDEX dispatches_open_deadline ON dispatches (deadline)
    WHERE status IN ('routed', 'pending', 'dispatching', 'accepted');

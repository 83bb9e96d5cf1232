-- The read model of calls. Upserts are idempotent and never move a call backwards: `stage`
-- only rises, and each column is set by the event that owns it.
CREATE TABLE calls (
    request_id   text PRIMARY KEY,
    consumer_id  text,
    owner_id     text,
    api          text,
    api_id       text,
    mode         text,
    status       text     NOT NULL,
    stage        smallint NOT NULL,
    outcome      text,
    webhook_url  text,
    result       jsonb,
    result_content_type text,
    error        jsonb,
    cost         bigint,
    fee          bigint,
    requested_at timestamptz,
    completed_at timestamptz,
    delivered_at timestamptz,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX calls_by_consumer ON calls (consumer_id, requested_at DESC, request_id);
CREATE INDEX calls_by_owner ON calls (owner_id, requested_at DESC, request_id);

-- Every event of every call, in the order the topic holds them.
CREATE TABLE call_events (
    event_id   text PRIMARY KEY,
    request_id text        NOT NULL,
    type       text        NOT NULL,
    time       timestamptz NOT NULL,
    source     text        NOT NULL,
    data       jsonb       NOT NULL,
    partition  integer     NOT NULL,
    "offset"   bigint      NOT NULL
);
CREATE INDEX call_events_timeline ON call_events (request_id, "offset");

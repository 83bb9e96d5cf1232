-- Rate limits and quotas per consumer and API, shared by every routing replica: a call takes
-- its token and its quota unit under a row lock, in the transaction that routes it.
CREATE TABLE rate_buckets (
    consumer_id text             NOT NULL,
    api_id      text             NOT NULL,
    tokens      double precision NOT NULL,
    refilled_at timestamptz      NOT NULL,
    PRIMARY KEY (consumer_id, api_id)
);

CREATE TABLE quota_usage (
    consumer_id text    NOT NULL,
    api_id      text    NOT NULL,
    period      text    NOT NULL,  -- 'day:2026-11-22', 'month:2026-11'
    used        integer NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer_id, api_id, period)
);

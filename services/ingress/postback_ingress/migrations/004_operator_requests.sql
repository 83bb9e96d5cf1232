-- The operator's credits and corrections by Idempotency-Key: sent twice (a retry after a
-- timeout), one moves money once.
CREATE TABLE operator_requests (
    kind            text        NOT NULL,
    account_id      text        NOT NULL,
    idempotency_key text        NOT NULL,
    request_id      text        NOT NULL,
    digest          text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, account_id, idempotency_key)
);

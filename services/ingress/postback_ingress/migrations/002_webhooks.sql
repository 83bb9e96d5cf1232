-- Webhook endpoints: the source of truth; every change is also a full-state event on the
-- compacted postback.webhooks topic (newest `revision` wins). Secrets are derived from the
-- master key and the endpoint's secret version, never stored. A deleted endpoint keeps its row
-- (deleted_at) so its delivery history still has an owner.
CREATE TABLE webhook_endpoints (
    endpoint_id text PRIMARY KEY,
    account_id  text        NOT NULL REFERENCES accounts (account_id),
    state       jsonb       NOT NULL,
    deleted_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_by_account ON webhook_endpoints (account_id, endpoint_id)
    WHERE deleted_at IS NULL;

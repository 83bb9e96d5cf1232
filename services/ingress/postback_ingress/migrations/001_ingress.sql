-- Accounts: only the hash of each secret is kept. During rotation the previous key keeps
-- working until `previous_valid_until`.
CREATE TABLE accounts (
    account_id           text PRIMARY KEY,
    name                 text        NOT NULL,
    roles                text[]      NOT NULL,
    status               text        NOT NULL DEFAULT 'active',
    key_id               text        NOT NULL UNIQUE,
    key_hash             text        NOT NULL,
    previous_key_id      text UNIQUE,
    previous_key_hash    text,
    previous_valid_until timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now()
);

-- The catalog's source of truth; every change is also a full-state event on postback.catalog.
CREATE TABLE apis (
    api_id     text PRIMARY KEY,
    slug       text        NOT NULL UNIQUE,
    owner_id   text        NOT NULL REFERENCES accounts (account_id),
    state      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every accepted call, for Idempotency-Key and for answering about a call the read model has
-- not reached yet.
CREATE TABLE calls (
    request_id      text PRIMARY KEY,
    consumer_id     text        NOT NULL,
    idempotency_key text,
    request_digest  text        NOT NULL,
    accepted_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer_id, idempotency_key)
);

-- A double-entry ledger on TigerBeetle's model: accounts hold running totals, transfers are
-- immutable, and a two-phase transfer is a pending one later posted or voided exactly once.
CREATE TABLE accounts (
    id               text PRIMARY KEY,
    kind             text   NOT NULL CHECK (kind IN ('consumer', 'owner', 'fee', 'funding')),
    debits_pending   bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted    bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending  bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted   bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    -- A consumer can never spend more than it has been credited, reservations included.
    debits_must_not_exceed_credits boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT debits_must_not_exceed_credits
           OR debits_posted + debits_pending <= credits_posted)
);

CREATE TABLE transfers (
    id             text PRIMARY KEY,   -- derived from the request id and phase
    debit_account  text   NOT NULL REFERENCES accounts (id),
    credit_account text   NOT NULL REFERENCES accounts (id),
    amount         bigint NOT NULL CHECK (amount >= 0),
    kind           text   NOT NULL CHECK (kind IN ('single', 'pending', 'post', 'void')),
    pending_id     text REFERENCES transfers (id),
    request_id     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind IN ('post', 'void')) = (pending_id IS NOT NULL))
);
-- A pending transfer is resolved (posted or voided) at most once.
CREATE UNIQUE INDEX transfers_resolve_once ON transfers (pending_id) WHERE pending_id IS NOT NULL;
CREATE INDEX transfers_by_request ON transfers (request_id) WHERE request_id IS NOT NULL;

-- What settlement knows of each call it has seen routed.
CREATE TABLE reservations (
    request_id  text PRIMARY KEY,
    consumer_id text   NOT NULL,
    owner_id    text   NOT NULL,
    amount      bigint NOT NULL CHECK (amount >= 0),
    fee         bigint NOT NULL CHECK (fee >= 0),
    state       text   NOT NULL CHECK (state IN ('reserved', 'posted', 'voided')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reservations_open ON reservations (created_at) WHERE state = 'reserved';

INSERT INTO accounts (id, kind) VALUES ('platform:fee', 'fee'), ('operator:funding', 'funding');

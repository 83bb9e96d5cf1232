-- Every movement of money as `postback.ledger` tells it, one row per transfer: statements and
-- earnings are read from here. Transfers are immutable and their ids unique, so a redelivered
-- or replayed event inserts nothing, and balances move only when a transfer row is new.
CREATE TABLE transfers (
    transfer_id    text PRIMARY KEY,
    type           text        NOT NULL,   -- the event: transfer.posted, account.credited, ...
    kind           text        NOT NULL CHECK (kind IN ('single', 'pending', 'post', 'void')),
    debit_account  text        NOT NULL,
    credit_account text        NOT NULL,
    amount         bigint      NOT NULL CHECK (amount >= 0),
    pending_id     text,
    request_id     text,
    api_id         text,
    note           text,
    at             timestamptz NOT NULL
);
-- Statements page through one account's side, newest first.
CREATE INDEX transfers_by_debit ON transfers (debit_account, at DESC, transfer_id DESC);
CREATE INDEX transfers_by_credit ON transfers (credit_account, at DESC, transfer_id DESC);
-- Earnings count a pending transfer as held until a post or void names it.
CREATE INDEX transfers_by_pending ON transfers (pending_id) WHERE pending_id IS NOT NULL;

-- Operator corrections and what became of them: applied, or refused (and why).
CREATE TABLE corrections (
    correction_id text PRIMARY KEY,
    account_id    text        NOT NULL,
    role          text        NOT NULL,
    amount        bigint      NOT NULL,
    note          text        NOT NULL DEFAULT '',
    status        text        NOT NULL CHECK (status IN ('requested', 'applied', 'refused')),
    reason        text,
    detail        text,
    balance       bigint,
    transfer_id   text,
    requested_at  timestamptz,
    decided_at    timestamptz
);
CREATE INDEX corrections_by_account ON corrections (account_id, correction_id DESC);

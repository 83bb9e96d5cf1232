-- Balances per ledger account ("consumer:<id>", "owner:<id>", "platform:fee", ...). Ledger
-- events only add and subtract, so they commute: any order of arrival gives the same totals.
CREATE TABLE balances (
    ledger_account text PRIMARY KEY,
    balance        bigint      NOT NULL DEFAULT 0,
    reserved       bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

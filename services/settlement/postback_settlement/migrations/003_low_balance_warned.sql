-- Whether the consumer has been told its balance is low since its last top-up: balance.low
-- is sent once, not again each time a refunded call lifts the balance back over the threshold.
ALTER TABLE accounts ADD COLUMN low_balance_warned boolean NOT NULL DEFAULT false;

-- The secret signing messages to an account's calls' webhook_url rotates like an endpoint's:
-- its version, and the versions a rotation replaced with when each stops signing.
ALTER TABLE accounts
    ADD COLUMN webhook_secret_version  integer NOT NULL DEFAULT 1,
    ADD COLUMN retired_webhook_secrets jsonb   NOT NULL DEFAULT '[]';

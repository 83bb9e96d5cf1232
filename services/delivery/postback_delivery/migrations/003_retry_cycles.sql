-- When the current retry cycle began, if a resend or recovery started it (else `created_at`):
-- an endpoint's retry window counts from there, so a message sent again gets a whole window.
ALTER TABLE deliveries ADD COLUMN cycle_started_at timestamptz;

-- A reservation remembers its call's deadline and API: the deadline lets settlement release a
-- reservation whose call never got an outcome; the API lets owners see earnings per API.
ALTER TABLE reservations ADD COLUMN deadline timestamptz;
ALTER TABLE reservations ADD COLUMN api_id text;
ALTER TABLE transfers ADD COLUMN api_id text;
-- Corrections are transfers too: `credit:<id>` and `correction:<id>` are single transfers
-- between operator funding and an account, in either direction.

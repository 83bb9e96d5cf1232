-- The trace of the event that made the message (a call's final event, a balance alert): its
-- attempts and their events continue it, and each request carries it to the receiver.
ALTER TABLE deliveries ADD COLUMN traceparent text;

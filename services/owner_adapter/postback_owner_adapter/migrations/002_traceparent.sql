-- The trace of the call.routed that made the dispatch: forwarding, the owner's callback and the
-- outcomes continue it, so one call is one trace from the consumer's request to its webhook.
ALTER TABLE dispatches ADD COLUMN traceparent text;

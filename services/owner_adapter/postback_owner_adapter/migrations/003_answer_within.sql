-- How long the owner has to answer one forwarded request before it is tried again; NULL: until
-- the call's deadline (or the operator's POSTBACK_OWNER_TIMEOUT_SECONDS, applied at each claim).
-- Set when the call is routed: an API registered with delivery_mode async must answer (202)
-- within POSTBACK_OWNER_ACCEPT_TIMEOUT_SECONDS, while its result may take until the deadline.
ALTER TABLE dispatches ADD COLUMN answer_within_seconds double precision;

-- How long the owner has to answer one forwarded request before it is tried again; NULL: until
-- the call's deadline. Set when the call is routed: an API registered with delivery_mode async
-- must answer (202) within POSTBACK_OWNER_ACCEPT_TIMEOUT_SECONDS, while its result may still
-- take until the deadline.
ALTER TABLE dispatches ADD COLUMN answer_within_seconds double precision;

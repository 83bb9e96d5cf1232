-- Every slug an API has had stays its own: renamed, its old slug is not free for another API,
-- whose owner would then get the calls consumers still make by it.
CREATE TABLE slug_history (
    slug   text PRIMARY KEY,
    api_id text NOT NULL
);
INSERT INTO slug_history (slug, api_id) SELECT slug, api_id FROM apis ON CONFLICT DO NOTHING;

-- Full-text search over the catalog: name and tags weigh more than the description.
ALTER TABLE apis ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english', coalesce(state->>'name', '')), 'A') ||
    setweight(to_tsvector('english', coalesce(state->>'tags', '')), 'A') ||
    setweight(to_tsvector('english', coalesce(state->>'slug', '')), 'B') ||
    setweight(to_tsvector('english', coalesce(state->>'description', '')), 'C')
) STORED;
CREATE INDEX apis_search ON apis USING gin (search);
CREATE INDEX apis_owner ON apis (owner_id);

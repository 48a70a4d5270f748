-- Claims, recounts and start-up recovery read live items by state first, so a
-- recount reads only the live rows however many final ones are retained.
DROP INDEX items_claim;
CREATE INDEX items_live ON items (state, workspace, priority);
-- The replay check asks when a workspace last had an item delivered.
CREATE INDEX items_delivered ON items (workspace, finished_at) WHERE state = 'delivered';

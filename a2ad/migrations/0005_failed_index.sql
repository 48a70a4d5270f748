-- The status page lists the newest failed items; without this it walks back
-- through every item to find them.
CREATE INDEX items_failed ON items (seq) WHERE state = 'failed';

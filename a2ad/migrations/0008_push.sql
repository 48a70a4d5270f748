-- Push notifications: each item's push configs, and the outbox of updates to POST.
ALTER TABLE items ADD COLUMN push TEXT;  -- JSON list of configs {id, url, token, ...}

-- One row per update of a task to push to one of its configs; config_id '' marks
-- a delivered task whose later updates a2ad follows at the agent (payload: the
-- agent's Task as last seen; token: what the agent's pushes to a2ad must carry).
-- Rows are made by the triggers below, in the same statement as the change they
-- tell of, so no change is committed without them.
CREATE TABLE push_outbox (
    seq         INTEGER PRIMARY KEY,
    item_id     TEXT NOT NULL,
    config_id   TEXT NOT NULL,
    state       TEXT NOT NULL,            -- the item state told of; 'current', 'update', 'follow'
    payload     TEXT,                     -- the agent's Task, for 'update' and 'follow'
    status      TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,            -- due then; while a sender holds it, its lease
    last_error  TEXT,
    created_at  REAL NOT NULL,
    sent_at     REAL,
    token       TEXT                      -- a followed task: the token a2ad gave the agent
);
CREATE INDEX push_due ON push_outbox (next_at) WHERE status = 'pending';
CREATE INDEX push_item ON push_outbox (item_id, config_id, seq);
CREATE INDEX push_dead ON push_outbox (seq) WHERE status = 'dead';

-- A send that came with a push config: its SUBMITTED update.
CREATE TRIGGER push_submitted AFTER INSERT ON items WHEN NEW.push IS NOT NULL
BEGIN
    INSERT INTO push_outbox (item_id, config_id, state, next_at, created_at)
    SELECT NEW.id, json_extract(value, '$.id'), NEW.state, NEW.updated_at, NEW.updated_at
    FROM json_each(NEW.push);
END;

-- The item ended (delivered, failed, expired, cancelled): tell every config.
CREATE TRIGGER push_final AFTER UPDATE OF state ON items
WHEN NEW.push IS NOT NULL AND OLD.state <> NEW.state
     AND NEW.state IN ('delivered', 'failed', 'expired', 'cancelled')
BEGIN
    INSERT INTO push_outbox (item_id, config_id, state, next_at, created_at)
    SELECT NEW.id, json_extract(value, '$.id'), NEW.state, NEW.updated_at, NEW.updated_at
    FROM json_each(NEW.push);
END;

-- A config registered after the item ended gets the task as it is now ('current':
-- the agent's Task as a2ad last saw it, when it follows one) at once.
CREATE TRIGGER push_late_config AFTER UPDATE OF push ON items
WHEN NEW.push IS NOT NULL AND NEW.state IN ('delivered', 'failed', 'expired', 'cancelled')
BEGIN
    INSERT INTO push_outbox (item_id, config_id, state, next_at, created_at)
    SELECT NEW.id, json_extract(n.value, '$.id'), 'current', NEW.updated_at, NEW.updated_at
    FROM json_each(NEW.push) AS n
    WHERE json_extract(n.value, '$.id') NOT IN
        (SELECT json_extract(o.value, '$.id') FROM json_each(COALESCE(OLD.push, '[]')) AS o);
END;

-- An item's updates go with it (retention, purge, delete).
CREATE TRIGGER push_forget AFTER DELETE ON items WHEN OLD.push IS NOT NULL
BEGIN
    DELETE FROM push_outbox WHERE item_id = OLD.id;
END;

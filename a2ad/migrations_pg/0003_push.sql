-- Push notifications: each item's push configs, and the outbox of updates to POST.
ALTER TABLE items ADD COLUMN push text;  -- JSON list of configs {id, url, token, ...}

-- One row per update of a task to push to one of its configs; config_id '' marks
-- a delivered task whose later updates a2ad follows at the agent (payload: the
-- agent's Task as last seen; token: what the agent's pushes to a2ad must carry).
-- Rows are made by the triggers below, in the same statement as the change they
-- tell of. A config written while a settle waits on the item's row lock is in the
-- row the settle updates (NEW), so neither is lost.
CREATE TABLE push_outbox (
    seq         bigserial PRIMARY KEY,
    item_id     text NOT NULL,
    config_id   text NOT NULL,
    state       text NOT NULL,            -- the item state told of; 'current', 'update', 'follow'
    payload     text,                     -- the agent's Task, for 'update' and 'follow'
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts    integer NOT NULL DEFAULT 0,
    next_at     double precision NOT NULL, -- due then; while a sender holds it, its lease
    last_error  text,
    created_at  double precision NOT NULL,
    sent_at     double precision,
    token       text                      -- a followed task: the token a2ad gave the agent
);
CREATE INDEX push_due ON push_outbox (next_at) WHERE status = 'pending';
CREATE INDEX push_item ON push_outbox (item_id, config_id, seq);
CREATE INDEX push_dead ON push_outbox (seq) WHERE status = 'dead';

CREATE FUNCTION push_outbox_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO push_outbox (item_id, config_id, state, next_at, created_at)
    SELECT NEW.id, c->>'id', CASE TG_ARGV[0] WHEN 'push' THEN 'current' ELSE NEW.state END,
           NEW.updated_at, NEW.updated_at
    FROM jsonb_array_elements(NEW.push::jsonb) AS c
    WHERE TG_OP = 'INSERT' OR TG_ARGV[0] = 'state'
       OR NOT COALESCE(OLD.push::jsonb, '[]'::jsonb) @> jsonb_build_array(
              jsonb_build_object('id', c->>'id'));
    RETURN NULL;
END $$;

-- A send that came with a push config: its SUBMITTED update.
CREATE TRIGGER push_submitted AFTER INSERT ON items FOR EACH ROW
WHEN (NEW.push IS NOT NULL) EXECUTE FUNCTION push_outbox_add('insert');
-- The item ended (delivered, failed, expired, cancelled): tell every config.
CREATE TRIGGER push_final AFTER UPDATE OF state ON items FOR EACH ROW
WHEN (NEW.push IS NOT NULL AND OLD.state <> NEW.state
      AND NEW.state IN ('delivered', 'failed', 'expired', 'cancelled'))
EXECUTE FUNCTION push_outbox_add('state');
-- A config registered after the item ended gets the task as it is now ('current':
-- the agent's Task as a2ad last saw it, when it follows one) at once.
CREATE TRIGGER push_late_config AFTER UPDATE OF push ON items FOR EACH ROW
WHEN (NEW.push IS NOT NULL AND NEW.state IN ('delivered', 'failed', 'expired', 'cancelled'))
EXECUTE FUNCTION push_outbox_add('push');

CREATE FUNCTION push_outbox_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM push_outbox WHERE item_id = OLD.id;
    RETURN NULL;
END $$;
-- An item's updates go with it (retention, purge, delete).
CREATE TRIGGER push_forget AFTER DELETE ON items FOR EACH ROW
WHEN (OLD.push IS NOT NULL) EXECUTE FUNCTION push_outbox_forget();

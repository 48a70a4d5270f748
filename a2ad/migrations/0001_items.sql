-- Queue items: one stored request each, from enqueue to its final state.
CREATE TABLE items (
    seq             INTEGER PRIMARY KEY,          -- insertion order: age among equals
    id              TEXT NOT NULL UNIQUE,         -- q- + 32 hex digits
    workspace       TEXT NOT NULL,
    caller          TEXT NOT NULL DEFAULT '',     -- '' when the proxy is open
    method          TEXT NOT NULL,
    body            BLOB NOT NULL,                -- the request exactly as received
    headers         TEXT NOT NULL DEFAULT '{}',   -- stored A2A-Version, A2A-Extensions, Accept
    message_id      TEXT,
    context_id      TEXT,
    request_id      TEXT,
    priority        INTEGER NOT NULL DEFAULT 50 CHECK (priority IN (10, 50, 100)),
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'dispatching', 'delivered', 'failed',
                                     'expired', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,   -- failed deliveries only
    busy_answers    INTEGER NOT NULL DEFAULT 0,
    ttl_seconds     REAL,                         -- kept so a retry gets a fresh expiry
    not_before      REAL NOT NULL DEFAULT 0,
    expires_at      REAL,
    lease_until     REAL,
    claim_token     TEXT,
    result          BLOB,                         -- the agent's JSON-RPC response
    last_error      TEXT,
    agent_task_id   TEXT,
    agent_context_id TEXT,
    enqueued_at     REAL NOT NULL,
    updated_at      REAL NOT NULL,
    finished_at     REAL
);

-- Claims read the head of each priority level per workspace.
CREATE INDEX items_claim ON items (workspace, state, priority);
-- Idempotency: at most one live item per (workspace, caller, messageId).
CREATE UNIQUE INDEX items_live_message ON items (workspace, caller, message_id)
    WHERE message_id IS NOT NULL AND state IN ('queued', 'dispatching');
CREATE INDEX items_message ON items (workspace, caller, message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX items_expiry ON items (expires_at) WHERE state = 'queued';
CREATE INDEX items_lease ON items (lease_until) WHERE state = 'dispatching';
CREATE INDEX items_finished ON items (finished_at) WHERE finished_at IS NOT NULL;

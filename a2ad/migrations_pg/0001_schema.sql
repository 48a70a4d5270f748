-- a2ad's tables on PostgreSQL: the same rows and indexes as SQLite's migrations
-- 0001-0007 have made, in one step. Times are seconds since the epoch (a2ad's
-- clock), as on SQLite, so an item reads the same from either store.
CREATE TABLE items (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- age among equals
    id               text NOT NULL UNIQUE,           -- q- + 32 hex digits
    workspace        text NOT NULL,
    caller           text NOT NULL DEFAULT '',       -- '' when the proxy is open
    method           text NOT NULL,
    body             bytea NOT NULL,                 -- the request exactly as received
    headers          text NOT NULL DEFAULT '{}',     -- stored A2A-Version, A2A-Extensions, …
    message_id       text,
    context_id       text,
    request_id       text,
    priority         integer NOT NULL DEFAULT 50 CHECK (priority IN (10, 50, 100)),
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'dispatching', 'delivered', 'failed',
                                      'expired', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,     -- failed deliveries only
    busy_answers     integer NOT NULL DEFAULT 0,
    ttl_seconds      double precision,               -- kept so a retry gets a fresh expiry
    not_before       double precision NOT NULL DEFAULT 0,
    expires_at       double precision,
    lease_until      double precision,
    claim_token      text,
    result           bytea,                          -- the agent's JSON-RPC response
    last_error       text,
    agent_task_id    text,
    agent_context_id text,
    enqueued_at      double precision NOT NULL,
    updated_at       double precision NOT NULL,
    finished_at      double precision
);

-- Claims read the head of each priority level of a workspace: queued rows only, so
-- a claimed or delivered row leaves the index a claim walks (recounts read it too).
CREATE INDEX items_queued ON items (workspace, priority, seq) WHERE state = 'queued';
-- Idempotency: at most one live item per (workspace, caller, messageId).
CREATE UNIQUE INDEX items_live_message ON items (workspace, caller, message_id)
    WHERE message_id IS NOT NULL AND state IN ('queued', 'dispatching');
CREATE INDEX items_message ON items (workspace, caller, message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX items_expiry ON items (expires_at) WHERE state = 'queued';
CREATE INDEX items_lease ON items (lease_until) WHERE state = 'dispatching';
CREATE INDEX items_finished ON items (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX items_context ON items (context_id) WHERE agent_context_id IS NOT NULL;
CREATE INDEX items_failed ON items (seq) WHERE state = 'failed';
-- The replay check asks when a workspace last had an item delivered.
CREATE INDEX items_delivered ON items (workspace, finished_at) WHERE state = 'delivered';
-- ListTasks pages through one caller's items of a workspace, most recently updated first.
CREATE INDEX items_caller ON items (workspace, caller, updated_at);

-- Workspaces registered at run time (PUT /workspaces/{id}).
CREATE TABLE workspaces (
    id          text PRIMARY KEY,
    config      text NOT NULL,      -- the workspace's settings as JSON
    updated_at  double precision NOT NULL
);

-- One row a2ad rewrites while the store cannot write, to find out when it can again.
CREATE TABLE write_probe (
    id  integer PRIMARY KEY CHECK (id = 1),
    at  double precision NOT NULL
);

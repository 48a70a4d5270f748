-- Slots shared by every replica serving this schema. An agent never holds more of
-- a2ad's requests than its slots, counted over all replicas: each request at an
-- agent, direct or a claimed item, holds a lease here, and `slots.in_use` counts a
-- workspace's live leases. The counter is changed only in the statement that takes
-- or returns a lease: one row per workspace, whose row lock orders the takers (a
-- COUNT over the leases would let two takers that waited on the same lock both see
-- the same free slot).
CREATE TABLE slots (
    workspace  text PRIMARY KEY,
    in_use     integer NOT NULL DEFAULT 0 CHECK (in_use >= 0),
    granted    integer NOT NULL DEFAULT 0   -- the last take's grant (for its RETURNING)
);

CREATE TABLE slot_leases (
    token        text PRIMARY KEY,          -- an item's claim token, or a direct send's
    workspace    text NOT NULL,
    replica      text NOT NULL,             -- store.replica_id of the holder
    lease_until  double precision NOT NULL  -- the store's clock; renewed while it runs
);
CREATE INDEX slot_leases_lapse ON slot_leases (lease_until);
CREATE INDEX slot_leases_replica ON slot_leases (replica);

-- Each agent's last heartbeat, whichever replica took it: every replica counts its
-- slots from it. `external` is its load that is not a2ad's requests (its active
-- tasks less the slots a2ad held there when it arrived).
CREATE TABLE heartbeats (
    workspace  text PRIMARY KEY,
    active     integer NOT NULL,
    capacity   integer,                     -- NULL: the configured max_concurrent
    external   integer NOT NULL,
    at         double precision NOT NULL    -- the store's clock
);

-- Duties that one replica at a time performs (probing and restarting an agent,
-- the sweeps), each under a lease the holder renews; another takes it over when
-- it lapses, or at once when the holder cannot restart the agent and it can.
CREATE TABLE duties (
    duty         text PRIMARY KEY,          -- 'sweeps', or 'agent:' || workspace
    replica      text NOT NULL,
    can_restart  boolean NOT NULL DEFAULT false,
    lease_until  double precision NOT NULL
);

-- The replicas that serve this schema, as they last said so (GET /workspaces).
CREATE TABLE replicas (
    replica     text PRIMARY KEY,
    started_at  double precision NOT NULL,
    seen_at     double precision NOT NULL
);

-- Restarts of agents over the last hour, by whichever replica ran them: the
-- budget and the backoff count them all.
CREATE TABLE restarts (
    workspace  text NOT NULL,
    at         double precision NOT NULL,
    replica    text NOT NULL
);
CREATE INDEX restarts_workspace ON restarts (workspace, at);

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

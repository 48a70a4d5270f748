-- Workspaces registered at run time (PUT /workspaces/{id}); those of a2ad.toml are not stored.
CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY,
    config      TEXT NOT NULL,      -- the workspace's settings as JSON
    updated_at  REAL NOT NULL
);

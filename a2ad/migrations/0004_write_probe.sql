-- One row a2ad rewrites while the store cannot write (disk full, read-only file),
-- to find out by itself when it can again, with no traffic needed.
CREATE TABLE write_probe (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    at  REAL NOT NULL
);

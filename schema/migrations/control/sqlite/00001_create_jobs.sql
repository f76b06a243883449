-- +goose Up
-- Times are UTC text 'YYYY-MM-DD HH:MM:SS.ffffff' (fixed width, so text order
-- is time order). JSON columns hold text.
CREATE TABLE jobs (
    id               TEXT    NOT NULL PRIMARY KEY,
    frontend         TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    workflow         TEXT    NOT NULL,
    metadata         TEXT,
    inputs           TEXT,
    node             TEXT,
    prompt_id        TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at TEXT,
    progress         TEXT,
    outputs          TEXT,
    error            TEXT,
    idempotency_key  TEXT,
    charged          INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT    NOT NULL,
    dispatched_at    TEXT,
    started_at       TEXT,
    finished_at      TEXT,
    updated_at       TEXT    NOT NULL
) STRICT;
CREATE INDEX jobs_queue_idx ON jobs (state, priority DESC, created_at, id);
CREATE INDEX jobs_frontend_queue_idx ON jobs (frontend, state, priority DESC, created_at, id);
CREATE INDEX jobs_frontend_id_idx ON jobs (frontend, id);
CREATE INDEX jobs_user_idx ON jobs (frontend, user_id, id);
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at);
CREATE UNIQUE INDEX jobs_idempotency_idx ON jobs (frontend, idempotency_key);

-- +goose Down
DROP TABLE jobs;

-- +goose Up
-- The webhook outbox: one row per (job, event), written in the transaction
-- that gives the job its final state, so no delivery is lost to a crash.
-- A deliverer claims a due row by moving next_attempt_at past the attempt
-- (a lease, with lease_owner fencing the result); attempts is a JSON array of
-- every try (time, status or error, duration).
CREATE TABLE webhooks (
    id              TEXT    NOT NULL PRIMARY KEY,
    job_id          TEXT    NOT NULL,
    frontend        TEXT    NOT NULL,
    event           TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    attempts        TEXT,
    attempt_count   INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    lease_owner     TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL
) STRICT;
CREATE UNIQUE INDEX webhooks_job_event_idx ON webhooks (job_id, event);
CREATE INDEX webhooks_due_idx ON webhooks (state, next_attempt_at, id);

-- +goose Down
DROP TABLE webhooks;

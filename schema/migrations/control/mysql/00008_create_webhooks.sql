-- +goose Up
-- The webhook outbox: one row per (job, event), written in the transaction
-- that gives the job its final state, so no delivery is lost to a crash.
-- A deliverer claims a due row by moving next_attempt_at past the attempt
-- (a lease, with lease_owner fencing the result); attempts is a JSON array of
-- every try (time, status or error, duration).
CREATE TABLE webhooks (
    id              VARBINARY(160) NOT NULL,
    job_id          VARBINARY(64)  NOT NULL,
    frontend        VARBINARY(64)  NOT NULL,
    event           VARCHAR(16)    NOT NULL,
    url             VARCHAR(2048)  NOT NULL,
    state           VARCHAR(16)    NOT NULL,
    attempts        MEDIUMTEXT     NULL,
    attempt_count   INT            NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(6)    NOT NULL,
    lease_owner     VARBINARY(255) NULL,
    created_at      DATETIME(6)    NOT NULL,
    updated_at      DATETIME(6)    NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY webhooks_job_event_idx (job_id, event),
    KEY webhooks_due_idx (state, next_attempt_at, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE webhooks;

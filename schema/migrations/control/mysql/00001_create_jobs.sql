-- +goose Up
-- One change per file: MySQL commits DDL implicitly. Binary collation keeps
-- ids, user ids and keys case-sensitive, as on SQLite.
CREATE TABLE jobs (
    id               VARCHAR(64)  NOT NULL,
    frontend         VARCHAR(64)  NOT NULL,
    user_id          VARCHAR(255) NOT NULL,
    state            VARCHAR(16)  NOT NULL,
    priority         INT          NOT NULL DEFAULT 0,
    workflow         LONGTEXT     NOT NULL,
    metadata         MEDIUMTEXT   NULL,
    inputs           MEDIUMTEXT   NULL,
    node             VARCHAR(255) NULL,
    prompt_id        VARCHAR(255) NULL,
    attempts         INT          NOT NULL DEFAULT 0,
    lease_owner      VARCHAR(255) NULL,
    lease_expires_at DATETIME(6)  NULL,
    progress         TEXT         NULL,
    outputs          MEDIUMTEXT   NULL,
    error            MEDIUMTEXT   NULL,
    idempotency_key  VARCHAR(255) NULL,
    charged          BIGINT       NOT NULL DEFAULT 0,
    cancel_requested TINYINT(1)   NOT NULL DEFAULT 0,
    created_at       DATETIME(6)  NOT NULL,
    dispatched_at    DATETIME(6)  NULL,
    started_at       DATETIME(6)  NULL,
    finished_at      DATETIME(6)  NULL,
    updated_at       DATETIME(6)  NOT NULL,
    PRIMARY KEY (id),
    KEY jobs_queue_idx (state, priority DESC, created_at, id),
    KEY jobs_frontend_queue_idx (frontend, state, priority DESC, created_at, id),
    KEY jobs_frontend_id_idx (frontend, id),
    KEY jobs_user_idx (frontend, user_id, id),
    KEY jobs_lease_idx (lease_expires_at),
    UNIQUE KEY jobs_idempotency_idx (frontend, idempotency_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE jobs;

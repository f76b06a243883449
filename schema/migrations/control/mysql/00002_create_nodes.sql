-- +goose Up
CREATE TABLE nodes (
    name         VARCHAR(255)  NOT NULL,
    url          VARCHAR(2048) NOT NULL,
    tags         TEXT          NOT NULL,
    max_inflight INT           NOT NULL DEFAULT 1,
    drain        TINYINT(1)    NOT NULL DEFAULT 0,
    source       VARCHAR(16)   NOT NULL DEFAULT 'api',
    created_at   DATETIME(6)   NOT NULL,
    updated_at   DATETIME(6)   NOT NULL,
    PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE nodes;

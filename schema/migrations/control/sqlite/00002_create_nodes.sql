-- +goose Up
CREATE TABLE nodes (
    name         TEXT    NOT NULL PRIMARY KEY,
    url          TEXT    NOT NULL,
    tags         TEXT    NOT NULL DEFAULT '[]',
    max_inflight INTEGER NOT NULL DEFAULT 1,
    drain        INTEGER NOT NULL DEFAULT 0,
    source       TEXT    NOT NULL DEFAULT 'api',
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL
) STRICT;

-- +goose Down
DROP TABLE nodes;

-- +goose Up
-- Workflow templates, one row per version. A deleted template keeps its rows
-- (deleted_at set), so a version number is never given twice and a job's
-- "name@version" always names what it ran.
CREATE TABLE templates (
    frontend   TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    workflow   TEXT    NOT NULL,
    inputs     TEXT    NOT NULL,
    created_at TEXT    NOT NULL,
    deleted_at TEXT,
    PRIMARY KEY (frontend, name, version)
) STRICT;

-- +goose Down
DROP TABLE templates;

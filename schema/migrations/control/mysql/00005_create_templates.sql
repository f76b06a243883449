-- +goose Up
-- Workflow templates, one row per version. A deleted template keeps its rows
-- (deleted_at set), so a version number is never given twice and a job's
-- "name@version" always names what it ran. Identifiers are VARBINARY: they
-- compare byte for byte, as on SQLite (see 00003).
CREATE TABLE templates (
    frontend   VARBINARY(64) NOT NULL,
    name       VARBINARY(64) NOT NULL,
    version    INT           NOT NULL,
    workflow   LONGTEXT      NOT NULL,
    inputs     MEDIUMTEXT    NOT NULL,
    created_at DATETIME(6)   NOT NULL,
    deleted_at DATETIME(6)   NULL,
    PRIMARY KEY (frontend, name, version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE templates;

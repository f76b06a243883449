-- +goose Up
-- A job's placement requirements ({"tags": [...], "min_vram_gb": N}), NULL
-- when it has none (see the MySQL migration).
ALTER TABLE jobs ADD COLUMN requirements TEXT;

-- +goose Down
ALTER TABLE jobs DROP COLUMN requirements;

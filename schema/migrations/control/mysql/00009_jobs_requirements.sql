-- +goose Up
-- A job's placement requirements ({"tags": [...], "min_vram_gb": N}), NULL
-- when it has none. Its own column rather than a key inside metadata (the
-- client's free JSON, shown back as sent) or inputs (a list of uploads).
ALTER TABLE jobs ADD COLUMN requirements TEXT NULL;

-- +goose Down
ALTER TABLE jobs DROP COLUMN requirements;

-- +goose Up
-- The "name@version" of the template a job was made from; NULL for a raw
-- workflow.
ALTER TABLE jobs ADD COLUMN template VARBINARY(80) NULL;

-- +goose Down
ALTER TABLE jobs DROP COLUMN template;

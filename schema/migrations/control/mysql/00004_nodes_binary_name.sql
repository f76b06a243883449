-- +goose Up
-- Node names compare byte for byte (see 00003).
ALTER TABLE nodes MODIFY name VARBINARY(255) NOT NULL;

-- +goose Down
ALTER TABLE nodes MODIFY name VARCHAR(255) NOT NULL;

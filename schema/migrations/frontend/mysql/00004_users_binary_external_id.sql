-- +goose Up
-- Identifiers compare byte for byte, as on SQLite. utf8mb4_bin is a PAD SPACE
-- collation: under it 'bob ' = 'bob', so "bob " read, overwrote and spent
-- bob's profile and credits. VARBINARY compares every byte on MariaDB and
-- MySQL alike. external_id has always been limited to 255 bytes, so
-- existing ids fit; the unique key only gets stricter.
ALTER TABLE users MODIFY external_id VARBINARY(255) NOT NULL;

-- +goose Down
ALTER TABLE users MODIFY external_id VARCHAR(255) NOT NULL;

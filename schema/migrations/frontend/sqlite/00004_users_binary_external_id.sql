-- +goose Up
-- Nothing to change: SQLite compares TEXT with the BINARY collation (byte for
-- byte), so identifiers are exact already. The version keeps both dialects'
-- migrations numbered alike (the MySQL one makes its columns VARBINARY).

-- +goose Down

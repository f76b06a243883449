-- +goose Up
-- Every change of a user's credits, with the balance after it. The key is
-- unique per user; NULL (no key) may repeat.
CREATE TABLE credit_ledger (
    id              INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    user_id         INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    delta           INTEGER NOT NULL,
    reason          TEXT    NOT NULL DEFAULT '',
    idempotency_key TEXT,
    balance         INTEGER NOT NULL,
    created_at      TEXT    NOT NULL,
    UNIQUE (user_id, idempotency_key)
) STRICT;
CREATE INDEX credit_ledger_user_idx ON credit_ledger (user_id, id);

-- +goose Down
DROP TABLE credit_ledger;

-- +goose Up
CREATE TABLE credit_ledger (
    id              BIGINT       NOT NULL AUTO_INCREMENT,
    user_id         BIGINT       NOT NULL,
    delta           BIGINT       NOT NULL,
    reason          VARCHAR(255) NOT NULL DEFAULT '',
    idempotency_key VARCHAR(255) NULL,
    balance         BIGINT       NOT NULL,
    created_at      DATETIME(6)  NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY credit_ledger_key_idx (user_id, idempotency_key),
    KEY credit_ledger_user_idx (user_id, id),
    CONSTRAINT credit_ledger_user_fk FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE credit_ledger;

-- +goose Up
-- Idempotency keys compare byte for byte (see 00004): "pay-1 " no longer
-- replays "pay-1".
ALTER TABLE credit_ledger MODIFY idempotency_key VARBINARY(255) NULL;

-- +goose Down
ALTER TABLE credit_ledger MODIFY idempotency_key VARCHAR(255) NULL;

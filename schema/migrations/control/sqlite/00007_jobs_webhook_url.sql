-- +goose Up
-- A job's own webhook address (submit field webhook_url), overriding its
-- frontend's webhook.url. NULL: the frontend's, if any.
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;

-- +goose Down
ALTER TABLE jobs DROP COLUMN webhook_url;

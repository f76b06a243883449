-- +goose Up
CREATE TABLE users (
    id          BIGINT        NOT NULL AUTO_INCREMENT,
    external_id VARCHAR(255)  NOT NULL,
    nickname    VARCHAR(255)  NOT NULL DEFAULT '',
    email       VARCHAR(320)  NOT NULL DEFAULT '',
    avatar_url  VARCHAR(2048) NOT NULL DEFAULT '',
    credits     BIGINT        NOT NULL DEFAULT 0,
    created_at  DATETIME(6)   NOT NULL,
    updated_at  DATETIME(6)   NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY users_external_id_idx (external_id),
    CONSTRAINT users_credits_check CHECK (credits >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE users;

-- +goose Up
CREATE TABLE photos (
    id           BIGINT        NOT NULL AUTO_INCREMENT,
    user_id      BIGINT        NOT NULL,
    job_id       VARCHAR(64)   NOT NULL,
    output_index INT           NOT NULL,
    object_key   VARCHAR(1024) NOT NULL,
    url          VARCHAR(2048) NOT NULL DEFAULT '',
    content_type VARCHAR(255)  NOT NULL,
    width        INT           NOT NULL DEFAULT 0,
    height       INT           NOT NULL DEFAULT 0,
    bytes        BIGINT        NOT NULL DEFAULT 0,
    sha256       VARCHAR(64)   NOT NULL DEFAULT '',
    node         VARCHAR(255)  NOT NULL DEFAULT '',
    metadata     MEDIUMTEXT    NULL,
    style        VARCHAR(64)   NULL,
    created_at   DATETIME(6)   NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY photos_job_output_idx (job_id, output_index),
    KEY photos_user_idx (user_id, id),
    KEY photos_style_idx (style, user_id, id),
    CONSTRAINT photos_user_fk FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE photos;

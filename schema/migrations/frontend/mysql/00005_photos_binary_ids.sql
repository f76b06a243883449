-- +goose Up
-- Job ids, object keys, node names and the indexed style compare byte for
-- byte (see 00004). The sizes are the byte limits the code enforces.
ALTER TABLE photos
    MODIFY job_id     VARBINARY(64)   NOT NULL,
    MODIFY object_key VARBINARY(1024) NOT NULL,
    MODIFY node       VARBINARY(255)  NOT NULL DEFAULT '',
    MODIFY style      VARBINARY(64)   NULL;

-- +goose Down
ALTER TABLE photos
    MODIFY job_id     VARCHAR(64)   NOT NULL,
    MODIFY object_key VARCHAR(1024) NOT NULL,
    MODIFY node       VARCHAR(255)  NOT NULL DEFAULT '',
    MODIFY style      VARCHAR(64)   NULL;

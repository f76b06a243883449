-- +goose Up
-- Identifiers compare byte for byte, as on SQLite. utf8mb4_bin is a PAD SPACE
-- collation: under it 'bob ' = 'bob', so a user id, job id or idempotency key
-- with trailing spaces found another's row. VARBINARY compares every byte on
-- MariaDB and MySQL alike (utf8mb4_nopad_bin is MariaDB's only). The sizes
-- are the byte limits the code has always enforced, so existing values fit;
-- unique keys only get stricter, so they still hold. One statement: the
-- table is rebuilt once, and a failure leaves it as it was.
ALTER TABLE jobs
    MODIFY id              VARBINARY(64)  NOT NULL,
    MODIFY frontend        VARBINARY(64)  NOT NULL,
    MODIFY user_id         VARBINARY(255) NOT NULL,
    MODIFY node            VARBINARY(255) NULL,
    MODIFY prompt_id       VARBINARY(255) NULL,
    MODIFY lease_owner     VARBINARY(255) NULL,
    MODIFY idempotency_key VARBINARY(255) NULL;

-- +goose Down
-- Fails on a unique key when two values differing only in trailing spaces
-- were stored meanwhile.
ALTER TABLE jobs
    MODIFY id              VARCHAR(64)  NOT NULL,
    MODIFY frontend        VARCHAR(64)  NOT NULL,
    MODIFY user_id         VARCHAR(255) NOT NULL,
    MODIFY node            VARCHAR(255) NULL,
    MODIFY prompt_id       VARCHAR(255) NULL,
    MODIFY lease_owner     VARCHAR(255) NULL,
    MODIFY idempotency_key VARCHAR(255) NULL;

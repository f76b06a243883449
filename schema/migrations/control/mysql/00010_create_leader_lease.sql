-- +goose Up
-- The scheduler's lease when several replicas share one control database:
-- one row per leadership, held by one instance until expires_ms (the
-- database's clock, milliseconds since 1970). epoch grows at each change of
-- holder; every job write of the leader is checked against it, so a leader
-- whose lease was taken over cannot write any more.
CREATE TABLE leader_lease (
    name       VARBINARY(64)  NOT NULL PRIMARY KEY,
    holder     VARBINARY(128) NOT NULL,
    epoch      BIGINT         NOT NULL,
    expires_ms BIGINT         NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE leader_lease;

-- +goose Up
-- The scheduler's lease when several replicas share one control database:
-- one row per leadership, held by one instance until expires_ms (the
-- database's clock, milliseconds since 1970). epoch grows at each change of
-- holder; every job write of the leader is checked against it, so a leader
-- whose lease was taken over cannot write any more.
CREATE TABLE leader_lease (
    name       TEXT    NOT NULL PRIMARY KEY,
    holder     TEXT    NOT NULL,
    epoch      INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) STRICT;

-- +goose Down
DROP TABLE leader_lease;

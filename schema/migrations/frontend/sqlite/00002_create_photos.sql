-- +goose Up
-- style is filled by controllers that index a metadata field (the style
-- controller); the table is the same for every frontend.
CREATE TABLE photos (
    id           INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    job_id       TEXT    NOT NULL,
    output_index INTEGER NOT NULL,
    object_key   TEXT    NOT NULL,
    url          TEXT    NOT NULL DEFAULT '',
    content_type TEXT    NOT NULL,
    width        INTEGER NOT NULL DEFAULT 0,
    height       INTEGER NOT NULL DEFAULT 0,
    bytes        INTEGER NOT NULL DEFAULT 0,
    sha256       TEXT    NOT NULL DEFAULT '',
    node         TEXT    NOT NULL DEFAULT '',
    metadata     TEXT,
    style        TEXT,
    created_at   TEXT    NOT NULL,
    UNIQUE (job_id, output_index)
) STRICT;
CREATE INDEX photos_user_idx ON photos (user_id, id);
CREATE INDEX photos_style_idx ON photos (style, user_id, id);

-- +goose Down
DROP TABLE photos;

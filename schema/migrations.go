package schema

import (
	"embed"
	"fmt"
	"io/fs"
)

// Migrations holds the SQL migrations of both databases in both dialects,
// laid out as migrations/<db>/<dialect>/NNNNN_name.sql with <db> "control"
// (jobs, nodes) or "frontend" (users, photos, credit_ledger) and <dialect>
// "sqlite" or "mysql". Files carry goose "-- +goose Up/Down" annotations.
//
//go:embed migrations/*/*/*.sql
var Migrations embed.FS

// MigrationsFS returns the migrations of one database ("control" or
// "frontend") in one dialect ("sqlite" or "mysql").
func MigrationsFS(db, dialect string) (fs.FS, error) {
	switch db {
	case "control", "frontend":
	default:
		return nil, fmt.Errorf("migrations: unknown database kind %q", db)
	}
	switch dialect {
	case "sqlite", "mysql":
	default:
		return nil, fmt.Errorf("migrations: unknown dialect %q", dialect)
	}
	return fs.Sub(Migrations, "migrations/"+db+"/"+dialect)
}

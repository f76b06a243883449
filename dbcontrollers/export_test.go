package dbcontrollers

import (
	"context"
	"fmt"
)

// OpenAt opens (creating) a database of kind ("control" or "frontend")
// migrated only up to version, as an older release left it.
func OpenAt(ctx context.Context, cfg Config, name, kind string, version int64) (*DB, error) {
	d, err := cfg.dialect()
	if err != nil {
		return nil, err
	}
	var db *DB
	if d == DialectSQLite {
		db, err = openSQLite(ctx, cfg, name)
	} else {
		db, err = openMySQL(ctx, cfg, name)
	}
	if err != nil {
		return nil, err
	}
	p, err := newProvider(db, kind)
	if err == nil {
		_, err = p.UpTo(ctx, version)
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("migrate %s up to %d: %w", name, version, err)
	}
	return db, nil
}

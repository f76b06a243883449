package dbcontrollers

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/database"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Database kinds, as laid out under schema/migrations.
const (
	kindControl  = "control"
	kindFrontend = "frontend"
)

// migrationsTable records applied migrations in every database.
const migrationsTable = "schema_migrations"

// migrationLockTimeout bounds the wait for another process migrating the same
// MySQL database.
const migrationLockTimeoutSeconds = 120

// newProvider builds the goose provider for one database: the embedded
// migrations of its kind and dialect, versions kept in schema_migrations.
func newProvider(db *DB, kind string) (*goose.Provider, error) {
	fsys, err := schema.MigrationsFS(kind, db.Dialect)
	if err != nil {
		return nil, err
	}
	gd := database.DialectSQLite3
	if db.Dialect == DialectMySQL {
		gd = database.DialectMySQL
	}
	store, err := database.NewStore(gd, migrationsTable)
	if err != nil {
		return nil, err
	}
	return goose.NewProvider(goose.DialectCustom, db.DB.DB, fsys,
		goose.WithStore(store), goose.WithDisableGlobalRegistry(true))
}

// sqliteMigrating serialises migrations of one SQLite file within the
// process (MySQL uses a server lock, see mysqlLocker).
var sqliteMigrating sync.Map // file path -> *sync.Mutex

// migrate applies every pending migration of the database's kind.
func migrate(ctx context.Context, db *DB, kind string) error {
	p, err := newProvider(db, kind)
	if err != nil {
		return fmt.Errorf("migrate %s database %s: %w", kind, db.Name, err)
	}
	// The whole Up runs under the lock: goose checks for pending migrations
	// (creating its version table) before it takes a session lock, so a
	// session locker alone still lets first starts race.
	if db.Dialect == DialectSQLite {
		mu, _ := sqliteMigrating.LoadOrStore(db.Name, new(sync.Mutex))
		mu.(*sync.Mutex).Lock()
		defer mu.(*sync.Mutex).Unlock()
	} else {
		unlock, err := lockMySQLMigrations(ctx, db)
		if err != nil {
			return fmt.Errorf("migrate %s database %s: %w", kind, db.Name, err)
		}
		defer unlock()
	}
	// Not p.Close: that would close db.
	_, err = p.Up(ctx)
	if err != nil && db.Dialect == DialectSQLite && ctx.Err() == nil {
		// Another process migrated the file at the same moment: what is
		// left (if anything) applies cleanly now.
		_, err = p.Up(ctx)
	}
	if err != nil {
		return fmt.Errorf("migrate %s database %s: %w", kind, db.Name, err)
	}
	return nil
}

// MigrationVersion reports the applied and the newest known migration version
// of an open database of the given kind ("control" or "frontend").
func MigrationVersion(ctx context.Context, db *DB, kind string) (current, target int64, err error) {
	p, err := newProvider(db, kind)
	if err != nil {
		return 0, 0, err
	}
	return p.GetVersions(ctx)
}

// lockMySQLMigrations takes a named server lock on a connection of its own,
// so processes starting at once against one server migrate one at a time.
func lockMySQLMigrations(ctx context.Context, db *DB) (unlock func(), err error) {
	conn, err := db.DB.Conn(ctx)
	if err != nil {
		return nil, err
	}
	name := migrationLockName(db.Name)
	var got sql.NullInt64
	if err := conn.QueryRowContext(ctx, "SELECT GET_LOCK(?, ?)", name, migrationLockTimeoutSeconds).Scan(&got); err != nil {
		conn.Close()
		return nil, fmt.Errorf("migration lock: %w", err)
	}
	if !got.Valid || got.Int64 != 1 {
		conn.Close()
		return nil, fmt.Errorf("migration lock %s: not acquired within %ds", name, migrationLockTimeoutSeconds)
	}
	return func() {
		var released sql.NullInt64
		_ = conn.QueryRowContext(context.WithoutCancel(ctx), "SELECT RELEASE_LOCK(?)", name).Scan(&released)
		conn.Close() // a closed session releases its locks in any case
	}, nil
}

func migrationLockName(dbName string) string {
	sum := sha256.Sum256([]byte(dbName))
	return "comfyfarm.migrate." + hex.EncodeToString(sum[:12])
}

// Package dbtest gives tests of any package the databases to run on: SQLite
// in a temporary folder, and MariaDB/MySQL when one is reachable.
//
// MySQL comes from COMFYFARM_TEST_MYSQL_DSN (default
// "root@tcp(127.0.0.1:3306)/"). When it cannot be reached the MySQL case is
// skipped with a message, unless COMFYFARM_REQUIRE_MYSQL=1, which fails the
// test instead. Every MySQL config gets a fresh database prefix
// (comfyfarm_t<random>), so its control and frontend databases are new; they
// are dropped when the test ends.
package dbtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
)

// Environment variables read by this package.
const (
	EnvMySQLDSN     = "COMFYFARM_TEST_MYSQL_DSN"
	EnvRequireMySQL = "COMFYFARM_REQUIRE_MYSQL"
	DefaultMySQLDSN = "root@tcp(127.0.0.1:3306)/"
)

// Named is one database to run a test on. Its configuration is made inside
// the subtest (Config), so that a MySQL that cannot be used shows as that
// subtest's skip.
type Named struct {
	Name string // "sqlite" or "mysql"
}

// Configs names both databases, always: run each as a subtest named Name and
// call Config in it. An unreachable MySQL then appears as a skipped "mysql"
// subtest (SKIP in go test -v), or a failed one when COMFYFARM_REQUIRE_MYSQL=1.
func Configs() []Named {
	return []Named{{Name: dbcontrollers.DialectSQLite}, {Name: dbcontrollers.DialectMySQL}}
}

// Config returns a fresh configuration of the database for t: SQLite in a
// new temporary folder, or MySQL with a new prefix (t skipped when MySQL is
// not reachable, failed when it is required).
func (n Named) Config(t testing.TB) dbcontrollers.Config {
	t.Helper()
	if n.Name == dbcontrollers.DialectMySQL {
		return MySQL(t)
	}
	return SQLite(t)
}

// Each runs fn as a subtest per database: "sqlite" and "mysql". The MySQL
// subtest is skipped (or failed, see the package doc) when MySQL is not
// reachable. fn may call t.Parallel.
func Each(t *testing.T, fn func(t *testing.T, cfg dbcontrollers.Config)) {
	t.Helper()
	for _, n := range Configs() {
		t.Run(n.Name, func(t *testing.T) { fn(t, n.Config(t)) })
	}
}

// SQLite returns a SQLite config in a fresh temporary folder.
func SQLite(t testing.TB) dbcontrollers.Config {
	return dbcontrollers.Config{Driver: dbcontrollers.DialectSQLite, Path: t.TempDir()}
}

// MySQL returns a MySQL config with a fresh database prefix, or skips t
// (fails it when MySQL is required).
func MySQL(t testing.TB) dbcontrollers.Config {
	t.Helper()
	cfg, reason := mysqlConfig(t)
	if reason != "" {
		t.Skip(reason)
	}
	return cfg
}

var (
	probeOnce   sync.Once
	probeReason string
	noticeOnce  sync.Once
)

// DSN is the MySQL server tests use.
func DSN() string {
	if v := os.Getenv(EnvMySQLDSN); v != "" {
		return v
	}
	return DefaultMySQLDSN
}

func required() bool { return os.Getenv(EnvRequireMySQL) == "1" }

// mysqlConfig returns a config with a fresh prefix whose databases are
// dropped at cleanup, or why MySQL cannot be used (t failed if required).
func mysqlConfig(t testing.TB) (dbcontrollers.Config, string) {
	t.Helper()
	probeOnce.Do(func() { probeReason = probe(DSN()) })
	if probeReason != "" {
		if required() {
			t.Fatalf("%s=1 but MySQL is not usable: %s", EnvRequireMySQL, probeReason)
		}
		reason := "skipping MySQL: " + probeReason + " (set " + EnvMySQLDSN + "; " + EnvRequireMySQL + "=1 makes this fail)"
		noticeOnce.Do(func() { fmt.Fprintln(os.Stderr, "dbtest: "+reason) })
		return dbcontrollers.Config{}, reason
	}
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	prefix := "comfyfarm_t" + hex.EncodeToString(b[:])
	t.Cleanup(func() {
		if err := DropPrefix(DSN(), prefix); err != nil {
			t.Errorf("drop test databases %s*: %v", prefix, err)
		}
	})
	return dbcontrollers.Config{Driver: dbcontrollers.DialectMySQL, DSN: DSN(), Prefix: prefix}, ""
}

func adminDB(dsn string) (*sql.DB, error) {
	mc, err := mysql.ParseDSN(dsn)
	if err != nil {
		return nil, err
	}
	mc.DBName = ""
	mc.Timeout = 3 * time.Second
	conn, err := mysql.NewConnector(mc)
	if err != nil {
		return nil, err
	}
	return sql.OpenDB(conn), nil
}

func probe(dsn string) string {
	db, err := adminDB(dsn)
	if err != nil {
		return fmt.Sprintf("bad DSN: %v", err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := db.PingContext(ctx); err != nil {
		return fmt.Sprintf("cannot reach MySQL: %v", err)
	}
	return ""
}

// DropPrefix drops the database named prefix and every <prefix>_* database.
func DropPrefix(dsn, prefix string) error { return dbcontrollers.DropPrefix(dsn, prefix) }

package dbcontrollers

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jmoiron/sqlx"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Dialects.
const (
	DialectSQLite = "sqlite"
	DialectMySQL  = "mysql"
)

// DefaultPrefix names the control database and prefixes the default frontend
// database names on MySQL.
const DefaultPrefix = "comfyfarm"

// DefaultSQLitePath is the folder of the SQLite files when Config.Path is empty.
const DefaultSQLitePath = "./data"

// SQLite pool and lock settings. WAL lets readers run beside the one writer;
// every transaction begins IMMEDIATE, so a writer takes the write lock up front
// and waits (busy_timeout) instead of failing half-way on a lock upgrade.
//
// Durability: synchronous=NORMAL in WAL mode. A commit returns once its frames
// are written to the WAL file (in the page cache), so a killed process loses
// no committed job: the kernel writes those pages all the same. A power loss
// or kernel crash can lose the commits since the last checkpoint, which
// fsyncs the WAL. FULL would fsync at every commit (about 0.6 ms on the
// development disk, and a job makes seven commits) for that case only; see
// docs/benchmarks.md, "Durability".
const (
	sqliteMaxOpenConns = 8
	sqliteBusyTimeout  = 10 * time.Second
)

// MySQL pool settings.
const (
	mysqlMaxOpenConns    = 32
	mysqlMaxIdleConns    = 8
	mysqlConnMaxLifetime = 30 * time.Minute
	mysqlConnMaxIdleTime = 5 * time.Minute
)

// Config says where the databases live.
type Config struct {
	Driver string // "sqlite" (default) or "mysql"
	Path   string // sqlite: folder holding <prefix>.db and one <frontend>.db per frontend
	DSN    string // mysql: "user:pass@tcp(host:3306)/"; the database name part is ignored
	// Prefix names the control database (<prefix>.db on SQLite, database
	// <prefix> on MySQL) and, on MySQL, prefixes the default frontend database
	// names (<prefix>_<frontend>). Default "comfyfarm".
	Prefix string
	// Logger receives the MySQL driver's own messages (a connection that
	// broke, say), at warn level; nil leaves them on the driver's default,
	// standard error.
	Logger *slog.Logger
}

// driverLogger passes the MySQL driver's messages to slog.
type driverLogger struct{ log *slog.Logger }

func (l driverLogger) Print(v ...any) {
	l.log.Warn(strings.TrimSpace(fmt.Sprint(v...)))
}

// setDriverLogger routes mc's driver messages to cfg.Logger, when set.
func (cfg Config) setDriverLogger(mc *mysql.Config) {
	if cfg.Logger != nil {
		mc.Logger = driverLogger{cfg.Logger.With("component", "mysql")}
	}
}

func (c Config) dialect() (string, error) {
	switch c.Driver {
	case "", DialectSQLite, "sqlite3":
		return DialectSQLite, nil
	case DialectMySQL, "mariadb":
		return DialectMySQL, nil
	}
	return "", fmt.Errorf("database: unknown driver %q (want sqlite or mysql)", c.Driver)
}

func (c Config) prefix() (string, error) {
	p := c.Prefix
	if p == "" {
		p = DefaultPrefix
	}
	if !ValidDatabaseName(p) {
		return "", fmt.Errorf("database: prefix %q is not a valid database name", p)
	}
	return p, nil
}

// ControlDatabase is the control database's name: the MySQL database, or the
// SQLite file name without ".db".
func (c Config) ControlDatabase() (string, error) { return c.prefix() }

// FrontendDatabase is the database name of one frontend: configured when not
// empty (it must be a ValidDatabaseName), otherwise <frontend> on SQLite and
// <prefix>_<frontend> on MySQL.
func (c Config) FrontendDatabase(frontend, configured string) (string, error) {
	if configured != "" {
		if !ValidDatabaseName(configured) {
			return "", fmt.Errorf("frontend %s: database name %q must match %s", frontend, configured, dbNamePattern)
		}
		return configured, nil
	}
	if !schema.ValidFrontendName(frontend) {
		return "", schema.Invalid("frontend", "%q is not a valid frontend name", frontend)
	}
	d, err := c.dialect()
	if err != nil {
		return "", err
	}
	if d == DialectSQLite {
		return frontend, nil
	}
	p, err := c.prefix()
	if err != nil {
		return "", err
	}
	name := p + "_" + frontend
	if !ValidDatabaseName(name) {
		return "", fmt.Errorf("frontend %s: database name %q is too long", frontend, name)
	}
	return name, nil
}

const dbNamePattern = `^[a-z][a-z0-9_]{0,63}$`

var dbNameRE = regexp.MustCompile(dbNamePattern)

// ValidDatabaseName reports whether name may be used as a database (or SQLite
// file) name: lower-case letters, digits and underscores, at most 64.
func ValidDatabaseName(name string) bool { return dbNameRE.MatchString(name) }

// quoteIdent quotes a MySQL identifier. Names reaching it are validated first;
// quoting is the second line of defence.
func quoteIdent(name string) string {
	return "`" + strings.ReplaceAll(name, "`", "``") + "`"
}

// DB is one open database: the control database or one frontend's.
type DB struct {
	*sqlx.DB
	Dialect string // "sqlite" or "mysql"
	Name    string // database name (MySQL) or file path (SQLite)
}

// Ping checks that the database answers.
func (db *DB) Ping(ctx context.Context) error {
	if err := db.DB.PingContext(ctx); err != nil {
		return fmt.Errorf("ping %s database %s: %w", db.Dialect, db.Name, err)
	}
	return nil
}

// OpenControl opens the control database (jobs, nodes), creating and
// migrating it when needed.
func OpenControl(ctx context.Context, cfg Config) (*DB, error) {
	name, err := cfg.ControlDatabase()
	if err != nil {
		return nil, err
	}
	return openMigrated(ctx, cfg, name, kindControl)
}

// OpenFrontend opens one frontend's database (users, photos, credit_ledger),
// creating and migrating it when needed. dbName is the name from
// Config.FrontendDatabase.
func OpenFrontend(ctx context.Context, cfg Config, dbName string) (*DB, error) {
	if !ValidDatabaseName(dbName) {
		return nil, fmt.Errorf("open frontend database: name %q must match %s", dbName, dbNamePattern)
	}
	if control, err := cfg.ControlDatabase(); err != nil {
		return nil, err
	} else if control == dbName {
		return nil, fmt.Errorf("open frontend database: %q is the control database", dbName)
	}
	return openMigrated(ctx, cfg, dbName, kindFrontend)
}

// Migrate brings the control database and the given frontend databases up to
// date, then closes them.
func Migrate(ctx context.Context, cfg Config, frontendDBNames []string) error {
	db, err := OpenControl(ctx, cfg)
	if err != nil {
		return err
	}
	if err := db.Close(); err != nil {
		return err
	}
	for _, name := range frontendDBNames {
		db, err := OpenFrontend(ctx, cfg, name)
		if err != nil {
			return err
		}
		if err := db.Close(); err != nil {
			return err
		}
	}
	return nil
}

func openMigrated(ctx context.Context, cfg Config, name, kind string) (*DB, error) {
	d, err := cfg.dialect()
	if err != nil {
		return nil, err
	}
	var db *DB
	switch d {
	case DialectSQLite:
		db, err = openSQLite(ctx, cfg, name)
	default:
		db, err = openMySQL(ctx, cfg, name)
	}
	if err != nil {
		return nil, err
	}
	if err := migrate(ctx, db, kind); err != nil {
		_ = db.Close()
		return nil, err
	}
	return db, nil
}

func openSQLite(ctx context.Context, cfg Config, name string) (*DB, error) {
	dir := cfg.Path
	if dir == "" {
		dir = DefaultSQLitePath
	}
	if strings.ContainsAny(dir, "?#") {
		return nil, fmt.Errorf("sqlite: path %q must not contain '?' or '#'", dir)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("sqlite: create data folder: %w", err)
	}
	file := filepath.Join(dir, name+".db")
	if err := privateFiles(file, cfg.Logger); err != nil {
		return nil, err
	}
	dsn := file + "?" + strings.Join([]string{
		fmt.Sprintf("_pragma=busy_timeout(%d)", sqliteBusyTimeout.Milliseconds()),
		"_pragma=journal_mode(WAL)",
		"_pragma=synchronous(NORMAL)",
		"_pragma=foreign_keys(1)",
		"_txlock=immediate",
	}, "&")
	x := sqlx.NewDb(sql.OpenDB(&stmtCachingConnector{dsn: dsn, drv: &sqlite.Driver{}}), "sqlite")
	var err error
	x.SetMaxOpenConns(sqliteMaxOpenConns)
	x.SetMaxIdleConns(sqliteMaxOpenConns)
	db := &DB{DB: x, Dialect: DialectSQLite, Name: file}
	// Setting WAL mode takes a lock that the busy handler does not wait for
	// when several processes (or pools) open a new file at once: retry.
	for attempt := 1; ; attempt++ {
		err = db.Ping(ctx)
		if err == nil || attempt == 20 || !strings.Contains(err.Error(), "SQLITE_BUSY") {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(attempt) * 10 * time.Millisecond):
		}
	}
	if err != nil {
		_ = x.Close()
		return nil, err
	}
	return db, nil
}

// sqliteFileMode is the mode of the SQLite files: they hold users and their
// e-mail addresses, so only the owner may read them (like the secret).
const sqliteFileMode = 0o600

// privateFiles creates the database file with sqliteFileMode before SQLite
// opens it (SQLite gives its -wal and -shm files the database file's mode),
// and takes group and other access away from files an older release
// created 0644. A file it may not chmod is left as it is, with a warning.
func privateFiles(file string, log *slog.Logger) error {
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE|os.O_EXCL, sqliteFileMode)
	if err == nil {
		return f.Close()
	}
	if !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("sqlite: create %s: %w", file, err)
	}
	for _, p := range []string{file, file + "-wal", file + "-shm"} {
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm()&0o077 == 0 {
			continue
		}
		if err := os.Chmod(p, fi.Mode().Perm()&^0o077); err != nil && log != nil {
			log.Warn("sqlite file readable by others; chmod failed", "file", p, "err", err)
		}
	}
	return nil
}

// mysqlConfig parses the configured DSN and sets what this package relies
// on: parseTime, UTC, one statement per call. "Rows affected" stays MySQL's
// default (rows changed, not matched): INSERT ... ON DUPLICATE KEY UPDATE
// then tells an insert (1) from an existing row (0).
func mysqlConfig(dsn, dbName string) (*mysql.Config, error) {
	if dsn == "" {
		return nil, errors.New("mysql: database.dsn is empty")
	}
	mc, err := mysql.ParseDSN(dsn)
	if err != nil {
		return nil, fmt.Errorf("mysql: parse dsn: %w", err)
	}
	mc.DBName = dbName
	mc.ParseTime = true
	mc.Loc = time.UTC
	mc.MultiStatements = false
	mc.ClientFoundRows = false
	// One round trip per statement instead of prepare, execute and close;
	// the driver escapes by the connection's (utf8mb4) rules.
	mc.InterpolateParams = true
	if mc.Params == nil {
		mc.Params = map[string]string{}
	}
	mc.Params["time_zone"] = "'+00:00'"
	if mc.Timeout == 0 {
		mc.Timeout = 10 * time.Second
	}
	return mc, nil
}

// createMySQLDatabase creates the database when missing.
func createMySQLDatabase(ctx context.Context, cfg Config, name string) error {
	mc, err := mysqlConfig(cfg.DSN, "")
	if err != nil {
		return err
	}
	cfg.setDriverLogger(mc)
	conn, err := mysql.NewConnector(mc)
	if err != nil {
		return fmt.Errorf("mysql: %w", err)
	}
	admin := sql.OpenDB(conn)
	defer admin.Close()
	q := "CREATE DATABASE IF NOT EXISTS " + quoteIdent(name) + " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
	if _, err := admin.ExecContext(ctx, q); err != nil {
		return fmt.Errorf("mysql: create database %s: %w", name, err)
	}
	return nil
}

func openMySQL(ctx context.Context, cfg Config, name string) (*DB, error) {
	if !ValidDatabaseName(name) {
		return nil, fmt.Errorf("mysql: database name %q must match %s", name, dbNamePattern)
	}
	if err := createMySQLDatabase(ctx, cfg, name); err != nil {
		return nil, err
	}
	mc, err := mysqlConfig(cfg.DSN, name)
	if err != nil {
		return nil, err
	}
	cfg.setDriverLogger(mc)
	conn, err := mysql.NewConnector(mc)
	if err != nil {
		return nil, fmt.Errorf("mysql: %w", err)
	}
	x := sqlx.NewDb(sql.OpenDB(conn), "mysql")
	x.SetMaxOpenConns(mysqlMaxOpenConns)
	x.SetMaxIdleConns(mysqlMaxIdleConns)
	x.SetConnMaxLifetime(mysqlConnMaxLifetime)
	x.SetConnMaxIdleTime(mysqlConnMaxIdleTime)
	db := &DB{DB: x, Dialect: DialectMySQL, Name: name}
	if err := db.Ping(ctx); err != nil {
		_ = x.Close()
		return nil, err
	}
	return db, nil
}

// InTx runs fn in one transaction: it commits when fn returns nil and rolls
// back otherwise (and on panic, which it re-raises). On SQLite the
// transaction holds the write lock from its start, so a transaction must not
// wait on another transaction of the same database.
func InTx(ctx context.Context, db *DB, fn func(tx *sqlx.Tx) error) (err error) {
	return inTxOpts(ctx, db, nil, fn)
}

// inTxOpts is InTx with transaction options (an isolation level, say).
func inTxOpts(ctx context.Context, db *DB, opts *sql.TxOptions, fn func(tx *sqlx.Tx) error) (err error) {
	tx, err := db.BeginTxx(ctx, opts)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if p := recover(); p != nil {
			_ = tx.Rollback()
			panic(p)
		}
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	if err = fn(tx); err != nil {
		return err
	}
	if err = tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", interpretError(err))
	}
	return nil
}

// withTx runs fn in the caller's transaction when ext is one, and otherwise in
// a transaction of its own, so multi-statement operations stay atomic either
// way.
func withTx(ctx context.Context, ext sqlx.ExtContext, fn func(tx sqlx.ExtContext) error) error {
	switch db := ext.(type) {
	case *DB:
		return InTx(ctx, db, func(tx *sqlx.Tx) error { return fn(tx) })
	case *sqlx.DB:
		return InTx(ctx, &DB{DB: db}, func(tx *sqlx.Tx) error { return fn(tx) })
	default:
		return fn(ext)
	}
}

// interpretError translates driver errors into the vocabulary's sentinels:
// no rows -> schema.ErrNotFound, a unique-key violation -> schema.ErrConflict.
func interpretError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, sql.ErrNoRows) {
		return schema.ErrNotFound
	}
	var me *mysql.MySQLError
	if errors.As(err, &me) && me.Number == mysqlErrDupEntry {
		return fmt.Errorf("%w: %s", schema.ErrConflict, me.Message)
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() {
		case sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
			return fmt.Errorf("%w: %s", schema.ErrConflict, se.Error())
		}
	}
	return err
}

// MySQL error numbers.
const (
	mysqlErrDupEntry = 1062
	mysqlErrLockWait = 1205
	mysqlErrDeadlock = 1213
)

// Transient reports whether err says the database could not be reached or
// could not finish for now — a broken or refused connection, the server
// going away or shutting down, a lock race — so the same request may succeed
// later. An error that is the database's answer (a constraint, a conflict, a
// missing row, a bad statement) is not transient.
func Transient(err error) bool {
	if err == nil {
		return false
	}
	if retryable(err) {
		return true
	}
	var me *mysql.MySQLError
	if errors.As(err, &me) {
		switch me.Number {
		case 1040, // too many connections
			1053, // server shutdown in progress
			1927, // connection killed
			2006, // server has gone away
			2013: // lost connection during query
			return true
		}
		return false
	}
	var ne net.Error
	var oe *net.OpError
	return errors.Is(err, driver.ErrBadConn) || errors.Is(err, mysql.ErrInvalidConn) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.As(err, &oe) || (errors.As(err, &ne) && ne.Timeout())
}

// retryable reports whether a transaction failed only because it lost a lock
// race and may simply be run again.
func retryable(err error) bool {
	var me *mysql.MySQLError
	if errors.As(err, &me) {
		return me.Number == mysqlErrDeadlock || me.Number == mysqlErrLockWait
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		return se.Code()&0xff == sqlite3.SQLITE_BUSY
	}
	return false
}

// inTxRetry is InTx for the package's own short transactions: a deadlock or
// busy error runs the transaction again, a few times.
func inTxRetry(ctx context.Context, db *DB, fn func(tx *sqlx.Tx) error) error {
	return inTxRetryOpts(ctx, db, nil, fn)
}

// inTxRetryOpts is inTxRetry with transaction options.
func inTxRetryOpts(ctx context.Context, db *DB, opts *sql.TxOptions, fn func(tx *sqlx.Tx) error) error {
	const attempts = 4
	var err error
	for i := 0; i < attempts; i++ {
		if err = inTxOpts(ctx, db, opts, fn); err == nil || !retryable(err) || i == attempts-1 {
			return err
		}
		// Racers that deadlocked each other would meet again if they retried
		// at once: wait a short, random while, longer at each try.
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(1+rand.IntN(4<<i)) * time.Millisecond):
		}
	}
	return err
}

// DropPrefix drops the MySQL database named prefix and every <prefix>_*
// database (a test's or a benchmark's control and frontend databases) on
// the server of dsn.
func DropPrefix(dsn, prefix string) error {
	if !ValidDatabaseName(prefix) {
		return fmt.Errorf("bad prefix %q", prefix)
	}
	mc, err := mysqlConfig(dsn, "")
	if err != nil {
		return err
	}
	mc.Timeout = 3 * time.Second
	conn, err := mysql.NewConnector(mc)
	if err != nil {
		return err
	}
	db := sql.OpenDB(conn)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var names []string
	if err := sqlx.SelectContext(ctx, sqlx.NewDb(db, "mysql"), &names, "SHOW DATABASES LIKE '"+strings.ReplaceAll(prefix, "_", `\_`)+"%'"); err != nil {
		return err
	}
	for _, n := range names {
		if ValidDatabaseName(n) && (n == prefix || strings.HasPrefix(n, prefix+"_")) {
			if _, err := db.ExecContext(ctx, "DROP DATABASE IF EXISTS "+quoteIdent(n)); err != nil {
				return err
			}
		}
	}
	return nil
}

package dbcontrollers

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"modernc.org/sqlite"
)

func openCachingSQLite(t *testing.T) *sql.DB {
	t.Helper()
	db := sql.OpenDB(&stmtCachingConnector{dsn: filepath.Join(t.TempDir(), "c.db") + "?_pragma=journal_mode(WAL)", drv: &sqlite.Driver{}})
	db.SetMaxOpenConns(1) // one connection: one cache
	t.Cleanup(func() { db.Close() })
	return db
}

// A query run again runs on its compiled statement; a script of several
// statements runs whole, uncached.
func TestStmtCacheReusesStatements(t *testing.T) {
	db := openCachingSQLite(t)
	ctx := context.Background()
	if _, err := db.ExecContext(ctx, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t (v) VALUES ('a'); INSERT INTO t (v) VALUES ('b');"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := db.QueryRowContext(ctx, "SELECT COUNT(*) FROM t").Scan(&n); err != nil || n != 2 {
		t.Fatalf("the script ran %d inserts (%v), want 2", n, err)
	}
	before := stmtCompiles.Load()
	for i := range 50 {
		if _, err := db.ExecContext(ctx, "UPDATE t SET v = ? WHERE id = ?", fmt.Sprint(i), 1); err != nil {
			t.Fatal(err)
		}
		var v string
		if err := db.QueryRowContext(ctx, "SELECT v FROM t WHERE id = ?", 1).Scan(&v); err != nil || v != fmt.Sprint(i) {
			t.Fatalf("read %q (%v), want %d", v, err, i)
		}
	}
	if got := stmtCompiles.Load() - before; got != 2 {
		t.Fatalf("%d statements compiled for 100 runs of two queries, want 2", got)
	}
}

// A query run again while its rows are still read runs apart; a statement
// evicted while its rows are read stays usable until they close.
func TestStmtCacheBusyAndEvicted(t *testing.T) {
	db := openCachingSQLite(t)
	ctx := context.Background()
	if _, err := db.ExecContext(ctx, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := db.ExecContext(ctx, "INSERT INTO t (v) VALUES (?)", fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	const q = "SELECT id, v FROM t ORDER BY id"
	rows, err := tx.QueryContext(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for rows.Next() {
		var id int
		var v string
		if err := rows.Scan(&id, &v); err != nil {
			t.Fatal(err)
		}
		seen = append(seen, v)
		if id == 2 {
			// The same query, on the same connection, while its rows are open.
			var inner int
			r2, err := tx.QueryContext(ctx, q)
			if err != nil {
				t.Fatal(err)
			}
			for r2.Next() {
				inner++
			}
			r2.Close()
			if inner != 5 {
				t.Fatalf("the inner run read %d rows, want 5", inner)
			}
			// Push the busy statement out of the cache.
			for k := range stmtCacheSize + 10 {
				var x int
				if err := tx.QueryRowContext(ctx, fmt.Sprintf("SELECT %d + ?", k), 1).Scan(&x); err != nil || x != k+1 {
					t.Fatalf("query %d: %d, %v", k, x, err)
				}
			}
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows.Close()
	if len(seen) != 5 || seen[4] != "4" {
		t.Fatalf("the outer run read %v", seen)
	}
	// The query is compiled anew and runs.
	var n int
	if err := tx.QueryRowContext(ctx, "SELECT COUNT(*) FROM ("+q+")").Scan(&n); err != nil || n != 5 {
		t.Fatalf("count %d, %v", n, err)
	}
}

func TestSingleStatement(t *testing.T) {
	for q, want := range map[string]bool{
		"SELECT 1":                          true,
		"SELECT 1;":                         true,
		"SELECT 1; \n":                      true,
		"SELECT 1; SELECT 2":                false,
		"CREATE TABLE a (x); INSERT INTO a": false,
		"SELECT ';x'":                       false, // not cached: safe
	} {
		if got := singleStatement(q); got != want {
			t.Errorf("singleStatement(%q) = %v, want %v", q, got, want)
		}
	}
}

// A statement whose run was interrupted (its context ended) runs again.
func TestStmtCacheAfterInterrupt(t *testing.T) {
	db := openCachingSQLite(t)
	const q = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) SELECT COUNT(*) FROM c"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	defer cancel()
	var n int
	if err := db.QueryRowContext(ctx, q, 100_000_000).Scan(&n); err == nil {
		t.Fatalf("counted to %d within 5 ms: the interrupt was not tested", n)
	}
	for _, want := range []int{10, 1000} {
		if err := db.QueryRowContext(context.Background(), q, want).Scan(&n); err != nil || n != want {
			t.Fatalf("after the interrupt: %d, %v; want %d", n, err, want)
		}
	}
	if _, err := db.ExecContext(context.Background(), "CREATE TABLE t (x)"); err != nil {
		t.Fatal(err)
	}
}

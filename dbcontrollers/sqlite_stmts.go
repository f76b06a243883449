package dbcontrollers

import (
	"container/list"
	"context"
	"database/sql/driver"
	"errors"
	"sync/atomic"

	"modernc.org/sqlite"
)

// The SQLite driver compiles every query it is given from its text, also
// the same few queries the job path runs thousands of times: compiling is
// about 40 % of a statement's cost there (30 µs of 75 µs for an UPDATE of a
// job). stmtCachingConnector keeps each connection's compiled statements,
// keyed by their text, and runs a query again on its statement. Only what
// database/sql itself would run on a prepared statement goes through the
// cache: a script of several statements (goose's migrations), or a query
// whose statement is still being read (its rows are open), runs as before.

// stmtCacheSize bounds the statements kept per connection. The store's
// queries are a few dozen texts; lists of ids (IN (?, ?, ...)) give one text
// per length, and the least recently used are closed.
const stmtCacheSize = 128

// stmtCompiles counts statements compiled for the cache (tests).
var stmtCompiles atomic.Int64

// stmtCachingConnector opens SQLite connections that keep their statements.
type stmtCachingConnector struct {
	dsn string
	drv *sqlite.Driver
}

func (c *stmtCachingConnector) Connect(context.Context) (driver.Conn, error) {
	conn, err := c.drv.Open(c.dsn)
	if err != nil {
		return nil, err
	}
	return newCachingConn(conn)
}

func (c *stmtCachingConnector) Driver() driver.Driver { return c.drv }

// sqliteConn is what the SQLite driver's connection offers and the cache
// passes on.
type sqliteConn interface {
	driver.Conn
	driver.ConnBeginTx
	driver.ConnPrepareContext
	driver.ExecerContext
	driver.QueryerContext
	driver.SessionResetter
	driver.Validator
	driver.Pinger
}

// preparedStmt is what a statement of the SQLite driver offers.
type preparedStmt interface {
	driver.Stmt
	driver.StmtExecContext
	driver.StmtQueryContext
}

// cachingConn is one SQLite connection with its statements. database/sql
// uses a connection from one goroutine at a time, so it has no lock.
type cachingConn struct {
	sqliteConn
	stmts map[string]*list.Element // of *cachedStmt, by query text
	lru   *list.List               // most recently used first
}

type cachedStmt struct {
	query string
	st    preparedStmt
	busy  bool // its rows are open: it cannot run again until they close
	gone  bool // evicted while busy: closed when its rows close
}

func newCachingConn(c driver.Conn) (driver.Conn, error) {
	sc, ok := c.(sqliteConn)
	if !ok {
		_ = c.Close()
		return nil, errors.New("sqlite: the driver's connection lacks an interface the statement cache needs")
	}
	return &cachingConn{sqliteConn: sc, stmts: map[string]*list.Element{}, lru: list.New()}, nil
}

// stmt returns query's statement, compiled on first use, or nil when it is
// busy or query is not one statement the cache can hold.
func (c *cachingConn) stmt(ctx context.Context, query string) (*cachedStmt, error) {
	if e, ok := c.stmts[query]; ok {
		cs := e.Value.(*cachedStmt)
		if cs.busy {
			return nil, nil
		}
		c.lru.MoveToFront(e)
		return cs, nil
	}
	if !singleStatement(query) {
		return nil, nil
	}
	ds, err := c.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	st, ok := ds.(preparedStmt)
	if !ok {
		_ = ds.Close()
		return nil, nil
	}
	stmtCompiles.Add(1)
	cs := &cachedStmt{query: query, st: st}
	c.stmts[query] = c.lru.PushFront(cs)
	for c.lru.Len() > stmtCacheSize {
		c.evict(c.lru.Back())
	}
	return cs, nil
}

// singleStatement reports whether query holds no ';' outside its last
// character: a script's statements are run one by one by the driver, and a
// statement compiled from it would hold only the first. A ';' in a string
// literal also counts: such a query is just not cached.
func singleStatement(query string) bool {
	for i := 0; i < len(query); i++ {
		if query[i] == ';' {
			for _, r := range query[i+1:] {
				if r != ' ' && r != '\n' && r != '\t' && r != '\r' {
					return false
				}
			}
		}
	}
	return true
}

func (c *cachingConn) evict(e *list.Element) {
	cs := c.lru.Remove(e).(*cachedStmt)
	delete(c.stmts, cs.query)
	if cs.busy {
		cs.gone = true
		return
	}
	_ = cs.st.Close()
}

func (c *cachingConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	cs, err := c.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	if cs == nil {
		return c.sqliteConn.ExecContext(ctx, query, args)
	}
	return cs.st.ExecContext(ctx, args)
}

func (c *cachingConn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	cs, err := c.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	if cs == nil {
		return c.sqliteConn.QueryContext(ctx, query, args)
	}
	rows, err := cs.st.QueryContext(ctx, args)
	if err != nil {
		return nil, err
	}
	cs.busy = true
	return &cachedRows{Rows: rows, cs: cs}, nil
}

// Close closes the kept statements, then the connection.
func (c *cachingConn) Close() error {
	for e := c.lru.Front(); e != nil; e = e.Next() {
		cs := e.Value.(*cachedStmt)
		if !cs.busy {
			_ = cs.st.Close()
		}
	}
	c.stmts, c.lru = nil, list.New()
	return c.sqliteConn.Close()
}

// cachedRows gives its statement back when closed.
type cachedRows struct {
	driver.Rows
	cs *cachedStmt
}

func (r *cachedRows) Close() error {
	err := r.Rows.Close()
	if r.cs != nil {
		r.cs.busy = false
		if r.cs.gone {
			_ = r.cs.st.Close()
		}
		r.cs = nil
	}
	return err
}

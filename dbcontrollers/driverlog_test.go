package dbcontrollers_test

import (
	"bytes"
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The MySQL driver's own messages go to the configured slog logger (JSON
// logs stay JSON), not to standard error.
func TestMySQLDriverMessagesGoToSlog(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close() // a server that hangs up before its greeting
		}
	}()
	var buf syncBuffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = dbcontrollers.OpenControl(ctx, dbcontrollers.Config{
		Driver: dbcontrollers.DialectMySQL, DSN: "root@tcp(" + ln.Addr().String() + ")/", Logger: log,
	})
	if err == nil {
		t.Fatal("opened a database on a server that hangs up")
	}
	out := buf.String()
	if !strings.Contains(out, `"component":"mysql"`) || !strings.Contains(out, `"level":"WARN"`) {
		t.Fatalf("driver messages not in the log: %q", out)
	}
}

func TestTransient(t *testing.T) {
	cases := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{fmt.Errorf("begin: %w", driver.ErrBadConn), true},
		{fmt.Errorf("update job x: begin: %w", mysql.ErrInvalidConn), true},
		{fmt.Errorf("read: %w", io.ErrUnexpectedEOF), true},
		{&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, true},
		{fmt.Errorf("exec: %w", syscall.ECONNRESET), true},
		{&mysql.MySQLError{Number: 1213, Message: "Deadlock found"}, true},
		{&mysql.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded"}, true},
		{&mysql.MySQLError{Number: 1053, Message: "Server shutdown in progress"}, true},
		{&mysql.MySQLError{Number: 1062, Message: "Duplicate entry"}, false},
		{&mysql.MySQLError{Number: 1406, Message: "Data too long"}, false},
		{&mysql.MySQLError{Number: 1142, Message: "command denied"}, false},
		{fmt.Errorf("update job x: %w", schema.ErrConflict), false},
		{schema.ErrNotFound, false},
		{errors.New("json: unsupported value"), false},
	}
	for _, c := range cases {
		if got := dbcontrollers.Transient(c.err); got != c.want {
			t.Errorf("Transient(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	// What a connection to a closed port really returns.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = dbcontrollers.OpenControl(ctx, dbcontrollers.Config{Driver: dbcontrollers.DialectMySQL, DSN: "root@tcp(" + addr + ")/"})
	if err == nil || !dbcontrollers.Transient(err) {
		t.Fatalf("refused connection: %v, transient %v", err, dbcontrollers.Transient(err))
	}
}

package dbcontrollers_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
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

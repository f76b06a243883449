package main

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-sql-driver/mysql"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/internal/testnet"
)

// refusedAddr is a loopback address whose port refuses connections until the
// test ends.
func refusedAddr(t *testing.T) string { return testnet.RefusedAddr(t) }

// wrongPasswordDSN is the test MySQL server's DSN with a wrong password, or
// skips t when no MySQL answers (fails it when MySQL is required).
func wrongPasswordDSN(t *testing.T) string {
	t.Helper()
	dbtest.MySQL(t) // skips or fails when unreachable
	dsn := os.Getenv(dbtest.EnvMySQLDSN)
	if dsn == "" {
		dsn = dbtest.DefaultMySQLDSN
	}
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Passwd = "not-the-password"
	return cfg.FormatDSN()
}

// TestServeStartupFailures: every way serve can fail to start returns one
// error naming the cause (printed as one "comfyfarm: ..." line, exit status
// 1), never a panic. Each case once panicked closing a nil app.
func TestServeStartupFailures(t *testing.T) {
	aFile := filepath.Join(t.TempDir(), "a-file")
	if err := os.WriteFile(aFile, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	cases := []struct {
		name string
		env  func(t *testing.T) []string
		want []string // substrings of the error, in order
	}{
		{"database unreachable", func(t *testing.T) []string {
			return []string{"COMFYFARM_DATABASE_DRIVER=mysql", "COMFYFARM_DATABASE_DSN=root@tcp(" + refusedAddr(t) + ")/"}
		}, []string{"database", "connection refused"}},
		{"wrong mysql password", func(t *testing.T) []string {
			return []string{"COMFYFARM_DATABASE_DRIVER=mysql", "COMFYFARM_DATABASE_DSN=" + wrongPasswordDSN(t)}
		}, []string{"database", "Access denied for user"}},
		{"data dir unwritable", func(t *testing.T) []string {
			return []string{"COMFYFARM_DATA_DIR=" + filepath.Join(aFile, "data")}
		}, []string{"not a directory"}},
		{"sqlite folder unwritable", func(t *testing.T) []string {
			return []string{"COMFYFARM_DATABASE_PATH=" + filepath.Join(aFile, "db")}
		}, []string{"database", "not a directory"}},
		{"listen address taken", func(t *testing.T) []string {
			return []string{"COMFYFARM_LISTEN=" + busy.Addr().String()}
		}, []string{"listen", "address already in use"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Chdir(t.TempDir())
			environ := append([]string{"COMFYFARM_LOG_LEVEL=error"}, tc.env(t)...)
			e, _, _ := testEnv(environ...)
			var err error
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Fatalf("serve panicked: %v", r)
					}
				}()
				err = run(context.Background(), e, []string{"serve"})
			}()
			if err == nil {
				t.Fatal("serve started")
			}
			msg := err.Error()
			rest := msg
			for _, w := range tc.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("error %q: want %q (in order %q)", msg, w, tc.want)
				}
				rest = rest[i+len(w):]
			}
			var out strings.Builder
			if code := exitCode(&out, err); code != 1 {
				t.Fatalf("exit status %d, want 1", code)
			}
			if got := out.String(); got != "comfyfarm: "+msg+"\n" || strings.Count(got, "\n") != 1 {
				t.Fatalf("printed %q, want one line", got)
			}
		})
	}
}

// TestExitCodes: help is success (0), a command-line mistake is 2.
func TestExitCodes(t *testing.T) {
	for _, args := range [][]string{{"serve", "-h"}, {"sim", "--help"}, {"submit", "-h"}, {"-h"}, {"help"}} {
		e, _, errb := testEnv()
		err := run(context.Background(), e, args)
		var out strings.Builder
		if code := exitCode(&out, err); code != 0 {
			t.Errorf("%q: exit status %d (%v)", args, code, err)
		}
		if !strings.Contains(errb.String(), "usage: comfyfarm") {
			t.Errorf("%q: no usage printed: %q", args, errb.String())
		}
	}
	for _, args := range [][]string{{}, {"serve", "--no-such-flag"}, {"frobnicate"}} {
		e, _, _ := testEnv()
		if code := exitCode(new(strings.Builder), run(context.Background(), e, args)); code != 2 {
			t.Errorf("%q: exit status %d, want 2", args, code)
		}
	}
	if code := exitCode(new(strings.Builder), errors.New("boom")); code != 1 {
		t.Errorf("error: exit status %d, want 1", code)
	}
}

// TestServeStartupFailureBinary runs the real binary into a start-up failure:
// exit status 1, one line on stderr, no panic trace.
func TestServeStartupFailureBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := dockerfileBinary(t)
	cmd := exec.Command(bin, "serve")
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "COMFYFARM_LOG_LEVEL=error", "COMFYFARM_DATABASE_DRIVER=mysql",
		"COMFYFARM_DATABASE_DSN=root@tcp("+refusedAddr(t)+")/")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit: %v\n%s", err, stderr.String())
	}
	got := stderr.String()
	if strings.Contains(got, "panic") || strings.Count(got, "\n") != 1 ||
		!strings.HasPrefix(got, "comfyfarm: ") || !strings.Contains(got, "connection refused") {
		t.Fatalf("stderr %q: want one line naming the cause", got)
	}
}

package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
)

// runCLI runs one client command against the stack with the given key.
func (s *stack) runCLI(key string, args ...string) (string, error) {
	s.t.Helper()
	e, out, errb := testEnv("COMFYFARM_SERVER="+s.base, "COMFYFARM_API_KEY="+key)
	err := run(context.Background(), e, args)
	return out.String() + errb.String(), err
}

// The templates commands and submit --template against a live stack.
func TestTemplatesCommands(t *testing.T) {
	s := startStack(t, dbtest.SQLite(t), "COMFYFARM_PUBLIC_URL=http://farm.invalid:1/prefix")
	dir := t.TempDir()
	if out, err := s.runCLI("style-key", "templates"); err != nil || !strings.Contains(out, "portrait") || !strings.Contains(out, "width,height") {
		t.Fatalf("ls: %v\n%s", err, out)
	}
	if out, err := s.runCLI("style-key", "templates", "show", "portrait@1"); err != nil || !strings.Contains(out, "portrait@1") ||
		!strings.Contains(out, "sigma") || !strings.Contains(out, "0.1..10") {
		t.Fatalf("show: %v\n%s", err, out)
	}
	badge, err := exampleTemplates.ReadFile("templates/logo/badge.json")
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "sq.json")
	if err := os.WriteFile(file, badge, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := s.runCLI("logo-key", "templates", "put", "sq", file); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("put with a frontend key: %v\n%s", err, out)
	}
	if out, err := s.runCLI(testAdminKey, "templates", "put", "sq", file, "--frontend", "logo"); err != nil || !strings.Contains(out, "stored template sq@1 of logo") {
		t.Fatalf("put: %v\n%s", err, out)
	}

	img := filepath.Join(dir, "mark.png")
	if err := os.WriteFile(img, pngBytes(t, 20, 20), 0o600); err != nil {
		t.Fatal(err)
	}
	// The events_url is absolute (public_url), on an address the client
	// cannot reach: --wait follows the job on --server.
	out, err := s.runCLI("logo-key", "submit", "--template", "sq", "--input", "logo=@"+img, "--input", "method=area",
		"--input", "width=48", "--user", "cli-u", "--wait")
	if err != nil || !strings.Contains(out, "/files/") {
		t.Fatalf("submit --template --wait: %v\n%s", err, out)
	}
	if out, err := s.runCLI("logo-key", "submit", "--template", "sq", "--input", "width=big"); err == nil || !strings.Contains(err.Error(), "width") {
		t.Fatalf("bad input: %v\n%s", err, out)
	}
	if out, err := s.runCLI("logo-key", "submit", "--template", "sq", "--input", "nope=1"); err == nil || !strings.Contains(err.Error(), "no such input") {
		t.Fatalf("unknown input: %v\n%s", err, out)
	}
	if out, err := s.runCLI(testAdminKey, "templates", "rm", "sq", "--frontend", "logo"); err != nil || !strings.Contains(out, "deleted template sq") {
		t.Fatalf("rm: %v\n%s", err, out)
	}
	if out, err := s.runCLI("logo-key", "templates", "show", "sq"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("show after rm: %v\n%s", err, out)
	}
}

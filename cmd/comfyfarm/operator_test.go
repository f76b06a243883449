package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

const operatorAdminKey = "cf-admin-operator-test-key-0123456789"

// runServe runs the command args (serve) of this binary in this process with
// environ, until the test ends, and returns the base URL it listens on. With
// checkExit, a serve that does not stop cleanly fails the test at its end.
func runServe(t *testing.T, checkExit bool, environ []string, args ...string) string {
	t.Helper()
	e, _, errb := testEnv(environ...)
	addrc := make(chan net.Addr, 1)
	e.ready = func(a net.Addr) { addrc <- a }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, e, args) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if checkExit && err != nil && !t.Failed() {
				t.Errorf("serve: %v\n%s", err, errb.String())
			}
		case <-time.After(60 * time.Second):
			t.Error("serve did not stop")
		}
	})
	select {
	case a := <-addrc:
		return "http://" + a.String()
	case err := <-done:
		done <- err // for the cleanup
		t.Fatalf("serve stopped: %v\n%s", err, errb.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("serve did not start\n%s", errb.String())
	}
	return ""
}

// startServe runs `comfyfarm serve` in this process in a fresh folder, on a
// loopback port, and returns its base URL; it stops when the test ends.
func startServe(t *testing.T, environ ...string) string {
	t.Helper()
	t.Chdir(t.TempDir())
	environ = append([]string{"COMFYFARM_LISTEN=127.0.0.1:0", "COMFYFARM_ADMIN_KEY=" + operatorAdminKey,
		"COMFYFARM_LOG_LEVEL=warn"}, environ...)
	return runServe(t, true, environ, "serve")
}

// cli runs one client command against base with the admin key.
func cli(t *testing.T, base string, args ...string) (string, error) {
	t.Helper()
	e, out, errb := testEnv("COMFYFARM_SERVER="+base, "COMFYFARM_ADMIN_KEY="+operatorAdminKey)
	err := run(context.Background(), e, args)
	return out.String() + errb.String(), err
}

// TestNodesCommandsRoundTrip: add, drain, undrain, probe and remove a node of
// a live server from the command line.
func TestNodesCommandsRoundTrip(t *testing.T) {
	fake := comfytest.NewServer(comfytest.Options{})
	defer fake.Close()
	base := startServe(t)

	if out, err := cli(t, base, "nodes", "add", "gpu-9", fake.URL(), "--tags", "sdxl, big", "--max-inflight", "2"); err != nil ||
		!strings.Contains(out, "gpu-9") {
		t.Fatalf("add: %v\n%s", err, out)
	}
	view := func() schema.NodeView {
		t.Helper()
		out, err := cli(t, base, "nodes", "ls", "--json")
		if err != nil {
			t.Fatalf("ls: %v\n%s", err, out)
		}
		var nodes []schema.NodeView
		if err := json.Unmarshal([]byte(out), &nodes); err != nil {
			t.Fatalf("ls --json: %v\n%s", err, out)
		}
		for _, n := range nodes {
			if n.Name == "gpu-9" {
				return n
			}
		}
		t.Fatalf("gpu-9 not listed: %s", out)
		return schema.NodeView{}
	}
	if v := view(); v.MaxInflight != 2 || strings.Join(v.Tags, ",") != "sdxl,big" || v.URL != fake.URL() {
		t.Fatalf("added node %+v", v)
	}
	if out, err := cli(t, base, "nodes", "set", "gpu-9", "--max-inflight", "3", "--tags", "flux"); err != nil || !strings.Contains(out, "gpu-9") {
		t.Fatalf("set: %v\n%s", err, out)
	}
	if v := view(); v.MaxInflight != 3 || strings.Join(v.Tags, ",") != "flux" {
		t.Fatalf("after set: %+v", v)
	}
	if out, err := cli(t, base, "nodes", "set", "gpu-9", "--tags", ""); err != nil {
		t.Fatalf("set tags empty: %v\n%s", err, out)
	}
	if v := view(); v.MaxInflight != 3 || len(v.Tags) != 0 {
		t.Fatalf("after clearing tags: %+v", v)
	}
	if out, err := cli(t, base, "nodes", "set", "gpu-9"); !errors.Is(err, errUsage) {
		t.Fatalf("set without a change: %v\n%s", err, out)
	}
	if out, err := cli(t, base, "nodes", "probe", "gpu-9", "--json"); err != nil || !strings.Contains(out, `"comfy_ok": true`) {
		t.Fatalf("probe: %v\n%s", err, out)
	}
	if out, err := cli(t, base, "nodes", "drain", "gpu-9"); err != nil || !strings.Contains(out, "draining") {
		t.Fatalf("drain: %v\n%s", err, out)
	}
	if v := view(); v.State != schema.NodeDraining {
		t.Fatalf("after drain: %s", v.State)
	}
	if out, err := cli(t, base, "nodes", "undrain", "gpu-9"); err != nil || strings.Contains(out, "draining") {
		t.Fatalf("undrain: %v\n%s", err, out)
	}
	if v := view(); v.State == schema.NodeDraining {
		t.Fatalf("after undrain: %s", v.State)
	}
	if out, err := cli(t, base, "nodes", "rm", "gpu-9"); err != nil || !strings.Contains(out, "removed node gpu-9") {
		t.Fatalf("rm: %v\n%s", err, out)
	}
	out, err := cli(t, base, "nodes", "rm", "gpu-9")
	var ae *apiError
	if !errors.As(err, &ae) || ae.Status != 404 {
		t.Fatalf("second rm: %v\n%s", err, out)
	}
	if out, err := cli(t, base, "nodes", "add", "only-a-name"); !errors.Is(err, errUsage) {
		t.Fatalf("add without URL: %v\n%s", err, out)
	}
}

// tcpProxy forwards loopback connections to target until cut.
type tcpProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	cut    bool
}

func newTCPProxy(t *testing.T, target string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{ln: ln, target: target}
	t.Cleanup(p.Cut)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			p.mu.Lock()
			if err != nil || p.cut {
				p.mu.Unlock()
				c.Close()
				if up != nil {
					up.Close()
				}
				continue
			}
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
	return p
}

// Cut closes every connection and refuses new ones: the database is gone.
func (p *tcpProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = true
	p.ln.Close()
	for _, c := range p.conns {
		c.Close()
	}
}

// TestHealthCommand: `comfyfarm health` exits 0 while the server is ready and
// 1 once its database is gone (what the Docker HEALTHCHECK runs).
func TestHealthCommand(t *testing.T) {
	db := dbtest.MySQL(t) // a fresh database prefix, dropped when the test ends
	mc, err := mysql.ParseDSN(db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newTCPProxy(t, mc.Addr)
	mc.Addr = proxy.ln.Addr().String()
	mc.Timeout = 2 * time.Second
	base := startServe(t, "COMFYFARM_DATABASE_DRIVER=mysql", "COMFYFARM_DATABASE_DSN="+mc.FormatDSN(),
		"COMFYFARM_DATABASE_PREFIX="+db.Prefix)

	health := func() (int, string) {
		e, out, _ := testEnv()
		err := run(context.Background(), e, []string{"health", "--url", base, "--timeout", "10s"})
		var msg strings.Builder
		code := exitCode(&msg, err)
		return code, out.String() + msg.String()
	}
	// Ready once the scheduler has started (it loads the queue after the
	// server listens).
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, out := health()
		if code == 0 && strings.Contains(out, `"scheduler":"ok"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ready server: exit %d: %s", code, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	proxy.Cut()
	if code, out := health(); code != 1 || !strings.Contains(out, "503") {
		t.Fatalf("database gone: exit %d: %s", code, out)
	}
	if code, out := health(); code != 1 {
		t.Fatalf("database still gone: exit %d: %s", code, out)
	}
	e, _, _ := testEnv()
	if err := run(context.Background(), e, []string{"health", "--url", "http://" + refusedAddr(t)}); err == nil ||
		!strings.Contains(err.Error(), "refused") {
		t.Fatalf("no server: %v", err)
	}
}

// TestJobsCommands: submit, then list, show, follow and cancel jobs from the
// command line against a live server with a fake node.
func TestJobsCommands(t *testing.T) {
	fake := comfytest.NewServer(comfytest.Options{DefaultClassTime: 5 * time.Millisecond})
	defer fake.Close()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	workflow := filepath.Join(wd, "sample_workflow.json")
	base := startServe(t, "COMFYFARM_NODES=gpu-a="+fake.URL(), "COMFYFARM_SCHEDULER_PROBE_INTERVAL=100ms")
	api := func(args ...string) (string, error) {
		t.Helper()
		e, out, errb := testEnv("COMFYFARM_SERVER="+base, "COMFYFARM_API_KEY=logo-key")
		err := run(context.Background(), e, args)
		return out.String() + errb.String(), err
	}
	out, err := api("submit", "--workflow", workflow, "--user", "cli-u", "--wait")
	if err != nil {
		t.Fatalf("submit: %v\n%s", err, out)
	}
	id := strings.Fields(out)[1]

	if out, err := api("jobs", "ls", "--user", "cli-u"); err != nil || !strings.Contains(out, id) || !strings.Contains(out, "succeeded") {
		t.Fatalf("ls: %v\n%s", err, out)
	}
	if out, err := api("jobs", "show", id); err != nil || !strings.Contains(out, "succeeded") ||
		!strings.Contains(out, "output 0:") || !strings.Contains(out, "gpu-a") {
		t.Fatalf("show: %v\n%s", err, out)
	}
	// events of a finished job: the snapshot, then the stream ends.
	if out, err := api("jobs", "events", id); err != nil || !strings.Contains(out, "snapshot succeeded") {
		t.Fatalf("events: %v\n%s", err, out)
	}

	// A job held in the node's queue is cancelled; a second cancel is a 409.
	fake.Hold()
	out, err = api("submit", "--workflow", workflow, "--user", "cli-u")
	if err != nil {
		t.Fatalf("submit: %v\n%s", err, out)
	}
	held := strings.Fields(out)[1]
	if out, err := api("jobs", "cancel", held); err != nil || !strings.Contains(out, "cancelled") {
		t.Fatalf("cancel: %v\n%s", err, out)
	}
	_, err = api("jobs", "cancel", held)
	var ae *apiError
	if !errors.As(err, &ae) || ae.Status != 409 {
		t.Fatalf("second cancel: %v", err)
	}
	fake.Release()
	if out, err := api("jobs", "ls", "--state", "cancelled", "--json"); err != nil || !strings.Contains(out, held) {
		t.Fatalf("ls cancelled: %v\n%s", err, out)
	}
	if out, err := api("jobs", "show"); !errors.Is(err, errUsage) {
		t.Fatalf("show without id: %v\n%s", err, out)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// syncBuffer is a bytes.Buffer safe for a command's goroutines.
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

func testEnv(environ ...string) (*env, *syncBuffer, *syncBuffer) {
	out, errb := &syncBuffer{}, &syncBuffer{}
	return &env{stdout: out, stderr: errb, environ: environ}, out, errb
}

// TestServeSmoke starts `comfyfarm serve` with the built-in defaults in an
// empty folder, on a loopback port, and checks it is alive and ready.
func TestServeSmoke(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	e, out, errb := testEnv("COMFYFARM_LISTEN=127.0.0.1:0")
	addrc := make(chan net.Addr, 1)
	e.ready = func(a net.Addr) { addrc <- a }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, e, []string{"serve"}) }()
	var base string
	select {
	case a := <-addrc:
		base = "http://" + a.String()
	case err := <-done:
		t.Fatalf("serve stopped: %v\n%s", err, errb.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("serve did not start\n%s", errb.String())
	}
	client := &http.Client{Timeout: 30 * time.Second}
	for _, path := range []string{"/healthz", "/readyz"} {
		// Ready once the scheduler has loaded its queue, a moment after
		// the listener opens.
		deadline := time.Now().Add(30 * time.Second)
		for {
			res, err := client.Get(base + path)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode == 200 && strings.Contains(string(body), `"status":"ok"`) {
				break
			}
			if path == "/healthz" || res.StatusCode != http.StatusServiceUnavailable || time.Now().After(deadline) {
				t.Fatalf("%s: %d %s", path, res.StatusCode, body)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// The admin key was made, kept, printed once, and works.
	key, err := os.ReadFile(filepath.Join(dir, "data", "admin_key"))
	if err != nil {
		t.Fatal(err)
	}
	adminKey := strings.TrimSpace(string(key))
	if !strings.Contains(out.String(), adminKey) {
		t.Fatalf("admin key not printed: %q", out.String())
	}
	req, _ := http.NewRequest("GET", base+"/api/v1/photos?frontend=style", nil)
	req.Header.Set("Authorization", "Bearer "+adminKey)
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("photos with the admin key: %d", res.StatusCode)
	}
	for _, f := range []string{"comfyfarm.db", "style.db", "logo.db", "secret"} {
		if _, err := os.Stat(filepath.Join(dir, "data", f)); err != nil {
			t.Errorf("data/%s: %v", f, err)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v\n%s", err, errb.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("serve did not stop")
	}

	// A second start keeps the key and prints nothing.
	e2, out2, _ := testEnv("COMFYFARM_LISTEN=127.0.0.1:0")
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	e2.ready = func(net.Addr) { cancel2() }
	if err := run(ctx2, e2, []string{"serve"}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out2.String(), "admin key") {
		t.Fatalf("printed again: %q", out2.String())
	}
}

func TestServeRefusesBadConfig(t *testing.T) {
	t.Chdir(t.TempDir())
	e, _, _ := testEnv("COMFYFARM_DATABASE_DRIVER=oracle")
	err := run(context.Background(), e, []string{"serve"})
	if err == nil || !strings.Contains(err.Error(), "database.driver") {
		t.Fatalf("err %v", err)
	}
}

func TestMigrate(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	e, _, errb := testEnv()
	if err := run(context.Background(), e, []string{"migrate"}); err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	for _, f := range []string{"comfyfarm.db", "style.db", "logo.db"} {
		if _, err := os.Stat(filepath.Join(dir, "data", f)); err != nil {
			t.Errorf("data/%s: %v", f, err)
		}
	}
}

func TestUsage(t *testing.T) {
	e, _, errb := testEnv()
	if err := run(context.Background(), e, []string{"frobnicate"}); !errors.Is(err, errUsage) {
		t.Fatalf("unknown command: %v", err)
	}
	if !strings.Contains(errb.String(), "serve") || !strings.Contains(errb.String(), "submit") {
		t.Fatalf("usage: %s", errb.String())
	}
	if err := run(context.Background(), e, []string{"version", "extra"}); !errors.Is(err, errUsage) {
		t.Fatalf("stray argument: %v", err)
	}
	e, out, _ := testEnv()
	if err := run(context.Background(), e, []string{"version"}); err != nil || !strings.HasPrefix(out.String(), "comfyfarm ") {
		t.Fatalf("version: %v %q", err, out.String())
	}
}

func TestNodesCommand(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v1/nodes" {
			http.NotFound(w, r)
			return
		}
		if r.Header.Get("Authorization") != "Bearer the-admin-key" {
			w.WriteHeader(401)
			io.WriteString(w, `{"error":{"code":"unauthorized","message":"unknown api key"}}`)
			return
		}
		json.NewEncoder(w).Encode([]schema.NodeView{
			{Name: "gpu-1", URL: "http://10.0.0.1:8188", State: schema.NodeUp, MaxInflight: 1, Inflight: 1, CurrentJob: "01JOB",
				Devices: []schema.Device{{Name: "cuda:0", VRAMTotal: 24 << 30, VRAMFree: 12 << 30}}, LatencyMS: 3.2, JobsDone: 7},
			{Name: "gpu-2", URL: "http://10.0.0.2:8188", State: schema.NodeDown, Error: "dial tcp: connection\nrefused"},
		})
	}))
	defer srv.Close()

	e, out, _ := testEnv("COMFYFARM_ADMIN_KEY=the-admin-key")
	if err := run(context.Background(), e, []string{"nodes", "--server", srv.URL}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "NAME") {
		t.Fatalf("table:\n%s", out.String())
	}
	for _, want := range []string{"gpu-1", "up", "12.0/24.0 GiB", "01JOB", "1/1", "gpu-2", "down", "connection refused"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("table lacks %q:\n%s", want, out.String())
		}
	}
	e, _, _ = testEnv()
	err := run(context.Background(), e, []string{"nodes", "--server", srv.URL, "--key", "wrong"})
	var ae *apiError
	if !errors.As(err, &ae) || ae.Status != 401 || ae.Code != "unauthorized" {
		t.Fatalf("wrong key: %v", err)
	}
	if err := run(context.Background(), e, []string{"nodes", "--server", srv.URL}); err == nil {
		t.Fatal("no key accepted")
	}
}

// TestSubmitWait: submit, follow the SSE stream across a dropped connection
// (resumed with Last-Event-ID) and print the output URL.
func TestSubmitWait(t *testing.T) {
	var (
		mu        sync.Mutex
		submitted map[string]any
		resumed   string
		streams   int
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == "POST" && r.URL.Path == "/api/v1/jobs":
			if r.Header.Get("Authorization") != "Bearer style-key-1" {
				w.WriteHeader(401)
				return
			}
			mu.Lock()
			json.NewDecoder(r.Body).Decode(&submitted)
			mu.Unlock()
			w.WriteHeader(202)
			io.WriteString(w, `{"id":"J1","state":"queued","position":2,"events_url":"/api/v1/jobs/J1/events?token=tok"}`)
		case r.URL.Path == "/api/v1/jobs/J1/events" && r.URL.Query().Get("token") == "tok":
			if r.Header.Get("Accept") != "text/event-stream" {
				w.WriteHeader(426)
				return
			}
			mu.Lock()
			streams++
			n := streams
			if n == 2 {
				resumed = r.Header.Get("Last-Event-ID")
			}
			mu.Unlock()
			w.Header().Set("Content-Type", "text/event-stream")
			send := func(seq int, typ, data string) {
				fmt.Fprintf(w, "id: %d\nevent: %s\ndata: {\"seq\":%d,\"type\":%q,\"job_id\":\"J1\"%s}\n\n", seq, typ, seq, typ, data)
			}
			if n == 1 {
				io.WriteString(w, "retry: 2000\n\n: keepalive\n\n")
				send(1, "snapshot", `,"job":{"id":"J1","state":"queued"}`)
				send(2, "running", `,"node":"gpu-1"`)
				send(3, "progress", `,"node_id":"3","value":5,"max":10,"percent":50`)
				return // the connection drops
			}
			send(4, "succeeded", `,"outputs":[{"url":"http://127.0.0.1/files/style/J1/0.png","content_type":"image/png"}]`)
		default:
			w.WriteHeader(404)
		}
	}))
	defer srv.Close()
	wf := filepath.Join(t.TempDir(), "wf.json")
	os.WriteFile(wf, []byte(`{"prompt":{"3":{"class_type":"KSampler","inputs":{}}}}`), 0o600)

	e, out, errb := testEnv("COMFYFARM_API_KEY=style-key-1", "COMFYFARM_SERVER="+srv.URL)
	err := run(context.Background(), e, []string{"submit", "--user", "u-1", "--workflow", wf, "--wait", "--timeout", "60s"})
	if err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	if !strings.Contains(out.String(), "job J1 queued (position 2)") || !strings.Contains(out.String(), "http://127.0.0.1/files/style/J1/0.png") {
		t.Fatalf("stdout: %q", out.String())
	}
	mu.Lock()
	defer mu.Unlock()
	if resumed != "3" {
		t.Fatalf("resumed after %q, want 3", resumed)
	}
	wfSent, _ := json.Marshal(submitted["workflow"])
	if submitted["user_id"] != "u-1" || !strings.Contains(string(wfSent), "KSampler") || strings.Contains(string(wfSent), "prompt") {
		t.Fatalf("submitted %v", submitted)
	}
}

func TestSubmitFailedJob(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "POST" {
			w.WriteHeader(202)
			io.WriteString(w, `{"id":"J2","state":"queued","position":0,"events_url":"/e?token=t"}`)
			return
		}
		io.WriteString(w, "id: 1\nevent: failed\ndata: {\"seq\":1,\"type\":\"failed\",\"job_id\":\"J2\",\"error\":{\"code\":\"execution_error\",\"message\":\"CUDA out of memory\"}}\n\n")
	}))
	defer srv.Close()
	wf := filepath.Join(t.TempDir(), "wf.json")
	os.WriteFile(wf, []byte(`{"1":{}}`), 0o600)
	e, _, _ := testEnv()
	err := run(context.Background(), e, []string{"submit", "--server", srv.URL, "--key", "k", "--workflow", wf, "--wait"})
	if err == nil || !strings.Contains(err.Error(), "CUDA out of memory") {
		t.Fatalf("err %v", err)
	}
	e, _, _ = testEnv()
	if err := run(context.Background(), e, []string{"submit", "--server", srv.URL, "--key", "k"}); !errors.Is(err, errUsage) {
		t.Fatalf("no workflow: %v", err)
	}
}

func TestSSEReader(t *testing.T) {
	stream := "retry: 1000\n\n: comment\nid: 1\nevent: a\ndata: x\ndata: y\n\nid: 2\r\ndata: z\r\n\r\ndata: partial"
	r := newSSEReader(strings.NewReader(stream))
	ev, err := r.Next()
	if err != nil || ev != (sseEvent{ID: "1", Event: "a", Data: "x\ny"}) {
		t.Fatalf("first: %+v %v", ev, err)
	}
	ev, err = r.Next()
	if err != nil || ev != (sseEvent{ID: "2", Data: "z"}) {
		t.Fatalf("second: %+v %v", ev, err)
	}
	if _, err := r.Next(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("partial: %v", err)
	}
	long := "data: " + strings.Repeat("a", maxSSELine+1) + "\n\n"
	if _, err := newSSEReader(strings.NewReader(long)).Next(); err == nil {
		t.Fatal("an over-long line was accepted")
	}
}

func FuzzSSEReader(f *testing.F) {
	f.Add([]byte("id: 1\nevent: snapshot\ndata: {}\n\n"))
	f.Add([]byte(": keepalive\n\nretry: 5\n\n"))
	f.Add([]byte("data\ndata:\ndata: a\r\n\r\n"))
	f.Add([]byte("\r\r\n\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := newSSEReader(bytes.NewReader(data))
		for range 10_000 {
			ev, err := r.Next()
			if err != nil {
				return
			}
			if strings.ContainsAny(ev.ID, "\n") || strings.ContainsAny(ev.Event, "\n") {
				t.Fatalf("field with a newline: %+v", ev)
			}
		}
		t.Fatal("reader did not finish")
	})
}

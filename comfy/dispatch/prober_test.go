package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/internal/testnet"
	"github.com/comfyfarm/comfyfarm/schema"
)

// traceBody returns the body of the first HTTP response to GET path in a
// recorded trace (comfy/testdata).
func traceBody(t testing.TB, file, path string) []byte {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "testdata", file))
	if err != nil {
		t.Fatal(err)
	}
	if strings.HasSuffix(file, "system_stats.json") && path == "/system_stats" {
		return raw
	}
	var trace struct {
		Events []struct {
			Kind   string          `json:"kind"`
			Method string          `json:"method"`
			Path   string          `json:"path"`
			Body   json.RawMessage `json:"body"`
		} `json:"events"`
	}
	if err := json.Unmarshal(raw, &trace); err != nil {
		t.Fatal(err)
	}
	for _, e := range trace.Events {
		if e.Kind == "http_response" && e.Method == "GET" && e.Path == path {
			return e.Body
		}
	}
	t.Fatalf("%s: no GET %s response", file, path)
	return nil
}

// traceServer serves the recorded /system_stats and /queue bodies of one
// trace directory, byte for byte.
type traceServer struct {
	url      string
	requests atomic.Int64
}

func newTraceServer(t testing.TB, traceDir string) *traceServer {
	t.Helper()
	stats := traceBody(t, traceDir+"/system_stats.json", "/system_stats")
	queue := traceBody(t, traceDir+"/e_multi_queue.json", "/queue")
	ts := &traceServer{}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ts.requests.Add(1)
		var body []byte
		switch r.URL.Path {
		case "/system_stats":
			body = stats
		case "/queue":
			body = queue
		default:
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_, _ = w.Write(body)
	}), ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.url = "http://" + ln.Addr().String()
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ts
}

func (ts *traceServer) URL() string { return ts.url }

// silentListener accepts TCP connections and never answers.
func silentListener(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return "http://" + ln.Addr().String()
}

// closedPortURL returns a loopback URL whose port refuses connections until
// the test ends.
func closedPortURL(t testing.TB) string { return "http://" + testnet.RefusedAddr(t) }

// answering serves a fixed status and body on every path.
func answering(t testing.TB, status int, body string) string {
	t.Helper()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

func TestProbeHealthyRecordedServers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		dir, version string
	}{
		{"comfy-traces", "v0.3.10"},
		{"comfy-traces-current", "0.8.0"},
	} {
		t.Run(tc.dir, func(t *testing.T) {
			t.Parallel()
			f := newTraceServer(t, tc.dir)
			res := Probe(context.Background(), f.URL()+"/", 10*time.Second)
			if !res.HostReachable || !res.PortOpen || !res.ComfyOK || res.Error != "" {
				t.Fatalf("probe = %+v, want healthy", res)
			}
			if res.ComfyUIVersion != tc.version {
				t.Errorf("version = %q, want %q", res.ComfyUIVersion, tc.version)
			}
			if len(res.Devices) != 1 || res.Devices[0].Name != "cpu" || res.Devices[0].Type != "cpu" ||
				res.Devices[0].VRAMTotal != 25276510208 || res.Devices[0].VRAMFree <= 0 {
				t.Errorf("devices = %+v", res.Devices)
			}
			if res.QueueRunning != 1 || res.QueuePending != 3 {
				t.Errorf("queue = %d running, %d pending; want 1, 3", res.QueueRunning, res.QueuePending)
			}
			if res.URL != f.URL() || res.Host != "127.0.0.1" || res.Port == 0 {
				t.Errorf("target = %q %q %d", res.URL, res.Host, res.Port)
			}
			if res.LatencyMS <= 0 || res.ProbedAt.IsZero() {
				t.Errorf("latency %v, probed_at %v", res.LatencyMS, res.ProbedAt)
			}
			if got := f.requests.Load(); got != 2 {
				t.Errorf("server saw %d requests, want 2 (system_stats, queue)", got)
			}
		})
	}
}

func TestProbeFailures(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name                     string
		url                      string
		reachable, open, comfyOK bool
		answered                 bool
		verdict                  schema.NodeState
		errHas                   string
	}{
		{"closed port", closedPortURL(t), true, false, false, false, schema.NodeDown, "refused"},
		{"accepts, never answers", silentListener(t), true, true, false, false, schema.NodeDown, "no HTTP answer"},
		{"HTTP 500", answering(t, 500, "boom"), true, true, false, true, schema.NodeDegraded, "HTTP 500"},
		{"not JSON", answering(t, 200, "<html>hello</html>"), true, true, false, true, schema.NodeDegraded, "decode"},
		{"404 (not ComfyUI)", answering(t, 404, "404: Not Found"), true, true, false, true, schema.NodeDegraded, "HTTP 404"},
		{"bad URL", "ftp://127.0.0.1:21", false, false, false, false, schema.NodeDown, "scheme"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tgt, err := parseProbeTarget(tc.url)
			var res schema.ProbeResult
			var answered bool
			// Only the silent listener (open, never answers) runs into the
			// timeout, which keeps it short; every other case gets a
			// deadline that merely bounds a hang, so a loaded machine does
			// not turn a refusal or an answer into a timeout.
			timeout := 10 * time.Second
			if tc.open && !tc.answered {
				timeout = 500 * time.Millisecond
			}
			if err != nil {
				res = Probe(context.Background(), tc.url, timeout)
			} else {
				res, answered = runProbe(context.Background(), tgt, timeout, dialHost(tgt, dialTCP), time.Now)
			}
			if res.HostReachable != tc.reachable || res.PortOpen != tc.open || res.ComfyOK != tc.comfyOK || answered != tc.answered {
				t.Errorf("reachable/open/ok/answered = %v/%v/%v/%v, want %v/%v/%v/%v (%s)",
					res.HostReachable, res.PortOpen, res.ComfyOK, answered, tc.reachable, tc.open, tc.comfyOK, tc.answered, res.Error)
			}
			if !strings.Contains(res.Error, tc.errHas) {
				t.Errorf("error %q does not mention %q", res.Error, tc.errHas)
			}
			if v := probeVerdict(res, answered, time.Hour); v != tc.verdict {
				t.Errorf("verdict %s, want %s", v, tc.verdict)
			}
		})
	}
}

func TestProbeServerWithoutSystemStats(t *testing.T) {
	t.Parallel()
	// ComfyUI builds from before mid-2023 have /queue but no /system_stats.
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/queue" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(`{"queue_running": [], "queue_pending": [[3, "p-3", {}, {}, ["9"]]]}`))
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	res := Probe(context.Background(), "http://"+ln.Addr().String(), 10*time.Second)
	if !res.ComfyOK || res.QueuePending != 1 || res.ComfyUIVersion != "" || len(res.Devices) != 0 || res.Devices == nil {
		t.Errorf("probe = %+v, want ok with one pending and no version or devices", res)
	}
}

func TestClassifyDialError(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err       error
		reachable bool
		has       string
	}{
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, true, "port closed"},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.EHOSTUNREACH)}, false, "host unreachable"},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ENETUNREACH)}, false, "network unreachable"},
		{&net.DNSError{Err: "no such host", Name: "gpu-9", IsNotFound: true}, false, "no such host"},
		{context.DeadlineExceeded, false, "timeout"},
		{&net.OpError{Op: "dial", Err: os.ErrDeadlineExceeded}, false, "timeout"},
		{errors.New("odd"), false, "odd"},
	} {
		reachable, msg := classifyDialError(tc.err, time.Second)
		if reachable != tc.reachable || !strings.Contains(msg, tc.has) {
			t.Errorf("%v: reachable %v %q, want %v and %q", tc.err, reachable, msg, tc.reachable, tc.has)
		}
	}
}

func TestProbeVerdictSlow(t *testing.T) {
	t.Parallel()
	ok := schema.ProbeResult{HostReachable: true, PortOpen: true, ComfyOK: true, LatencyMS: 50}
	if v := probeVerdict(ok, true, 100*time.Millisecond); v != schema.NodeUp {
		t.Errorf("fast: %s", v)
	}
	ok.LatencyMS = 150
	if v := probeVerdict(ok, true, 100*time.Millisecond); v != schema.NodeDegraded {
		t.Errorf("slow: %s", v)
	}
}

func TestParseProbeTarget(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in, base string
		port     int
		bad      bool
	}{
		{in: "http://10.0.0.5:8188", base: "http://10.0.0.5:8188", port: 8188},
		{in: " http://10.0.0.5:8188/ ", base: "http://10.0.0.5:8188", port: 8188},
		{in: "http://gpu-1.lan", base: "http://gpu-1.lan:80", port: 80},
		{in: "https://gpu-1.lan/comfy/", base: "https://gpu-1.lan:443/comfy", port: 443},
		{in: "http://[::1]:8188", base: "http://[::1]:8188", port: 8188},
		{in: "http://10.0.0.5:0", bad: true},
		{in: "http://10.0.0.5:70000", bad: true},
		{in: "http://10.0.0.5:", bad: true},
		{in: "ftp://10.0.0.5:21", bad: true},
		{in: "10.0.0.5:8188", bad: true},
		{in: "http://user:pw@10.0.0.5:8188", bad: true},
		{in: "http://10.0.0.5:8188/?x=1", bad: true},
		{in: "http://:8188", bad: true},
		{in: "", bad: true},
	} {
		got, err := parseProbeTarget(tc.in)
		if tc.bad {
			var ve *schema.ValidationError
			if !errors.As(err, &ve) {
				t.Errorf("%q: err %v, want a validation error", tc.in, err)
			}
			continue
		}
		if err != nil || got.base != tc.base || got.port != tc.port {
			t.Errorf("%q: %+v %v, want %s port %d", tc.in, got, err, tc.base, tc.port)
		}
	}
}

func TestNextProbeDelay(t *testing.T) {
	t.Parallel()
	cfg := ProbeConfig{Interval: time.Second, MaxBackoff: 10 * time.Second, Jitter: -1}.withDefaults()
	for _, tc := range []struct {
		health, pending schema.NodeState
		streak          int
		want            time.Duration
	}{
		{schema.NodeUp, "", 0, time.Second},
		{schema.NodeDegraded, "", 0, time.Second},
		{schema.NodeUp, schema.NodeDown, 0, time.Second}, // confirming probe comes promptly
		{schema.NodeDown, schema.NodeUp, 5, time.Second}, // so does a recovery's
		{schema.NodeDown, "", 1, time.Second},            // just went down
		{schema.NodeDown, "", 2, 2 * time.Second},        // stays down: doubling
		{schema.NodeDown, "", 3, 4 * time.Second},        //
		{schema.NodeDown, "", 4, 8 * time.Second},        //
		{schema.NodeDown, "", 5, 10 * time.Second},       // capped
		{schema.NodeDown, "", 500, 10 * time.Second},     //
		{schema.NodeUnknown, "", 0, time.Second},         //
		{schema.NodeDown, schema.NodeDegraded, 9, time.Second},
	} {
		if got := nextProbeDelay(cfg, tc.health, tc.pending, tc.streak); got != tc.want {
			t.Errorf("%s pending %q streak %d: %s, want %s", tc.health, tc.pending, tc.streak, got, tc.want)
		}
	}
	for range 1000 {
		d := jitterDuration(time.Second, 0.2)
		if d < 900*time.Millisecond || d > 1100*time.Millisecond {
			t.Fatalf("jittered %s outside ±10%%", d)
		}
	}
}

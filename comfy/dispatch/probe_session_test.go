package dispatch

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// A node's probes after a good one ask over the connection kept from the
// one before (two connections in all: the full probe's and the kept one),
// and report what the full probe reports (/system_stats read again at every
// statsEvery-th probe); once the node is gone, the next
// probe falls back to a full one, which finds the port closed.
func TestProbeSessionKeepsConnection(t *testing.T) {
	var conns, stats atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/system_stats":
			free := 1073741824 * stats.Add(1) // changes at each read
			_, _ = w.Write([]byte(fmt.Sprintf(`{"system": {"os": "posix", "comfyui_version": "0.8.0"},
				"devices": [{"name": "cuda:0 RTX", "type": "cuda", "index": 0, "vram_total": 25769803776, "vram_free": %d}]}`, free)))
		case "/queue":
			_, _ = w.Write([]byte(`{"queue_running": [[1, "p1", {"3": {"inputs": {"text": "[\"]"}}}, {}, ["9"]]],
				"queue_pending": [[2, "p2", {}, {}, []], [3, "p3", {}, {}, []]]}`))
		default:
			http.NotFound(w, r)
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	n := NewNodes(newMemStore(), ProbeConfig{Interval: time.Second}, slog.New(slog.DiscardHandler))
	tgt, err := parseProbeTarget(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var sess *probeSession
	defer func() { sess.close() }()
	// The full probe and every statsEvery-th probe after it read
	// /system_stats; the others carry its last answer.
	for i := range 2 * statsEvery {
		res, answered := n.probeKept(ctx, tgt, &sess)
		reads := int64(1 + i/statsEvery)
		if got := stats.Load(); got != reads || res.Devices[0].VRAMFree != 1073741824*reads {
			t.Fatalf("probe %d: /system_stats read %d times (want %d), free VRAM %d", i, got, reads, res.Devices[0].VRAMFree)
		}
		if !answered || !res.ComfyOK || !res.PortOpen || res.ComfyUIVersion != "0.8.0" || res.QueueRunning != 1 || res.QueuePending != 2 ||
			len(res.Devices) != 1 || res.Devices[0].VRAMTotal != 25769803776 || res.Error != "" {
			t.Fatalf("probe %d: %+v", i, res)
		}
		if sess == nil {
			t.Fatalf("probe %d kept no session", i)
		}
	}
	if c := conns.Load(); c != 2 {
		t.Fatalf("%d connections for %d probes, want 2", c, 2*statsEvery)
	}
	srv.Close()
	res, answered := n.probeKept(ctx, tgt, &sess)
	if answered || res.ComfyOK || res.PortOpen || !res.HostReachable || sess != nil {
		t.Fatalf("probe of a closed port: %+v, answered %v, session %v", res, answered, sess != nil)
	}
}

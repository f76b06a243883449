package dispatch

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Failures of the node's own making: degraded after FailureLimit in a row,
// with the reason in the view; back after its back-off and a good probe; one
// more failure then degrades it again for twice as long; a success clears.
func TestNodesJobFailuresDegradeAndRecover(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := setupNodes(t, ProbeConfig{Interval: time.Second, Jitter: -1, FailureLimit: 3, FaultBackoff: 30 * time.Second,
		NowFunc: func() time.Time { return now }})
	n := b.nodes
	changes := subscribe(t, n)
	if _, err := n.Add(context.Background(), apiNode("gpu-1", "http://127.0.0.1:1")); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	e := n.entries["gpu-1"]
	n.mu.Unlock()
	good := schema.ProbeResult{HostReachable: true, PortOpen: true, ComfyOK: true, LatencyMS: 1}
	probe := func() (time.Duration, schema.NodeState) {
		t.Helper()
		next, s, ok := n.apply(e, good, true)
		if !ok {
			t.Fatal("node gone")
		}
		return next, s
	}
	state := func() schema.NodeView {
		v, _ := n.Get("gpu-1")
		return v
	}
	probe()
	if s := state(); s.State != schema.NodeUp || s.Reason != "" {
		t.Fatalf("start: %s %q", s.State, s.Reason)
	}
	// Two failures, a success, two failures: never three in a row.
	n.JobFailed("gpu-1", "unreadable history")
	n.JobFailed("gpu-1", "unreadable history")
	n.JobSucceeded("gpu-1")
	n.JobFailed("gpu-1", "unreadable history")
	if n.JobFailed("gpu-1", "unreadable history") || state().State != schema.NodeUp {
		t.Fatalf("degraded without %d failures in a row: %s", 3, state().State)
	}
	if !n.JobFailed("gpu-1", "unreadable history: comfy: GET /history/x: decode: invalid character") {
		t.Fatal("third failure in a row did not degrade the node")
	}
	v := state()
	if v.State != schema.NodeDegraded || !strings.Contains(v.Reason, "3 jobs in a row failed") || !strings.Contains(v.Reason, "unreadable history") {
		t.Fatalf("after 3 failures: %s %q", v.State, v.Reason)
	}
	// Good probes during the back-off leave it degraded, and the next probe
	// is due when the back-off ends.
	next, s := probe()
	if s != schema.NodeDegraded || next != 30*time.Second {
		t.Fatalf("probe in back-off: %s, next in %s", s, next)
	}
	now = now.Add(next)
	if _, s := probe(); s != schema.NodeUp {
		t.Fatalf("good probe after the back-off: %s", s)
	}
	// On probation: one more failure degrades it again, for 60 s.
	if !n.JobFailed("gpu-1", "prompt lost") {
		t.Fatal("failure on probation did not degrade")
	}
	if next, s := probe(); s != schema.NodeDegraded || next != 60*time.Second || !strings.Contains(state().Reason, "prompt lost") {
		t.Fatalf("second degradation: %s next %s reason %q", s, next, state().Reason)
	}
	// A job that was still running there succeeds: up at once.
	n.JobSucceeded("gpu-1")
	if v := state(); v.State != schema.NodeUp || v.Reason != "" {
		t.Fatalf("after a success: %s %q", v.State, v.Reason)
	}
	waitFor(t, "changes", func() bool { return len(changes.list()) >= 6 })
	var got []string
	for _, c := range changes.list() {
		got = append(got, string(c.New))
	}
	want := []string{"unknown", "up", "degraded", "up", "degraded", "up"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("changes %v, want %v", got, want)
	}
}

// A refused connection marks the node down at once; the prober brings it
// back after two good probes.
func TestNodesSuspectIsDownUntilProbesAgree(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{Interval: time.Second, Jitter: -1})
	n := b.nodes
	if _, err := n.Add(context.Background(), apiNode("gpu-1", "http://127.0.0.1:1")); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	e := n.entries["gpu-1"]
	n.mu.Unlock()
	good := schema.ProbeResult{HostReachable: true, PortOpen: true, ComfyOK: true, LatencyMS: 1}
	n.apply(e, good, true)
	n.Suspect("gpu-1", "connection failed: dial tcp 127.0.0.1:1: connect: connection refused")
	v, _ := n.Get("gpu-1")
	if v.State != schema.NodeDown || !strings.Contains(v.Reason, "connection refused") {
		t.Fatalf("suspect: %s %q", v.State, v.Reason)
	}
	if _, s, _ := n.apply(e, good, true); s != schema.NodeDown {
		t.Fatalf("one good probe: %s", s)
	}
	if _, s, _ := n.apply(e, good, true); s != schema.NodeUp {
		t.Fatalf("two good probes: %s", s)
	}
	if v, _ := n.Get("gpu-1"); v.Reason != "" {
		t.Fatalf("reason when up: %q", v.Reason)
	}
}

// rewriteHistory returns a node URL wrapper: the nodes named in which are
// reached through a proxy that replaces every /history/ answer body by
// rewrite's result; the others directly.
func rewriteHistory(t testing.TB, rewrite func([]byte) []byte, which ...string) func(string, *comfytest.Server) string {
	return func(name string, s *comfytest.Server) string {
		if !slices.Contains(which, name) {
			return s.URL()
		}
		target, _ := url.Parse(s.URL())
		proxy := httputil.NewSingleHostReverseProxy(target)
		proxy.ModifyResponse = func(resp *http.Response) error {
			if !strings.HasPrefix(resp.Request.URL.Path, "/history/") {
				return nil
			}
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				return err
			}
			resp.Body.Close()
			body = rewrite(body)
			resp.Body = io.NopCloser(bytes.NewReader(body))
			resp.ContentLength = int64(len(body))
			resp.Header.Del("Content-Length")
			return nil
		}
		srv := httptest.NewServer(proxy)
		t.Cleanup(srv.Close)
		return srv.URL
	}
}

// One node answers garbage on /history, the other is healthy: the garbage
// node fails three jobs (each within milliseconds of its end), goes degraded with
// the reason shown and gets no more; every job succeeds on the healthy node
// after at most two attempts.
func TestFarmGarbageHistoryNodeIsDegraded(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		garbage := func(b []byte) []byte {
			if len(b) <= 2 {
				return b // {}: not in history yet, answered honestly
			}
			return []byte(`{"oops": <html>Internal garbage</html>`)
		}
		// The garbage node's prompts take 300 ms, so that each failure is
		// found out (in milliseconds) before the prompt after it ends.
		// A 2023-era node: without execution_success, every completion
		// reads the history entry. The healthy node takes 150 ms a job, so
		// that the queue lasts long enough for the garbage node to be given
		// three jobs however fast the machine runs the rest (at 40 ms it
		// emptied the queue before the second failure on a quiet machine).
		slow := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 300 * time.Millisecond}, Generation: comfytest.GenLegacy}
		healthy := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 150 * time.Millisecond}}
		e := newFarmEnvWith(t, cfg, []comfytest.Options{slow, healthy}, func(c *FarmConfig) {
			c.HistoryWait = 30 * time.Second
		}, nil, rewriteHistory(t, garbage, "n1"))
		var ids []string
		for i := range 20 {
			ids = append(ids, e.submit("alpha", "g", sdGraph(ckptXL, 1, i), 0).ID)
		}
		onGarbage := 0
		for _, id := range ids {
			j := e.waitState(id, schema.JobSucceeded, 60*time.Second)
			if j.Node != "n2" || j.Attempts > 2 {
				t.Errorf("job %s succeeded on %s after %d attempts, want n2 and at most 2", id, j.Node, j.Attempts)
			}
			if j.Attempts == 2 {
				onGarbage++
			}
		}
		v, _ := e.nodes.Get("n1")
		if v.State != schema.NodeDegraded || !strings.Contains(v.Reason, "3 jobs in a row") || !strings.Contains(v.Reason, "unreadable history") {
			t.Fatalf("garbage node: %s %q", v.State, v.Reason)
		}
		// A finished prompt frees its slot before its history is read, so
		// one more job may have been posted there while the third failure
		// was being found out; none after.
		if onGarbage < 3 || onGarbage > 4 {
			t.Errorf("%d jobs were tried on the garbage node, want 3 (or 4)", onGarbage)
		}
		if got := e.fakes["n1"].Stats().Submitted; got != onGarbage {
			t.Errorf("the garbage node got %d prompts, %d jobs were tried there", got, onGarbage)
		}
		if v, _ := e.nodes.Get("n2"); v.State != schema.NodeUp {
			t.Errorf("healthy node %s", v.State)
		}
	})
}

// A post refused by a node that just died (the prober has not noticed yet:
// its interval is long) uses no attempt, takes the node out of placement at
// once, and the jobs wait for it instead of burning their attempts; once it
// is back, each runs exactly once.
func TestFarmRefusedPostUsesNoAttempt(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnvProbe(t, cfg, []comfytest.Options{sdOptions()}, nil, nil, nil, func(p *ProbeConfig) {
			p.Interval = time.Hour // only the first probe and ProbeNow
		})
		ctx := context.Background()
		node := e.fakes["n1"]
		node.Crash()
		var ids []string
		for i := range 5 {
			ids = append(ids, e.submit("alpha", "refused", sdGraph(ckptXL, 1, i), 0).ID)
		}
		e.eventually(10*time.Second, "node down after a refused post", func() bool {
			v, _ := e.nodes.Get("n1")
			return v.State == schema.NodeDown
		})
		v, _ := e.nodes.Get("n1")
		if !strings.Contains(v.Reason, "connection refused") {
			t.Errorf("reason %q", v.Reason)
		}
		e.eventually(10*time.Second, "every job queued with no attempt used", func() bool {
			for _, id := range ids {
				if j := e.job(id); j.State != schema.JobQueued || j.Attempts != 0 {
					return false
				}
			}
			return true
		})
		if err := node.Restart(); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if _, err := e.nodes.ProbeNow(ctx, "n1"); err != nil {
				t.Fatal(err)
			}
		}
		for _, id := range ids {
			if j := e.waitState(id, schema.JobSucceeded, 30*time.Second); j.Attempts != 1 {
				t.Errorf("job %s succeeded after %d attempts, want 1", id, j.Attempts)
			}
		}
		if got := node.Stats().Submitted; got != len(ids) {
			t.Errorf("the node got %d prompts for %d jobs", got, len(ids))
		}
	})
}

package dispatch

import (
	"context"
	"strings"
	"testing"
	"time"

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

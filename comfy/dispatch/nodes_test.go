package dispatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// memStore is an in-memory NodeStore; a set Func field replaces a method.
type memStore struct {
	mu   sync.Mutex
	rows map[string]schema.Node

	ListFunc     func(ctx context.Context) ([]schema.Node, error)
	GetFunc      func(ctx context.Context, name string) (*schema.Node, error)
	UpsertFunc   func(ctx context.Context, n *schema.Node) error
	DeleteFunc   func(ctx context.Context, name string) error
	SetDrainFunc func(ctx context.Context, name string, drain bool) error
}

func newMemStore(rows ...schema.Node) *memStore {
	s := &memStore{rows: map[string]schema.Node{}}
	for _, r := range rows {
		s.rows[r.Name] = r
	}
	return s
}

func (s *memStore) NodeList(ctx context.Context) ([]schema.Node, error) {
	if s.ListFunc != nil {
		return s.ListFunc(ctx)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []schema.Node
	for _, r := range s.rows {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b schema.Node) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func (s *memStore) NodeGet(ctx context.Context, name string) (*schema.Node, error) {
	if s.GetFunc != nil {
		return s.GetFunc(ctx, name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.rows[name]
	if !ok {
		return nil, schema.ErrNotFound
	}
	return &r, nil
}

func (s *memStore) NodeUpsert(ctx context.Context, n *schema.Node) error {
	if s.UpsertFunc != nil {
		return s.UpsertFunc(ctx, n)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rows[n.Name] = *n
	return nil
}

func (s *memStore) NodeDelete(ctx context.Context, name string) error {
	if s.DeleteFunc != nil {
		return s.DeleteFunc(ctx, name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.rows[name]; !ok {
		return schema.ErrNotFound
	}
	delete(s.rows, name)
	return nil
}

func (s *memStore) NodeSetDrain(ctx context.Context, name string, drain bool) error {
	if s.SetDrainFunc != nil {
		return s.SetDrainFunc(ctx, name, drain)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.rows[name]
	if !ok {
		return schema.ErrNotFound
	}
	r.Drain = drain
	s.rows[name] = r
	return nil
}

func (s *memStore) row(name string) (schema.Node, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.rows[name]
	return r, ok
}

// probeLog records every scheduled probe.
type probeLog struct {
	mu   sync.Mutex
	recs []probeRecord
	hook func(probeRecord) // called in the probe loop, after recording
}

func (l *probeLog) record(r probeRecord) {
	l.mu.Lock()
	l.recs = append(l.recs, r)
	hook := l.hook
	l.mu.Unlock()
	if hook != nil {
		hook(r)
	}
}

func (l *probeLog) setHook(f func(probeRecord)) {
	l.mu.Lock()
	l.hook = f
	l.mu.Unlock()
}

// of returns the probes of name that started at or after since.
func (l *probeLog) of(name string, since time.Time) []probeRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []probeRecord
	for _, r := range l.recs {
		if r.Name == name && !r.Started.Before(since) {
			out = append(out, r)
		}
	}
	return out
}

type nodesBundle struct {
	nodes *Nodes
	store *memStore
	log   *probeLog
}

// setupNodes builds a registry over an in-memory store with a fast prober.
func setupNodes(t *testing.T, cfg ProbeConfig, rows ...schema.Node) *nodesBundle {
	t.Helper()
	if cfg.Interval == 0 {
		cfg.Interval = 50 * time.Millisecond
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.SlowThreshold == 0 {
		cfg.SlowThreshold = 5 * time.Second // the test machine may be slow; only the slow test lowers it
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 4 * cfg.Interval
	}
	b := &nodesBundle{store: newMemStore(rows...), log: &probeLog{}}
	b.nodes = NewNodes(b.store, cfg, slog.New(slog.DiscardHandler))
	b.nodes.onProbeFunc = b.log.record
	return b
}

// run starts the prober until the test ends.
func (b *nodesBundle) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.nodes.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return after cancel")
		}
	})
}

const waitLimit = 30 * time.Second

// waitFor polls cond until it holds or waitLimit passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitState(t *testing.T, n *Nodes, name string, want schema.NodeState) schema.NodeView {
	t.Helper()
	var v schema.NodeView
	waitFor(t, fmt.Sprintf("%s to be %s", name, want), func() bool {
		v, _ = n.Get(name)
		return v.State == want
	})
	return v
}

// newComfy starts a fake ComfyUI of one protocol generation.
func newComfy(t *testing.T, gen comfytest.Generation) *comfytest.Server {
	t.Helper()
	s := comfytest.NewServer(comfytest.Options{Generation: gen})
	t.Cleanup(s.Close)
	return s
}

func restart(t *testing.T, s *comfytest.Server) {
	if err := s.Restart(); err != nil {
		t.Errorf("restart fake ComfyUI: %v", err)
	}
}

func apiNode(name, url string) schema.Node {
	return schema.Node{Name: name, URL: url, MaxInflight: 1, Tags: []string{"t"}}
}

// collect drains a subscription in the background.
type changeLog struct {
	mu  sync.Mutex
	got []NodeChange
}

func (c *changeLog) list() []NodeChange {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got)
}

func subscribe(t *testing.T, n *Nodes) *changeLog {
	t.Helper()
	ch, cancel := n.Subscribe()
	c := &changeLog{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range ch {
			c.mu.Lock()
			c.got = append(c.got, ev)
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func TestNodesCrashAndRestart(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenCurrent)
	b := setupNodes(t, ProbeConfig{})
	changes := subscribe(t, b.nodes)
	ctx := context.Background()
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	b.run(t)
	v := waitState(t, b.nodes, "gpu-1", schema.NodeUp)
	if !v.ComfyOK || v.ComfyUIVersion != "0.8.0" || len(v.Devices) != 1 || v.LastOKAt == nil || v.LastProbeAt == nil {
		t.Fatalf("up view = %+v", v)
	}

	f.Crash()
	crashed := time.Now()
	v = waitState(t, b.nodes, "gpu-1", schema.NodeDown)
	took := time.Since(crashed)
	if !v.HostReachable || v.PortOpen || v.ComfyOK {
		t.Errorf("down view: host_reachable %v port_open %v comfy_ok %v, want true false false", v.HostReachable, v.PortOpen, v.ComfyOK)
	}
	// Seen within two probe intervals: at most two probes that started after
	// the crash were needed to call it down.
	if n := probesUntil(b.log.of("gpu-1", crashed), schema.NodeDown); n < 1 || n > 2 {
		t.Errorf("down after %d probes started after the crash, want 1..2", n)
	}
	t.Logf("down seen %s after the crash (interval 50ms)", took)

	restart(t, f)
	restarted := time.Now()
	waitState(t, b.nodes, "gpu-1", schema.NodeUp)
	if n := probesUntil(b.log.of("gpu-1", restarted), schema.NodeUp); n < 1 || n > 2 {
		t.Errorf("up after %d probes started after the restart, want 1..2", n)
	}
	t.Logf("up seen %s after the restart", time.Since(restarted))

	waitFor(t, "four changes", func() bool { return len(changes.list()) >= 4 })
	var states []string
	for _, c := range changes.list() {
		states = append(states, fmt.Sprintf("%s>%s", c.Old, c.New))
	}
	if want := []string{">unknown", "unknown>up", "up>down", "down>up"}; !slices.Equal(states, want) {
		t.Errorf("changes %v, want %v", states, want)
	}
}

// probesUntil counts probes up to and including the first that left the node
// in state want; 0 if none did.
func probesUntil(recs []probeRecord, want schema.NodeState) int {
	for i, r := range recs {
		if r.State == want {
			return i + 1
		}
	}
	return 0
}

func TestNodesSingleFailedProbeDoesNotFlip(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenClassic)
	b := setupNodes(t, ProbeConfig{})
	changes := subscribe(t, b.nodes)
	if _, err := b.nodes.Add(context.Background(), apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	b.run(t)
	waitState(t, b.nodes, "gpu-1", schema.NodeUp)

	// The probe loop calls the hook before scheduling the next probe, so
	// restarting inside it makes the crash visible to exactly one probe.
	var once sync.Once
	failed := make(chan probeRecord, 1)
	b.log.setHook(func(r probeRecord) {
		if r.Name == "gpu-1" && !r.Result.PortOpen {
			once.Do(func() {
				restart(t, f)
				failed <- r
			})
		}
	})
	f.Crash()
	var r probeRecord
	select {
	case r = <-failed:
	case <-time.After(waitLimit):
		t.Fatal("no failed probe")
	}
	if r.State != schema.NodeUp {
		t.Errorf("state after one failed probe = %s, want up", r.State)
	}
	waitFor(t, "three good probes after the restart", func() bool {
		good := 0
		for _, p := range b.log.of("gpu-1", r.Started.Add(time.Nanosecond)) {
			if p.Result.ComfyOK {
				good++
			}
		}
		return good >= 3
	})
	for _, c := range changes.list() {
		if c.New == schema.NodeDown {
			t.Errorf("node flipped to down after a single failed probe: %+v", c)
		}
	}
}

func TestNodesHungNodeDoesNotBlockOthers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		// start returns the hung node's URL and, if it starts healthy, the
		// switch that hangs it.
		start func(t *testing.T) (url string, hang func())
	}{
		{"silent listener", func(t *testing.T) (string, func()) { return silentListener(t), nil }},
		{"Hang(true) after up", func(t *testing.T) (string, func()) {
			f := newComfy(t, comfytest.GenCurrent)
			return f.URL(), func() { f.Hang(true) }
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			healthy := newComfy(t, comfytest.GenCurrent)
			b := setupNodes(t, ProbeConfig{Timeout: 2 * time.Second, Concurrency: 2})
			changes := subscribe(t, b.nodes)
			ctx := context.Background()
			url, hang := tc.start(t)
			for _, nd := range []schema.Node{apiNode("healthy", healthy.URL()), apiNode("hung", url)} {
				if _, err := b.nodes.Add(ctx, nd); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			b.run(t)
			waitState(t, b.nodes, "healthy", schema.NodeUp)
			if hang != nil {
				waitState(t, b.nodes, "hung", schema.NodeUp)
				hang()
				start = time.Now()
			}
			v := waitState(t, b.nodes, "hung", schema.NodeDown)
			if !v.PortOpen || v.ComfyOK || !strings.Contains(v.Error, "no HTTP answer") {
				t.Errorf("hung view: port_open %v comfy_ok %v error %q", v.PortOpen, v.ComfyOK, v.Error)
			}
			hungProbes := b.log.of("hung", start)
			healthyProbes := b.log.of("healthy", start)
			// Each hung probe takes the 2s timeout; the healthy node is due
			// every 50ms. On schedule it gets dozens of probes meanwhile;
			// blocked behind the hung node it would get about as many as it.
			if len(healthyProbes) < 4*max(1, len(hungProbes)) {
				t.Errorf("healthy node probed %d times while the hung one was probed %d times", len(healthyProbes), len(hungProbes))
			}
			if hv, _ := b.nodes.Get("healthy"); hv.State != schema.NodeUp {
				t.Errorf("healthy node is %s", hv.State)
			}
			for _, c := range changes.list() {
				if c.Name == "healthy" && c.Old == schema.NodeUp {
					t.Errorf("healthy node left up: %+v", c)
				}
			}
			t.Logf("healthy probed %d times while the hung node was probed %d times", len(healthyProbes), len(hungProbes))
		})
	}
}

func TestNodesSlowNodeIsDegraded(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenCurrent)
	b := setupNodes(t, ProbeConfig{SlowThreshold: 150 * time.Millisecond, Timeout: 5 * time.Second})
	if _, err := b.nodes.Add(context.Background(), apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	b.run(t)
	waitState(t, b.nodes, "gpu-1", schema.NodeUp)
	f.SetSlow(400 * time.Millisecond)
	v := waitState(t, b.nodes, "gpu-1", schema.NodeDegraded)
	if !v.ComfyOK || v.LatencyMS < 400 {
		t.Errorf("degraded view: comfy_ok %v latency %vms", v.ComfyOK, v.LatencyMS)
	}
	f.SetSlow(0)
	waitState(t, b.nodes, "gpu-1", schema.NodeUp)
}

func TestNodesBadAnswerIsDegraded(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{})
	if _, err := b.nodes.Add(context.Background(), apiNode("web", answering(t, 200, "<html></html>"))); err != nil {
		t.Fatal(err)
	}
	b.run(t)
	v := waitState(t, b.nodes, "web", schema.NodeDegraded)
	if !v.PortOpen || v.ComfyOK || v.Error == "" {
		t.Errorf("view %+v", v)
	}
}

// Probes that time out back off: the gaps between them double up to
// MaxBackoff.
func TestNodesTimedOutProbesBackOff(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{Interval: 20 * time.Millisecond, MaxBackoff: 80 * time.Millisecond, Jitter: -1})
	b.nodes.dialer = func(ctx context.Context, addr string) (net.Conn, error) {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}
	}
	if _, err := b.nodes.Add(context.Background(), apiNode("off", closedPortURL(t))); err != nil {
		t.Fatal(err)
	}
	b.run(t)
	v := waitState(t, b.nodes, "off", schema.NodeDown)
	if v.HostReachable || v.PortOpen {
		t.Errorf("timed out: host_reachable %v port_open %v, want false false", v.HostReachable, v.PortOpen)
	}
	waitFor(t, "six probes", func() bool { return len(b.log.of("off", time.Time{})) >= 6 })
	recs := b.log.of("off", time.Time{})
	// Gaps between probe starts grow 20, 40, 80, 80ms: each at least the
	// scheduled delay (timers never fire early).
	for i, want := range []time.Duration{20, 40, 80, 80} {
		gap := recs[i+1].Started.Sub(recs[i].Started)
		if gap < want*time.Millisecond {
			t.Errorf("gap %d = %s, want >= %dms", i+1, gap, want)
		}
	}
}

// A node whose port refuses connections for 90 s (probe interval 1 s, on
// the prober's own clock) and then listens again is up within two probe
// intervals of listening: refused probes are cheap and do not back off, and
// the first good answer needs one confirming probe.
func TestNodesRestartAfterLongDowntimeIsUpWithinTwoIntervals(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	const interval = time.Second
	b := setupNodes(t, ProbeConfig{Interval: interval, MaxBackoff: time.Minute, Jitter: -1, NowFunc: clock})
	n := b.nodes
	if _, err := n.Add(context.Background(), apiNode("gpu-1", "http://127.0.0.1:1")); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	e := n.entries["gpu-1"]
	n.mu.Unlock()
	up := schema.ProbeResult{HostReachable: true, PortOpen: true, ComfyOK: true, LatencyMS: 1}
	refused := schema.ProbeResult{HostReachable: true, Error: "connection refused: port closed"}
	if _, s, _ := n.apply(e, up, true); s != schema.NodeUp {
		t.Fatalf("first probe: %s", s)
	}
	// The node dies: refused connections for 90 s of probe time.
	died := now
	var next time.Duration
	for now.Sub(died) < 90*time.Second {
		var s schema.NodeState
		next, s, _ = n.apply(e, refused, false)
		if now.Sub(died) > 2*interval && s != schema.NodeDown {
			t.Fatalf("%s after the death: %s", now.Sub(died), s)
		}
		if next > interval {
			t.Fatalf("%s after the death the next probe waits %s, want one interval (%s)", now.Sub(died), next, interval)
		}
		now = now.Add(next)
	}
	// It listens again somewhere within the last delay; the next probe is
	// its first good answer at the latest one interval later.
	restarted := now.Add(-next / 2)
	firstGood := now
	var s schema.NodeState
	for s != schema.NodeUp {
		next, s, _ = n.apply(e, up, true)
		if s == schema.NodeUp {
			break
		}
		now = now.Add(next)
		if now.Sub(firstGood) > 2*interval {
			t.Fatalf("still %s %s after the first good answer", s, now.Sub(firstGood))
		}
	}
	t.Logf("up %s after the first good answer, %s after listening again", now.Sub(firstGood), now.Sub(restarted))
}

func TestNodesTwoAgreeingProbes(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{})
	n := b.nodes
	if _, err := n.Add(context.Background(), apiNode("gpu-1", "http://127.0.0.1:1")); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	e := n.entries["gpu-1"]
	n.mu.Unlock()
	up := schema.ProbeResult{HostReachable: true, PortOpen: true, ComfyOK: true, LatencyMS: 1}
	down := schema.ProbeResult{HostReachable: true, Error: "refused"}
	slow := schema.ProbeResult{HostReachable: true, PortOpen: true, ComfyOK: true, LatencyMS: 60_000}
	steps := []struct {
		res  schema.ProbeResult
		want schema.NodeState
	}{
		{down, schema.NodeDown}, // first probe of an unknown node decides at once
		{up, schema.NodeDown},
		{down, schema.NodeDown},
		{up, schema.NodeDown},
		{up, schema.NodeUp},
		{down, schema.NodeUp},
		{slow, schema.NodeUp}, // down then degraded: neither confirmed
		{slow, schema.NodeDegraded},
		{up, schema.NodeDegraded},
		{up, schema.NodeUp},
	}
	for i, s := range steps {
		_, got, ok := n.apply(e, s.res, s.res.PortOpen)
		if !ok || got != s.want {
			t.Fatalf("step %d: state %s (ok %v), want %s", i, got, ok, s.want)
		}
	}
}

func TestNodesDrain(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenClassic)
	b := setupNodes(t, ProbeConfig{})
	changes := subscribe(t, b.nodes)
	ctx := context.Background()
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	b.run(t)
	waitState(t, b.nodes, "gpu-1", schema.NodeUp)

	v, err := b.nodes.SetDrain(ctx, "gpu-1", true)
	if err != nil || v.State != schema.NodeDraining || !v.ComfyOK {
		t.Fatalf("SetDrain = %+v, %v", v, err)
	}
	if r, _ := b.store.row("gpu-1"); !r.Drain {
		t.Error("drain not stored")
	}
	if nd, _ := b.nodes.Node("gpu-1"); !nd.Drain {
		t.Error("Node().Drain false")
	}
	if h, _ := b.nodes.Health("gpu-1"); h != schema.NodeUp {
		t.Errorf("health while draining = %s, want up", h)
	}
	// Still probed while draining: health fields stay current.
	since := time.Now()
	waitFor(t, "a probe while draining", func() bool { return len(b.log.of("gpu-1", since)) > 0 })
	if v, _ := b.nodes.Get("gpu-1"); v.State != schema.NodeDraining || v.LastProbeAt == nil || v.LastProbeAt.Before(since.Add(-time.Second)) {
		t.Errorf("draining view %+v", v)
	}
	// A drained node that goes down keeps showing draining, with health down.
	f.Crash()
	waitFor(t, "health down", func() bool { h, _ := b.nodes.Health("gpu-1"); return h == schema.NodeDown })
	if v, _ := b.nodes.Get("gpu-1"); v.State != schema.NodeDraining || v.PortOpen {
		t.Errorf("drained and down: %+v", v)
	}
	restart(t, f)
	waitFor(t, "health up", func() bool { h, _ := b.nodes.Health("gpu-1"); return h == schema.NodeUp })

	v, err = b.nodes.SetDrain(ctx, "gpu-1", false)
	if err != nil || v.State != schema.NodeUp {
		t.Fatalf("undrain = %+v, %v", v, err)
	}
	if _, err := b.nodes.SetDrain(ctx, "nope", true); !errors.Is(err, schema.ErrNotFound) {
		t.Errorf("drain unknown: %v", err)
	}
	drainChanges := func() []string {
		var out []string
		for _, c := range changes.list() {
			if c.Old == schema.NodeDraining || c.New == schema.NodeDraining {
				out = append(out, fmt.Sprintf("%s>%s", c.Old, c.New))
			}
		}
		return out
	}
	waitFor(t, "two drain changes", func() bool { return len(drainChanges()) >= 2 })
	if want := []string{"up>draining", "draining>up"}; !slices.Equal(drainChanges(), want) {
		t.Errorf("drain changes %v, want %v", drainChanges(), want)
	}

	b.store.SetDrainFunc = func(context.Context, string, bool) error { return errors.New("db down") }
	if _, err := b.nodes.SetDrain(ctx, "gpu-1", true); err == nil {
		t.Error("SetDrain with a failing store succeeded")
	}
	if v, _ := b.nodes.Get("gpu-1"); v.State == schema.NodeDraining {
		t.Error("drain applied although the store refused it")
	}
}

func TestNodesAddValidation(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{})
	ctx := context.Background()
	long := strings.Repeat("a", 65)
	for _, tc := range []struct {
		node  schema.Node
		field string
	}{
		{schema.Node{Name: "", URL: "http://127.0.0.1:8188"}, "name"},
		{schema.Node{Name: "GPU", URL: "http://127.0.0.1:8188"}, "name"},
		{schema.Node{Name: "-gpu", URL: "http://127.0.0.1:8188"}, "name"},
		{schema.Node{Name: "gpu 1", URL: "http://127.0.0.1:8188"}, "name"},
		{schema.Node{Name: long, URL: "http://127.0.0.1:8188"}, "name"},
		{schema.Node{Name: "gpu-1", URL: "http://127.0.0.1"}, "url"},
		{schema.Node{Name: "gpu-1", URL: "https://gpu.lan/"}, "url"},
		{schema.Node{Name: "gpu-1", URL: "ftp://127.0.0.1:8188"}, "url"},
		{schema.Node{Name: "gpu-1", URL: "127.0.0.1:8188"}, "url"},
		{schema.Node{Name: "gpu-1", URL: "http://127.0.0.1:8188?x=1"}, "url"},
		{schema.Node{Name: "gpu-1", URL: "http://127.0.0.1:99999"}, "url"},
		{schema.Node{Name: "gpu-1", URL: "http://127.0.0.1:8188", MaxInflight: 65}, "max_inflight"},
		{schema.Node{Name: "gpu-1", URL: "http://127.0.0.1:8188", MaxInflight: -1}, "max_inflight"},
		{schema.Node{Name: "gpu-1", URL: "http://127.0.0.1:8188", Tags: []string{""}}, "tags"},
	} {
		_, err := b.nodes.Add(ctx, tc.node)
		var ve *schema.ValidationError
		if !errors.As(err, &ve) || ve.Field != tc.field {
			t.Errorf("Add(%+v) = %v, want a validation error on %s", tc.node, err, tc.field)
		}
	}
	if rows, _ := b.store.NodeList(ctx); len(rows) != 0 {
		t.Errorf("invalid nodes were stored: %+v", rows)
	}

	ok := schema.Node{Name: "gpu_1.a-b", URL: "http://127.0.0.1:8188/", Tags: []string{"sdxl", " sdxl ", "big"}}
	v, err := b.nodes.Add(ctx, ok)
	if err != nil {
		t.Fatal(err)
	}
	if v.URL != "http://127.0.0.1:8188" || v.Host != "127.0.0.1" || v.Port != 8188 || v.MaxInflight != 1 ||
		!slices.Equal(v.Tags, []string{"sdxl", "big"}) || v.State != schema.NodeUnknown {
		t.Errorf("added view %+v", v)
	}
	if r, _ := b.store.row("gpu_1.a-b"); r.Source != "api" || r.CreatedAt.IsZero() {
		t.Errorf("stored row %+v", r)
	}
	if _, err := b.nodes.Add(ctx, ok); !errors.Is(err, schema.ErrConflict) {
		t.Errorf("duplicate Add: %v, want ErrConflict", err)
	}
	// A row someone else stored also conflicts.
	_ = b.store.NodeUpsert(ctx, &schema.Node{Name: "other", URL: "http://127.0.0.1:9"})
	if _, err := b.nodes.Add(ctx, schema.Node{Name: "other", URL: "http://127.0.0.1:9"}); !errors.Is(err, schema.ErrConflict) {
		t.Errorf("Add over a stored row: %v, want ErrConflict", err)
	}
	b.store.UpsertFunc = func(context.Context, *schema.Node) error { return errors.New("db down") }
	if _, err := b.nodes.Add(ctx, schema.Node{Name: "gpu-2", URL: "http://127.0.0.1:9"}); err == nil {
		t.Error("Add with a failing store succeeded")
	}
	if _, ok := b.nodes.Get("gpu-2"); ok {
		t.Error("node registered although the store refused it")
	}
}

func TestNodesConcurrentAddSameName(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			_, err := b.nodes.Add(context.Background(), apiNode("gpu-1", "http://127.0.0.1:9"))
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	okCount := 0
	for err := range errs {
		switch {
		case err == nil:
			okCount++
		case !errors.Is(err, schema.ErrConflict):
			t.Errorf("unexpected error %v", err)
		}
	}
	if okCount != 1 {
		t.Errorf("%d Adds of one name succeeded, want 1", okCount)
	}
}

func TestNodesAddRemoveWhileRunning(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenClassic)
	b := setupNodes(t, ProbeConfig{})
	changes := subscribe(t, b.nodes)
	ctx := context.Background()
	b.run(t)
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	waitState(t, b.nodes, "gpu-1", schema.NodeUp)
	if err := b.nodes.Remove(ctx, "gpu-1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.nodes.Get("gpu-1"); ok {
		t.Error("removed node still listed")
	}
	if _, ok := b.store.row("gpu-1"); ok {
		t.Error("removed node still stored")
	}
	if err := b.nodes.Remove(ctx, "gpu-1"); !errors.Is(err, schema.ErrNotFound) {
		t.Errorf("second Remove: %v", err)
	}
	// The probe loop stops: once any in-flight probe ended, no new one starts.
	removed := time.Now()
	later := removed.Add(300 * time.Millisecond)
	waitFor(t, "time to pass", func() bool { return time.Now().After(later) })
	if n := len(b.log.of("gpu-1", removed.Add(50*time.Millisecond))); n != 0 {
		t.Errorf("%d probes of a removed node", n)
	}
	waitFor(t, "the Removed change", func() bool {
		cs := changes.list()
		return len(cs) > 0 && cs[len(cs)-1].Removed
	})
	cs := changes.list()
	if len(cs) == 0 || !cs[0].Added || !cs[len(cs)-1].Removed || cs[len(cs)-1].Name != "gpu-1" {
		t.Errorf("changes %+v, want Added first and Removed last", cs)
	}
	// Re-adding the name works and is probed again.
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	waitState(t, b.nodes, "gpu-1", schema.NodeUp)
}

func TestNodesLoad(t *testing.T) {
	t.Parallel()
	old := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	b := setupNodes(t, ProbeConfig{},
		schema.Node{Name: "cfg-a", URL: "http://127.0.0.1:8001", MaxInflight: 1, Drain: true, Source: "config", CreatedAt: old},
		schema.Node{Name: "cfg-gone", URL: "http://127.0.0.1:8002", MaxInflight: 1, Source: "config"},
		schema.Node{Name: "api-x", URL: "http://127.0.0.1:8003", MaxInflight: 2, Source: "api"},
	)
	changes := subscribe(t, b.nodes)
	ctx := context.Background()
	cfg := []schema.Node{
		{Name: "cfg-a", URL: "http://127.0.0.1:8011", Tags: []string{"x"}},
		{Name: "cfg-b", URL: "http://127.0.0.1:8012", MaxInflight: 3},
	}
	if err := b.nodes.Load(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, v := range b.nodes.List() {
		names = append(names, v.Name)
	}
	if !slices.Equal(names, []string{"api-x", "cfg-a", "cfg-b"}) {
		t.Errorf("loaded %v", names)
	}
	a, _ := b.store.row("cfg-a")
	if a.URL != "http://127.0.0.1:8011" || !a.Drain || a.Source != "config" || !a.CreatedAt.Equal(old) || a.MaxInflight != 1 {
		t.Errorf("cfg-a row %+v: want new URL, drain kept, created_at kept", a)
	}
	if v, _ := b.nodes.Get("cfg-a"); v.State != schema.NodeDraining {
		t.Errorf("cfg-a state %s, want draining", v.State)
	}
	if _, ok := b.store.row("cfg-gone"); ok {
		t.Error("config row no longer in the config was kept")
	}
	if v, _ := b.nodes.Get("cfg-b"); v.State != schema.NodeUnknown || v.MaxInflight != 3 {
		t.Errorf("cfg-b %+v", v)
	}
	waitFor(t, "three Added changes", func() bool {
		added := 0
		for _, c := range changes.list() {
			if c.Added {
				added++
			}
		}
		return added == 3
	})

	for _, bad := range [][]schema.Node{
		{{Name: "Bad Name", URL: "http://127.0.0.1:1"}},
		{{Name: "dup", URL: "http://127.0.0.1:1"}, {Name: "dup", URL: "http://127.0.0.1:2"}},
	} {
		if err := b.nodes.Load(ctx, bad); err == nil {
			t.Errorf("Load(%+v) accepted", bad)
		}
	}
	b.store.ListFunc = func(context.Context) ([]schema.Node, error) { return nil, errors.New("db down") }
	if err := b.nodes.Load(ctx, nil); err == nil {
		t.Error("Load with a failing store succeeded")
	}
}

func TestNodesRuntimeInViews(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{})
	ctx := context.Background()
	changes := subscribe(t, b.nodes)
	b.nodes.SetRuntimeFunc(func(name string) Runtime {
		return Runtime{Inflight: 2, CurrentJob: "job-" + name, ModelsLoaded: []string{"sdxl.safetensors"}, JobsDone: 7, JobsFailed: 1}
	})
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", "http://127.0.0.1:9")); err != nil {
		t.Fatal(err)
	}
	for _, v := range []schema.NodeView{b.nodes.List()[0], func() schema.NodeView { v, _ := b.nodes.Get("gpu-1"); return v }()} {
		if v.Inflight != 2 || v.CurrentJob != "job-gpu-1" || !slices.Equal(v.ModelsLoaded, []string{"sdxl.safetensors"}) || v.JobsDone != 7 || v.JobsFailed != 1 {
			t.Errorf("view runtime fields %+v", v)
		}
	}
	waitFor(t, "the Added change", func() bool { return len(changes.list()) > 0 })
	if c := changes.list()[0]; c.View.CurrentJob != "job-gpu-1" {
		t.Errorf("change view %+v", c.View)
	}
	b.nodes.SetRuntimeFunc(nil)
	if v, _ := b.nodes.Get("gpu-1"); v.Inflight != 0 || v.ModelsLoaded == nil || v.Devices == nil || v.Tags == nil {
		t.Errorf("view without runtime %+v (slices must be non-nil for JSON)", v)
	}
}

func TestNodesSubscribeDropsOldest(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{})
	ch, cancel := b.nodes.Subscribe()
	total := nodeSubBuffer + 50
	for i := 1; i <= total; i++ {
		b.nodes.emit(NodeChange{Name: fmt.Sprintf("n%d", i), seq: uint64(i)})
	}
	if len(ch) != nodeSubBuffer {
		t.Fatalf("buffered %d, want %d", len(ch), nodeSubBuffer)
	}
	first := <-ch
	if first.Name != "n51" {
		t.Errorf("oldest kept = %s, want n51", first.Name)
	}
	// A change older than one already sent for the same node is stale.
	b.nodes.emit(NodeChange{Name: "n1", seq: 1})
	b.nodes.emit(NodeChange{Name: fmt.Sprintf("n%d", total), seq: 5})
	if len(ch) != nodeSubBuffer-1 {
		t.Errorf("stale changes were sent")
	}
	cancel()
	cancel() // twice is fine
	n := 0
	for range ch {
		n++
	}
	if n != nodeSubBuffer-1 {
		t.Errorf("drained %d after close", n)
	}
	b.nodes.emit(NodeChange{Name: "after", seq: 1 << 40}) // no panic on a closed subscription
}

func TestNodesProbeNow(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenCurrent)
	b := setupNodes(t, ProbeConfig{})
	ctx := context.Background()
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	// Not running: only ProbeNow probes.
	v, err := b.nodes.ProbeNow(ctx, "gpu-1")
	if err != nil || v.State != schema.NodeUp || !v.ComfyOK || v.ComfyUIVersion != "0.8.0" {
		t.Fatalf("ProbeNow = %+v, %v", v, err)
	}
	if _, err := b.nodes.ProbeNow(ctx, "nope"); !errors.Is(err, schema.ErrNotFound) {
		t.Errorf("ProbeNow unknown: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := b.nodes.ProbeNow(cctx, "gpu-1"); err == nil {
		t.Error("ProbeNow with a cancelled context succeeded")
	}
	if v, _ := b.nodes.Get("gpu-1"); v.State != schema.NodeUp || !v.ComfyOK {
		t.Errorf("a cancelled probe changed the node: %+v", v)
	}
}

// countingDialer records every address dialed and refuses anything but
// loopback, so a test can never reach the network.
type countingDialer struct {
	mu    sync.Mutex
	addrs []string
}

func (d *countingDialer) dial(ctx context.Context, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.addrs = append(d.addrs, addr)
	d.mu.Unlock()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("test dialer: refusing non-loopback %s", addr)
	}
	return dialTCP(ctx, addr)
}

func (d *countingDialer) dialed() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.addrs)
}

func TestNodesProbeURLAllowList(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenClassic)
	port := f.URL()[strings.LastIndex(f.URL(), ":")+1:]
	lookup := func(_ context.Context, host string) ([]netip.Addr, error) {
		switch host {
		case "good.test":
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		case "mixed.test":
			return []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("10.1.2.3")}, nil
		case "gpu.test":
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		}
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	for _, tc := range []struct {
		name      string
		allow     []string
		url       string
		forbidden bool
		ok        bool
	}{
		{"empty list allows loopback", nil, f.URL(), false, true},
		{"empty list refuses others", nil, "http://10.255.255.1:8188", true, false},
		{"empty list refuses unspecified", nil, "http://0.0.0.0:" + port, true, false},
		{"listed IP", []string{"127.0.0.1"}, f.URL(), false, true},
		{"listed CIDR", []string{"127.0.0.0/8"}, f.URL(), false, true},
		{"other CIDR refuses loopback", []string{"10.0.0.0/8"}, f.URL(), true, false},
		{"not listed", []string{"127.0.0.1"}, "http://10.255.255.1:8188", true, false},
		{"IPv6 not listed", []string{"127.0.0.1"}, "http://[fd00::1]:8188", true, false},
		{"name resolving to allowed", []string{"127.0.0.1"}, "http://good.test:" + port, false, true},
		{"name with one address outside", []string{"127.0.0.1"}, "http://mixed.test:" + port, true, false},
		{"listed host name", []string{"gpu.test"}, f.URL(), false, true},
		{"unresolvable", []string{"127.0.0.1"}, "http://nx.test:1", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setupNodes(t, ProbeConfig{Allow: tc.allow})
			d := &countingDialer{}
			b.nodes.dialer = d.dial
			b.nodes.lookupFunc = lookup
			res, err := b.nodes.ProbeURL(context.Background(), tc.url)
			if tc.forbidden {
				if !errors.Is(err, schema.ErrForbidden) {
					t.Fatalf("err %v, want ErrForbidden", err)
				}
				if got := d.dialed(); len(got) != 0 {
					t.Errorf("dialed %v for a forbidden target", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if res.ComfyOK != tc.ok {
				t.Errorf("comfy_ok %v, want %v (%s)", res.ComfyOK, tc.ok, res.Error)
			}
			for _, a := range d.dialed() {
				if !strings.HasPrefix(a, "127.0.0.1:") {
					t.Errorf("dialed %s, want only the checked loopback address", a)
				}
			}
		})
	}
	b := setupNodes(t, ProbeConfig{})
	var ve *schema.ValidationError
	if _, err := b.nodes.ProbeURL(context.Background(), "gopher://127.0.0.1:70"); !errors.As(err, &ve) {
		t.Errorf("bad URL: %v, want a validation error", err)
	}
}

func TestNodesMetrics(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenClassic)
	b := setupNodes(t, ProbeConfig{})
	ctx := context.Background()
	for _, nd := range []schema.Node{apiNode("up", f.URL()), apiNode("off", closedPortURL(t))} {
		if _, err := b.nodes.Add(ctx, nd); err != nil {
			t.Fatal(err)
		}
	}
	reg := prometheus.NewRegistry()
	for _, c := range b.nodes.Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	b.run(t)
	waitState(t, b.nodes, "up", schema.NodeUp)
	waitState(t, b.nodes, "off", schema.NodeDown)
	got := gather(t, reg)
	for key, want := range map[string]float64{
		"comfyfarm_node_state{node=up,state=up}":                         1,
		"comfyfarm_node_state{node=up,state=down}":                       0,
		"comfyfarm_node_state{node=off,state=down}":                      1,
		"comfyfarm_node_state{node=off,state=unknown}":                   0,
		"comfyfarm_node_probe_errors_total{node=off,reason=port_closed}": -1, // >= 1
		"comfyfarm_node_probe_duration_seconds_count":                    -1,
		"comfyfarm_node_probe_lag_seconds_count":                         -1,
	} {
		v, ok := got[key]
		switch {
		case !ok:
			t.Errorf("%s missing", key)
		case want < 0 && v < 1:
			t.Errorf("%s = %v, want >= 1", key, v)
		case want >= 0 && v != want:
			t.Errorf("%s = %v, want %v", key, v, want)
		}
	}
	if _, ok := got["comfyfarm_node_probe_errors_total{node=up,reason=port_closed}"]; ok {
		t.Error("errors counted for the healthy node")
	}
	if err := b.nodes.Remove(ctx, "off"); err != nil {
		t.Fatal(err)
	}
	for key := range gather(t, reg) {
		if strings.Contains(key, "node=off,") {
			// An in-flight probe may still land; it must not recreate series.
			t.Errorf("series of a removed node left: %s", key)
		}
	}
}

// gather flattens a registry into "name{label=value,...}" -> value.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			key := mf.GetName()
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.Gauge != nil:
				out[key] = m.GetGauge().GetValue()
			case m.Counter != nil:
				out[key] = m.GetCounter().GetValue()
			case m.Histogram != nil:
				out[key+"_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

func TestNodesRunTwice(t *testing.T) {
	t.Parallel()
	b := setupNodes(t, ProbeConfig{})
	b.run(t)
	waitFor(t, "Run to start", func() bool {
		b.nodes.mu.Lock()
		defer b.nodes.mu.Unlock()
		return b.nodes.runCtx != nil
	})
	if err := b.nodes.Run(context.Background()); err == nil {
		t.Error("second Run succeeded")
	}
}

func FuzzNormalizeNode(f *testing.F) {
	for _, s := range []struct {
		name, url string
		max       int
	}{
		{"gpu-1", "http://10.0.0.5:8188", 1},
		{"gpu_1.a", "https://gpu.lan:443/comfy/", 64},
		{"a", "http://[::1]:8188", 0},
		{"GPU", "http://h:1", 1},
		{"x", "http://h:0", 1},
		{"x", "http://user@h:1", 1},
		{"x", "http://h:1/%zz", 1},
		{"x", "http://[fe80::1%25eth0]:8188", 1},
		{"x", "http://h:1?q#f", 65},
	} {
		f.Add(s.name, s.url, s.max)
	}
	f.Fuzz(func(t *testing.T, name, rawURL string, maxInflight int) {
		nd, tgt, err := normalizeNode(schema.Node{Name: name, URL: rawURL, MaxInflight: maxInflight})
		if err != nil {
			var ve *schema.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("non-validation error %T %v", err, err)
			}
			return
		}
		if !nodeNameRE.MatchString(nd.Name) || nd.MaxInflight < 1 || nd.MaxInflight > MaxNodeInflight {
			t.Fatalf("accepted %+v", nd)
		}
		if tgt.port < 1 || tgt.port > 65535 || tgt.host == "" || nd.URL != tgt.base {
			t.Fatalf("target %+v for %q", tgt, rawURL)
		}
		// Normalizing is idempotent: the stored URL validates to itself.
		nd2, tgt2, err := normalizeNode(nd)
		if err != nil || nd2.URL != nd.URL || tgt2 != tgt {
			t.Fatalf("renormalize %q: %q %+v %v", nd.URL, nd2.URL, tgt2, err)
		}
	})
}

func FuzzProbeAllowList(f *testing.F) {
	f.Add("127.0.0.1", "127.0.0.1")
	f.Add("10.0.0.0/8", "10.1.2.3")
	f.Add("::1", "::ffff:127.0.0.1")
	f.Add("gpu.lan", "192.168.0.1")
	f.Add("bad/entry/x", "1.2.3.4")
	f.Fuzz(func(t *testing.T, entry, addr string) {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return
		}
		n := &Nodes{
			allow: parseProbeAllowList([]string{entry}, slog.New(slog.DiscardHandler)),
			lookupFunc: func(context.Context, string) ([]netip.Addr, error) {
				return nil, errors.New("no lookups in fuzzing")
			},
		}
		got := n.allowed(context.Background(), a)
		// Allowed only by a parsed prefix that contains it; a host name entry
		// whose lookup fails allows nothing.
		want := false
		for _, p := range n.allow.prefixes {
			want = want || p.Contains(a.Unmap().WithZone(""))
		}
		if len(n.allow.prefixes) == 0 && len(n.allow.hosts) == 0 {
			want = a.Unmap().IsLoopback()
		}
		if got != want {
			t.Fatalf("entry %q addr %s: allowed %v, want %v", entry, addr, got, want)
		}
	})
}

// TestNodesWithStore runs the registry on the real control database (SQLite,
// and MySQL when reachable): what it stores survives a restart.
func TestNodesWithStore(t *testing.T) {
	t.Parallel()
	for _, db := range dbtest.Configs() {
		t.Run(db.Name, func(t *testing.T) {
			t.Parallel()
			cfg := db.Config(t)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			open := func() *Nodes {
				cdb, err := dbcontrollers.OpenControl(ctx, cfg)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { cdb.Close() })
				return NewNodes(dbcontrollers.NewStore(cdb), ProbeConfig{}, slog.New(slog.DiscardHandler))
			}
			cfgNodes := []schema.Node{
				{Name: "cfg-1", URL: "http://127.0.0.1:8001", Tags: []string{"sdxl"}},
				{Name: "cfg-2", URL: "http://127.0.0.1:8002", MaxInflight: 2},
			}
			n := open()
			if err := n.Load(ctx, cfgNodes); err != nil {
				t.Fatal(err)
			}
			if _, err := n.Add(ctx, schema.Node{Name: "api-1", URL: "http://127.0.0.1:8003", MaxInflight: 4}); err != nil {
				t.Fatal(err)
			}
			if _, err := n.Add(ctx, schema.Node{Name: "cfg-1", URL: "http://127.0.0.1:9"}); !errors.Is(err, schema.ErrConflict) {
				t.Errorf("Add over a config node: %v, want ErrConflict", err)
			}
			if _, err := n.SetDrain(ctx, "cfg-1", true); err != nil {
				t.Fatal(err)
			}
			if err := n.Remove(ctx, "api-1"); err != nil {
				t.Fatal(err)
			}
			if _, err := n.Add(ctx, schema.Node{Name: "api-2", URL: "http://127.0.0.1:8004"}); err != nil {
				t.Fatal(err)
			}

			// Restart with cfg-2 gone from the config.
			n2 := open()
			if err := n2.Load(ctx, cfgNodes[:1]); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, v := range n2.List() {
				nd, _ := n2.Node(v.Name)
				got = append(got, fmt.Sprintf("%s %s %d %v drain=%v %s %s", v.Name, v.URL, v.MaxInflight, v.Tags, nd.Drain, nd.Source, v.State))
			}
			want := []string{
				"api-2 http://127.0.0.1:8004 1 [] drain=false api unknown",
				"cfg-1 http://127.0.0.1:8001 1 [sdxl] drain=true config draining",
			}
			if !slices.Equal(got, want) {
				t.Errorf("after restart:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		})
	}
}

// The same with a fake ComfyUI and the real probe loop on a fake clock: the
// node is crashed (connections refused) for 90 s of probe time, restarted,
// and is up within two intervals of probe time. The loop's waits are
// handed to the test, which moves the clock by each and lets it go on.
func TestNodesFakeRestartAfter90sIsUpWithinTwoIntervals(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenCurrent)
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return now
	}
	const interval = time.Second
	b := setupNodes(t, ProbeConfig{Interval: interval, MaxBackoff: time.Minute, Jitter: -1, NowFunc: clock})
	type wait struct {
		d       time.Duration
		proceed chan struct{}
	}
	waits := make(chan wait)
	b.nodes.waitFunc = func(ctx context.Context, d time.Duration) bool {
		w := wait{d, make(chan struct{})}
		select {
		case waits <- w:
		case <-ctx.Done():
			return false
		}
		select {
		case <-w.proceed:
			return true
		case <-ctx.Done():
			return false
		}
	}
	if _, err := b.nodes.Add(context.Background(), apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	b.run(t)
	// step lets one wait pass on the clock and returns its length.
	step := func() time.Duration {
		t.Helper()
		select {
		case w := <-waits:
			mu.Lock()
			now = now.Add(w.d)
			mu.Unlock()
			close(w.proceed)
			return w.d
		case <-time.After(waitLimit):
			t.Fatal("the probe loop stopped waiting")
			return 0
		}
	}
	state := func() schema.NodeState { v, _ := b.nodes.Get("gpu-1"); return v.State }
	for i := 0; state() != schema.NodeUp; i++ {
		if i > 10 {
			t.Fatalf("never up: %s", state())
		}
		step()
		waitFor(t, "the probe after the wait", func() bool { return len(b.log.of("gpu-1", time.Time{})) >= i+1 })
	}

	f.Crash()
	crashed := clock()
	for clock().Sub(crashed) < 90*time.Second {
		step()
	}
	if s := state(); s != schema.NodeDown {
		t.Fatalf("after 90 s refused: %s", s)
	}
	// Restart right after a probe found it refused (the worst case), then
	// let the loop go on one wait at a time, each time until its probe is in.
	probed := func() {
		t.Helper()
		waitFor(t, "the probe after the wait", func() bool {
			recs := b.log.of("gpu-1", time.Time{})
			return len(recs) > 0 && recs[len(recs)-1].Result.ProbedAt.Equal(clock())
		})
	}
	probed()
	restart(t, f)
	restarted := clock()
	for state() != schema.NodeUp {
		step()
		probed()
		if took := clock().Sub(restarted); took > 2*interval {
			t.Fatalf("still %s %s of probe time after the restart, want up within two intervals (%s)", state(), took, 2*interval)
		}
	}
	t.Logf("up %s of probe time after the restart", clock().Sub(restarted))
}

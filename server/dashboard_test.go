package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// NodeUpdate of the fake: applies the fields given.
func (f *fakeNodes) NodeUpdate(_ context.Context, name string, p schema.NodeUpdate) (*schema.NodeView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.nodes[name]
	if !ok {
		return nil, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	if p.MaxInflight != nil {
		n.MaxInflight = *p.MaxInflight
	}
	if p.Tags != nil {
		n.Tags = p.Tags
	}
	c := *n
	return &c, nil
}

// The page and its assets come from this server only, with a policy that
// allows nothing else to run.
func TestDashboardAssets(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	page := b.do(req{method: "GET", path: "/dashboard"})
	expect(t, page, 200)
	csp := page.header.Get("Content-Security-Policy")
	if !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe-inline") {
		t.Fatalf("page CSP %q", csp)
	}
	srcs := regexp.MustCompile(`(?:src|href)="(/dashboard/assets/[^"]+)"`).FindAllStringSubmatch(string(page.body), -1)
	if len(srcs) != 3 {
		t.Fatalf("page assets %v", srcs)
	}
	types := map[string]string{".js": "text/javascript", ".css": "text/css"}
	for _, m := range srcs {
		r := b.do(req{method: "GET", path: m[1]})
		expect(t, r, 200)
		ext := m[1][strings.LastIndex(m[1], "."):]
		if !strings.HasPrefix(r.header.Get("Content-Type"), types[ext]) || r.header.Get("X-Content-Type-Options") != "nosniff" || len(r.body) == 0 {
			t.Errorf("%s: %v", m[1], r.header)
		}
	}
	for _, p := range []string{"/dashboard/assets/nope.js", "/dashboard/assets/index.html", "/dashboard/assets/..%2fdashboard.go", "/dashboard/assets/%2e%2e"} {
		expect(t, b.do(req{method: "GET", path: p}), 404)
	}
}

func TestNodeUpdateRoute(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	r := b.do(req{method: "PATCH", path: "/api/v1/nodes/gpu-1", key: adminKey, body: `{"max_inflight":4,"tags":["sdxl","a100"]}`})
	expect(t, r, 200)
	var v schema.NodeView
	b.decode(r, &v)
	if v.MaxInflight != 4 || !slices.Equal(v.Tags, []string{"sdxl", "a100"}) {
		t.Fatalf("updated view %+v", v)
	}
	// Only what is given changes.
	r = b.do(req{method: "PATCH", path: "/api/v1/nodes/gpu-1", key: adminKey, body: `{"tags":[]}`})
	expect(t, r, 200)
	b.decode(r, &v)
	if v.MaxInflight != 4 || len(v.Tags) != 0 {
		t.Fatalf("tags cleared: %+v", v)
	}
	for _, body := range []string{`{}`, `{"max_inflight":0}`, `{"max_inflight":65}`, `{"tags":["bad tag"]}`, `{"max_inflight":"2"}`, `{"nope":1}`} {
		expect(t, b.do(req{method: "PATCH", path: "/api/v1/nodes/gpu-1", key: adminKey, body: body}), 400)
	}
	expect(t, b.do(req{method: "PATCH", path: "/api/v1/nodes/gpu-9", key: adminKey, body: `{"max_inflight":2}`}), 404)
	expect(t, b.do(req{method: "PATCH", path: "/api/v1/nodes/gpu-1", key: styleKey, body: `{"max_inflight":2}`}), 403)
	expect(t, b.do(req{method: "PATCH", path: "/api/v1/nodes/gpu-1", body: `{"max_inflight":2}`}), 401)
}

func TestDashboardJobs(t *testing.T) {
	var mu sync.Mutex
	var got []schema.JobFilter
	b := setup(t, dbtest.SQLite(t))
	b.jobs.JobsFunc = func(_ context.Context, f schema.JobFilter) ([]schema.Job, error) {
		mu.Lock()
		got = append(got, f)
		mu.Unlock()
		return []schema.Job{
			{ID: "01B", Frontend: "logo", State: schema.JobRunning, Node: "gpu-1"},
			{ID: "01A", Frontend: "style", State: schema.JobSucceeded, Outputs: []schema.Output{{Key: "style/01A/0.png"}}},
		}, nil
	}
	r := b.do(req{method: "GET", path: "/api/v1/dashboard/jobs", key: adminKey})
	expect(t, r, 200)
	var list []schema.Job
	b.decode(r, &list)
	if len(list) != 2 || list[0].Frontend != "logo" || !strings.Contains(list[1].Outputs[0].URL, "style/01A/0.png") {
		t.Fatalf("list %s", r.body)
	}
	q := url.Values{"frontend": {"retired"}, "state": {"failed"}, "user_id": {"u-1"}, "node": {"gpu-2"}, "limit": {"7"}, "before": {"01C"}}
	expect(t, b.do(req{method: "GET", path: "/api/v1/dashboard/jobs?" + q.Encode(), key: adminKey}), 200)
	want := []schema.JobFilter{
		{Limit: dashboardJobLimit},
		{Frontend: "retired", State: schema.JobFailed, UserID: "u-1", Node: "gpu-2", Limit: 7, Before: "01C"},
	}
	mu.Lock()
	if !slices.Equal(got, want) {
		t.Errorf("filters %+v, want %+v", got, want)
	}
	mu.Unlock()
	for _, q := range []string{"state=done", "frontend=Bad-Name", "node=a%20b", "limit=0", "limit=201", "before=..%2f"} {
		expect(t, b.do(req{method: "GET", path: "/api/v1/dashboard/jobs?" + q, key: adminKey}), 400)
	}
	expect(t, b.do(req{method: "GET", path: "/api/v1/dashboard/jobs", key: styleKey}), 403)
	expect(t, b.do(req{method: "GET", path: "/api/v1/dashboard/samples", key: logoKey}), 403)
}

// countsSeq is a JobCounter whose answers a test sets.
type countsSeq struct {
	mu     sync.Mutex
	counts map[string]map[schema.JobState]int
	err    error
}

func (c *countsSeq) set(counts map[string]map[schema.JobState]int, err error) {
	c.mu.Lock()
	c.counts, c.err = counts, err
	c.mu.Unlock()
}

func (c *countsSeq) JobCounts(context.Context) (map[string]map[schema.JobState]int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.counts, c.err
}

func TestSamplerRing(t *testing.T) {
	clk := newClock()
	nodes := newFakeNodes()
	nodes.nodes["gpu-1"].MaxInflight, nodes.nodes["gpu-1"].Inflight = 4, 3
	jobs := &countsSeq{}
	s := NewSampler(SamplerConfig{Interval: 10 * time.Second, Count: 12, NowFunc: clk.Now, Logger: slog.New(slog.DiscardHandler)}, nodes, jobs)
	ctx := context.Background()
	totals := func(queued, ok, failed, cancelled int) map[string]map[schema.JobState]int {
		return map[string]map[schema.JobState]int{
			"style": {schema.JobQueued: queued, schema.JobSucceeded: ok, schema.JobFailed: failed},
			"logo":  {schema.JobQueued: 1, schema.JobCancelled: cancelled},
		}
	}
	// 14 samples into a ring of 12: the first two fall out. Each sample
	// finishes 2 more succeeded jobs, one failed every other sample.
	for i := range 14 {
		jobs.set(totals(i, 2*i, i/2, 1), nil)
		if i == 9 {
			jobs.set(nil, fmt.Errorf("database down")) // a gap: the next difference covers two intervals
		}
		s.Take(ctx)
		clk.Advance(10 * time.Second)
	}
	v := s.View()
	if len(v.Samples) != 12 || v.Samples[0].Seq != 3 || v.Samples[11].Seq != 14 || v.Capacity != 12 || v.IntervalSeconds != 10 {
		t.Fatalf("ring: %d samples, seq %d..%d", len(v.Samples), v.Samples[0].Seq, v.Samples[len(v.Samples)-1].Seq)
	}
	for i := 1; i < len(v.Samples); i++ {
		if !v.Samples[i].At.After(v.Samples[i-1].At) {
			t.Fatal("samples not oldest first")
		}
	}
	last := v.Samples[11]
	if last.Queued["style"] != 13 || last.Queued["logo"] != 1 || last.Finished[schema.JobSucceeded] != 2 || last.FinishedSeconds != 10 {
		t.Errorf("last sample %+v", last)
	}
	gap, after := v.Samples[7], v.Samples[8] // seq 10 (i=9) failed to count
	if gap.Queued != nil || gap.Finished != nil || after.Finished[schema.JobSucceeded] != 4 || after.FinishedSeconds != 20 {
		t.Errorf("gap %+v, after it %+v", gap, after)
	}
	if got := v.Busy["gpu-1"]; len(got) != 12 || got[0] != 0.75 {
		t.Errorf("busy %v", got)
	}
	// Buckets of six samples by seq: 1-6 (3-6 kept), 7-12, 13-14. Succeeded
	// is 2 per 10 s, so 12 per minute in every bucket.
	if len(v.FinishedPerMinute) != 3 {
		t.Fatalf("buckets %+v", v.FinishedPerMinute)
	}
	for i, bk := range v.FinishedPerMinute {
		if bk.Succeeded != 12 || bk.Cancelled != 0 {
			t.Errorf("bucket %d: %+v", i, bk)
		}
	}
	if bk := v.FinishedPerMinute[1]; bk.Seconds != 60 || bk.Failed != 3 {
		t.Errorf("middle bucket %+v (3 failed in a minute)", bk)
	}
}

// The samples route serves the sampler's view; without a sampler the charts
// are empty, not an error.
func TestDashboardSamplesRoute(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	r := b.do(req{method: "GET", path: "/api/v1/dashboard/samples", key: adminKey})
	expect(t, r, 200)
	if !strings.Contains(string(r.body), `"samples":[]`) {
		t.Fatalf("no sampler: %s", r.body)
	}
	clk := newClock()
	s := NewSampler(SamplerConfig{NowFunc: clk.Now}, b.nodes, &countingJobs{fakeJobs: b.jobs})
	s.Take(context.Background())
	b2 := setup(t, dbtest.SQLite(t), func(_ *Config, d *Deps) { d.Samples = s })
	r = b2.do(req{method: "GET", path: "/api/v1/dashboard/samples", key: adminKey})
	expect(t, r, 200)
	var v SamplesView
	b2.decode(r, &v)
	if len(v.Samples) != 1 || v.Samples[0].Queued["style"] != 0 || v.Capacity != DefaultSampleCount || len(v.Busy["gpu-1"]) != 1 {
		t.Fatalf("samples %s", r.body)
	}
}

// Run samples at once and then on every tick until its context ends.
func TestSamplerRun(t *testing.T) {
	s := NewSampler(SamplerConfig{Interval: time.Millisecond}, newFakeNodes(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	deadline := time.Now().Add(30 * time.Second)
	for len(s.Samples()) < 3 {
		if time.Now().After(deadline) {
			t.Fatal("no samples")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if smp := s.Samples()[0]; smp.Queued != nil || smp.Nodes["gpu-1"].State != schema.NodeUp {
		t.Fatalf("sample without a job counter: %+v", smp)
	}
}

// The PATCH /nodes/{name} body: any input is a 4xx or an update within the
// bounds, never a panic.
func FuzzNodeUpdateBody(f *testing.F) {
	for _, seed := range []string{
		`{"max_inflight":4,"tags":["sdxl","a100"]}`, `{"tags":[]}`, `{"tags":null}`, `{"max_inflight":0}`,
		`{"max_inflight":1e40}`, `{"max_inflight":-1}`, `{"tags":["a b"]}`, `{"tags":[1]}`, `{}`, `[]`, `null`, ``, `{`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var b nodeUpdateBody
		err := decodeJSONBytes(body, &b)
		var p schema.NodeUpdate
		if err == nil {
			p, err = b.update()
		}
		if err != nil {
			if ae := classify(err); ae.Status < 400 || ae.Status >= 500 {
				t.Fatalf("status %d for %q: %v", ae.Status, body, err)
			}
			return
		}
		if p.MaxInflight == nil && p.Tags == nil {
			t.Fatalf("%q: an update that changes nothing", body)
		}
		if p.MaxInflight != nil && (*p.MaxInflight < 1 || *p.MaxInflight > maxNodeInflight) {
			t.Fatalf("%q: max_inflight %d", body, *p.MaxInflight)
		}
		if len(p.Tags) > maxNodeTags {
			t.Fatalf("%q: %d tags", body, len(p.Tags))
		}
		for _, tag := range p.Tags {
			if !nodeName.MatchString(tag) {
				t.Fatalf("%q: tag %q", body, tag)
			}
		}
	})
}

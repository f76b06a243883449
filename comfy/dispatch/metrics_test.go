package dispatch

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// histogramCount is the sample count of one histogram series of reg.
func histogramCount(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m, labels) {
				n += m.GetHistogram().GetSampleCount()
			}
		}
	}
	return n
}

func matches(m *dto.Metric, labels map[string]string) bool {
	for k, v := range labels {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == k && lp.GetValue() == v {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// A mix of jobs — succeeded, failed for several reasons, cancelled — shows
// in the farm's metrics: each outcome and error code counted, each
// histogram observed once per job that reached its stage, the queue empty.
func TestFarmMetricsAfterMixedJobs(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	reg := prometheus.NewRegistry()
	reg.MustRegister(e.farm.Collectors()...)
	ctx := context.Background()

	raises := json.RawMessage(`{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
 "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 1.0}},
 "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}`)
	refused := sdGraph(ckptXL, 0, 1) // steps below the minimum: the node refuses it
	previewOnly := json.RawMessage(`{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}`)

	for i := range 2 {
		j := e.submit("alpha", "m", sdGraph(ckptXL, 2, i), 0)
		e.waitState(j.ID, schema.JobSucceeded, 20*time.Second)
	}
	for _, tc := range []struct {
		g    json.RawMessage
		code string
	}{
		{raises, schema.CodeExecutionError},
		{refused, schema.CodeValidationFailed},
		{previewOnly, schema.CodeNoOutputs},
	} {
		j := e.submit("alpha", "m", tc.g, 0)
		done := e.waitState(j.ID, schema.JobFailed, 20*time.Second)
		if done.Error == nil || done.Error.Code != tc.code {
			t.Fatalf("job failed with %+v, want %s", done.Error, tc.code)
		}
	}
	// One cancelled while queued behind a held node.
	e.fakes["n1"].Hold()
	first := e.submit("alpha", "m", sdGraph(ckptXL, 2, 7), 0)
	e.waitState(first.ID, schema.JobDispatched, 10*time.Second)
	queued := e.submit("alpha", "m", sdGraph(ckptXL, 2, 8), 0)
	if got := testutil.ToFloat64(e.farm.metrics.queued.WithLabelValues("alpha")); got != 1 {
		t.Fatalf("queue depth of alpha with one job waiting: %v", got)
	}
	if _, err := e.farm.Cancel(ctx, "alpha", queued.ID); err != nil {
		t.Fatal(err)
	}
	e.fakes["n1"].Release()
	e.waitState(first.ID, schema.JobSucceeded, 20*time.Second)

	finished := func(outcome, code string) float64 {
		return testutil.ToFloat64(e.farm.metrics.finished.WithLabelValues("alpha", outcome, code))
	}
	// A job is counted just after its end is written, which waitState sees.
	e.eventually(5*time.Second, "the last job counted", func() bool { return finished("succeeded", "") >= 3 })
	for _, c := range []struct {
		outcome, code string
		want          float64
	}{
		{"succeeded", "", 3},
		{"failed", schema.CodeExecutionError, 1},
		{"failed", schema.CodeValidationFailed, 1},
		{"failed", schema.CodeNoOutputs, 1},
		{"cancelled", "", 1},
	} {
		if got := finished(c.outcome, c.code); got != c.want {
			t.Errorf("jobs_finished_total{outcome=%q,error_code=%q} = %v, want %v", c.outcome, c.code, got, c.want)
		}
	}
	if n := testutil.CollectAndCount(e.farm.metrics.finished); n != 5 {
		t.Errorf("%d finished series, want 5", n)
	}
	// Every job but the cancelled one was dispatched once: 6 waits. Runs that
	// ended well on the node: 3 succeeded + the preview-only one (it failed
	// later, in storing). Stores that completed: the 3 successes.
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   uint64
	}{
		{"comfyfarm_job_queue_wait_seconds", map[string]string{"frontend": "alpha"}, 6},
		{"comfyfarm_job_run_duration_seconds", map[string]string{"frontend": "alpha", "node": "n1"}, 4},
		{"comfyfarm_job_store_duration_seconds", nil, 3},
		{"comfyfarm_job_seconds", nil, 3},
	} {
		if got := histogramCount(t, reg, c.name, c.labels); got != c.want {
			t.Errorf("%s%v count %d, want %d", c.name, c.labels, got, c.want)
		}
	}
	if got := testutil.ToFloat64(e.farm.metrics.queued.WithLabelValues("alpha")); got != 0 {
		t.Errorf("queue depth at the end: %v", got)
	}

	// The same, as Prometheus scrapes it: the text exposition over HTTP.
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	res, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || res.StatusCode != 200 {
		t.Fatalf("scrape: %d %v", res.StatusCode, err)
	}
	for _, line := range []string{
		`comfyfarm_jobs_finished_total{error_code="",frontend="alpha",outcome="succeeded"} 3`,
		`comfyfarm_jobs_finished_total{error_code="execution_error",frontend="alpha",outcome="failed"} 1`,
		`comfyfarm_jobs_finished_total{error_code="validation_failed",frontend="alpha",outcome="failed"} 1`,
		`comfyfarm_jobs_finished_total{error_code="no_outputs",frontend="alpha",outcome="failed"} 1`,
		`comfyfarm_jobs_finished_total{error_code="",frontend="alpha",outcome="cancelled"} 1`,
		`comfyfarm_job_queue_wait_seconds_count{frontend="alpha"} 6`,
		`comfyfarm_job_run_duration_seconds_count{frontend="alpha",node="n1"} 4`,
		`comfyfarm_job_store_duration_seconds_count 3`,
		`comfyfarm_queue_depth{frontend="alpha"} 0`,
		`comfyfarm_node_inflight{node="n1"} 0`,
	} {
		if !strings.Contains(string(body), line+"\n") {
			t.Errorf("scrape lacks %q", line)
		}
	}

	// The node's gauges, read at scrape time.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var inflight, busy *dto.Metric
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if !matches(m, map[string]string{"node": "n1"}) {
				continue
			}
			switch mf.GetName() {
			case "comfyfarm_node_inflight":
				inflight = m
			case "comfyfarm_node_busy_ratio":
				busy = m
			}
		}
	}
	if inflight == nil || busy == nil {
		t.Fatal("node gauges missing")
	}
	if v := inflight.GetGauge().GetValue(); v != 0 {
		t.Errorf("inflight after every job ended: %v", v)
	}
	if v := busy.GetGauge().GetValue(); v <= 0 || v > 1 {
		t.Errorf("busy ratio after running jobs: %v, want in (0, 1]", v)
	}
}

func TestBusyClock(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var b busyClock
	if r := b.ratio(t0); r != 0 {
		t.Fatalf("idle: %v", r)
	}
	b.set(t0, true)
	b.set(t0.Add(15*time.Second), false) // 15 s busy
	b.set(t0.Add(30*time.Second), true)  // busy again, still open
	if r := b.ratio(t0.Add(45 * time.Second)); r != 0.5 {
		t.Fatalf("15 s + 15 s of 60 s: %v", r)
	}
	if r := b.ratio(t0.Add(90 * time.Second)); r != 1 {
		t.Fatalf("busy the whole last minute: %v", r)
	}
	b.set(t0.Add(90*time.Second), false)
	if r := b.ratio(t0.Add(120 * time.Second)); r != 0.5 {
		t.Fatalf("30 s of the last 60 s: %v", r)
	}
	if r := b.ratio(t0.Add(200 * time.Second)); r != 0 {
		t.Fatalf("long idle: %v", r)
	}
	b.set(t0.Add(200*time.Second), true)
	b.set(t0.Add(200*time.Second), true) // repeated: no new span
	b.set(t0.Add(206*time.Second), false)
	if len(b.spans) != 1 {
		t.Fatalf("old spans kept: %d", len(b.spans))
	}
	// Bounded: many short spans are merged, never more than maxBusySpans.
	now := t0.Add(300 * time.Second)
	for i := range maxBusySpans * 2 {
		at := now.Add(time.Duration(i) * time.Millisecond)
		b.set(at, true)
		b.set(at.Add(time.Microsecond), false)
	}
	if len(b.spans) > maxBusySpans {
		t.Fatalf("%d spans kept", len(b.spans))
	}
}

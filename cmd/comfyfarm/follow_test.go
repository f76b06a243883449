package main

import (
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Every state change is drawn the moment it arrives, also within the
// progress throttle; progress spans the whole workflow.
func TestJobFollowerDrawsEveryStateChange(t *testing.T) {
	var out syncBuffer
	f := newJobFollower(&out, 4)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f.NowFunc = func() time.Time { return now } // no time passes: every draw is inside the throttle
	num := func(v float64) *float64 { return &v }
	pos := func(n int) *int { return &n }

	steps := []struct {
		ev   schema.Event
		want string // drawn after the event
	}{
		{schema.Event{Type: schema.EventSnapshot, JobID: "j1", Job: &schema.Job{ID: "j1", State: schema.JobQueued, Position: 5}}, "queued, 5 ahead"},
		{schema.Event{Type: schema.EventQueued, Position: pos(2)}, "queued, 2 ahead"},
		{schema.Event{Type: schema.EventDispatched, Node: "gpu-1"}, "dispatched on gpu-1"},
		{schema.Event{Type: schema.EventRunning, Node: "gpu-1"}, "running on gpu-1, 0 of 4 nodes"},
		{schema.Event{Type: schema.EventExecuted, NodeID: "1"}, ""}, // throttled: same state
		{schema.Event{Type: schema.EventProgress, NodeID: "3", Value: num(5), Max: num(10)}, ""},
		{schema.Event{Type: schema.EventStoring}, "storing on gpu-1"},
		{schema.Event{Type: schema.EventSucceeded}, "succeeded"},
	}
	for i, s := range steps {
		before := len(out.String())
		f.apply(s.ev)
		drawn := out.String()[before:]
		if s.want != "" && !strings.Contains(drawn, s.want) {
			t.Fatalf("step %d (%s): drew %q, want %q", i, s.ev.Type, drawn, s.want)
		}
		if s.want == "" && drawn != "" {
			t.Fatalf("step %d (%s): drew %q inside the throttle", i, s.ev.Type, drawn)
		}
		if i == 5 {
			// one node of four executed, the sampler (node 3) half done
			if p := f.percent(); p != 37 {
				t.Fatalf("overall progress %d%%, want 37%%", p)
			}
		}
	}
	if f.job.State != schema.JobSucceeded || f.job.Node != "gpu-1" {
		t.Fatalf("job %+v", f.job)
	}

	// Progress after the throttle interval is drawn, with the overall percent.
	var out2 syncBuffer
	g := newJobFollower(&out2, 2)
	g.NowFunc = func() time.Time { return now }
	g.apply(schema.Event{Type: schema.EventRunning, Node: "n"})
	now = now.Add(progressEvery)
	g.apply(schema.Event{Type: schema.EventProgress, NodeID: "a", Value: num(1), Max: num(2)})
	if !strings.Contains(out2.String(), "25%") {
		t.Fatalf("progress not drawn: %q", out2.String())
	}
	// Without the workflow's size, the running node's own percent.
	h := newJobFollower(&syncBuffer{}, 0)
	h.apply(schema.Event{Type: schema.EventProgress, NodeID: "a", Value: num(3), Max: num(4)})
	if p := h.percent(); p != 75 {
		t.Fatalf("unknown size: %d%%", p)
	}
}

// An absolute events_url is followed on the server the client was given.
func TestAPIPath(t *testing.T) {
	for in, want := range map[string]string{
		"/api/v1/jobs/J/events?token=t":                                 "/api/v1/jobs/J/events?token=t",
		"https://farm.example.com/api/v1/jobs/J/events?token=t":         "/api/v1/jobs/J/events?token=t",
		"http://farm.example.com:8443/gpu/api/v1/jobs/J/events?token=t": "/api/v1/jobs/J/events?token=t",
	} {
		if got := apiPath(in); got != want {
			t.Errorf("apiPath(%q) = %q, want %q", in, got, want)
		}
	}
}

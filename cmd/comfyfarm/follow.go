package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/comfyfarm/comfyfarm/schema"
)

// followJob follows a job's SSE stream until its terminal event, drawing a
// progress bar on w, and returns the final job. A dropped stream is resumed
// with Last-Event-ID. nodes is the number of nodes of the job's workflow
// (0: unknown): the bar then shows progress across the whole workflow.
func followJob(ctx context.Context, c *apiClient, eventsURL string, w io.Writer, nodes int) (*schema.Job, error) {
	eventsURL = apiPath(eventsURL)
	f := newJobFollower(w, nodes)
	defer fmt.Fprintln(w)
	var (
		lastSeq string
		retries int
	)
	for {
		final, seq, err := streamEvents(ctx, c, eventsURL, lastSeq, func(_ string, ev schema.Event) { f.apply(ev) })
		if seq != "" {
			lastSeq, retries = seq, 0
		}
		if final {
			f.finish()
			return &f.job, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ae *apiError
		if errors.As(err, &ae) {
			return nil, err // the server refused: retrying will not help
		}
		retries++
		if retries > 5 {
			return nil, fmt.Errorf("event stream: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Duration(retries) * time.Second):
		}
	}
}

// apiPath turns an absolute events_url (the server's public_url and a path)
// into its path from /api/v1/ on: the client asks the --server it was given,
// which may be reached by another address than the public one, and the
// public URL may carry a prefix a reverse proxy removes.
func apiPath(u string) string {
	if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
		return u
	}
	if i := strings.Index(u, "/api/v1/"); i >= 0 {
		return u[i:]
	}
	return u
}

// streamEvents reads one connection of the event stream, handing each event
// (its JSON and decoded) to fn. final reports a terminal event; seq is the
// last seq seen.
func streamEvents(ctx context.Context, c *apiClient, eventsURL, lastSeq string, fn func(raw string, ev schema.Event)) (final bool, seq string, err error) {
	req, err := c.request(ctx, "GET", eventsURL, nil, "")
	if err != nil {
		return false, "", err
	}
	if strings.Contains(eventsURL, "token=") {
		req.Header.Del("Authorization") // the job-scoped token is enough
	}
	req.Header.Set("Accept", "text/event-stream")
	if lastSeq != "" {
		req.Header.Set("Last-Event-ID", lastSeq)
	}
	res, err := c.http.Do(req)
	if err != nil {
		return false, "", err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return false, "", readAPIError(res)
	}
	r := newSSEReader(res.Body)
	for {
		msg, err := r.Next()
		if err != nil {
			return false, seq, err
		}
		var ev schema.Event
		if err := json.Unmarshal([]byte(msg.Data), &ev); err != nil {
			return false, seq, fmt.Errorf("event %q: %w", msg.Data, err)
		}
		if msg.ID != "" {
			seq = msg.ID
		}
		fn(msg.Data, ev)
		if ev.Type.Terminal() {
			return true, seq, nil
		}
	}
}

// progressEvery is how often progress events redraw the bar; state changes
// always redraw at once.
const progressEvery = 100 * time.Millisecond

// jobFollower folds a job's events into the job and a progress bar: every
// state change (queued with its position, dispatched, running, storing, the
// end) is drawn when it arrives, progress at most every progressEvery. With
// the workflow's node count the bar shows the whole workflow's progress
// (nodes executed, plus the running node's own fraction), not only the
// sampler's percent.
type jobFollower struct {
	bar      *progressbar.ProgressBar
	job      schema.Job
	nodes    int             // nodes in the workflow; 0: unknown
	executed map[string]bool // node ids executed
	current  string          // node id of the last progress event
	fraction float64         // its value/max
	lastDraw time.Time
	NowFunc  func() time.Time
}

func newJobFollower(w io.Writer, nodes int) *jobFollower {
	bar := progressbar.NewOptions(100,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetDescription("queued"),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowDescriptionAtLineEnd(),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionThrottle(0), // throttled here, by event kind
	)
	return &jobFollower{bar: bar, nodes: nodes, executed: map[string]bool{}, NowFunc: time.Now}
}

// percent is the progress of the whole workflow, or of the running node when
// the workflow's size is unknown. It stays below 100 until the job ends.
func (f *jobFollower) percent() int {
	var p float64
	if f.nodes > 0 {
		done := float64(len(f.executed))
		if f.current != "" && !f.executed[f.current] {
			done += f.fraction
		}
		p = 100 * done / float64(f.nodes)
	} else {
		p = 100 * f.fraction
	}
	return min(int(p), 99)
}

// describe is the bar's text for the job's state.
func (f *jobFollower) describe() string {
	desc := string(f.job.State)
	if f.job.Node != "" && !f.job.State.Terminal() && f.job.State != schema.JobQueued {
		desc += " on " + f.job.Node
	}
	if f.job.State == schema.JobRunning && f.nodes > 0 {
		desc += fmt.Sprintf(", %d of %d nodes", len(f.executed), f.nodes)
	}
	return desc
}

// apply folds one event in and redraws what changed.
func (f *jobFollower) apply(ev schema.Event) {
	if f.job.ID == "" {
		f.job.ID = ev.JobID
	}
	old := f.job.State
	switch ev.Type {
	case schema.EventSnapshot:
		if ev.Job != nil {
			f.job = *ev.Job
		}
		if f.job.State == schema.JobQueued {
			f.bar.Describe(fmt.Sprintf("queued, %d ahead", f.job.Position))
			return
		}
	case schema.EventQueued:
		f.job.State, f.job.Node = schema.JobQueued, ""
		if ev.Position != nil {
			f.job.Position = *ev.Position
			f.bar.Describe(fmt.Sprintf("queued, %d ahead", *ev.Position))
			return
		}
	case schema.EventDispatched:
		f.job.State, f.job.Node = schema.JobDispatched, ev.Node
	case schema.EventRunning:
		f.job.State = schema.JobRunning
		if ev.Node != "" {
			f.job.Node = ev.Node
		}
	case schema.EventProgress:
		f.job.State = schema.JobRunning
		if ev.NodeID != f.current {
			f.current, f.fraction = ev.NodeID, 0
		}
		if ev.Max != nil && *ev.Max > 0 && ev.Value != nil {
			f.fraction = min(float64(*ev.Value)/float64(*ev.Max), 1)
		}
	case schema.EventExecuted:
		f.job.State = schema.JobRunning
		f.executed[ev.NodeID] = true
	case schema.EventStoring:
		f.job.State = schema.JobStoring
	case schema.EventSucceeded:
		f.job.State, f.job.Outputs = schema.JobSucceeded, ev.Outputs
	case schema.EventFailed:
		f.job.State, f.job.Error = schema.JobFailed, ev.Error
	case schema.EventCancelled:
		f.job.State = schema.JobCancelled
	default:
		return
	}
	now := f.NowFunc()
	if f.job.State == old && (ev.Type == schema.EventProgress || ev.Type == schema.EventExecuted) &&
		now.Sub(f.lastDraw) < progressEvery {
		return // progress within the same state: throttled
	}
	f.lastDraw = now
	if f.job.State == schema.JobSucceeded {
		_ = f.bar.Set(100)
	} else if p := f.percent(); p > 0 {
		_ = f.bar.Set(p)
	}
	f.bar.Describe(f.describe())
}

// finish draws the final state.
func (f *jobFollower) finish() {
	f.bar.Describe(f.describe())
	if f.job.State == schema.JobSucceeded {
		_ = f.bar.Finish()
	}
}

// workflowNodes is the number of nodes of an API-format graph (0 when it
// cannot be read).
func workflowNodes(graph json.RawMessage) int {
	var nodes map[string]json.RawMessage
	if json.Unmarshal(graph, &nodes) != nil {
		return 0
	}
	return len(nodes)
}

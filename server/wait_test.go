package server

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// heldJobs makes the fake job service's Subscribe send a snapshot and then
// wait: it reports each subscription on subscribed, and finish ends the job.
type heldJobs struct {
	b          *bundle
	subscribed chan string
	released   chan string
	events     chan schema.Event
}

func holdJobs(b *bundle) *heldJobs {
	h := &heldJobs{b: b, subscribed: make(chan string, 8), released: make(chan string, 8), events: make(chan schema.Event, 8)}
	b.jobs.SubscribeFunc = func(ctx context.Context, jobID string, after int64, previews bool) (<-chan schema.Event, func(), error) {
		j, err := b.jobs.get("style", jobID)
		if err != nil {
			return nil, nil, err
		}
		ch := make(chan schema.Event, 8)
		ch <- schema.Event{Seq: 1, Type: schema.EventSnapshot, JobID: jobID, Job: j}
		stop := make(chan struct{})
		go func() {
			for {
				select {
				case ev := <-h.events:
					ch <- ev
				case <-stop:
					return
				}
			}
		}()
		h.subscribed <- jobID
		return ch, func() { close(stop); h.released <- jobID }, nil
	}
	return h
}

// finish marks a job succeeded with one output and sends its terminal event.
func (h *heldJobs) finish(id string) {
	h.b.jobs.mu.Lock()
	j := h.b.jobs.jobs[id]
	j.State = schema.JobSucceeded
	j.Outputs = []schema.Output{{Key: "style/" + id + "/0.png", ContentType: "image/png", Filename: "0.png"}}
	h.b.jobs.mu.Unlock()
	h.events <- schema.Event{Seq: 2, Type: schema.EventSucceeded, JobID: id}
}

func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(30 * time.Second):
		t.Fatalf("no %s", what)
		panic("unreachable")
	}
}

func TestSubmitWait(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	h := holdJobs(b)
	raw := `{"user_id": "u1", "workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}}`

	// It ends within the wait: 200 with the finished view and output URLs.
	done := make(chan resp, 1)
	go func() { done <- b.do(req{method: "POST", path: "/api/v1/jobs?wait=60s", key: styleKey, body: raw}) }()
	id := receive(t, h.subscribed, "subscription")
	h.finish(id)
	r := receive(t, done, "answer")
	expect(t, r, http.StatusOK)
	var view struct {
		schema.Job
		EventsURL string `json:"events_url"`
	}
	b.decode(r, &view)
	if view.ID != id || view.State != schema.JobSucceeded || len(view.Outputs) != 1 || !strings.Contains(view.Outputs[0].URL, "/files/") ||
		!strings.Contains(view.EventsURL, "token=") {
		t.Fatalf("waited submit: %s", r.body)
	}
	receive(t, h.released, "unsubscribe")

	// The wait runs out: 202 with the view as it is.
	r = b.do(req{method: "POST", path: "/api/v1/jobs?wait=1", key: styleKey, body: raw})
	expect(t, r, http.StatusAccepted)
	b.decode(r, &view)
	if view.State != schema.JobQueued || view.ID == "" || view.EventsURL == "" {
		t.Fatalf("wait ran out: %s", r.body)
	}
	receive(t, h.subscribed, "subscription")
	receive(t, h.released, "unsubscribe")
	queued := view.ID

	// GET with a wait: the current view when it runs out, the finished one
	// when it ends; a finished job answers at once.
	r = b.do(req{method: "GET", path: "/api/v1/jobs/" + queued + "?wait=500ms", key: styleKey})
	expect(t, r, http.StatusOK)
	b.decode(r, &view)
	if view.State != schema.JobQueued {
		t.Fatalf("GET wait ran out: %s", r.body)
	}
	receive(t, h.subscribed, "subscription")
	receive(t, h.released, "unsubscribe")
	go func() { done <- b.do(req{method: "GET", path: "/api/v1/jobs/" + queued + "?wait=2m", key: styleKey}) }()
	receive(t, h.subscribed, "subscription")
	h.finish(queued)
	r = receive(t, done, "answer")
	expect(t, r, http.StatusOK)
	b.decode(r, &view)
	if view.State != schema.JobSucceeded || len(view.Outputs) != 1 || view.Outputs[0].URL == "" {
		t.Fatalf("GET wait: %s", r.body)
	}
	receive(t, h.released, "unsubscribe")
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + queued + "?wait=2m", key: styleKey}), http.StatusOK)
	select {
	case <-h.subscribed:
		t.Fatal("a finished job was waited for")
	default:
	}
	// Another frontend's job is not waited for.
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + queued + "?wait=2m", key: logoKey}), http.StatusNotFound)

	for _, bad := range []string{"x", "-1s", "121s", "121", "1h", "-3"} {
		expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + queued + "?wait=" + bad, key: styleKey}), http.StatusBadRequest, "invalid_request")
		expect(t, b.do(req{method: "POST", path: "/api/v1/jobs?wait=" + bad, key: styleKey, body: raw}), http.StatusBadRequest, "invalid_request")
	}
}

// A client that hangs up ends its wait: the subscription is released long
// before the wait would run out.
func TestWaitClientGone(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	h := holdJobs(b)
	j := b.jobs.add("style", "u1", schema.JobRunning)
	conn, err := net.Dial("tcp", strings.TrimPrefix(b.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "GET /api/v1/jobs/%s?wait=120s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", j.ID, styleKey)
	receive(t, h.subscribed, "subscription")
	conn.Close()
	receive(t, h.released, "unsubscribe after the client left")

	// A client that stays gets its answer on the same connection, and the
	// connection serves its next request.
	conn, err = net.Dial("tcp", strings.TrimPrefix(b.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /api/v1/jobs/%s?wait=1s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", j.ID, styleKey)
	fmt.Fprintf(conn, "GET /api/v1/jobs/%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", j.ID, styleKey)
	br := bufio.NewReader(conn)
	for i := 0; i < 2; i++ {
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Fatalf("response %d: %d", i, res.StatusCode)
		}
	}
}

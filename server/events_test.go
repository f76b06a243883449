package server

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// wait bounds every wait of these tests; generous for a loaded machine.
const wait = 30 * time.Second

// feed is one subscription handed out by the fake JobService: the test
// sends events into it and sees when the server cancels it.
type feed struct {
	jobID     string
	after     int64
	previews  bool
	ch        chan schema.Event
	cancelled chan struct{}

	mu     sync.Mutex
	closed bool
}

func (f *feed) send(t *testing.T, ev schema.Event) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		t.Fatalf("send %s after the feed closed", ev.Type)
	}
	select {
	case f.ch <- ev:
	case <-time.After(wait):
		t.Fatalf("send %s: nobody reads", ev.Type)
	}
	if ev.Type.Terminal() {
		f.closed = true
		close(f.ch)
	}
}

func (f *feed) cancel() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.closed {
		f.closed = true
		close(f.ch)
	}
	select {
	case <-f.cancelled:
	default:
		close(f.cancelled)
	}
}

// subscriptions makes the fake JobService hand out feeds on the returned channel.
func subscriptions(b *bundle) chan *feed {
	feeds := make(chan *feed, 16)
	b.jobs.SubscribeFunc = func(_ context.Context, jobID string, after int64, previews bool) (<-chan schema.Event, func(), error) {
		f := &feed{jobID: jobID, after: after, previews: previews, ch: make(chan schema.Event, 64), cancelled: make(chan struct{})}
		feeds <- f
		return f.ch, f.cancel, nil
	}
	return feeds
}

func nextFeed(t *testing.T, feeds chan *feed) *feed {
	t.Helper()
	select {
	case f := <-feeds:
		return f
	case <-time.After(wait):
		t.Fatal("no subscription")
		return nil
	}
}

func waitCancelled(t *testing.T, f *feed) {
	t.Helper()
	select {
	case <-f.cancelled:
	case <-time.After(wait):
		t.Fatal("subscription not cancelled")
	}
}

func fptr(v float64) *float64 { return &v }
func iptr(v int) *int         { return &v }

// script is a job's life as events.
func script(jobID string) []schema.Event {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	return []schema.Event{
		{Seq: 1, Type: schema.EventSnapshot, JobID: jobID, Time: t0, Job: &schema.Job{ID: jobID, Frontend: "style", State: schema.JobQueued}},
		{Seq: 2, Type: schema.EventQueued, JobID: jobID, Time: t0, Position: iptr(0)},
		{Seq: 3, Type: schema.EventDispatched, JobID: jobID, Time: t0, Node: "gpu-1"},
		{Seq: 4, Type: schema.EventRunning, JobID: jobID, Time: t0, Node: "gpu-1"},
		{Seq: 5, Type: schema.EventProgress, JobID: jobID, Time: t0, NodeID: "3", Value: fptr(5), Max: fptr(20), Percent: fptr(25)},
		{Seq: 6, Type: schema.EventStoring, JobID: jobID, Time: t0},
		{Seq: 7, Type: schema.EventSucceeded, JobID: jobID, Time: t0, Outputs: []schema.Output{{PhotoID: 9, Key: "style/" + jobID + "/0.png", ContentType: "image/png"}}},
	}
}

// sseMsg is one Server-Sent Events message (or comment).
type sseMsg struct {
	id, event, data, comment string
}

// readSSE reads the next message or comment, skipping retry-only messages.
func readSSE(r *bufio.Reader) (sseMsg, error) {
	var m sseMsg
	seen := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return m, err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			if seen {
				return m, nil
			}
			continue
		}
		name, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch name {
		case "":
			m.comment, seen = value, true
		case "id":
			m.id, seen = value, true
		case "event":
			m.event, seen = value, true
		case "data":
			m.data, seen = m.data+value, true
		}
	}
}

// openSSE starts an SSE request; header may carry Authorization or Last-Event-ID.
func openSSE(t *testing.T, b *bundle, path string, header map[string]string) (*http.Response, *bufio.Reader) {
	t.Helper()
	hr, err := http.NewRequest("GET", b.base+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	hr.Header.Set("Accept", "text/event-stream")
	for k, v := range header {
		hr.Header.Set(k, v)
	}
	res, err := (&http.Client{}).Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res, bufio.NewReader(res.Body)
}

func TestEventsSSE(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	feeds := subscriptions(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	res, r := openSSE(t, b, "/api/v1/jobs/"+job.ID+"/events", map[string]string{"Authorization": "Bearer " + styleKey})
	if res.StatusCode != 200 || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") ||
		res.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("status %d, header %v", res.StatusCode, res.Header)
	}
	f := nextFeed(t, feeds)
	if f.jobID != job.ID || f.after != 0 || f.previews {
		t.Fatalf("subscribed %+v", f)
	}
	events := script(job.ID)
	go func() {
		for _, ev := range events {
			f.send(t, ev)
		}
	}()
	for i, want := range events {
		m, err := readSSE(r)
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if m.id != strconv.FormatInt(want.Seq, 10) || m.event != string(want.Type) {
			t.Fatalf("event %d: id %q event %q, want %d %s", i, m.id, m.event, want.Seq, want.Type)
		}
		var got schema.Event
		if err := json.Unmarshal([]byte(m.data), &got); err != nil {
			t.Fatalf("event %d data %q: %v", i, m.data, err)
		}
		if got.Seq != want.Seq || got.Type != want.Type || got.JobID != job.ID {
			t.Fatalf("event %d: %s", i, m.data)
		}
		if want.Type == schema.EventSucceeded && (len(got.Outputs) != 1 || !strings.Contains(got.Outputs[0].URL, "signature=")) {
			t.Fatalf("outputs without URL: %s", m.data)
		}
		if want.Type == schema.EventProgress && (got.Percent == nil || *got.Percent != 25) {
			t.Fatalf("progress: %s", m.data)
		}
	}
	// The stream ends after the terminal event.
	if _, err := readSSE(r); !errors.Is(err, io.EOF) {
		t.Fatalf("after the terminal event: %v", err)
	}
	waitCancelled(t, f)
}

func TestEventsResume(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	feeds := subscriptions(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	path := "/api/v1/jobs/" + job.ID + "/events"
	auth := "Bearer " + styleKey
	cases := []struct {
		name   string
		query  string
		header map[string]string
		after  int64
	}{
		{"Last-Event-ID", "", map[string]string{"Last-Event-ID": "3"}, 3},
		{"after", "?after=5", nil, 5},
		{"header wins", "?after=6", map[string]string{"Last-Event-ID": "2"}, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := map[string]string{"Authorization": auth}
			for k, v := range c.header {
				h[k] = v
			}
			res, r := openSSE(t, b, path+c.query, h)
			if res.StatusCode != 200 {
				t.Fatalf("status %d", res.StatusCode)
			}
			f := nextFeed(t, feeds)
			if f.after != c.after {
				t.Fatalf("after %d, want %d", f.after, c.after)
			}
			// Resumed: the next events follow on from the seq.
			rest := script(job.ID)[c.after:]
			go func() {
				for _, ev := range rest {
					f.send(t, ev)
				}
			}()
			m, err := readSSE(r)
			if err != nil || m.id != strconv.FormatInt(c.after+1, 10) {
				t.Fatalf("first resumed event %+v %v", m, err)
			}
			for range rest[1:] {
				if _, err := readSSE(r); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
	for _, bad := range []string{"?after=-1", "?after=x", "?previews=maybe"} {
		expect(t, b.do(req{method: "GET", path: path + bad, key: styleKey, header: map[string]string{"Accept": "text/event-stream"}}), 400, "invalid_request")
	}
	expect(t, b.do(req{method: "GET", path: path, key: styleKey, header: map[string]string{"Accept": "text/event-stream", "Last-Event-ID": "abc"}}), 400, "invalid_request")
	// Neither WebSocket nor SSE.
	expect(t, b.do(req{method: "GET", path: path, key: styleKey}), 426, "upgrade_required")

	// previews=1 passes through.
	_, _ = openSSE(t, b, path+"?previews=1", map[string]string{"Authorization": auth})
	if f := nextFeed(t, feeds); !f.previews {
		t.Fatal("previews not requested")
	}
}

func TestEventsToken(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	job := b.jobs.add("style", "u1", schema.JobQueued)
	other := b.jobs.add("style", "u1", schema.JobQueued)
	r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u1","workflow":{"1":{}}}`})
	expect(t, r, 202)
	var sub submitResponse
	b.decode(r, &sub)
	u, err := url.Parse(sub.EventsURL)
	if err != nil {
		t.Fatal(err)
	}
	token := u.Query().Get("token")
	sse := map[string]string{"Accept": "text/event-stream"}

	// The events_url works as is, without a key (default fake: snapshot, cancelled).
	r = b.do(req{method: "GET", path: sub.EventsURL, header: sse})
	expect(t, r, 200)
	if !strings.Contains(string(r.body), "event: snapshot") || !strings.Contains(string(r.body), "event: cancelled") {
		t.Fatalf("stream: %s", r.body)
	}

	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + job.ID + "/events?token=" + url.QueryEscape(token), header: sse}), 403, "forbidden")
	tampered := []byte(token)
	tampered[len(tampered)/2] ^= 1
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/events?token=" + url.QueryEscape(string(tampered)), header: sse}), 401)
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/events?token=garbage", header: sse}), 401, "invalid_token")
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/events", header: sse}), 401, "unauthorized")

	// A token minted for a job of another frontend does not open this one.
	logoJob := b.jobs.add("logo", "u1", schema.JobQueued)
	logoToken := b.srv.tokens.mint(logoJob.ID, "logo")
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + other.ID + "/events?token=" + url.QueryEscape(logoToken), header: sse}), 403)

	b.clock.Advance(2 * time.Hour)
	expect(t, b.do(req{method: "GET", path: sub.EventsURL, header: sse}), 401, "token_expired")
}

func dialWS(t *testing.T, b *bundle, path string, header http.Header) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: wait}
	conn, res, err := d.Dial("ws"+strings.TrimPrefix(b.base, "http")+path, header)
	if conn != nil {
		t.Cleanup(func() { conn.Close() })
	}
	return conn, res, err
}

func TestEventsWebSocket(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	feeds := subscriptions(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	token := b.srv.tokens.mint(job.ID, "style")
	conn, _, err := dialWS(t, b, "/api/v1/jobs/"+job.ID+"/events?token="+url.QueryEscape(token), nil)
	if err != nil {
		t.Fatal(err)
	}
	f := nextFeed(t, feeds)
	events := script(job.ID)
	go func() {
		for _, ev := range events {
			f.send(t, ev)
		}
	}()
	conn.SetReadDeadline(time.Now().Add(wait))
	for i, want := range events {
		kind, data, err := conn.ReadMessage()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		var got schema.Event
		if kind != websocket.TextMessage || json.Unmarshal(data, &got) != nil {
			t.Fatalf("frame %d: kind %d %q", i, kind, data)
		}
		if got.Seq != want.Seq || got.Type != want.Type {
			t.Fatalf("frame %d: %s, want seq %d %s", i, data, want.Seq, want.Type)
		}
		if i == 0 && (got.Job == nil || got.Job.ID != job.ID) {
			t.Fatalf("first frame is not the snapshot: %s", data)
		}
	}
	_, _, err = conn.ReadMessage()
	if !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
		t.Fatalf("after the terminal event: %v", err)
	}
	waitCancelled(t, f)

	// With a bearer key in the handshake, and refusals before the upgrade.
	h := http.Header{"Authorization": {"Bearer " + styleKey}}
	conn2, _, err := dialWS(t, b, "/api/v1/jobs/"+job.ID+"/events?after=4", h)
	if err != nil {
		t.Fatal(err)
	}
	f2 := nextFeed(t, feeds)
	if f2.after != 4 {
		t.Fatalf("after %d", f2.after)
	}
	conn2.Close()
	waitCancelled(t, f2) // the client left

	for _, c := range []struct {
		path   string
		header http.Header
		want   int
	}{
		{"/api/v1/jobs/" + job.ID + "/events", nil, 401},
		{"/api/v1/jobs/" + job.ID + "/events", http.Header{"Authorization": {"Bearer " + logoKey}}, 404},
		{"/api/v1/jobs/nosuch/events", h, 404},
		{"/api/v1/jobs/" + job.ID + "/events?token=x", nil, 401},
	} {
		_, res, err := dialWS(t, b, c.path, c.header)
		if err == nil || res == nil || res.StatusCode != c.want {
			status := 0
			if res != nil {
				status = res.StatusCode
			}
			t.Fatalf("%s: err %v status %d, want %d", c.path, err, status, c.want)
		}
	}
}

func TestEventsKeepAlive(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) { c.KeepAlive = 20 * time.Millisecond })
	feeds := subscriptions(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	snap := script(job.ID)[0]

	t.Run("sse", func(t *testing.T) {
		_, r := openSSE(t, b, "/api/v1/jobs/"+job.ID+"/events", map[string]string{"Authorization": "Bearer " + styleKey})
		f := nextFeed(t, feeds)
		f.send(t, snap)
		if m, err := readSSE(r); err != nil || m.event != "snapshot" {
			t.Fatalf("%+v %v", m, err)
		}
		for {
			m, err := readSSE(r)
			if err != nil {
				t.Fatal(err)
			}
			if m.comment == "keepalive" {
				break
			}
		}
		f.send(t, schema.Event{Seq: 2, Type: schema.EventCancelled, JobID: job.ID})
		for {
			m, err := readSSE(r)
			if err != nil {
				t.Fatal(err)
			}
			if m.event == "cancelled" {
				break
			}
		}
	})

	t.Run("websocket", func(t *testing.T) {
		conn, _, err := dialWS(t, b, "/api/v1/jobs/"+job.ID+"/events", http.Header{"Authorization": {"Bearer " + styleKey}})
		if err != nil {
			t.Fatal(err)
		}
		f := nextFeed(t, feeds)
		f.send(t, snap)
		conn.SetReadDeadline(time.Now().Add(wait))
		var got schema.Event
		if err := conn.ReadJSON(&got); err != nil || got.Type != schema.EventSnapshot {
			t.Fatalf("%+v %v", got, err)
		}
		for {
			if err := conn.ReadJSON(&got); err != nil {
				t.Fatal(err)
			}
			if got.Type == schema.EventKeepAlive {
				if got.Seq != 1 || got.JobID != job.ID {
					t.Fatalf("keepalive %+v", got)
				}
				break
			}
		}
		// A client that stops reading and goes away is noticed.
		conn.Close()
		waitCancelled(t, f)
	})

	t.Run("sse client leaves", func(t *testing.T) {
		res, r := openSSE(t, b, "/api/v1/jobs/"+job.ID+"/events", map[string]string{"Authorization": "Bearer " + styleKey})
		f := nextFeed(t, feeds)
		f.send(t, snap)
		if _, err := readSSE(r); err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		waitCancelled(t, f)
	})
}

func TestEventsShutdown(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	feeds := subscriptions(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	conn, _, err := dialWS(t, b, "/api/v1/jobs/"+job.ID+"/events", http.Header{"Authorization": {"Bearer " + styleKey}})
	if err != nil {
		t.Fatal(err)
	}
	f := nextFeed(t, feeds)
	_, r := openSSE(t, b, "/api/v1/jobs/"+job.ID+"/events", map[string]string{"Authorization": "Bearer " + styleKey})
	f2 := nextFeed(t, feeds)

	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := b.srv.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	conn.SetReadDeadline(time.Now().Add(wait))
	if _, _, err := conn.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseGoingAway) {
		t.Fatalf("websocket after shutdown: %v", err)
	}
	for {
		if _, err := readSSE(r); err != nil {
			break // the stream ended
		}
	}
	waitCancelled(t, f)
	waitCancelled(t, f2)
}

func TestEventsSubscribeError(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	job := b.jobs.add("style", "u1", schema.JobQueued)
	b.jobs.SubscribeFunc = func(context.Context, string, int64, bool) (<-chan schema.Event, func(), error) {
		return nil, nil, schema.ErrNotFound
	}
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + job.ID + "/events", key: styleKey, header: map[string]string{"Accept": "text/event-stream"}}), 404)
	conn, _, err := dialWS(t, b, "/api/v1/jobs/"+job.ID+"/events", http.Header{"Authorization": {"Bearer " + styleKey}})
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(wait))
	if _, _, err := conn.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseInternalServerErr) {
		t.Fatalf("websocket: %v", err)
	}
}

func TestToken(t *testing.T) {
	clk := newClock()
	ts := &tokenSigner{key: []byte("0123456789abcdef"), ttl: time.Minute, now: clk.Now}
	tok := ts.mint("01JOB", "style")
	if fe, err := ts.check(tok, "01JOB"); err != nil || fe != "style" {
		t.Fatalf("check: %q %v", fe, err)
	}
	if _, err := ts.check(tok, "01JOC"); !errors.Is(err, errTokenOtherJob) {
		t.Fatalf("other job: %v", err)
	}
	other := &tokenSigner{key: []byte("fedcba9876543210"), ttl: time.Minute, now: clk.Now}
	if _, err := other.check(tok, "01JOB"); !errors.Is(err, errTokenSignature) {
		t.Fatalf("other key: %v", err)
	}
	for _, bad := range []string{"", ".", "abc", "a.b", tok + "x", strings.Repeat("a", 600)} {
		if _, err := ts.check(bad, "01JOB"); err == nil {
			t.Fatalf("accepted %q", bad)
		}
	}
	clk.Advance(time.Minute)
	if _, err := ts.check(tok, "01JOB"); !errors.Is(err, errTokenExpired) {
		t.Fatalf("expired: %v", err)
	}
}

// One job's events token opens at most maxTokenStreamsPerJob streams at
// once: SSE beyond it is 429, a WebSocket is closed with a policy
// violation; a closed stream frees its place. Keyed streams do not count.
func TestEventsTokenStreamCap(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	feeds := subscriptions(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	token := b.srv.tokens.mint(job.ID, "style")
	path := "/api/v1/jobs/" + job.ID + "/events?token=" + url.QueryEscape(token)
	var open []*feed
	for i := 0; i < maxTokenStreamsPerJob; i++ {
		res, _ := openSSE(t, b, path, nil)
		if res.StatusCode != 200 {
			t.Fatalf("stream %d: %d", i+1, res.StatusCode)
		}
		open = append(open, nextFeed(t, feeds))
	}
	res, _ := openSSE(t, b, path, nil)
	if res.StatusCode != 429 {
		t.Fatalf("stream %d: %d, want 429", maxTokenStreamsPerJob+1, res.StatusCode)
	}
	conn, _, err := dialWS(t, b, path, nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(wait))
	_, _, err = conn.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.ClosePolicyViolation {
		t.Fatalf("websocket beyond the cap: %v, want close 1008", err)
	}
	conn.Close()
	// A keyed stream is not counted.
	if res, _ := openSSE(t, b, "/api/v1/jobs/"+job.ID+"/events", map[string]string{"Authorization": "Bearer " + styleKey}); res.StatusCode != 200 {
		t.Fatalf("keyed stream: %d", res.StatusCode)
	}
	nextFeed(t, feeds)
	// A stream that ends frees its place.
	open[0].send(t, schema.Event{Seq: 1, Type: schema.EventCancelled, JobID: job.ID})
	waitCancelled(t, open[0])
	deadline := time.Now().Add(wait)
	for {
		res, _ := openSSE(t, b, path, nil)
		if res.StatusCode == 200 {
			break
		}
		res.Body.Close()
		if time.Now().After(deadline) {
			t.Fatalf("a closed stream's place was not freed: %d", res.StatusCode)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

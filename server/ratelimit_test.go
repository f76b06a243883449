package server

import (
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

const limitedSubmit = `{"user_id":"u1","workflow":{"1":{}}}`

// limits sets the rate limits of a test server.
func limits(requests, submits int) option {
	return func(c *Config, _ *Deps) {
		c.RatePerMinute = requests
		c.SubmitPerMinute = submits
	}
}

// expectLimited checks a 429 answer: status, Retry-After, the error shape and
// its retry_after_seconds.
func expectLimited(t *testing.T, b *bundle, r resp, retryAfter int) {
	t.Helper()
	expect(t, r, 429, "rate_limited")
	if got := r.header.Get("Retry-After"); got != strconv.Itoa(retryAfter) {
		t.Fatalf("Retry-After %q, want %d", got, retryAfter)
	}
	var body struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
			Details struct {
				RetryAfterSeconds *int `json:"retry_after_seconds"`
			} `json:"details"`
		} `json:"error"`
	}
	b.decode(r, &body)
	if body.Error.Message == "" || body.Error.Details.RetryAfterSeconds == nil || *body.Error.Details.RetryAfterSeconds != retryAfter {
		t.Fatalf("error body: %s", r.body)
	}
}

func TestRateLimitSubmit(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), limits(0, 2))
	submit := func(key, query string) resp {
		return b.do(req{method: "POST", path: "/api/v1/jobs" + query, key: key, body: limitedSubmit})
	}
	// Two per minute, with a burst of two.
	expect(t, submit(styleKey, ""), 202)
	expect(t, submit(styleKey, ""), 202)
	r := submit(styleKey, "")
	expectLimited(t, b, r, 30) // one token comes back every 30 s
	if !strings.Contains(string(r.body), "2 job submissions per minute") {
		t.Fatalf("message: %s", r.body)
	}
	if n := len(b.jobs.calls()); n != 2 {
		t.Fatalf("%d submits reached the job service, want 2", n)
	}

	// Other routes of the key are not submit-limited (no request limit here).
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey}), 200)
	// Another frontend's key has its own bucket.
	expect(t, submit(logoKey, ""), 202)
	expect(t, submit(logoKey, ""), 202)
	expectLimited(t, b, submit(logoKey, ""), 30)
	// The admin key is never limited, also when acting for style.
	for range 5 {
		expect(t, submit(adminKey, "?frontend=style"), 202)
	}

	// The clock, not the wall, refills the bucket.
	b.clock.Advance(29 * time.Second)
	expectLimited(t, b, submit(styleKey, ""), 1)
	b.clock.Advance(time.Second)
	expect(t, submit(styleKey, ""), 202)
	expectLimited(t, b, submit(styleKey, ""), 30)
	b.clock.Advance(time.Minute)
	expect(t, submit(styleKey, ""), 202)
	expect(t, submit(styleKey, ""), 202)
	expectLimited(t, b, submit(styleKey, ""), 30)

	if n := len(b.jobs.calls()); n != 2+2+5+3 {
		t.Fatalf("%d submits reached the job service, want 12", n)
	}
}

func TestRateLimitRequests(t *testing.T) {
	const styleKey2 = "style-key-2"
	b := setup(t, dbtest.SQLite(t), limits(3, 0), func(c *Config, _ *Deps) {
		c.FrontendKeys["style"] = append(c.FrontendKeys["style"], styleKey2)
	})
	job := b.jobs.add("style", "u1", schema.JobQueued)
	// Every keyed route counts, a submit included.
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + job.ID, key: styleKey}), 200)
	expect(t, b.do(req{method: "GET", path: "/api/v1/queue?job_id=" + job.ID, key: styleKey}), 200)
	r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: limitedSubmit})
	expect(t, r, 202)
	var sub submitResponse
	b.decode(r, &sub)
	expectLimited(t, b, b.do(req{method: "GET", path: "/api/v1/photos", key: styleKey}), 20)
	expectLimited(t, b, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: limitedSubmit}), 20)
	if n := len(b.jobs.calls()); n != 1 {
		t.Fatalf("%d submits reached the job service, want 1", n)
	}

	// A key-authenticated event stream counts at connect.
	sse := map[string]string{"Accept": "text/event-stream"}
	expectLimited(t, b, b.do(req{method: "GET", path: "/api/v1/jobs/" + job.ID + "/events", key: styleKey, header: sse}), 20)
	// One following with the submit response's token needs no key and is not limited.
	u, err := url.Parse(sub.EventsURL)
	if err != nil {
		t.Fatal(err)
	}
	expect(t, b.do(req{method: "GET", path: u.RequestURI(), header: sse}), 200)

	// Authentication comes first: no key or an unknown key is 401, not 429.
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs"}), 401, "unauthorized")
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs", key: "no-such-key"}), 401, "unauthorized")
	// The limit is per key: the frontend's other key and another frontend are unaffected.
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey2}), 200)
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs", key: logoKey}), 200)
	// The admin key is never limited.
	for range 10 {
		expect(t, b.do(req{method: "GET", path: "/api/v1/nodes", key: adminKey}), 200)
	}
	// Routes outside /api/v1 are not limited.
	for range 5 {
		for _, path := range []string{"/healthz", "/readyz", "/metrics", "/dashboard"} {
			expect(t, b.do(req{method: "GET", path: path, key: styleKey}), 200)
		}
	}

	// A new request every 20 s.
	b.clock.Advance(20 * time.Second)
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey}), 200)
	expectLimited(t, b, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey}), 20)
	b.clock.Advance(10 * time.Second)
	expectLimited(t, b, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey}), 10)
	b.clock.Advance(10 * time.Second)
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + job.ID + "/events", key: styleKey, header: sse}), 200)

	// Only keys that were used hold buckets: style's two and logo's.
	if n := b.srv.limiter.size(); n != 3 {
		t.Fatalf("%d buckets, want 3", n)
	}
}

func TestRateLimitBothKinds(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), limits(4, 1))
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: limitedSubmit}), 202)
	// The submit limit answers first; the refused submit still spent a request.
	expectLimited(t, b, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: limitedSubmit}), 60)
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey}), 200)
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey}), 200)
	expectLimited(t, b, b.do(req{method: "GET", path: "/api/v1/jobs", key: styleKey}), 15)
	if n := b.srv.limiter.size(); n != 2 {
		t.Fatalf("%d buckets, want 2 (requests and submits of one key)", n)
	}
}

func TestRateLimitOff(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), limits(0, 0))
	for i := range 150 {
		if r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: limitedSubmit}); r.status != 202 {
			t.Fatalf("submit %d: %s", i, r)
		}
	}
	if n := b.srv.limiter.size(); n != 0 {
		t.Fatalf("%d buckets with limits off", n)
	}
	if _, err := New(Config{AdminKey: adminKey, TokenSecret: []byte("events-secret-0123456789"), RatePerMinute: -1},
		Deps{Frontends: b.reg}); err == nil {
		t.Fatal("a negative RatePerMinute was accepted")
	}
	if _, err := New(Config{AdminKey: adminKey, TokenSecret: []byte("events-secret-0123456789"), SubmitPerMinute: -1},
		Deps{Frontends: b.reg}); err == nil {
		t.Fatal("a negative SubmitPerMinute was accepted")
	}
}

func TestLimiterEviction(t *testing.T) {
	const idle = 10 * time.Minute
	l := newLimiter(60, 6, idle)
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	// A new key every second for three hours: a bucket lives at most two idle
	// periods after its last use (swept once per idle period), so at most
	// 2*600 buckets (plus the one just made) are ever held.
	const keys = 3 * 3600
	most := 0
	for i := range keys {
		now := t0.Add(time.Duration(i) * time.Second)
		if ok, _ := l.allow(i, limitRequests, now); !ok {
			t.Fatalf("key %d: first request refused", i)
		}
		most = max(most, l.size())
	}
	if most > 2*600+1 {
		t.Fatalf("the map grew to %d buckets", most)
	}
	if most < 600 {
		t.Fatalf("the map held only %d buckets: evicted before idle", most)
	}

	// A bucket in use survives a sweep and keeps its state.
	l = newLimiter(60, 6, idle)
	now := t0
	for range 6 {
		if ok, _ := l.allow(1, limitSubmits, now); !ok {
			t.Fatal("burst refused")
		}
	}
	if ok, wait := l.allow(1, limitSubmits, now); ok || wait != 10*time.Second {
		t.Fatalf("7th submit: %v, wait %v", ok, wait)
	}
	now = now.Add(idle - time.Second)
	l.allow(1, limitSubmits, now) // used again: not idle
	now = now.Add(time.Second)
	l.allow(2, limitSubmits, now) // another key sweeps
	if _, ok := l.buckets[bucketKey{key: 1, kind: limitSubmits}]; !ok {
		t.Fatal("a bucket in use was evicted")
	}
	// An idle one is dropped at the next sweep.
	now = now.Add(2 * idle)
	l.allow(3, limitSubmits, now)
	if _, ok := l.buckets[bucketKey{key: 1, kind: limitSubmits}]; ok || l.size() != 1 {
		t.Fatalf("idle buckets kept: %d", l.size())
	}
	// Kind 0 per minute is off: nothing is held.
	l = newLimiter(0, 0, idle)
	for i := range 100 {
		if ok, _ := l.allow(i, limitSubmits, now); !ok {
			t.Fatal("limit off refused")
		}
	}
	if l.size() != 0 {
		t.Fatalf("%d buckets with limits off", l.size())
	}
}

func BenchmarkLimiterAllow(b *testing.B) {
	l := newLimiter(1<<30, 0, bucketIdle)
	now := time.Now()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		l.allow(i%64, limitRequests, now)
	}
}

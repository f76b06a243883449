package webhook_test

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
	"github.com/comfyfarm/comfyfarm/webhook"
)

const testTimeout = 2 * time.Minute

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// clock is a settable clock shared by the store and the deliverer.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Now().UTC()} }

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *clock) Advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

func newSecret(t testing.TB) string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "whsec_" + base64.StdEncoding.EncodeToString(b)
}

// request is what a receiver got.
type request struct {
	header http.Header
	body   []byte
}

// receiver answers with answer(n) for the n-th request (from 1) and passes
// every request on got.
type receiver struct {
	*httptest.Server
	got   chan request
	count atomic.Int32
}

func newReceiver(t testing.TB, answer func(n int, w http.ResponseWriter, r *http.Request)) *receiver {
	rc := &receiver{got: make(chan request, 100)}
	rc.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		n := int(rc.count.Add(1))
		rc.got <- request{header: r.Header.Clone(), body: body}
		answer(n, w, r)
	}))
	t.Cleanup(rc.Close)
	return rc
}

func statusSequence(codes ...int) func(int, http.ResponseWriter, *http.Request) {
	return func(n int, w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(codes[min(n, len(codes))-1])
	}
}

func (rc *receiver) next(t testing.TB) request {
	t.Helper()
	select {
	case r := <-rc.got:
		return r
	case <-time.After(testTimeout):
		t.Fatal("no webhook request arrived")
		return request{}
	}
}

func openStore(t testing.TB, cfg dbcontrollers.Config, c *clock, targets *webhook.Targets) *dbcontrollers.Store {
	t.Helper()
	db, err := dbcontrollers.OpenControl(testContext(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s := dbcontrollers.NewStore(db)
	s.WebhookURLFunc = targets.URLFor
	if c != nil {
		s.NowFunc = c.Now
	}
	return s
}

func mustTargets(t testing.TB, endpoints map[string]webhook.Endpoint, allow ...string) *webhook.Targets {
	t.Helper()
	a, err := webhook.ParseAllowList(allow)
	if err != nil {
		t.Fatal(err)
	}
	tg, err := webhook.NewTargets(endpoints, a)
	if err != nil {
		t.Fatal(err)
	}
	return tg
}

func endpoint(t testing.TB, url, secret string) webhook.Endpoint {
	key, err := webhook.DecodeSecret(secret)
	if err != nil {
		t.Fatal(err)
	}
	return webhook.Endpoint{URL: url, Key: key}
}

// finish stores a job of frontend and ends it in state the way the farm
// does, through JobUpdate.
func finish(t testing.TB, s *dbcontrollers.Store, frontend string, state schema.JobState, ownURL string) *schema.Job {
	t.Helper()
	ctx := testContext(t)
	j := &schema.Job{Frontend: frontend, UserID: "u1", Workflow: json.RawMessage(`{"1":{"class_type":"X","inputs":{}}}`),
		WebhookURL: ownURL}
	if err := s.JobInsert(ctx, j); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	done, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{schema.JobQueued},
		State: state, FinishedAt: &now})
	if err != nil {
		t.Fatal(err)
	}
	return done
}

// run starts a deliverer; the returned func stops it and waits for Run.
func run(t testing.TB, cfg webhook.Config, store webhook.Store, targets *webhook.Targets) func() {
	t.Helper()
	if cfg.Owner == "" {
		cfg.Owner = "test"
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 10 * time.Millisecond
	}
	if cfg.Backoff == nil {
		cfg.Backoff = []time.Duration{10 * time.Millisecond}
	}
	d, err := webhook.New(cfg, store, targets)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// waitDelivery polls the job's delivery until ok says it is done.
func waitDelivery(t testing.TB, s *dbcontrollers.Store, jobID string, ok func(schema.WebhookDelivery) bool) schema.WebhookDelivery {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		list, err := s.WebhookList(testContext(t), jobID)
		if err != nil {
			t.Fatal(err)
		}
		if len(list) == 1 && ok(list[0]) {
			return list[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s: deliveries %+v", jobID, list)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func attempts(n int) func(schema.WebhookDelivery) bool {
	return func(d schema.WebhookDelivery) bool { return len(d.Attempts) >= n }
}

func inState(st schema.WebhookState) func(schema.WebhookDelivery) bool {
	return func(d schema.WebhookDelivery) bool { return d.State == st }
}

// A receiver that answers 500 twice, then 200, gets the job three times with
// one webhook-id, each signed so that the Standard Webhooks library accepts
// it; the attempts are recorded.
func TestDeliverRetriesUntilAccepted(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		secret := newSecret(t)
		rc := newReceiver(t, statusSequence(500, 500, 200))
		targets := mustTargets(t, map[string]webhook.Endpoint{"alpha": endpoint(t, rc.URL+"/hook", secret)})
		s := openStore(t, cfg, nil, targets)
		job := finish(t, s, "alpha", schema.JobSucceeded, "")
		run(t, webhook.Config{}, s, targets)

		verifier, err := standardwebhooks.NewWebhook(secret)
		if err != nil {
			t.Fatal(err)
		}
		wantID := "msg_" + job.ID + "_succeeded"
		for i := 0; i < 3; i++ {
			r := rc.next(t)
			if got := r.header.Get("webhook-id"); got != wantID {
				t.Errorf("attempt %d: webhook-id %q, want %q", i+1, got, wantID)
			}
			if err := verifier.Verify(r.body, r.header); err != nil {
				t.Errorf("attempt %d: signature refused: %v", i+1, err)
			}
			tampered := append([]byte(nil), r.body...)
			tampered[len(tampered)-2] ^= 1
			if verifier.Verify(tampered, r.header) == nil {
				t.Error("a changed body verified")
			}
			var view schema.Job
			if err := json.Unmarshal(r.body, &view); err != nil || view.ID != job.ID || view.State != schema.JobSucceeded {
				t.Errorf("attempt %d: body %s (%v)", i+1, r.body, err)
			}
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("content type %q", ct)
			}
		}
		d := waitDelivery(t, s, job.ID, inState(schema.WebhookDelivered))
		var codes []int
		for _, a := range d.Attempts {
			codes = append(codes, a.StatusCode)
		}
		if fmt.Sprint(codes) != "[500 500 200]" || d.Attempts[0].Error != "answered 500" || d.Attempts[2].Error != "" {
			t.Fatalf("attempts %+v", d.Attempts)
		}
	})
}

// 410 Gone stops the retries at once.
func TestDeliverGoneStops(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		rc := newReceiver(t, statusSequence(http.StatusGone, 200))
		targets := mustTargets(t, map[string]webhook.Endpoint{"alpha": endpoint(t, rc.URL, newSecret(t))})
		s := openStore(t, cfg, nil, targets)
		job := finish(t, s, "alpha", schema.JobFailed, "")
		stop := run(t, webhook.Config{}, s, targets)
		d := waitDelivery(t, s, job.ID, inState(schema.WebhookFailed))
		stop()
		if len(d.Attempts) != 1 || d.Attempts[0].StatusCode != 410 || rc.count.Load() != 1 {
			t.Fatalf("attempts %+v, %d requests", d.Attempts, rc.count.Load())
		}
	})
}

// Retries stop once the next one would start more than max_age after the
// event: with a 10 h back-off and 24 h, the tries are at 0, 10 h and 20 h.
func TestDeliverGivesUpAfterMaxAge(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		c := newClock()
		rc := newReceiver(t, statusSequence(503))
		targets := mustTargets(t, map[string]webhook.Endpoint{"alpha": endpoint(t, rc.URL, newSecret(t))})
		s := openStore(t, cfg, c, targets)
		job := finish(t, s, "alpha", schema.JobCancelled, "")
		stop := run(t, webhook.Config{NowFunc: c.Now, Backoff: []time.Duration{10 * time.Hour}, MaxAge: 24 * time.Hour}, s, targets)
		start := c.Now()
		for n := 1; n <= 2; n++ {
			rc.next(t)
			d := waitDelivery(t, s, job.ID, attempts(n))
			if d.State != schema.WebhookPending || !d.NextAttemptAt.Equal(start.Add(time.Duration(n)*10*time.Hour).Truncate(time.Microsecond)) {
				t.Fatalf("after attempt %d: %+v", n, d)
			}
			c.Advance(10 * time.Hour)
		}
		rc.next(t)
		d := waitDelivery(t, s, job.ID, inState(schema.WebhookFailed))
		stop()
		if len(d.Attempts) != 3 || rc.count.Load() != 3 {
			t.Fatalf("%d attempts, %d requests, want 3", len(d.Attempts), rc.count.Load())
		}
		if last := d.Attempts[2]; last.StatusCode != 503 || last.Error != "answered 503; no further try within 24h0m0s of the event" {
			t.Fatalf("last attempt %+v", last)
		}
	})
}

// A receiver that hangs holds one slot only: another frontend's receiver gets
// its delivery, and jobs keep ending, while the hanging request is in flight.
func TestHangingReceiverDelaysNothingElse(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		entered, release := make(chan struct{}), make(chan struct{})
		var hanging atomic.Bool
		slow := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
			if n == 1 {
				hanging.Store(true)
				close(entered)
				select {
				case <-release:
				case <-r.Context().Done():
				case <-time.After(60 * time.Second):
				}
				hanging.Store(false)
			}
			w.WriteHeader(http.StatusNoContent)
		})
		fast := newReceiver(t, statusSequence(200))
		targets := mustTargets(t, map[string]webhook.Endpoint{
			"slow": endpoint(t, slow.URL, newSecret(t)),
			"fast": endpoint(t, fast.URL, newSecret(t)),
		})
		s := openStore(t, cfg, nil, targets)
		run(t, webhook.Config{Timeout: time.Minute}, s, targets)
		slowJob := finish(t, s, "slow", schema.JobSucceeded, "")
		<-entered
		// the job path: more jobs end while the slow receiver hangs
		var fastJobs []*schema.Job
		for i := 0; i < 3; i++ {
			fastJobs = append(fastJobs, finish(t, s, "fast", schema.JobSucceeded, ""))
		}
		for range fastJobs {
			fast.next(t)
			if !hanging.Load() {
				t.Fatal("the other receiver was reached only after the hanging one answered")
			}
		}
		for _, j := range fastJobs {
			waitDelivery(t, s, j.ID, inState(schema.WebhookDelivered))
		}
		close(release)
		d := waitDelivery(t, s, slowJob.ID, inState(schema.WebhookDelivered))
		if len(d.Attempts) != 1 || d.Attempts[0].StatusCode != 204 {
			t.Fatalf("slow delivery %+v", d)
		}
	})
}

// deadStore is a deliverer's store after its process was killed: nothing it
// does from then on reaches the database.
type deadStore struct {
	*dbcontrollers.Store
	dead atomic.Bool
}

func (d *deadStore) WebhookRecord(ctx context.Context, r dbcontrollers.WebhookResult) error {
	if d.dead.Load() {
		return errors.New("process killed")
	}
	return d.Store.WebhookRecord(ctx, r)
}

// A deliverer killed during its second attempt loses nothing: another
// process over the same database delivers once the lease runs out, with the
// same webhook-id.
func TestDeliveryOutlivesKilledDeliverer(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		c := newClock()
		secret := newSecret(t)
		hang := make(chan struct{})
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
			switch n {
			case 1:
				w.WriteHeader(500)
			case 2:
				select { // the request dies with its deliverer
				case <-hang:
				case <-r.Context().Done():
				}
			default:
				w.WriteHeader(200)
			}
		})
		targets := mustTargets(t, map[string]webhook.Endpoint{"alpha": endpoint(t, rc.URL, secret)})
		first := &deadStore{Store: openStore(t, cfg, c, targets)}
		job := finish(t, first.Store, "alpha", schema.JobSucceeded, "")
		stopFirst := run(t, webhook.Config{Owner: "first", NowFunc: c.Now, Backoff: []time.Duration{time.Second}}, first, targets)
		r1 := rc.next(t)
		waitDelivery(t, first.Store, job.ID, attempts(1))
		c.Advance(2 * time.Second)
		r2 := rc.next(t) // in flight
		first.dead.Store(true)
		stopFirst()
		close(hang)

		// a new process: its own connection, its own deliverer
		second := openStore(t, cfg, c, targets)
		run(t, webhook.Config{Owner: "second", NowFunc: c.Now}, second, targets)
		c.Advance(webhook.DefaultTimeout + time.Minute) // the first one's lease runs out
		r3 := rc.next(t)
		d := waitDelivery(t, second, job.ID, inState(schema.WebhookDelivered))
		for i, r := range []request{r1, r2, r3} {
			if r.header.Get("webhook-id") != d.ID {
				t.Errorf("request %d: webhook-id %q, want %q", i+1, r.header.Get("webhook-id"), d.ID)
			}
		}
		// the killed attempt left no record; the other two did
		if len(d.Attempts) != 2 || d.Attempts[0].StatusCode != 500 || d.Attempts[1].StatusCode != 200 {
			t.Fatalf("attempts %+v", d.Attempts)
		}
	})
}

// Two deliverers on one database send every due row once between them.
func TestTwoDeliverersSendEachOnce(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		var mu sync.Mutex
		seen := map[string]int{}
		rc := newReceiver(t, func(_ int, w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			seen[r.Header.Get("webhook-id")]++
			mu.Unlock()
		})
		targets := mustTargets(t, map[string]webhook.Endpoint{"alpha": endpoint(t, rc.URL, newSecret(t))})
		a := openStore(t, cfg, nil, targets)
		b := openStore(t, cfg, nil, targets)
		const n = 40
		var jobs []*schema.Job
		for i := 0; i < n; i++ {
			jobs = append(jobs, finish(t, a, "alpha", schema.JobSucceeded, ""))
		}
		run(t, webhook.Config{Owner: "a", Concurrency: 3}, a, targets)
		run(t, webhook.Config{Owner: "b", Concurrency: 3}, b, targets)
		for _, j := range jobs {
			waitDelivery(t, a, j.ID, inState(schema.WebhookDelivered))
		}
		mu.Lock()
		defer mu.Unlock()
		if len(seen) != n {
			t.Fatalf("%d distinct ids received, want %d", len(seen), n)
		}
		for id, k := range seen {
			if k != 1 {
				t.Errorf("%s sent %d times", id, k)
			}
		}
	})
}

// A job's own webhook_url wins over the frontend's; events the frontend did
// not ask for are not sent.
func TestJobURLAndEvents(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		front := newReceiver(t, statusSequence(200))
		own := newReceiver(t, statusSequence(200))
		e := endpoint(t, front.URL, newSecret(t))
		e.Events = []schema.JobState{schema.JobSucceeded}
		targets := mustTargets(t, map[string]webhook.Endpoint{"alpha": e}, "127.0.0.1")
		if err := targets.CheckJobURL("alpha", own.URL+"/mine"); err != nil {
			t.Fatal(err)
		}
		s := openStore(t, cfg, nil, targets)
		run(t, webhook.Config{}, s, targets)
		j1 := finish(t, s, "alpha", schema.JobSucceeded, own.URL+"/mine")
		failed := finish(t, s, "alpha", schema.JobFailed, "")
		j2 := finish(t, s, "alpha", schema.JobSucceeded, "")
		if r := own.next(t); r.header.Get("webhook-id") != "msg_"+j1.ID+"_succeeded" {
			t.Fatalf("own receiver got %s", r.header.Get("webhook-id"))
		}
		if r := front.next(t); r.header.Get("webhook-id") != "msg_"+j2.ID+"_succeeded" {
			t.Fatalf("frontend receiver got %s", r.header.Get("webhook-id"))
		}
		waitDelivery(t, s, j2.ID, inState(schema.WebhookDelivered))
		if list, err := s.WebhookList(testContext(t), failed.ID); err != nil || len(list) != 0 {
			t.Fatalf("failed job (event not asked for): %+v %v", list, err)
		}
	})
}

// A frontend whose receiver hangs takes at most PerFrontend slots: with
// five of its deliveries hanging, another frontend's still go out.
func TestHangingFrontendKeepsToItsShare(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		release := make(chan struct{})
		var hanging atomic.Int32
		slow := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
			hanging.Add(1)
			defer hanging.Add(-1)
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		fast := newReceiver(t, statusSequence(200))
		targets := mustTargets(t, map[string]webhook.Endpoint{
			"slow": endpoint(t, slow.URL, newSecret(t)),
			"fast": endpoint(t, fast.URL, newSecret(t)),
		})
		s := openStore(t, cfg, nil, targets)
		var slowJobs []*schema.Job
		for i := 0; i < 5; i++ {
			slowJobs = append(slowJobs, finish(t, s, "slow", schema.JobSucceeded, ""))
		}
		run(t, webhook.Config{Concurrency: 4, PerFrontend: 2, Timeout: time.Minute}, s, targets)
		slow.next(t)
		slow.next(t)
		fastJob := finish(t, s, "fast", schema.JobFailed, "")
		fast.next(t)
		if n := hanging.Load(); n != 2 {
			t.Fatalf("%d slow requests in flight, want 2", n)
		}
		waitDelivery(t, s, fastJob.ID, inState(schema.WebhookDelivered))
		close(release)
		for _, j := range slowJobs {
			waitDelivery(t, s, j.ID, inState(schema.WebhookDelivered))
		}
		if n := slow.count.Load(); n != 5 {
			t.Fatalf("%d slow requests, want 5", n)
		}
	})
}

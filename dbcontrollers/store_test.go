package dbcontrollers_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// testTimeout bounds every test's database work; generous for a loaded host.
const testTimeout = 2 * time.Minute

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

func openStore(t testing.TB, cfg dbcontrollers.Config) *dbcontrollers.Store {
	t.Helper()
	db, err := dbcontrollers.OpenControl(testContext(t), cfg)
	if err != nil {
		t.Fatalf("open control: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return dbcontrollers.NewStore(db)
}

func newJob(frontend, user string, priority int) *schema.Job {
	return &schema.Job{
		Frontend: frontend,
		UserID:   user,
		Priority: priority,
		Workflow: json.RawMessage(`{"1":{"class_type":"KSampler","inputs":{}}}`),
	}
}

func mustInsert(t testing.TB, s *dbcontrollers.Store, j *schema.Job) *schema.Job {
	t.Helper()
	if err := s.JobInsert(testContext(t), j); err != nil {
		t.Fatalf("insert job: %v", err)
	}
	return j
}

func wantErr(t testing.TB, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error = %v, want %v", err, target)
	}
}

func TestMigrationsIdempotent(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		name, err := cfg.FrontendDatabase("style", "")
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2; i++ {
			if err := dbcontrollers.Migrate(ctx, cfg, []string{name}); err != nil {
				t.Fatalf("migrate run %d: %v", i+1, err)
			}
		}
		for _, open := range []struct {
			kind string
			open func() (*dbcontrollers.DB, error)
		}{
			{"control", func() (*dbcontrollers.DB, error) { return dbcontrollers.OpenControl(ctx, cfg) }},
			{"frontend", func() (*dbcontrollers.DB, error) { return dbcontrollers.OpenFrontend(ctx, cfg, name) }},
		} {
			db, err := open.open()
			if err != nil {
				t.Fatalf("reopen %s: %v", open.kind, err)
			}
			cur, target, err := dbcontrollers.MigrationVersion(ctx, db, open.kind)
			if err != nil {
				t.Fatal(err)
			}
			if cur != target || cur < 1 {
				t.Errorf("%s: version %d, want %d", open.kind, cur, target)
			}
			var applied int
			if err := db.GetContext(ctx, &applied, "SELECT COUNT(*) FROM schema_migrations WHERE version_id > 0"); err != nil {
				t.Fatalf("%s: read schema_migrations: %v", open.kind, err)
			}
			// Versions may leave gaps (numbers kept for work merged
			// later), so count the files.
			fsys, err := schema.MigrationsFS(open.kind, db.Dialect)
			if err != nil {
				t.Fatal(err)
			}
			files, err := fs.Glob(fsys, "*.sql")
			if err != nil {
				t.Fatal(err)
			}
			if applied != len(files) {
				t.Errorf("%s: %d migrations recorded, want %d (each once)", open.kind, applied, len(files))
			}
			db.Close()
		}
	})
}

func TestConcurrentOpenMigratesOnce(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		name, err := cfg.FrontendDatabase("race", "")
		if err != nil {
			t.Fatal(err)
		}
		const n = 4
		errs := make(chan error, n)
		for i := 0; i < n; i++ {
			go func() {
				db, err := dbcontrollers.OpenFrontend(ctx, cfg, name)
				if err == nil {
					err = db.Close()
				}
				errs <- err
			}()
		}
		for i := 0; i < n; i++ {
			if err := <-errs; err != nil {
				t.Errorf("concurrent open: %v", err)
			}
		}
		db, err := dbcontrollers.OpenFrontend(ctx, cfg, name)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		var applied int
		if err := db.GetContext(ctx, &applied, "SELECT COUNT(*) FROM schema_migrations WHERE version_id > 0"); err != nil {
			t.Fatal(err)
		}
		if _, target, _ := dbcontrollers.MigrationVersion(ctx, db, "frontend"); int64(applied) != target {
			t.Errorf("%d migrations recorded, want %d", applied, target)
		}
	})
}

func TestJobInsertGetRoundTrip(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		lease := time.Date(2030, 1, 2, 3, 4, 5, 123456789, time.FixedZone("x", 3600))
		j := newJob("style", "u-1", 7)
		j.Metadata = json.RawMessage(`{"style":"ink"}`)
		j.Inputs = []schema.JobInput{{Field: "images", Filename: "a.png", Key: "in/a.png", ContentType: "image/png", Bytes: 10, Width: 2, Height: 3, SHA256: "ab"}}
		j.IdempotencyKey = "k1"
		j.Charged = 2
		j.LeaseExpiresAt = &lease
		mustInsert(t, s, j)
		if len(j.ID) != 26 || j.State != schema.JobQueued || j.CreatedAt.IsZero() {
			t.Fatalf("insert did not fill id/state/created_at: %+v", j)
		}
		got, err := s.JobGet(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !got.LeaseExpiresAt.Equal(lease.Truncate(time.Microsecond)) || got.LeaseExpiresAt.Location() != time.UTC {
			t.Errorf("lease = %v, want %v in UTC", got.LeaseExpiresAt, lease)
		}
		if !reflect.DeepEqual(got, j) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, j)
		}
		_, err = s.JobGet(ctx, "nope")
		wantErr(t, err, schema.ErrNotFound)

		// Outputs, progress and error survive an update, the object key too.
		if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j.ID, Node: "n1", Owner: "o", LeaseUntil: lease}); err != nil {
			t.Fatal(err)
		}
		p := schema.NewProgress("3", 5, 10)
		outs := []schema.Output{{PhotoID: 9, Key: "out/1.png", ContentType: "image/png", Width: 64, Height: 64, Bytes: 99, Filename: "x.png", NodeID: "9"}}
		now := time.Now()
		up, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{
			ID: j.ID, From: []schema.JobState{schema.JobDispatched}, State: schema.JobSucceeded,
			Progress: &p, Outputs: outs, Error: &schema.JobError{Code: "x", Message: "m", Details: map[string]any{"a": "b"}},
			FinishedAt: &now, ClearLease: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(up.Outputs, outs) || up.Outputs[0].Key != "out/1.png" {
			t.Errorf("outputs = %+v, want %+v", up.Outputs, outs)
		}
		if *up.Progress != p || up.Error.Details["a"] != "b" || up.LeaseExpiresAt != nil || up.LeaseOwner != "" {
			t.Errorf("update not applied: %+v", up)
		}
		if !up.FinishedAt.Equal(now.Truncate(time.Microsecond)) {
			t.Errorf("finished_at = %v, want %v", up.FinishedAt, now)
		}
	})
}

func TestJobInsertValidates(t *testing.T) {
	t.Parallel()
	s := openStore(t, dbtest.SQLite(t))
	for name, j := range map[string]*schema.Job{
		"frontend": newJob("Bad-Name", "u", 0),
		"user":     newJob("style", "", 0),
		"priority": newJob("style", "u", 101),
		"workflow": {Frontend: "style", UserID: "u", Workflow: json.RawMessage(`{`)},
		"state":    {Frontend: "style", UserID: "u", Workflow: json.RawMessage(`{}`), State: "weird"},
	} {
		var ve *schema.ValidationError
		if err := s.JobInsert(testContext(t), j); !errors.As(err, &ve) {
			t.Errorf("%s: error = %v, want a ValidationError", name, err)
		}
	}
}

func TestJobIdempotencyKey(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		a := newJob("style", "u", 0)
		a.IdempotencyKey = "pay-1"
		mustInsert(t, s, a)

		dup := newJob("style", "u", 0)
		dup.IdempotencyKey = "pay-1"
		wantErr(t, s.JobInsert(ctx, dup), schema.ErrConflict)

		// Keys are per frontend and case-sensitive; no key never conflicts.
		other := newJob("logo", "u", 0)
		other.IdempotencyKey = "pay-1"
		mustInsert(t, s, other)
		upper := newJob("style", "u", 0)
		upper.IdempotencyKey = "PAY-1"
		mustInsert(t, s, upper)
		mustInsert(t, s, newJob("style", "u", 0))
		mustInsert(t, s, newJob("style", "u", 0))

		got, err := s.JobByIdempotencyKey(ctx, "style", "pay-1")
		if err != nil || got.ID != a.ID {
			t.Fatalf("by key = %v, %v; want %s", got, err, a.ID)
		}
		_, err = s.JobByIdempotencyKey(ctx, "style", "missing")
		wantErr(t, err, schema.ErrNotFound)
		_, err = s.JobByIdempotencyKey(ctx, "style", "")
		wantErr(t, err, schema.ErrNotFound)
	})
}

func TestJobClaimRace(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		j := mustInsert(t, s, newJob("style", "u", 0))
		const n = 12
		var wg sync.WaitGroup
		results := make(chan error, n)
		start := make(chan struct{})
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				<-start
				_, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{
					ID: j.ID, Node: fmt.Sprintf("n%d", i), Owner: "o", LeaseUntil: time.Now().Add(time.Minute),
				})
				results <- err
			}(i)
		}
		close(start)
		wg.Wait()
		close(results)
		wins := 0
		for err := range results {
			switch {
			case err == nil:
				wins++
			case errors.Is(err, schema.ErrConflict):
			default:
				t.Errorf("claim: %v", err)
			}
		}
		if wins != 1 {
			t.Fatalf("%d claims won, want exactly 1", wins)
		}
		got, err := s.JobGet(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.State != schema.JobDispatched || got.Attempts != 1 || got.Node == "" || got.DispatchedAt == nil ||
			got.LeaseOwner != "o" || got.LeaseExpiresAt == nil {
			t.Errorf("claimed job = %+v", got)
		}
		_, err = s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: "missing", Node: "n", Owner: "o", LeaseUntil: time.Now()})
		wantErr(t, err, schema.ErrNotFound)
	})
}

// TestJobClaimOnlyQueued: claiming a job that is no longer queued is
// refused and changes nothing, one claim after another (no race needed).
func TestJobClaimOnlyQueued(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		until := time.Now().Add(time.Minute)
		claim := func(id, node string) (*schema.Job, error) {
			return s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: id, Node: node, Owner: "o-" + node, LeaseUntil: until})
		}
		j := mustInsert(t, s, newJob("style", "u", 0))
		if _, err := claim(j.ID, "n1"); err != nil {
			t.Fatal(err)
		}
		_, err := claim(j.ID, "n2")
		wantErr(t, err, schema.ErrConflict)
		got, err := s.JobGet(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.State != schema.JobDispatched || got.Node != "n1" || got.Attempts != 1 || got.LeaseOwner != "o-n1" {
			t.Errorf("dispatched job after a refused claim = %+v", got)
		}
		for _, st := range []schema.JobState{schema.JobRunning, schema.JobStoring, schema.JobSucceeded} {
			if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{got.State}, State: st}); err != nil {
				t.Fatal(err)
			}
			_, err := claim(j.ID, "n3")
			wantErr(t, err, schema.ErrConflict)
			if got, err = s.JobGet(ctx, j.ID); err != nil || got.State != st || got.Node != "n1" || got.Attempts != 1 {
				t.Errorf("%s job after a refused claim = %+v, %v", st, got, err)
			}
		}
	})
}

func TestJobClaimNextOrderAndNoDoubleClaim(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		base := time.Now().Add(-time.Hour)
		// Priority first, then age: insert oldest low-priority first.
		for i, prio := range []int{0, 5, 0, -3, 5} {
			j := newJob("style", "u", prio)
			j.CreatedAt = base.Add(time.Duration(i) * time.Second)
			mustInsert(t, s, j)
		}
		mustInsert(t, s, newJob("logo", "u", 100)) // another frontend's queue
		wantOrder := []string{"5/1", "5/4", "0/0", "0/2", "-3/3"}
		for _, w := range wantOrder {
			j, err := s.JobClaimNext(ctx, dbcontrollers.ClaimNextParams{Frontend: "style", Node: "n", Owner: "o", LeaseUntil: time.Now().Add(time.Minute)})
			if err != nil {
				t.Fatal(err)
			}
			got := fmt.Sprintf("%d/%d", j.Priority, int(j.CreatedAt.Sub(base.Truncate(time.Microsecond))/time.Second))
			if got != w {
				t.Fatalf("claimed %s, want %s (order %v)", got, w, wantOrder)
			}
		}
		_, err := s.JobClaimNext(ctx, dbcontrollers.ClaimNextParams{Frontend: "style", Node: "n", Owner: "o", LeaseUntil: time.Now()})
		wantErr(t, err, schema.ErrNotFound)

		// Many jobs, several workers: every job claimed exactly once.
		const jobs, workers = 60, 3
		for i := 0; i < jobs; i++ {
			mustInsert(t, s, newJob("race", "u", i%3))
		}
		var mu sync.Mutex
		claimed := map[string]int{}
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for {
					j, err := s.JobClaimNext(ctx, dbcontrollers.ClaimNextParams{
						Frontend: "race", Node: fmt.Sprintf("n%d", w), Owner: "o", LeaseUntil: time.Now().Add(time.Minute),
					})
					if errors.Is(err, schema.ErrNotFound) {
						return
					}
					if err != nil {
						t.Errorf("worker %d: %v", w, err)
						return
					}
					mu.Lock()
					claimed[j.ID]++
					mu.Unlock()
				}
			}(w)
		}
		wg.Wait()
		if len(claimed) != jobs {
			t.Errorf("%d distinct jobs claimed, want %d", len(claimed), jobs)
		}
		for id, n := range claimed {
			if n != 1 {
				t.Errorf("job %s claimed %d times", id, n)
			}
		}
	})
}

func TestJobUpdateCompareAndSet(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		j := mustInsert(t, s, newJob("style", "u", 0))

		_, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{schema.JobRunning}, State: schema.JobStoring})
		wantErr(t, err, schema.ErrConflict)
		_, err = s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: "missing", From: []schema.JobState{schema.JobQueued}, State: schema.JobCancelled})
		wantErr(t, err, schema.ErrNotFound)
		var ve *schema.ValidationError
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, State: schema.JobCancelled}); !errors.As(err, &ve) {
			t.Fatalf("update without From: %v, want ValidationError", err)
		}

		// Concurrent transitions from queued: exactly one wins.
		const n = 10
		results := make(chan error, n)
		for i := 0; i < n; i++ {
			go func(i int) {
				node := fmt.Sprintf("n%d", i)
				_, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{
					ID: j.ID, From: []schema.JobState{schema.JobQueued}, State: schema.JobDispatched, Node: &node,
				})
				results <- err
			}(i)
		}
		wins := 0
		for i := 0; i < n; i++ {
			if err := <-results; err == nil {
				wins++
			} else if !errors.Is(err, schema.ErrConflict) {
				t.Errorf("update: %v", err)
			}
		}
		if wins != 1 {
			t.Fatalf("%d transitions won, want 1", wins)
		}

		// A no-op state (empty State) keeps the state and sets fields.
		prompt, yes, charged, attempts := "p-1", true, int64(3), 4
		got, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{
			ID: j.ID, From: []schema.JobState{schema.JobDispatched, schema.JobRunning},
			PromptID: &prompt, CancelRequested: &yes, Charged: &charged, Attempts: &attempts,
		})
		if err != nil {
			t.Fatal(err)
		}
		if got.State != schema.JobDispatched || got.PromptID != "p-1" || !got.CancelRequested || got.Charged != 3 || got.Attempts != 4 {
			t.Errorf("after update: %+v", got)
		}
		empty := ""
		got, err = s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{schema.JobDispatched}, Node: &empty, PromptID: &empty})
		if err != nil || got.Node != "" || got.PromptID != "" {
			t.Errorf("clearing node/prompt: %+v, %v", got, err)
		}
	})
}

func TestJobExtendLease(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		soon := time.Now().Add(time.Minute)
		later := time.Now().Add(time.Hour)
		var mine []string
		for i := 0; i < 3; i++ {
			j := mustInsert(t, s, newJob("style", "u", 0))
			if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j.ID, Node: "n", Owner: "me", LeaseUntil: soon}); err != nil {
				t.Fatal(err)
			}
			mine = append(mine, j.ID)
		}
		theirs := mustInsert(t, s, newJob("style", "u", 0))
		if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: theirs.ID, Node: "n", Owner: "them", LeaseUntil: soon}); err != nil {
			t.Fatal(err)
		}
		// One of mine finished: its lease is not extended.
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: mine[2], From: []schema.JobState{schema.JobDispatched}, State: schema.JobSucceeded}); err != nil {
			t.Fatal(err)
		}
		queued := mustInsert(t, s, newJob("style", "u", 0))
		n, err := s.JobExtendLease(ctx, "me", append(append([]string{}, mine...), theirs.ID, queued.ID, "missing"), later)
		if err != nil {
			t.Fatal(err)
		}
		if n != 2 {
			t.Fatalf("extended %d, want 2", n)
		}
		for id, want := range map[string]time.Time{mine[0]: later, mine[1]: later, theirs.ID: soon} {
			j, err := s.JobGet(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if !j.LeaseExpiresAt.Equal(want.Truncate(time.Microsecond)) {
				t.Errorf("job %s lease %v, want %v", id, j.LeaseExpiresAt, want)
			}
		}
		// Extending again to the same time still counts the jobs held.
		if n, err := s.JobExtendLease(ctx, "me", mine, later); err != nil || n != 2 {
			t.Errorf("second extend = %d, %v; want 2", n, err)
		}
		if n, err := s.JobExtendLease(ctx, "me", nil, later); err != nil || n != 0 {
			t.Errorf("empty extend = %d, %v", n, err)
		}
	})
}

func TestJobRescue(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		now := time.Now()
		expired, alive := now.Add(-time.Second), now.Add(time.Hour)
		claim := func(until time.Time) *schema.Job {
			j := mustInsert(t, s, newJob("style", "u", 0))
			c, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j.ID, Node: "gpu-1", Owner: "o", LeaseUntil: until})
			if err != nil {
				t.Fatal(err)
			}
			return c
		}
		requeue := claim(expired) // attempts 1 < 2
		running := claim(expired)
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: running.ID, From: []schema.JobState{schema.JobDispatched}, State: schema.JobRunning}); err != nil {
			t.Fatal(err)
		}
		exhausted := claim(expired)
		two := 2
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: exhausted.ID, From: []schema.JobState{schema.JobDispatched}, Attempts: &two}); err != nil {
			t.Fatal(err)
		}
		healthy := claim(alive)
		queued := mustInsert(t, s, newJob("style", "u", 0))

		requeued, failed, err := s.JobRescue(ctx, now, 2)
		if err != nil {
			t.Fatal(err)
		}
		ids := func(js []schema.Job) map[string]schema.Job {
			m := map[string]schema.Job{}
			for _, j := range js {
				m[j.ID] = j
			}
			return m
		}
		rq, fl := ids(requeued), ids(failed)
		if len(rq) != 2 || len(fl) != 1 {
			t.Fatalf("requeued %d, failed %d; want 2 and 1", len(rq), len(fl))
		}
		for _, id := range []string{requeue.ID, running.ID} {
			j, ok := rq[id]
			if !ok || j.State != schema.JobQueued || j.Node != "" || j.LeaseExpiresAt != nil || j.LeaseOwner != "" || j.Attempts != 1 || j.DispatchedAt != nil {
				t.Errorf("requeued job %s = %+v", id, j)
			}
		}
		f, ok := fl[exhausted.ID]
		if !ok || f.State != schema.JobFailed || f.Error == nil || f.Error.Code != schema.CodeNodeLost || f.FinishedAt == nil {
			t.Errorf("failed job = %+v", f)
		}
		for _, id := range []string{healthy.ID, queued.ID} {
			j, _ := s.JobGet(ctx, id)
			if (id == healthy.ID && j.State != schema.JobDispatched) || (id == queued.ID && j.State != schema.JobQueued) {
				t.Errorf("untouched job %s changed: %+v", id, j)
			}
		}
		// Idempotent: a second pass (from another process) finds nothing.
		requeued, failed, err = s.JobRescue(ctx, now, 2)
		if err != nil || len(requeued)+len(failed) != 0 {
			t.Errorf("second rescue: %d, %d, %v", len(requeued), len(failed), err)
		}
		// The requeued job can be claimed again; attempts count on.
		c, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: requeue.ID, Node: "gpu-2", Owner: "o", LeaseUntil: alive})
		if err != nil || c.Attempts != 2 || c.Node != "gpu-2" {
			t.Errorf("reclaim: %+v, %v", c, err)
		}
		if _, _, err := s.JobRescue(ctx, now, 0); err == nil {
			t.Error("maxAttempts 0 accepted")
		}
	})
}

func TestJobRescueConcurrent(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		const jobs = 30
		for i := 0; i < jobs; i++ {
			j := mustInsert(t, s, newJob("style", "u", 0))
			if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j.ID, Node: "n", Owner: "o", LeaseUntil: time.Now().Add(-time.Minute)}); err != nil {
				t.Fatal(err)
			}
		}
		const rescuers = 3
		counts := make(chan int, rescuers)
		for i := 0; i < rescuers; i++ {
			go func() {
				rq, fl, err := s.JobRescue(ctx, time.Now(), 3)
				if err != nil {
					t.Errorf("rescue: %v", err)
				}
				counts <- len(rq) + len(fl)
			}()
		}
		total := 0
		for i := 0; i < rescuers; i++ {
			total += <-counts
		}
		if total != jobs {
			t.Errorf("rescued %d in total, want each of %d once", total, jobs)
		}
	})
}

// On MySQL the rescuer neither waits for a job another transaction holds
// (a claim or an update in progress) nor blocks on it: it takes the other
// expired jobs and leaves that one for its next round.
func TestJobRescueSkipsLockedJob(t *testing.T) {
	t.Parallel()
	cfg := dbtest.MySQL(t)
	ctx := testContext(t)
	s := openStore(t, cfg)
	var ids []string
	for i := 0; i < 3; i++ {
		j := mustInsert(t, s, newJob("style", "u", 0))
		if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j.ID, Node: "n", Owner: "o", LeaseUntil: time.Now().Add(-time.Minute)}); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, j.ID)
	}
	tx, err := s.DB().BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	var id string
	if err := tx.GetContext(ctx, &id, "SELECT id FROM jobs WHERE id = ? FOR UPDATE", ids[1]); err != nil {
		t.Fatal(err)
	}
	// InnoDB's lock wait is 50 s: a rescuer that waited would miss this.
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	rq, fl, err := s.JobRescue(rctx, time.Now(), 3)
	if err != nil {
		t.Fatalf("rescue beside a held job: %v", err)
	}
	got := map[string]bool{}
	for _, j := range append(rq, fl...) {
		got[j.ID] = true
	}
	if len(got) != 2 || !got[ids[0]] || !got[ids[2]] {
		t.Fatalf("rescued %v, want %s and %s", got, ids[0], ids[2])
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	rq, _, err = s.JobRescue(ctx, time.Now(), 3)
	if err != nil || len(rq) != 1 || rq[0].ID != ids[1] {
		t.Fatalf("next round: %v, %v; want %s", rq, err, ids[1])
	}
}

func TestJobListPagination(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		var all []string
		for i := 0; i < 25; i++ {
			all = append(all, mustInsert(t, s, newJob("style", "u-a", 0)).ID)
		}
		mustInsert(t, s, newJob("style", "u-b", 0))
		mustInsert(t, s, newJob("logo", "u-a", 0))

		var got []string
		before := ""
		for page := 0; ; page++ {
			js, err := s.JobList(ctx, schema.JobFilter{Frontend: "style", UserID: "u-a", Limit: 10, Before: before})
			if err != nil {
				t.Fatal(err)
			}
			if len(js) == 0 {
				break
			}
			if page > 3 {
				t.Fatal("pagination does not end")
			}
			for _, j := range js {
				got = append(got, j.ID)
			}
			before = js[len(js)-1].ID
		}
		if len(got) != len(all) {
			t.Fatalf("listed %d, want %d", len(got), len(all))
		}
		for i := range got {
			if got[i] != all[len(all)-1-i] {
				t.Fatalf("position %d: %s, want %s (newest first)", i, got[i], all[len(all)-1-i])
			}
		}
		if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: all[3], Node: "n", Owner: "o", LeaseUntil: time.Now()}); err != nil {
			t.Fatal(err)
		}
		js, err := s.JobList(ctx, schema.JobFilter{Frontend: "style", State: schema.JobDispatched})
		if err != nil || len(js) != 1 || js[0].ID != all[3] {
			t.Errorf("state filter: %v, %v", js, err)
		}
		js, err = s.JobList(ctx, schema.JobFilter{Frontend: "style"})
		if err != nil || len(js) != 26 {
			t.Errorf("frontend list: %d, %v; want 26", len(js), err)
		}

		byState, err := s.JobListByState(ctx, schema.JobQueued, schema.JobDispatched)
		if err != nil || len(byState) != 27 {
			t.Fatalf("by state: %d, %v; want 27", len(byState), err)
		}
		for i := 1; i < len(byState); i++ {
			if byState[i].CreatedAt.Before(byState[i-1].CreatedAt) {
				t.Fatal("JobListByState is not oldest first")
			}
		}
		counts, err := s.JobCounts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		style, logo := counts["style"], counts["logo"]
		if len(counts) != 2 || style[schema.JobQueued] != 25 || style[schema.JobDispatched] != 1 ||
			logo[schema.JobQueued] != 1 || len(style) != len(schema.JobStates) || len(logo) != len(schema.JobStates) {
			t.Errorf("counts = %v", counts)
		}
	})
}

func TestNodeCRUD(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		n := &schema.Node{Name: "gpu-1", URL: "http://127.0.0.1:8188", Tags: []string{"sdxl", "a100"}, Source: "config"}
		if err := s.NodeUpsert(ctx, n); err != nil {
			t.Fatal(err)
		}
		if n.MaxInflight != 1 || n.CreatedAt.IsZero() || n.Drain {
			t.Errorf("after insert: %+v", n)
		}
		for i := 0; i < 2; i++ { // setting the same flag twice is fine
			if err := s.NodeSetDrain(ctx, "gpu-1", true); err != nil {
				t.Fatal(err)
			}
		}
		// Re-registering keeps the drain and the creation time.
		again := &schema.Node{Name: "gpu-1", URL: "http://127.0.0.1:8189", MaxInflight: 2}
		if err := s.NodeUpsert(ctx, again); err != nil {
			t.Fatal(err)
		}
		if !again.Drain || again.URL != "http://127.0.0.1:8189" || again.MaxInflight != 2 || !again.CreatedAt.Equal(n.CreatedAt) ||
			len(again.Tags) != 0 || again.Source != "api" {
			t.Errorf("after update: %+v", again)
		}
		if err := s.NodeUpsert(ctx, &schema.Node{Name: "gpu-0", URL: "http://127.0.0.1:8190"}); err != nil {
			t.Fatal(err)
		}
		list, err := s.NodeList(ctx)
		if err != nil || len(list) != 2 || list[0].Name != "gpu-0" || list[1].Name != "gpu-1" {
			t.Fatalf("list = %+v, %v", list, err)
		}
		got, err := s.NodeGet(ctx, "gpu-1")
		if err != nil || !reflect.DeepEqual(got, again) {
			t.Errorf("get = %+v, %v; want %+v", got, err, again)
		}
		if err := s.NodeDelete(ctx, "gpu-1"); err != nil {
			t.Fatal(err)
		}
		_, err = s.NodeGet(ctx, "gpu-1")
		wantErr(t, err, schema.ErrNotFound)
		wantErr(t, s.NodeDelete(ctx, "gpu-1"), schema.ErrNotFound)
		wantErr(t, s.NodeSetDrain(ctx, "gpu-1", false), schema.ErrNotFound)
		var ve *schema.ValidationError
		if err := s.NodeUpsert(ctx, &schema.Node{Name: "x"}); !errors.As(err, &ve) {
			t.Errorf("node without url: %v", err)
		}
	})
}

// JobIDsEnded picks the ended jobs out of a list longer than one query's
// chunk, leaving out queued and unknown ids.
func TestJobIDsEnded(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		ctx := testContext(t)
		s := openStore(t, cfg)
		var ids []string
		want := map[string]bool{}
		for i := range 1100 {
			j := mustInsert(t, s, newJob("alpha", "u", 0))
			ids = append(ids, j.ID)
			if i%100 == 7 {
				if _, err := s.JobUpdate(ctx, dbcontrollers.JobCancelQueued(j.ID, time.Now())); err != nil {
					t.Fatal(err)
				}
				want[j.ID] = true
			}
		}
		ids = append(ids, "01NOSUCHJOB0000000000000000")
		got, err := s.JobIDsEnded(ctx, ids)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(want) {
			t.Fatalf("%d ended ids, want %d", len(got), len(want))
		}
		for _, id := range got {
			if !want[id] {
				t.Fatalf("%s is not ended", id)
			}
		}
	})
}

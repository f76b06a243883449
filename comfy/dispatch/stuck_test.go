package dispatch

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// flakyJobStore fails the next JobGet once armed (a database hiccup).
type flakyJobStore struct {
	JobStore
	failGet atomic.Bool
}

func (s *flakyJobStore) JobGet(ctx context.Context, id string) (*schema.Job, error) {
	if s.failGet.CompareAndSwap(true, false) {
		return nil, errors.New("injected: database connection reset")
	}
	return s.JobStore.JobGet(ctx, id)
}

// flakyGetStore fails the next Get once armed (storage hiccup).
type flakyGetStore struct {
	oss.Store
	failGet atomic.Bool
}

func (s *flakyGetStore) Get(ctx context.Context, key string) (io.ReadCloser, oss.ObjectInfo, error) {
	if s.failGet.CompareAndSwap(true, false) {
		return nil, oss.ObjectInfo{}, errors.New("injected: storage unreachable")
	}
	return s.Store.Get(ctx, key)
}

// restartWithStore stops e's farm and starts a new one (same databases,
// nodes and storage) whose job store is wrapped.
func (e *farmEnv) restartWithStore(wrap func(JobStore) JobStore) {
	t := e.t
	e.stop()
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.done = make(chan struct{})
	e.nodes = NewNodes(e.store, ProbeConfig{Interval: 50 * time.Millisecond, Timeout: 2 * time.Second, SlowThreshold: 2 * time.Second, Jitter: -1}, testLogger())
	var list []schema.Node
	for _, name := range e.names {
		list = append(list, schema.Node{Name: name, URL: e.fakes[name].URL(), MaxInflight: 1})
	}
	if err := e.nodes.Load(ctx, list); err != nil {
		t.Fatal(err)
	}
	cfg := FarmConfig{
		StallTimeout: 2 * time.Second, ReconcileEvery: 150 * time.Millisecond, Lease: 3 * time.Second,
		HistoryWait: 5 * time.Second, Logger: testLogger(),
	}
	e.farm = NewFarm(cfg, wrap(e.store), e.reg, e.storage, e.nodes)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = e.nodes.Run(ctx) }()
	go func() { defer wg.Done(); _ = e.farm.Run(ctx) }()
	go func() { wg.Wait(); close(e.done) }()
	for _, name := range e.names {
		e.eventually(10*time.Second, "node "+name+" up", func() bool {
			v, ok := e.nodes.Get(name)
			return ok && v.State == schema.NodeUp
		})
	}
	<-e.farm.started
}

// prepare fails (input unreadable for a moment) and the requeue that follows
// cannot read the job (database hiccup): requeue returns before forget, the
// active entry keeps promptID "" so reconcile skips it forever, heartbeat
// keeps extending its lease so the rescuer never takes it. The job stays
// dispatched forever and the node's only slot stays taken.
// Expected: the job is retried and succeeds.
func TestPrepareFailureWithDBHiccupDoesNotStickJob(t *testing.T) {
	fs := &flakyGetStore{}
	local, err := oss.NewLocal(oss.LocalConfig{Dir: t.TempDir(), BaseURL: "http://127.0.0.1:1/files/"})
	if err != nil {
		t.Fatal(err)
	}
	fs.Store = local
	e := newFarmEnvWith(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil, fs, nil)
	var js *flakyJobStore
	e.restartWithStore(func(s JobStore) JobStore { js = &flakyJobStore{JobStore: s}; return js })
	e.fakes["n1"].Hold()
	js.failGet.Store(true)
	fs.failGet.Store(true)
	j, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: "alpha", UserID: "stuck", Workflow: loadImageGraph,
		Inputs: []schema.InputFile{inputFile("cat.png", testPNG(t, 40, 30))}})
	if err != nil {
		t.Fatal(err)
	}
	e.fakes["n1"].Release()
	// Recovery goes through the lease running out (3 s) and the rescuer;
	// the deadline only bounds a job that stays stuck for good, with room
	// for a loaded machine.
	const limit = 30 * time.Second
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if st := e.job(j.ID).State; st == schema.JobSucceeded {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := e.job(j.ID)
	rt := e.farm.runtime("n1")
	ids := e.farm.runner("n1").activeIDs()
	t.Fatalf("job still %s after %v (lease extended to %v); runner n1 inflight=%d following %v (job followed: %v)",
		got.State, limit, got.LeaseExpiresAt, rt.Inflight, ids, slices.Contains(ids, j.ID))
}

// hookJobStore runs hook(id, job) after a JobGet when set.
type hookJobStore struct {
	JobStore
	hook atomic.Pointer[func(id string, j *schema.Job)]
}

func (s *hookJobStore) JobGet(ctx context.Context, id string) (*schema.Job, error) {
	j, err := s.JobStore.JobGet(ctx, id)
	if h := s.hook.Load(); h != nil && err == nil {
		(*h)(id, j)
	}
	return j, err
}

// Cancel of a queued job that the scheduler claims between Cancel's read and
// its queue removal: Remove finds nothing (pj == nil), the CAS from queued
// conflicts, and the retry is taken only when pj != nil — the reverse of the
// case that needs it. The caller gets a conflict for a job that is merely
// dispatched, and the job runs.
// Expected: the job is cancelled.
func TestCancelQueuedRacingClaim(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	var hs *hookJobStore
	e.restartWithStore(func(s JobStore) JobStore { hs = &hookJobStore{JobStore: s}; return hs })
	node := e.fakes["n1"]
	node.Hold()
	a := e.submit("alpha", "race", sdGraph(ckptXL, 1, 1), 0)
	e.waitState(a.ID, schema.JobDispatched, 10*time.Second)
	b := e.submit("alpha", "race", sdGraph(ckptXL, 1, 2), 0)
	ctx := context.Background()
	var once sync.Once
	hook := func(id string, j *schema.Job) {
		if id != b.ID || j.State != schema.JobQueued {
			return
		}
		once.Do(func() {
			// While Cancel(b) holds its (now stale) read, a's slot frees
			// and the scheduler claims b.
			if _, err := e.farm.Cancel(ctx, "alpha", a.ID); err != nil {
				t.Errorf("cancel a: %v", err)
			}
			e.eventually(10*time.Second, "b claimed", func() bool {
				cur, _ := hs.JobStore.JobGet(ctx, b.ID)
				return cur.State == schema.JobDispatched
			})
		})
	}
	hs.hook.Store(&hook)
	got, err := e.farm.Cancel(ctx, "alpha", b.ID)
	hs.hook.Store(nil)
	if err != nil || got.State != schema.JobCancelled {
		t.Fatalf("cancel of a job claimed meanwhile: %+v, %v; want it cancelled (db state now %s)", got, err, e.job(b.ID).State)
	}
}

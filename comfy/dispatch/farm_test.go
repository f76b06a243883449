package dispatch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// sdGraph is a text-to-image workflow on the fake's SD classes.
func sdGraph(ckpt string, steps int, seed int) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": %q}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
 "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": %d, "steps": %d, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
}`, ckpt, seed, steps))
}

const (
	ckptXL = "sd_xl_base_1.0.safetensors"
	ckpt15 = "v1-5-pruned-emaonly.safetensors"
)

type farmEnv struct {
	t        testing.TB
	dbcfg    dbcontrollers.Config
	control  *dbcontrollers.DB
	store    *dbcontrollers.Store
	reg      *dbcontrollers.Registry
	local    *oss.Local
	localDir string
	storage  oss.Store
	fakes    map[string]*comfytest.Server
	names    []string
	mod      func(*FarmConfig)
	probeMod func(*ProbeConfig)
	nodeURL  func(name string, s *comfytest.Server) string

	nodes  *Nodes
	farm   *Farm
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	passes []schedPass
	sig    *testSignals // the farm's background rounds, kept across restarts
}

type schedPass struct {
	dispatched []string
	positions  map[string]int
}

func testLogger() *slog.Logger {
	if os.Getenv("COMFYFARM_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// newFarmEnv starts fake nodes, the databases, local storage, the registry
// and a farm. Nodes are named n1, n2, ... in the order of opts.
func newFarmEnv(t testing.TB, dbcfg dbcontrollers.Config, opts []comfytest.Options, mod func(*FarmConfig)) *farmEnv {
	t.Helper()
	return newFarmEnvWith(t, dbcfg, opts, mod, nil, nil)
}

// newFarmEnvWith is newFarmEnv with a storage backend (nil: local disk) and
// a wrapper for node URLs (nil: the fakes' own).
func newFarmEnvWith(t testing.TB, dbcfg dbcontrollers.Config, opts []comfytest.Options, mod func(*FarmConfig), storage oss.Store, nodeURL func(name string, s *comfytest.Server) string) *farmEnv {
	t.Helper()
	return newFarmEnvProbe(t, dbcfg, opts, mod, storage, nodeURL, nil)
}

// newFarmEnvProbe is newFarmEnvWith with a change to the prober's settings.
func newFarmEnvProbe(t testing.TB, dbcfg dbcontrollers.Config, opts []comfytest.Options, mod func(*FarmConfig), storage oss.Store, nodeURL func(name string, s *comfytest.Server) string, probeMod func(*ProbeConfig)) *farmEnv {
	t.Helper()
	ctx := context.Background()
	e := &farmEnv{t: t, dbcfg: dbcfg, fakes: map[string]*comfytest.Server{}, mod: mod, probeMod: probeMod, sig: newTestSignals()}
	var err error
	if e.control, err = dbcontrollers.OpenControl(ctx, dbcfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.control.Close() })
	e.store = dbcontrollers.NewStore(e.control)
	e.reg, err = dbcontrollers.NewRegistry(ctx, dbcfg, []dbcontrollers.FrontendConfig{
		{Name: "style", Controller: "style", InitialCredits: 5, CostPerJob: 1},
		{Name: "logo", Controller: "logo"},
		{Name: "alpha"},
		{Name: "beta"},
		{Name: "keeper", KeepTempOutputs: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.reg.Close() })
	e.localDir = t.TempDir()
	if e.local, err = oss.NewLocal(oss.LocalConfig{Dir: e.localDir, BaseURL: "http://127.0.0.1:1/files/"}); err != nil {
		t.Fatal(err)
	}
	e.storage = e.local
	if storage != nil {
		e.storage = storage
	}
	e.nodeURL = nodeURL
	for i, o := range opts {
		name := fmt.Sprintf("n%d", i+1)
		s := comfytest.NewServer(o)
		t.Cleanup(s.Close)
		e.fakes[name] = s
		e.names = append(e.names, name)
	}
	e.start()
	t.Cleanup(e.stop)
	return e
}

func (e *farmEnv) start() {
	t := e.t
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.done = make(chan struct{})
	pcfg := ProbeConfig{Interval: 50 * time.Millisecond, Timeout: 2 * time.Second, SlowThreshold: 2 * time.Second, Jitter: -1}
	if e.probeMod != nil {
		e.probeMod(&pcfg)
	}
	e.nodes = NewNodes(e.store, pcfg, testLogger())
	var list []schema.Node
	for _, name := range e.names {
		u := e.fakes[name].URL()
		if e.nodeURL != nil {
			u = e.nodeURL(name, e.fakes[name])
		}
		list = append(list, schema.Node{Name: name, URL: u, MaxInflight: 1})
	}
	if err := e.nodes.Load(ctx, list); err != nil {
		t.Fatal(err)
	}
	cfg := FarmConfig{
		StallTimeout: 2 * time.Second, ReconcileEvery: 150 * time.Millisecond, Lease: 3 * time.Second,
		HistoryWait: 5 * time.Second, Logger: testLogger(),
	}
	if e.mod != nil {
		e.mod(&cfg)
	}
	e.farm = NewFarm(cfg, e.store, e.reg, e.storage, e.nodes)
	e.farm.sig = e.sig
	e.farm.onSchedule = func(d []string, p map[string]int) {
		e.mu.Lock()
		e.passes = append(e.passes, schedPass{slices.Clone(d), p})
		e.mu.Unlock()
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = e.nodes.Run(ctx) }()
	go func() { defer wg.Done(); _ = e.farm.Run(ctx) }()
	go func() { wg.Wait(); close(e.done) }()
	for _, name := range e.names {
		name := name
		e.eventually(10*time.Second, "node "+name+" up", func() bool {
			v, ok := e.nodes.Get(name)
			return ok && v.State == schema.NodeUp
		})
	}
	<-e.farm.started
	// Every runner's event stream open: a job posted before it connects is
	// followed by asking the node, not by its events (a test of the stream
	// path would then take the other path).
	for _, name := range e.names {
		e.eventually(10*time.Second, "the event stream of "+name, func() bool {
			r := e.farm.runner(name)
			if r == nil {
				return false
			}
			r.mu.Lock()
			defer r.mu.Unlock()
			return r.connected
		})
	}
}

// reconciles waits for n reconcile rounds of node's runner (counting those
// since the last wait).
func (e *farmEnv) reconciles(node string, n int) {
	e.t.Helper()
	deadline := time.After(30 * time.Second)
	for n > 0 {
		select {
		case got := <-e.sig.reconciled:
			if got == node {
				n--
			}
		case <-deadline:
			e.t.Fatalf("no reconcile round of %s", node)
		}
	}
}

// nodeChangeSeen waits until the farm has acted on a change of node.
func (e *farmEnv) nodeChangeSeen(node string, removed bool) {
	e.t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case ch := <-e.sig.nodeChanged:
			if ch.Name == node && ch.Removed == removed {
				return
			}
		case <-deadline:
			e.t.Fatalf("the farm did not act on the change of %s", node)
		}
	}
}

func (e *farmEnv) stop() {
	if e.cancel == nil {
		return
	}
	e.cancel()
	select {
	case <-e.done:
	case <-time.After(20 * time.Second):
		e.t.Error("farm did not stop")
	}
	e.cancel = nil
}

func (e *farmEnv) eventually(d time.Duration, what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (e *farmEnv) submit(frontend, user string, g json.RawMessage, prio int) *schema.Job {
	e.t.Helper()
	j, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: frontend, UserID: user, Workflow: g, Priority: prio})
	if err != nil {
		e.t.Fatalf("submit: %v", err)
	}
	return j
}

func (e *farmEnv) job(id string) *schema.Job {
	e.t.Helper()
	j, err := e.store.JobGet(context.Background(), id)
	if err != nil {
		e.t.Fatal(err)
	}
	return j
}

func (e *farmEnv) waitState(id string, want schema.JobState, d time.Duration) *schema.Job {
	e.t.Helper()
	var j *schema.Job
	e.eventually(d, fmt.Sprintf("job %s %s", id, want), func() bool {
		j = e.job(id)
		if j.State.Terminal() && j.State != want {
			e.t.Fatalf("job %s ended %s (error %+v), want %s", id, j.State, j.Error, want)
		}
		return j.State == want
	})
	return j
}

func (e *farmEnv) holdAll() {
	for _, s := range e.fakes {
		s.Hold()
	}
}

func (e *farmEnv) releaseAll() {
	for _, s := range e.fakes {
		s.Release()
	}
}

func drain(t *testing.T, ch <-chan schema.Event, d time.Duration) []schema.Event {
	t.Helper()
	var out []schema.Event
	timeout := time.After(d)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return out
			}
			out = append(out, ev)
		case <-timeout:
			t.Fatalf("stream not closed after %v; got %d events", d, len(out))
		}
	}
}

func sdOptions() comfytest.Options {
	return comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 40 * time.Millisecond}}
}

// Submit -> queued -> dispatched -> running with progress -> storing ->
// succeeded, with the object in storage and a photo row in the frontend DB.
func TestFarmEndToEnd(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnv(t, cfg, []comfytest.Options{sdOptions(), sdOptions()}, nil)
		ctx := context.Background()
		e.holdAll()
		j := e.submit("style", "u-42", sdGraph(ckptXL, 4, 1), 0)
		if j.State != schema.JobQueued || j.ID == "" {
			t.Fatalf("submitted job = %+v", j)
		}
		ch, cancel, err := e.farm.Subscribe(ctx, j.ID, 0, false)
		if err != nil {
			t.Fatal(err)
		}
		defer cancel()
		e.releaseAll()
		evs := drain(t, ch, 30*time.Second)

		var types []schema.EventType
		progress := 0
		for i, ev := range evs {
			if i > 0 && ev.Seq <= evs[i-1].Seq {
				t.Fatalf("seq not increasing: %d after %d", ev.Seq, evs[i-1].Seq)
			}
			if ev.Type == schema.EventProgress {
				progress++
				if ev.Max == nil || *ev.Max != 4 || ev.NodeID != "3" {
					t.Fatalf("progress event %+v", ev)
				}
				continue
			}
			if len(types) == 0 || types[len(types)-1] != ev.Type {
				types = append(types, ev.Type)
			}
		}
		if evs[0].Type != schema.EventSnapshot {
			t.Fatalf("first event %s, want snapshot", evs[0].Type)
		}
		// The snapshot may already show the job dispatched.
		want := []schema.EventType{schema.EventRunning, schema.EventExecuted, schema.EventStoring, schema.EventSucceeded}
		if !isSubsequence(want, types) {
			t.Fatalf("event types %v do not contain %v in order", types, want)
		}
		if progress < 1 {
			t.Fatalf("no progress events")
		}
		last := evs[len(evs)-1]
		if len(last.Outputs) != 1 {
			t.Fatalf("succeeded outputs = %+v", last.Outputs)
		}
		out := last.Outputs[0]
		if out.ContentType != "image/png" || out.Width != 64 || out.Height != 48 || out.Key == "" || out.PhotoID == 0 {
			t.Fatalf("output = %+v", out)
		}
		rc, info, err := e.storage.Get(ctx, out.Key)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(rc)
		rc.Close()
		sum := sha256.Sum256(data)
		if hex.EncodeToString(sum[:]) != out.SHA256 || info.ContentType != "image/png" || int64(len(data)) != out.Bytes {
			t.Fatalf("stored object does not match the output: %d bytes %s", len(data), info.ContentType)
		}
		ctrl, _ := e.reg.Get("style")
		photos, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "u-42", Page: 1, Limit: 10})
		if err != nil || total != 1 || photos[0].ObjectKey != out.Key || photos[0].JobID != j.ID || photos[0].ID != out.PhotoID {
			t.Fatalf("photos = %+v total %d err %v", photos, total, err)
		}
		u, err := ctrl.UserGet(ctx, ctrl.DB(), "u-42")
		if err != nil || u.Credits != 4 {
			t.Fatalf("user after one job = %+v, %v (want 4 credits)", u, err)
		}
		view, err := e.farm.Job(ctx, "style", j.ID)
		if err != nil || view.State != schema.JobSucceeded || view.Attempts != 1 || view.Node == "" || view.FinishedAt == nil {
			t.Fatalf("job view = %+v, %v", view, err)
		}
		if _, err := e.farm.Job(ctx, "logo", j.ID); !errors.Is(err, schema.ErrNotFound) {
			t.Fatalf("another frontend read the job: %v", err)
		}
	})
}

func isSubsequence(want, got []schema.EventType) bool {
	i := 0
	for _, g := range got {
		if i < len(want) && g == want[i] {
			i++
		}
	}
	return i == len(want)
}

// 20 jobs from two frontends on 2 nodes: every position the farm publishes is
// the number of those jobs that really start before it; B's job is not held
// up by A's backlog.
func TestFarmPositionsAndFairness(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnv(t, cfg, []comfytest.Options{sdOptions(), sdOptions()}, nil)
		ctx := context.Background()
		e.holdAll()
		var ids []string
		for i := 0; i < 14; i++ {
			ids = append(ids, e.submit("alpha", "a", sdGraph(ckptXL, 2, i), 0).ID)
		}
		e.eventually(10*time.Second, "two jobs dispatched", func() bool {
			return e.fakes["n1"].Stats().Submitted+e.fakes["n2"].Stats().Submitted == 2
		})
		var betas []string
		for i := 0; i < 6; i++ {
			betas = append(betas, e.submit("beta", "b", sdGraph(ckptXL, 2, 100+i), 0).ID)
		}
		ids = append(ids, betas...)

		// While the nodes are held nothing moves: the API agrees with the
		// published positions, and B's first job is next.
		e.mu.Lock()
		lastPos := e.passes[len(e.passes)-1].positions
		e.mu.Unlock()
		if len(lastPos) != 18 {
			t.Fatalf("%d queued positions, want 18", len(lastPos))
		}
		for id, p := range lastPos {
			v, err := e.farm.Job(ctx, e.job(id).Frontend, id)
			if err != nil || v.Position != p || v.State != schema.JobQueued {
				t.Fatalf("job %s view position %d state %s, published %d (%v)", id, v.Position, v.State, p, err)
			}
			qs, err := e.farm.QueueStatus(ctx, v.Frontend, id)
			if err != nil || qs.Ahead != p || qs.Running {
				t.Fatalf("queue status %+v, %v", qs, err)
			}
		}
		if p := lastPos[betas[0]]; p > 1 {
			t.Fatalf("beta's first job has %d ahead behind alpha's backlog, want at most 1", p)
		}

		e.releaseAll()
		for _, id := range ids {
			e.waitState(id, schema.JobSucceeded, 60*time.Second)
		}
		e.mu.Lock()
		passes := slices.Clone(e.passes)
		e.mu.Unlock()
		var order []string
		for _, p := range passes {
			order = append(order, p.dispatched...)
		}
		if len(order) != 20 {
			t.Fatalf("%d dispatches, want 20", len(order))
		}
		checked := 0
		started := 0
		for _, p := range passes {
			started += len(p.dispatched)
			var rest []string
			for _, id := range order[started:] {
				if _, ok := p.positions[id]; ok {
					rest = append(rest, id)
				}
			}
			if len(rest) != len(p.positions) {
				t.Fatalf("a published position belongs to a job that never started")
			}
			for i, id := range rest {
				if p.positions[id] != i {
					t.Fatalf("job %s published at position %d, but %d jobs started before it", id, p.positions[id], i)
				}
				checked++
			}
		}
		if checked < 100 {
			t.Fatalf("only %d positions checked", checked)
		}
		// Fairness: after beta's first job was queued, at most one job per
		// node started before it.
		firstBeta := slices.Index(order, betas[0])
		if firstBeta-2 > 2 {
			t.Fatalf("beta's first job started %dth", firstBeta+1)
		}
	})
}

// A graph that loads checkpoint X goes to the node that has X loaded.
func TestFarmCheckpointAffinity(t *testing.T) {
	o := sdOptions()
	o.CheckpointLoad = 50 * time.Millisecond
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{o, o}, nil)
	j1 := e.waitState(e.submit("alpha", "a", sdGraph(ckptXL, 2, 1), 0).ID, schema.JobSucceeded, 30*time.Second)
	j2 := e.waitState(e.submit("alpha", "a", sdGraph(ckpt15, 2, 2), 0).ID, schema.JobSucceeded, 30*time.Second)
	if j1.Node == j2.Node {
		t.Fatalf("both first jobs ran on %s; round robin should have spread them", j1.Node)
	}
	// Round robin alone would now pick j1's node; affinity must pick j2's.
	j3 := e.waitState(e.submit("alpha", "a", sdGraph(ckpt15, 2, 3), 0).ID, schema.JobSucceeded, 30*time.Second)
	if j3.Node != j2.Node {
		t.Fatalf("job with %s ran on %s, but %s has it loaded", ckpt15, j3.Node, j2.Node)
	}
	j4 := e.waitState(e.submit("alpha", "a", sdGraph(ckptXL, 2, 4), 0).ID, schema.JobSucceeded, 30*time.Second)
	if j4.Node != j1.Node {
		t.Fatalf("job with %s ran on %s, but %s has it loaded", ckptXL, j4.Node, j1.Node)
	}
	v, _ := e.nodes.Get(j2.Node)
	if !slices.Contains(v.ModelsLoaded, ckpt15) || v.JobsDone != 2 {
		t.Fatalf("node view %+v", v)
	}
}

// Cancel works queued, dispatched (in the node's queue) and running; a
// finished job answers ErrTerminal; credits come back.
func TestFarmCancelInEveryState(t *testing.T) {
	o := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 3 * time.Second}}
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{o}, nil)
	ctx := context.Background()
	node := e.fakes["n1"]
	ctrl, _ := e.reg.Get("style")
	credits := func() int64 {
		u, err := ctrl.UserGet(ctx, ctrl.DB(), "c")
		if err != nil {
			t.Fatal(err)
		}
		return u.Credits
	}

	node.Hold()
	j1 := e.submit("style", "c", sdGraph(ckptXL, 30, 1), 0)
	j2 := e.submit("style", "c", sdGraph(ckptXL, 30, 2), 0)
	e.waitState(j1.ID, schema.JobDispatched, 10*time.Second)
	e.eventually(10*time.Second, "j1 in the node's queue", func() bool { return len(node.Stats().Pending) == 1 })
	if c := credits(); c != 3 {
		t.Fatalf("credits after two submits = %d, want 3", c)
	}

	// Queued.
	got, err := e.farm.Cancel(ctx, "style", j2.ID)
	if err != nil || got.State != schema.JobCancelled {
		t.Fatalf("cancel queued: %+v %v", got, err)
	}
	// Dispatched: removed from the node's own queue.
	got, err = e.farm.Cancel(ctx, "style", j1.ID)
	if err != nil || got.State != schema.JobCancelled {
		t.Fatalf("cancel dispatched: %+v %v", got, err)
	}
	e.eventually(5*time.Second, "node queue empty", func() bool { return len(node.Stats().Pending) == 0 })
	if c := credits(); c != 5 {
		t.Fatalf("credits after two cancels = %d, want 5", c)
	}

	// Running: interrupted on the node.
	node.Release()
	j3 := e.submit("style", "c", sdGraph(ckptXL, 30, 3), 0)
	e.eventually(15*time.Second, "j3 running with progress", func() bool {
		v, _ := e.farm.Job(ctx, "style", j3.ID)
		return v.State == schema.JobRunning && v.Progress != nil
	})
	got, err = e.farm.Cancel(ctx, "style", j3.ID)
	if err != nil || got.State != schema.JobCancelled {
		t.Fatalf("cancel running: %+v %v", got, err)
	}
	e.eventually(10*time.Second, "node idle after interrupt", func() bool { return node.Stats().Running == "" })
	if _, err := e.farm.Cancel(ctx, "style", j3.ID); !errors.Is(err, schema.ErrTerminal) {
		t.Fatalf("second cancel: %v, want ErrTerminal", err)
	}
	photos, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "c", Page: 1, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if total != 0 {
		t.Fatalf("cancelled jobs left photos: %+v", photos)
	}

	// The node is usable afterwards and the slot was given back.
	j4 := e.submit("style", "c", sdGraph(ckptXL, 1, 4), 0)
	e.waitState(j4.ID, schema.JobSucceeded, 30*time.Second)
	if _, err := e.farm.Cancel(ctx, "style", j4.ID); !errors.Is(err, schema.ErrTerminal) {
		t.Fatalf("cancel succeeded job: %v", err)
	}
}

// 1,000 subscribers on one job all get its terminal event.
func TestFarmThousandSubscribers(t *testing.T) {
	o := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 300 * time.Millisecond}}
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{o}, nil)
	e.holdAll()
	j := e.submit("alpha", "a", sdGraph(ckptXL, 20, 1), 0)
	const n = 1000
	results := make(chan schema.EventType, n)
	for i := 0; i < n; i++ {
		ch, cancel, err := e.farm.Subscribe(context.Background(), j.ID, 0, false)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			defer cancel()
			var last schema.EventType
			for ev := range ch {
				last = ev.Type
			}
			results <- last
		}()
	}
	e.releaseAll()
	for i := 0; i < n; i++ {
		select {
		case typ := <-results:
			if typ != schema.EventSucceeded {
				t.Fatalf("a subscriber ended on %q", typ)
			}
		case <-time.After(60 * time.Second):
			t.Fatalf("only %d of %d subscribers got the terminal event", i, n)
		}
	}
}

// A node killed mid-job: the job is requeued and finishes on the other node,
// once, with one photo.
func TestFarmNodeCrashRequeues(t *testing.T) {
	o := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 1500 * time.Millisecond}}
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{o, o}, nil)
	j := e.submit("alpha", "crash", sdGraph(ckptXL, 10, 1), 0)
	running := e.waitState(j.ID, schema.JobRunning, 15*time.Second)
	e.fakes[running.Node].Crash()
	done := e.waitState(j.ID, schema.JobSucceeded, 60*time.Second)
	if done.Node == running.Node || done.Attempts != 2 {
		t.Fatalf("job finished on %s after %d attempts (crashed node %s)", done.Node, done.Attempts, running.Node)
	}
	ctrl, _ := e.reg.Get("alpha")
	_, total, err := ctrl.PhotoList(context.Background(), ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "crash", Page: 1, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if total != 1 {
		t.Fatalf("%d photos, want 1", total)
	}
}

// comfyfarm stopped while a job runs: the next start adopts it from the
// node and finishes it without running it again.
func TestFarmRestartAdoptsRunningJob(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		o := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 1500 * time.Millisecond}}
		e := newFarmEnv(t, cfg, []comfytest.Options{o}, nil)
		j := e.submit("alpha", "r", sdGraph(ckptXL, 10, 1), 0)
		e.waitState(j.ID, schema.JobRunning, 15*time.Second)
		e.stop()
		if st := e.job(j.ID).State; st != schema.JobRunning {
			t.Fatalf("after stop the job is %s", st)
		}
		e.start()
		done := e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
		if done.Attempts != 1 || e.fakes["n1"].Stats().Submitted != 1 {
			t.Fatalf("attempts %d, node got %d prompts; want the first run adopted", done.Attempts, e.fakes["n1"].Stats().Submitted)
		}
	})
}

// Every protocol generation completes jobs: execution_success (classic,
// current) or executing(null) alone (2023-era).
func TestFarmGenerations(t *testing.T) {
	for _, gen := range []comfytest.Generation{comfytest.GenLegacy, comfytest.GenClassic, comfytest.GenCurrent} {
		t.Run(gen.String(), func(t *testing.T) {
			o := sdOptions()
			o.Generation = gen
			e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{o}, nil)
			j := e.submit("alpha", "g", sdGraph(ckptXL, 3, 1), 0)
			done := e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
			if len(done.Outputs) != 1 || done.Outputs[0].Width != 64 {
				t.Fatalf("outputs %+v", done.Outputs)
			}
			// Servers that end a prompt with execution_success had its
			// outputs in the executed frames; 2023-era ones are asked for
			// the history entry.
			reads := e.farm.runner("n1").historyReads.Load()
			if wantReads := gen == comfytest.GenLegacy; (reads > 0) != wantReads {
				t.Fatalf("history read %d times", reads)
			}
		})
	}
}

// The outputs taken from the executed frames are those the history entry
// lists, also for a prompt run again whose output node is cached (ComfyUI
// sends executed for it again, and writes no new file).
func TestFarmOutputsFromStreamMatchHistory(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	r := e.farm.runner("n1")
	for i := range 2 {
		j := e.submit("alpha", "s", sdGraph(ckptXL, 3, 7), 0)
		done := e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
		h, err := r.client.History(context.Background(), done.PromptID)
		if err != nil {
			t.Fatal(err)
		}
		files := keptFiles(h.Files(), false)
		if len(files) == 0 || len(done.Outputs) != len(files) {
			t.Fatalf("run %d: outputs %+v, history files %+v", i, done.Outputs, files)
		}
		for k, fr := range files {
			if done.Outputs[k].Filename != safeBase(fr.Filename) || done.Outputs[k].NodeID != fr.NodeID {
				t.Fatalf("run %d: output %d is %+v, history has %+v", i, k, done.Outputs[k], fr)
			}
		}
	}
	if n := r.historyReads.Load(); n != 0 {
		t.Fatalf("history read %d times", n)
	}
}

// A workflow that raises on the node fails at once, without retry, and its
// credits come back.
func TestFarmExecutionErrorFailsWithoutRetry(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	g := json.RawMessage(`{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
 "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 1.0}},
 "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}`)
	j := e.submit("style", "err", g, 0)
	done := e.waitState(j.ID, schema.JobFailed, 30*time.Second)
	if done.Attempts != 1 || done.Error == nil || done.Error.Code != schema.CodeExecutionError || done.Error.NodeID != "2" {
		t.Fatalf("failed job %+v error %+v", done, done.Error)
	}
	// The refund follows the state change.
	ctrl, _ := e.reg.Get("style")
	e.eventually(10*time.Second, "refund of the failed job", func() bool {
		u, err := ctrl.UserGet(context.Background(), ctrl.DB(), "err")
		return err == nil && u.Credits == 5
	})
}

// Bad submissions are refused with a validation error and leave nothing.
func TestFarmSubmitValidation(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	ctx := context.Background()
	e.eventually(10*time.Second, "node catalogue", func() bool {
		r := e.farm.runner("n1")
		return r != nil && r.knownClasses() != nil
	})
	cases := map[string]schema.SubmitParams{
		"dangling link":  {Frontend: "alpha", UserID: "v", Workflow: json.RawMessage(`{"1":{"class_type":"SaveImage","inputs":{"images":["9",0]}}}`)},
		"no class_type":  {Frontend: "alpha", UserID: "v", Workflow: json.RawMessage(`{"1":{"inputs":{}}}`)},
		"not an object":  {Frontend: "alpha", UserID: "v", Workflow: json.RawMessage(`[1,2]`)},
		"no user":        {Frontend: "alpha", Workflow: sdGraph(ckptXL, 1, 1)},
		"priority":       {Frontend: "alpha", UserID: "v", Workflow: sdGraph(ckptXL, 1, 1), Priority: 101},
		"metadata array": {Frontend: "alpha", UserID: "v", Workflow: sdGraph(ckptXL, 1, 1), Metadata: json.RawMessage(`[1]`)},
	}
	names := make([]string, 0, len(cases))
	for n := range cases {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		_, err := e.farm.Submit(ctx, cases[name])
		var ve *schema.ValidationError
		if !errors.As(err, &ve) {
			t.Errorf("%s: err = %v, want a validation error", name, err)
		}
	}
	_, err := e.farm.Submit(ctx, schema.SubmitParams{Frontend: "alpha", UserID: "v",
		Workflow: json.RawMessage(`{"1":{"class_type":"NotInstalledAnywhere","inputs":{}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}`)})
	if !errors.Is(err, schema.ErrNoNode) {
		t.Errorf("unknown class: %v, want ErrNoNode", err)
	}
	_, err = e.farm.Submit(ctx, schema.SubmitParams{Frontend: "nope", UserID: "v", Workflow: sdGraph(ckptXL, 1, 1)})
	if !errors.Is(err, schema.ErrUnknownFrontend) {
		t.Errorf("unknown frontend: %v", err)
	}
	jobs, err := e.store.JobList(ctx, schema.JobFilter{Frontend: "alpha", Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 0 {
		t.Fatalf("refused submissions left %d jobs", len(jobs))
	}
	// Idempotency: the same key gives the same job.
	p := schema.SubmitParams{Frontend: "alpha", UserID: "v", Workflow: sdGraph(ckptXL, 1, 1), IdempotencyKey: "k1"}
	a, err := e.farm.Submit(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.farm.Submit(ctx, p)
	if err != nil || b.ID != a.ID {
		t.Fatalf("same idempotency key gave %v, %v", b, err)
	}
	p.Workflow = sdGraph(ckptXL, 2, 1)
	if _, err := e.farm.Submit(ctx, p); !errors.Is(err, schema.ErrConflict) {
		t.Fatalf("same key, another workflow: %v, want ErrConflict", err)
	}
}

// Frontend A's backlog of 100 jobs delays frontend B's one job by at most one
// job slot per node.
func TestFarmBacklogDoesNotDelayAnotherFrontend(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions(), sdOptions()}, nil)
	e.holdAll()
	for i := 0; i < 100; i++ {
		e.submit("alpha", "a", sdGraph(ckptXL, 1, i), 0)
	}
	e.eventually(10*time.Second, "two jobs dispatched", func() bool {
		return e.fakes["n1"].Stats().Submitted+e.fakes["n2"].Stats().Submitted == 2
	})
	b := e.submit("beta", "b", sdGraph(ckptXL, 1, 1000), 0)
	if b.Position > 1 {
		t.Fatalf("beta's job has %d ahead, want at most 1", b.Position)
	}
	e.mu.Lock()
	before := 0
	for _, p := range e.passes {
		before += len(p.dispatched)
	}
	e.mu.Unlock()
	e.releaseAll()
	e.waitState(b.ID, schema.JobSucceeded, 30*time.Second)
	e.mu.Lock()
	defer e.mu.Unlock()
	var order []string
	for _, p := range e.passes {
		order = append(order, p.dispatched...)
	}
	idx := slices.Index(order, b.ID)
	if idx < 0 || idx-before > 2 {
		t.Fatalf("beta's job started %d dispatches after it was queued, want at most 2 (one per node)", idx-before)
	}
}

// A job running past job_timeout is interrupted and failed; the node is
// usable afterwards.
func TestFarmJobTimeout(t *testing.T) {
	o := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 4 * time.Second}}
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{o}, func(c *FarmConfig) { c.JobTimeout = 500 * time.Millisecond })
	j := e.submit("alpha", "slow", sdGraph(ckptXL, 40, 1), 0)
	done := e.waitState(j.ID, schema.JobFailed, 20*time.Second)
	if done.Error == nil || done.Error.Code != schema.CodeTimeout {
		t.Fatalf("error %+v", done.Error)
	}
	e.eventually(30*time.Second, "node idle", func() bool { return e.fakes["n1"].Stats().Running == "" })
	// The interrupted prompt gives its slot back once the node let go of it.
	e.eventually(30*time.Second, "the node's slot given back", func() bool { return e.farm.runtime("n1").Inflight == 0 })
	// The node runs the next job. Not under the 500 ms job_timeout: on a
	// loaded machine even this small job can take longer than that.
	e.stop()
	e.mod = nil
	e.start()
	quick := json.RawMessage(`{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "q"}}}`)
	e.waitState(e.submit("alpha", "slow", quick, 0).ID, schema.JobSucceeded, 30*time.Second)
}

// At start the farm adopts its own jobs, and leaves alone those another live
// instance holds a lease on.
func TestFarmAdoptLeavesOtherInstancesJobs(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	ctx := context.Background()
	e.stop()
	j := &schema.Job{Frontend: "alpha", UserID: "other", Workflow: sdGraph(ckptXL, 1, 1)}
	if err := e.store.JobInsert(ctx, j); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j.ID, Node: "n1", Owner: "another-host", LeaseUntil: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	e.start()
	e.reconciles("n1", 3)
	got := e.job(j.ID)
	if got.State != schema.JobDispatched || got.LeaseOwner != "another-host" {
		t.Fatalf("another instance's job is now %s owned by %q", got.State, got.LeaseOwner)
	}
	if r := e.farm.runner("n1"); r != nil && len(r.activeIDs()) != 0 {
		t.Fatalf("the farm follows %v", r.activeIDs())
	}
}

// crashingStore is a JobStore whose JobInsert never lands: it waits until
// released and then fails, like a process that died between the charge and
// the job.
type crashingStore struct {
	JobStore
	inserting chan struct{}
	release   chan struct{}
}

func (c *crashingStore) JobInsert(ctx context.Context, j *schema.Job) error {
	close(c.inserting)
	<-c.release
	return errors.New("connection lost")
}

// A keyed submit that died after charging and before recording its job is
// retried with the same Idempotency-Key: one job, one charge (the soak found
// a credit short after comfyfarm was killed mid-submit).
func TestFarmKeyedSubmitRetriedAfterCrashChargesOnce(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnv(t, cfg, []comfytest.Options{sdOptions()}, nil)
		ctx := context.Background()
		p := schema.SubmitParams{Frontend: "style", UserID: "retry", Workflow: sdGraph(ckptXL, 1, 1), IdempotencyKey: "pay-once"}
		cs := &crashingStore{JobStore: e.store, inserting: make(chan struct{}), release: make(chan struct{})}
		dying := NewFarm(FarmConfig{Logger: testLogger()}, cs, e.reg, e.storage, e.nodes)
		dead := make(chan error, 1)
		go func() {
			_, err := dying.Submit(ctx, p)
			dead <- err
		}()
		<-cs.inserting // charged, the job not recorded: the process dies here

		j, err := e.farm.Submit(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		again, err := e.farm.Submit(ctx, p)
		if err != nil || again.ID != j.ID {
			t.Fatalf("second retry: %+v %v, want job %s", again, err, j.ID)
		}
		e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
		ctrl, _ := e.reg.Get("style")
		u, err := ctrl.UserGet(ctx, ctrl.DB(), "retry")
		if err != nil {
			t.Fatal(err)
		}
		if u.Credits != 4 {
			t.Fatalf("credits %d after one job, want 4 (5 - 1)", u.Credits)
		}
		// The dead submit's late refund (were it alive after all) changes nothing.
		close(cs.release)
		if err := <-dead; err == nil {
			t.Fatal("the dying submit succeeded")
		}
		if u, _ := ctrl.UserGet(ctx, ctrl.DB(), "retry"); u.Credits != 4 {
			t.Fatalf("credits %d after the dead submit's refund, want 4", u.Credits)
		}
		jobs, err := e.store.JobList(ctx, schema.JobFilter{Frontend: "style", UserID: "retry", Limit: 10})
		if err != nil {
			t.Fatal(err)
		}
		if len(jobs) != 1 {
			t.Fatalf("%d jobs, want 1", len(jobs))
		}
	})
}

package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Keys of the test server.
const (
	adminKey = "admin-key-0123456789"
	styleKey = "style-key-1"
	logoKey  = "logo-key-1"
)

// clock is a settable test clock.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// bundle is one test server with its parts.
type bundle struct {
	t     testing.TB
	srv   *Server
	reg   *dbcontrollers.Registry
	store *oss.Local
	jobs  *fakeJobs
	nodes *fakeNodes
	clock *clock
	logs  *bytes.Buffer
	base  string // http://127.0.0.1:port of the running server
}

type option func(*Config, *Deps)

// setup builds a server over real frontend databases (style charging 1
// credit per job with 3 initial credits; logo free), a signed local store, and
// fake job and node services.
func setup(t testing.TB, dbcfg dbcontrollers.Config, opts ...option) *bundle {
	t.Helper()
	ctx := context.Background()
	reg, err := dbcontrollers.NewRegistry(ctx, dbcfg, []dbcontrollers.FrontendConfig{
		{Name: "style", Controller: "style", InitialCredits: 3, CostPerJob: 1},
		{Name: "logo", Controller: "logo", InitialCredits: 5},
	})
	if err != nil {
		t.Fatalf("registry: %v", err)
	}
	t.Cleanup(func() { reg.Close() })
	clk := newClock()
	store, err := oss.NewLocal(oss.LocalConfig{
		Dir: t.TempDir(), BaseURL: "http://127.0.0.1/files/", SignURLs: true,
		Secret: []byte("files-secret-0123456789"), TTL: time.Hour, NowFunc: clk.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	b := &bundle{t: t, reg: reg, store: store, jobs: newFakeJobs(), nodes: newFakeNodes(), clock: clk, logs: &bytes.Buffer{}}
	cfg := Config{
		AdminKey:       adminKey,
		FrontendKeys:   map[string][]string{"style": {styleKey}, "logo": {logoKey}},
		MaxBodyBytes:   1 << 20,
		MaxUploadBytes: 64 << 10,
		TokenSecret:    []byte("events-secret-0123456789"),
		TokenTTL:       time.Hour,
		NowFunc:        clk.Now,
		Version:        "test",
	}
	deps := Deps{
		Logger:    slog.New(slog.NewTextHandler(&lockedWriter{w: b.logs}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Frontends: reg,
		Control:   PingFunc(func(context.Context) error { return nil }),
		Store:     store,
		Files:     store,
		Jobs:      b.jobs,
		Nodes:     b.nodes,
	}
	for _, o := range opts {
		o(&cfg, &deps)
	}
	b.srv, err = New(cfg, deps)
	if err != nil {
		t.Fatalf("server: %v", err)
	}
	b.base = b.listen()
	return b
}

// with returns a copy of b whose helpers report to t (a subtest's).
func (b *bundle) with(t *testing.T) *bundle {
	c := *b
	c.t = t
	return &c
}

// eachDB runs fn on SQLite and on MySQL (skipped or failed per dbtest).
func eachDB(t *testing.T, fn func(t *testing.T, b *bundle)) {
	t.Helper()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		fn(t, setup(t, cfg))
	})
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// req describes one test request.
type req struct {
	method, path, key string
	body              any // string/[]byte sent as is; anything else as JSON
	header            map[string]string
}

// resp is a test response.
type resp struct {
	status int
	header http.Header
	body   []byte
}

func (r resp) String() string { return fmt.Sprintf("%d %s", r.status, r.body) }

// errorCode returns error.code of an error body.
func (r resp) errorCode() string {
	var e struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	_ = json.Unmarshal(r.body, &e)
	return e.Error.Code
}

// httpClient sends the tests' requests.
var httpClient = &http.Client{Timeout: 60 * time.Second}

// do sends a request to the server over loopback HTTP.
// It reports trouble with Errorf (safe from any goroutine); the caller's
// expect then fails on the status.
func (b *bundle) do(r req) resp {
	b.t.Helper()
	var body io.Reader
	ct := ""
	switch v := r.body.(type) {
	case nil:
	case string:
		body, ct = strings.NewReader(v), "application/json"
	case []byte:
		body, ct = bytes.NewReader(v), "application/json"
	default:
		data, err := json.Marshal(v)
		if err != nil {
			panic(err)
		}
		body, ct = bytes.NewReader(data), "application/json"
	}
	hr, err := http.NewRequest(r.method, b.base+r.path, body)
	if err != nil {
		b.t.Errorf("%s %s: %v", r.method, r.path, err)
		return resp{status: -1}
	}
	if ct != "" {
		hr.Header.Set("Content-Type", ct)
	}
	if r.key != "" {
		hr.Header.Set("Authorization", "Bearer "+r.key)
	}
	for k, v := range r.header {
		hr.Header.Set(k, v)
	}
	res, err := httpClient.Do(hr)
	if err != nil {
		b.t.Errorf("%s %s: %v", r.method, r.path, err)
		return resp{status: -1}
	}
	defer res.Body.Close()
	data, err := io.ReadAll(res.Body)
	if err != nil {
		b.t.Errorf("%s %s: read body: %v", r.method, r.path, err)
	}
	return resp{status: res.StatusCode, header: res.Header, body: data}
}

// decode decodes a response body into v, marking the test failed on a bad body.
func (b *bundle) decode(r resp, v any) {
	b.t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		b.t.Errorf("decode %q: %v", r.body, err)
	}
}

// expect fails the test unless r has the status (and, if given, error code).
func expect(t *testing.T, r resp, status int, code ...string) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d: %s", r.status, status, r.body)
	}
	if len(code) > 0 && r.errorCode() != code[0] {
		t.Fatalf("error code %q, want %q: %s", r.errorCode(), code[0], r.body)
	}
	if status >= 400 && !json.Valid(r.body) {
		t.Fatalf("error body is not JSON: %q", r.body)
	}
}

// listen serves the app on a loopback port and returns its base URL.
func (b *bundle) listen() string {
	b.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.srv.Run(ctx, ln) }()
	b.t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				b.t.Errorf("server run: %v", err)
			}
		case <-time.After(30 * time.Second):
			b.t.Error("server did not stop")
		}
	})
	return "http://" + ln.Addr().String()
}

// controller returns a frontend's controller.
func (b *bundle) controller(name string) dbcontrollers.Controller {
	b.t.Helper()
	c, err := b.reg.Get(name)
	if err != nil {
		b.t.Fatal(err)
	}
	return c
}

// addPhoto stores an object and records a photo for it.
func (b *bundle) addPhoto(frontend, userID, jobID string, index int) *schema.Photo {
	b.t.Helper()
	ctx := context.Background()
	key := fmt.Sprintf("%s/%s/%d.png", frontend, jobID, index)
	data := pngBytes()
	if err := b.store.Put(ctx, key, bytes.NewReader(data), int64(len(data)), "image/png"); err != nil {
		b.t.Fatal(err)
	}
	c := b.controller(frontend)
	p := &schema.Photo{
		UserID: userID, JobID: jobID, OutputIndex: index, ObjectKey: key, ContentType: "image/png",
		Width: 1, Height: 1, Bytes: int64(len(data)), Node: "gpu-1", Metadata: json.RawMessage(`{"k":1}`),
	}
	if err := c.PhotoInsert(ctx, c.DB(), p); err != nil {
		b.t.Fatal(err)
	}
	return p
}

// pngBytes is a valid 1x1 PNG.
func pngBytes() []byte {
	return []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89" +
		"\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82")
}

// ---- fakes ----

// fakeJobs is an in-memory JobService; each Func field, when set, replaces
// the default behaviour of its method.
type fakeJobs struct {
	SubmitFunc      func(ctx context.Context, p schema.SubmitParams) (*schema.Job, error)
	JobFunc         func(ctx context.Context, frontend, id string) (*schema.Job, error)
	JobsFunc        func(ctx context.Context, f schema.JobFilter) ([]schema.Job, error)
	CancelFunc      func(ctx context.Context, frontend, id string) (*schema.Job, error)
	QueueStatusFunc func(ctx context.Context, frontend, id string) (*schema.QueueStatus, error)
	SubscribeFunc   func(ctx context.Context, jobID string, after int64, previews bool) (<-chan schema.Event, func(), error)

	mu        sync.Mutex
	n         int
	jobs      map[string]*schema.Job
	submitted []submitted
}

// submitted is a Submit call with its input files read.
type submitted struct {
	params schema.SubmitParams
	files  map[string][]byte
}

func newFakeJobs() *fakeJobs { return &fakeJobs{jobs: map[string]*schema.Job{}} }

func (f *fakeJobs) Submit(ctx context.Context, p schema.SubmitParams) (*schema.Job, error) {
	files := map[string][]byte{}
	for _, in := range p.Inputs {
		r, err := in.Open()
		if err != nil {
			return nil, err
		}
		data, err := io.ReadAll(r)
		r.Close()
		if err != nil {
			return nil, err
		}
		files[in.Filename] = data
	}
	f.mu.Lock()
	f.submitted = append(f.submitted, submitted{params: p, files: files})
	f.mu.Unlock()
	if f.SubmitFunc != nil {
		return f.SubmitFunc(ctx, p)
	}
	return f.add(p.Frontend, p.UserID, schema.JobQueued), nil
}

// add records a job and returns a copy.
func (f *fakeJobs) add(frontend, userID string, state schema.JobState) *schema.Job {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	j := &schema.Job{
		ID: fmt.Sprintf("01JOB%04d", f.n), Frontend: frontend, UserID: userID, State: state,
		Position: f.n - 1, CreatedAt: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC),
	}
	f.jobs[j.ID] = j
	c := *j
	return &c
}

func (f *fakeJobs) calls() []submitted {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]submitted(nil), f.submitted...)
}

func (f *fakeJobs) get(frontend, id string) (*schema.Job, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	j, ok := f.jobs[id]
	if !ok || j.Frontend != frontend {
		return nil, fmt.Errorf("job %s: %w", id, schema.ErrNotFound)
	}
	c := *j
	return &c, nil
}

func (f *fakeJobs) Job(ctx context.Context, frontend, id string) (*schema.Job, error) {
	if f.JobFunc != nil {
		return f.JobFunc(ctx, frontend, id)
	}
	return f.get(frontend, id)
}

func (f *fakeJobs) Jobs(ctx context.Context, fl schema.JobFilter) ([]schema.Job, error) {
	if f.JobsFunc != nil {
		return f.JobsFunc(ctx, fl)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []schema.Job
	for _, j := range f.jobs {
		if j.Frontend == fl.Frontend && (fl.UserID == "" || fl.UserID == j.UserID) && (fl.State == "" || fl.State == j.State) {
			out = append(out, *j)
		}
	}
	return out, nil
}

func (f *fakeJobs) Cancel(ctx context.Context, frontend, id string) (*schema.Job, error) {
	if f.CancelFunc != nil {
		return f.CancelFunc(ctx, frontend, id)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	j, ok := f.jobs[id]
	if !ok || j.Frontend != frontend {
		return nil, schema.ErrNotFound
	}
	if j.State.Terminal() {
		return nil, fmt.Errorf("job %s is %s: %w", id, j.State, schema.ErrTerminal)
	}
	j.State = schema.JobCancelled
	c := *j
	return &c, nil
}

func (f *fakeJobs) QueueStatus(ctx context.Context, frontend, id string) (*schema.QueueStatus, error) {
	if f.QueueStatusFunc != nil {
		return f.QueueStatusFunc(ctx, frontend, id)
	}
	j, err := f.get(frontend, id)
	if err != nil {
		return nil, err
	}
	return &schema.QueueStatus{JobID: j.ID, State: j.State, Running: j.State == schema.JobRunning, Ahead: j.Position}, nil
}

// Subscribe by default sends a snapshot and the terminal event of a finished
// job, or a snapshot and a cancellation otherwise, then closes.
func (f *fakeJobs) Subscribe(ctx context.Context, jobID string, after int64, previews bool) (<-chan schema.Event, func(), error) {
	if f.SubscribeFunc != nil {
		return f.SubscribeFunc(ctx, jobID, after, previews)
	}
	f.mu.Lock()
	j, ok := f.jobs[jobID]
	var snap schema.Job
	if ok {
		snap = *j
	}
	f.mu.Unlock()
	if !ok {
		return nil, nil, schema.ErrNotFound
	}
	ch := make(chan schema.Event, 2)
	ch <- schema.Event{Seq: 1, Type: schema.EventSnapshot, JobID: jobID, Job: &snap}
	ch <- schema.Event{Seq: 2, Type: schema.EventCancelled, JobID: jobID}
	close(ch)
	return ch, func() {}, nil
}

// fakeNodes is an in-memory NodeService.
type fakeNodes struct {
	ProbeURLFunc func(ctx context.Context, rawURL string) (*schema.ProbeResult, error)

	mu    sync.Mutex
	nodes map[string]*schema.NodeView
}

func newFakeNodes() *fakeNodes {
	return &fakeNodes{nodes: map[string]*schema.NodeView{
		"gpu-1": {Name: "gpu-1", URL: "http://127.0.0.1:8188", State: schema.NodeUp, Tags: []string{}},
	}}
}

func (f *fakeNodes) Nodes(context.Context) ([]schema.NodeView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []schema.NodeView
	for _, n := range f.nodes {
		out = append(out, *n)
	}
	return out, nil
}

func (f *fakeNodes) NodeAdd(_ context.Context, n schema.Node) (*schema.NodeView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.nodes[n.Name]; ok {
		return nil, fmt.Errorf("node %s: %w", n.Name, schema.ErrConflict)
	}
	v := &schema.NodeView{Name: n.Name, URL: n.URL, Tags: n.Tags, MaxInflight: n.MaxInflight, State: schema.NodeUnknown}
	f.nodes[n.Name] = v
	c := *v
	return &c, nil
}

func (f *fakeNodes) NodeRemove(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.nodes[name]; !ok {
		return schema.ErrNotFound
	}
	delete(f.nodes, name)
	return nil
}

func (f *fakeNodes) NodeDrain(_ context.Context, name string, drain bool) (*schema.NodeView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.nodes[name]
	if !ok {
		return nil, schema.ErrNotFound
	}
	n.State = schema.NodeUp
	if drain {
		n.State = schema.NodeDraining
	}
	c := *n
	return &c, nil
}

func (f *fakeNodes) NodeProbe(_ context.Context, name string) (*schema.NodeView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.nodes[name]
	if !ok {
		return nil, schema.ErrNotFound
	}
	now := time.Now()
	n.LastProbeAt = &now
	c := *n
	return &c, nil
}

func (f *fakeNodes) ProbeURL(ctx context.Context, rawURL string) (*schema.ProbeResult, error) {
	if f.ProbeURLFunc != nil {
		return f.ProbeURLFunc(ctx, rawURL)
	}
	return &schema.ProbeResult{URL: rawURL, HostReachable: true, PortOpen: true, ComfyOK: true}, nil
}

package comfytest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Server is a fake ComfyUI server on a real loopback port. A Server outlives
// crashes: Crash stops the emulated process (sockets refused), Restart starts
// a fresh one on the same port. Input and output files survive a restart;
// queue, history, node cache and loaded models do not.
type Server struct {
	opts  Options
	cat   *catalog
	files *fileStore

	mu     sync.Mutex
	addr   string
	inst   *instance
	closed bool
	held   bool

	failMu   sync.Mutex
	failNth  int
	failSeen int

	hangMu sync.Mutex
	hung   bool
	unhung chan struct{} // closed while not hung

	slow atomic.Int64

	modelsMu    sync.Mutex
	checkpoints []string // as configured, then as SetCheckpoints left them
	loras       []string

	vclock *atomic.Int64 // virtual time in ns since the epoch, nil for wall time
}

// instance is one run of the emulated ComfyUI process.
type instance struct {
	srv    *Server
	ln     net.Listener
	hs     *http.Server
	hub    *hub
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the worker exits

	promptMu sync.Mutex // POST /prompt runs one at a time, like the event loop

	mu          sync.Mutex
	cond        *sync.Cond
	number      int64
	seq         int64
	pending     promptHeap
	running     *queueItem
	history     *obj
	cache       map[string]*cacheEntry // classic/current node cache by input signature
	legacy      *legacyCache
	loaded      []string
	interrupted bool
	clientSID   string // server.client_id of the running prompt
	hasClient   bool
	lastNode    *string // server.last_node_id
	flagUnload  bool
	flagFree    bool
	submitted   int
	executed    int
}

// Stats is a snapshot for tests and benchmarks.
type Stats struct {
	Submitted int      // prompts accepted by POST /prompt since the last (re)start
	Executed  int      // prompts the worker finished, whatever the outcome
	Loaded    []string // checkpoints loaded, in load order
	Running   string   // prompt id being executed, or ""
	Pending   []string // pending prompt ids in the order they will run
	Sockets   int      // open WebSocket connections
}

// FileRef names an output file as ComfyUI reports it.
type FileRef struct {
	Filename  string
	Subfolder string
	Type      string
}

// HistoryEntry summarises one finished prompt.
type HistoryEntry struct {
	PromptID string
	Number   float64
	ClientID string
	Status   string // "success", "error" or "interrupted"
	Outputs  map[string][]FileRef
}

// NewServer starts a fake server and panics if it cannot listen, like
// httptest.NewServer. Close it when done.
func NewServer(opts Options) *Server {
	s, err := start(opts)
	if err != nil {
		panic(fmt.Sprintf("comfytest: %v", err))
	}
	return s
}

// ListenAndServe runs a fake server on addr until ctx is done.
func ListenAndServe(ctx context.Context, addr string, opts Options) error {
	opts.Addr = addr
	s, err := start(opts)
	if err != nil {
		return err
	}
	s.opts.Logger.Info("fake ComfyUI listening", "url", s.URL(), "generation", s.opts.Generation.String())
	<-ctx.Done()
	s.Close()
	return nil
}

func start(opts Options) (*Server, error) {
	opts = opts.withDefaults()
	cat := catalogs[opts.Generation]
	if cat == nil {
		return nil, fmt.Errorf("unknown generation %d", opts.Generation)
	}
	s := &Server{opts: opts, cat: cat, files: newFileStore(), unhung: make(chan struct{}),
		checkpoints: slices.Clone(opts.Checkpoints), loras: slices.Clone(opts.Loras)}
	close(s.unhung)
	if opts.virtualTime {
		s.vclock = new(atomic.Int64)
		s.vclock.Store(time.Now().UnixNano())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.startLocked(opts.Addr); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) startLocked(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	s.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{
		srv: s, ln: ln, hub: newHub(s), ctx: ctx, cancel: cancel, done: make(chan struct{}),
		history: newObj(), cache: map[string]*cacheEntry{}, legacy: newLegacyCache(),
	}
	in.cond = sync.NewCond(&in.mu)
	in.hs = &http.Server{
		Handler:           in,
		ReadHeaderTimeout: time.Minute,
		ErrorLog:          log.New(io.Discard, "", 0),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	s.inst = in
	go func() { _ = in.hs.Serve(ln) }()
	go in.work()
	return nil
}

// tick lets virtual time pass the way an HTTP round trip would.
func (s *Server) tick() {
	if s.vclock != nil {
		s.vclock.Add(int64(time.Millisecond))
	}
}

// nowMS is the time in ms for timestamps and create_time.
func (s *Server) nowMS() int64 {
	if s.vclock != nil {
		return s.vclock.Load() / int64(time.Millisecond)
	}
	return time.Now().UnixMilli()
}

// URL is the base URL, e.g. "http://127.0.0.1:43127". It stays the same
// across Crash and Restart.
func (s *Server) URL() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return "http://" + s.addr
}

// Close stops the server for good.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	in := s.inst
	s.inst = nil
	s.mu.Unlock()
	if in != nil {
		in.stop()
	}
}

// Crash closes every socket and the listener at once, as if the process died:
// connections are refused until Restart. Running and pending prompts are lost.
func (s *Server) Crash() {
	s.mu.Lock()
	in := s.inst
	s.inst = nil
	s.mu.Unlock()
	if in != nil {
		in.stop()
	}
}

// Restart starts a fresh process on the same port after a Crash (a running
// server is crashed first). Queue, history, node cache, loaded checkpoints,
// the prompt counter and temp files are gone; input and output files remain.
func (s *Server) Restart() error {
	s.Crash()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("comfytest: server closed")
	}
	s.files.wipe(kindTemp)
	var err error
	for i := 0; i < 50; i++ { // the old listener's port can take a moment to free
		if err = s.startLocked(s.addr); err == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return err
}

func (in *instance) stop() {
	in.cancel()
	_ = in.hs.Close()
	in.hub.closeAll()
	in.mu.Lock()
	in.cond.Broadcast()
	in.mu.Unlock()
	<-in.done
}

// Hang freezes the server (true) or thaws it (false). While hung, connections
// are accepted but no HTTP request is answered, no WebSocket frame is sent and
// the worker stops at its next step. Thawing lets everything continue.
func (s *Server) Hang(on bool) {
	s.hangMu.Lock()
	defer s.hangMu.Unlock()
	if on == s.hung {
		return
	}
	s.hung = on
	if on {
		s.unhung = make(chan struct{})
	} else {
		close(s.unhung)
	}
}

// waitUnhung blocks while the server is hung; it reports false if done closed
// first.
func (s *Server) waitUnhung(done <-chan struct{}) bool {
	s.hangMu.Lock()
	ch := s.unhung
	s.hangMu.Unlock()
	select {
	case <-ch:
		return true
	case <-done:
		return false
	}
}

// SetSlow delays every HTTP response by d (0 turns it off).
func (s *Server) SetSlow(d time.Duration) { s.slow.Store(int64(d)) }

// FailNth makes the n-th prompt started after this call fail with an
// execution_error (a CUDA out-of-memory error) at the first node it executes.
// 0 cancels.
func (s *Server) FailNth(n int) {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	s.failNth, s.failSeen = n, 0
}

// takeFailure reports whether the prompt starting now must fail.
func (s *Server) takeFailure() bool {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	if s.failNth <= 0 {
		return false
	}
	s.failSeen++
	if s.failSeen == s.failNth {
		s.failNth, s.failSeen = 0, 0
		return true
	}
	return false
}

// Hold stops the worker from starting new prompts; the running one finishes.
func (s *Server) Hold() { s.setHeld(true) }

// Release lets the worker start prompts again.
func (s *Server) Release() { s.setHeld(false) }

func (s *Server) setHeld(h bool) {
	s.mu.Lock()
	s.held = h
	in := s.inst
	s.mu.Unlock()
	if in != nil {
		in.mu.Lock()
		in.cond.Broadcast()
		in.mu.Unlock()
	}
}

func (s *Server) isHeld() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held
}

func (s *Server) current() *instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inst
}

// Stats reports the state of the running process (zero when crashed).
func (s *Server) Stats() Stats {
	in := s.current()
	if in == nil {
		return Stats{}
	}
	in.mu.Lock()
	st := Stats{Submitted: in.submitted, Executed: in.executed, Loaded: append([]string(nil), in.loaded...)}
	if in.running != nil {
		st.Running = in.running.promptID
	}
	order := append(promptHeap(nil), in.pending...)
	sort.SliceStable(order, func(i, j int) bool { return order[i].less(order[j]) })
	for _, it := range order {
		st.Pending = append(st.Pending, it.promptID)
	}
	in.mu.Unlock()
	st.Sockets = in.hub.count()
	return st
}

// History summarises the history of the running process, keyed by prompt id.
func (s *Server) History() map[string]HistoryEntry {
	out := map[string]HistoryEntry{}
	in := s.current()
	if in == nil {
		return out
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, id := range in.history.keys {
		e := in.history.vals[id].(*obj)
		he := HistoryEntry{PromptID: id, Outputs: map[string][]FileRef{}, Status: "success"}
		pv, _ := e.get("prompt")
		if p, ok := pv.([]any); ok && len(p) >= 4 {
			he.Number, _ = pyNumber(p[0])
			if eo, ok := p[3].(*obj); ok {
				if c, ok := eo.get("client_id"); ok {
					he.ClientID, _ = c.(string)
				}
			}
		}
		if st, ok := e.get("status"); ok {
			so := st.(*obj)
			if s, _ := so.get("status_str"); s == "error" {
				he.Status = "error"
				if msgs, ok := so.get("messages"); ok {
					if l := msgs.([]any); len(l) > 0 {
						if last, ok := l[len(l)-1].([]any); ok && len(last) > 0 && last[0] == "execution_interrupted" {
							he.Status = "interrupted"
						}
					}
				}
			}
		} else if in.legacyStatus(id) != "" {
			he.Status = in.legacyStatus(id)
		}
		ov, _ := e.get("outputs")
		if oo, ok := ov.(*obj); ok {
			for _, node := range oo.keys {
				no, _ := oo.vals[node].(*obj)
				imgs, _ := no.get("images")
				list, _ := imgs.([]any)
				for _, im := range list {
					io, _ := im.(*obj)
					var ref FileRef
					if v, ok := io.get("filename"); ok {
						ref.Filename, _ = v.(string)
					}
					if v, ok := io.get("subfolder"); ok {
						ref.Subfolder, _ = v.(string)
					}
					if v, ok := io.get("type"); ok {
						ref.Type, _ = v.(string)
					}
					he.Outputs[node] = append(he.Outputs[node], ref)
				}
			}
		}
		out[id] = he
	}
	return out
}

// ReadFile returns a stored file; typ is "output", "input" or "temp".
func (s *Server) ReadFile(typ, subfolder, filename string) ([]byte, bool) {
	rel, ok := joinRel(subfolder, filename)
	if !ok {
		return nil, false
	}
	f, ok := s.files.read(typ, rel)
	return f.data, ok
}

// WriteInput stores a file in the input folder, as an upload would.
func (s *Server) WriteInput(name string, data []byte) error {
	rel, ok := joinRel(name)
	if !ok || rel == "" {
		return fmt.Errorf("comfytest: bad input name %q", name)
	}
	s.files.put(kindInput, rel, data)
	return nil
}

// step is a point where the worker may pause: while the server hangs, and in
// tests that move the worker in lockstep.
func (in *instance) step(what string) error {
	if !in.srv.waitUnhung(in.ctx.Done()) {
		return in.ctx.Err()
	}
	g := in.srv.opts.gate
	if g == nil {
		return in.ctx.Err()
	}
	return g.step(in.ctx, what)
}

// Checkpoints lists the names CheckpointLoaderSimple accepts now: what
// /object_info offers and what validation checks ckpt_name against.
func (s *Server) Checkpoints() []string {
	s.modelsMu.Lock()
	defer s.modelsMu.Unlock()
	return slices.Clone(s.checkpoints)
}

// SetCheckpoints replaces the checkpoint files, as copying files into or out
// of models/checkpoints does on a real server: the next /object_info and the
// next prompt see them, without a restart.
func (s *Server) SetCheckpoints(names ...string) {
	s.modelsMu.Lock()
	s.checkpoints = slices.Clone(names)
	s.modelsMu.Unlock()
}

// Loras lists the names LoraLoader accepts now.
func (s *Server) Loras() []string {
	s.modelsMu.Lock()
	defer s.modelsMu.Unlock()
	return slices.Clone(s.loras)
}

// SetLoras replaces the LoRA files (see SetCheckpoints).
func (s *Server) SetLoras(names ...string) {
	s.modelsMu.Lock()
	s.loras = slices.Clone(names)
	s.modelsMu.Unlock()
}

package dispatch

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"path"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/schema"
)

// runner follows one node: it keeps the node's event stream open, turns
// events into job state, dispatches the jobs the scheduler gives it and
// reconciles what it may have missed.
type runner struct {
	farm   *Farm
	name   string
	client *comfy.Client
	log    *slog.Logger
	stop   context.CancelFunc
	done   chan struct{}
	// historyReads counts completions that read the node's history entry
	// (the others took the outputs from the event stream).
	historyReads atomic.Int64

	mu          sync.Mutex
	jobs        map[string]*attempt // by job id, including cancelled prompts still on the node
	byPrompt    map[string]*attempt
	early       map[string][]comfy.Event // events for prompt ids not bound yet
	earlyOrder  []string                 // early's keys, oldest first
	gone        []string                 // prompt ids recently forgotten, newest last
	reconciling sync.Mutex               // one reconcile at a time
	current     *attempt                 // the prompt the node executes now, if known
	cat         *catalogue               // nil: not known yet
	catAt       time.Time                // when cat was read
	catTried    time.Time                // when a refresh for a missing value last asked the node
	learning    sync.Mutex               // one catalogue read at a time
	features    *comfy.Features
	models      []string // models of recent runs, newest last
	last        uint64
	seq         uint64
	connected   bool      // the event stream is open
	busy        busyClock // when a prompt of ours ran, for the busy ratio
	catSum      [32]byte  // a follower's: the hash of the catalogue read from the bus
	streamEpoch uint64    // counts event stream connects and drops
}

// streamIntact reports whether the node's event stream has stayed open since
// a was taken on, so that no frame of its prompt can have been missed.
// Called with r.mu held.
func (r *runner) streamIntact(a *attempt) bool {
	return r.connected && a.epoch == r.streamEpoch
}

const maxEarlyPrompts = 64

// jobRef names one attempt of a job; attempt 0 means whichever is current.
type jobRef struct {
	id      string
	attempt int
}

// clientID is the WebSocket client id of a node's runner. ComfyUI sends a
// prompt's events only to the socket registered under the id that posted
// it, and a socket that closes unregisters whatever socket holds its id,
// a newer one included. Alone, the id is fixed, so that a restarted process
// hears the prompts it posted before. Among replicas each has its own: when
// a stale leader's socket closed, it would take a new leader's
// registration with it and leave it deaf. A new leader follows the prompts
// it adopted by asking the node (reconcile), and hears those it posts.
func (f *Farm) clientID(node string) string {
	if f.clustered() {
		return "comfyfarm-" + node + "-" + f.cfg.InstanceID
	}
	return "comfyfarm-" + node
}

// newRunner makes a node's runner, not started.
func (f *Farm) newRunner(name, url string) (*runner, error) {
	client, err := comfy.NewClient(url, comfy.WithClientID(f.clientID(name)))
	if err != nil {
		return nil, err
	}
	return &runner{
		farm: f, name: name, client: client, log: f.log.With("node", name),
		jobs: make(map[string]*attempt), byPrompt: make(map[string]*attempt), early: make(map[string][]comfy.Event),
	}, nil
}

func (f *Farm) startRunner(ctx context.Context, name string) {
	n, ok := f.nodes.Node(name)
	if !ok {
		return
	}
	r, err := f.newRunner(name, n.URL)
	if err != nil {
		f.log.Error("node client", "node", name, "err", err)
		return
	}
	rctx, cancel := context.WithCancel(ctx)
	r.stop, r.done = cancel, make(chan struct{})
	f.rmu.Lock()
	if _, ok := f.runners[name]; ok {
		f.rmu.Unlock()
		cancel()
		return
	}
	f.runners[name] = r
	f.rmu.Unlock()
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		defer close(r.done)
		r.run(rctx)
	}()
}

func (f *Farm) stopRunners() {
	for _, r := range f.runnerList() {
		r.stop()
		<-r.done
	}
}

// run keeps the event stream and a reconcile ticker going until ctx ends.
func (r *runner) run(ctx context.Context) {
	r.farm.wg.Add(1)
	go func() {
		defer r.farm.wg.Done()
		// Stream reconnects by itself with backoff; it returns only when ctx ends.
		_ = r.client.Stream(ctx, r.handle)
	}()
	r.learn(ctx)
	t := time.NewTicker(r.farm.cfg.ReconcileEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if age, ok := r.catalogueAge(); !ok || age >= r.farm.cfg.CatalogueInterval {
				r.learn(ctx)
			}
			r.reconcile(ctx, false)
		}
	}
}

// learn reads the node's features and catalogue, once it answers. The
// catalogue says which classes the node offers, which are output nodes
// (custom nodes included), and the choices of every enum input (model
// files, input images, samplers...). It reports whether it read them.
func (r *runner) learn(ctx context.Context) bool {
	r.learning.Lock()
	defer r.learning.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	feats, err := r.client.Features(cctx)
	if err != nil {
		return false
	}
	info, err := r.client.ObjectInfo(cctx)
	if err != nil {
		return false
	}
	cat := r.farm.cats.build(info, r.farm.liveCatalogues(r))
	r.mu.Lock()
	r.features, r.cat, r.catAt = feats, cat, r.farm.cfg.NowFunc()
	r.mu.Unlock()
	r.farm.placementChanged()
	r.farm.shareCatalogue(r.name, cat)
	return true
}

// catalogueAge is how long ago the catalogue was read; ok is false when it
// never was.
func (r *runner) catalogueAge() (age time.Duration, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cat == nil {
		return 0, false
	}
	return r.farm.cfg.NowFunc().Sub(r.catAt), true
}

// catalogue returns the node's catalogue, or nil when unknown.
func (r *runner) catalogue() *catalogue {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cat
}

// canRun reports whether the node offers every class type and every enum
// value of the job; a node whose catalogue is not known yet is given the
// benefit of the doubt only when it has answered nothing at all, so that
// validation at the node catches it.
func (r *runner) canRun(pj *pendingJob) bool {
	c := r.catalogue()
	return c == nil || c.allows(pj.Classes, pj.Needs)
}

// knownClasses returns the node's classes, or nil when unknown.
func (r *runner) knownClasses() map[string]bool {
	if c := r.catalogue(); c != nil {
		return c.classes
	}
	return nil
}

func (r *runner) inflight() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, a := range r.jobs {
		if a.holdsSlot() {
			n++
		}
	}
	return n
}

func (r *runner) modelsLoaded(models []string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range models {
		if slices.Contains(r.models, m) {
			n++
		}
	}
	return n
}

func (r *runner) lastAssigned() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}

func (r *runner) assigned(seq uint64) {
	r.mu.Lock()
	r.last = seq
	r.mu.Unlock()
}

// leaseIDs lists every job the runner follows, those it gave up on whose
// prompt still holds the node included (a timed-out job is failed only
// after its interrupt): their leases must not run out meanwhile.
func (r *runner) leaseIDs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Collect(maps.Keys(r.jobs))
}

func (r *runner) jobCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.jobs)
}

// hold takes a node slot for a job about to be claimed (the scheduler picked
// this node for it); claimed completes it, release gives it back.
func (r *runner) hold(pj *pendingJob) *attempt {
	return r.take(pj, 0, phasePosting, schema.JobDispatched, time.Time{})
}

// take records an attempt of pj's job as this runner's, in phase and state.
func (r *runner) take(pj *pendingJob, num int, ph phase, state schema.JobState, runSince time.Time) *attempt {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	a := &attempt{
		r: r, jobID: pj.ID, frontend: pj.Frontend, state: state, runSince: runSince, seq: r.seq, num: num,
		models: pj.Models, lastSign: r.farm.cfg.NowFunc(), phase: ph, avoid: pj.Avoid,
		epoch: r.streamEpoch,
	}
	r.jobs[pj.ID] = a
	return a
}

// claimed records the attempt a held slot's claim gave the job.
func (r *runner) claimed(a *attempt, job *schema.Job) {
	r.mu.Lock()
	a.num = job.Attempts
	a.lastSign = r.farm.cfg.NowFunc()
	r.mu.Unlock()
}

// release gives back a slot whose claim failed.
func (r *runner) release(a *attempt) {
	r.mu.Lock()
	if r.jobs[a.jobID] == a {
		delete(r.jobs, a.jobID)
	}
	r.mu.Unlock()
	r.farm.kickScheduler()
}

// adoptAttempt takes on an active job found on the node at start (or at a
// new term), in the state the database has: followed from here, or, when
// it was storing, finishing (its outputs are copied again).
func (r *runner) adoptAttempt(job *schema.Job, pj *pendingJob) *attempt {
	ph := phaseFollowing
	if job.State == schema.JobStoring {
		ph = phaseFinishing
	}
	var since time.Time
	if job.StartedAt != nil {
		since = *job.StartedAt
	}
	return r.take(pj, job.Attempts, ph, job.State, since)
}

// bind ties a prompt id to a job and replays events that came early.
func (r *runner) bind(jobID, promptID string) {
	r.mu.Lock()
	a := r.jobs[jobID]
	if a == nil {
		r.mu.Unlock()
		return
	}
	if a.promptID != "" && a.promptID != promptID {
		delete(r.byPrompt, a.promptID)
	}
	a.promptID = promptID
	r.byPrompt[promptID] = a
	early := r.early[promptID]
	delete(r.early, promptID)
	if i := slices.Index(r.earlyOrder, promptID); i >= 0 {
		r.earlyOrder = slices.Delete(r.earlyOrder, i, i+1)
	}
	r.mu.Unlock()
	for _, ev := range early {
		r.handle(ev)
	}
}

// forget stops following a job (only that attempt, when ref names one).
func (r *runner) forget(ref jobRef) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.jobs[ref.id]
	if a == nil || (ref.attempt != 0 && a.num != ref.attempt) {
		return
	}
	delete(r.jobs, ref.id)
	if a.promptID != "" {
		delete(r.byPrompt, a.promptID)
		r.gone = append(r.gone, a.promptID)
		if len(r.gone) > 256 {
			r.gone = r.gone[1:]
		}
	}
	if r.current == a {
		r.current = nil
		r.busy.set(r.farm.cfg.NowFunc(), false)
	}
	r.farm.kickScheduler()
}

// promptFor maps a job attempt to the prompt id we ask the node to use.
func promptFor(job *schema.Job) string {
	return fmt.Sprintf("%s-%d", job.ID, job.Attempts)
}

// prepare uploads inputs and returns the graph as posted to the node.
func (r *runner) prepare(ctx context.Context, job *schema.Job) ([]byte, error) {
	g, err := comfy.ParseGraph(job.Workflow, comfy.GraphLimits{MaxNodes: r.farm.cfg.MaxGraphNodes})
	if err != nil {
		return nil, err
	}
	if len(job.Inputs) > 0 {
		names := make(map[string]string, len(job.Inputs))
		for i, in := range job.Inputs {
			rc, _, err := r.farm.storage.Get(ctx, in.Key)
			if err != nil {
				return nil, fmt.Errorf("read input %q: %w", in.Filename, err)
			}
			up, err := r.client.UploadImage(ctx, comfy.UploadRequest{
				Name: fmt.Sprintf("%s_%d%s", job.ID, i, path.Ext(in.Key)), Body: rc,
				Subfolder: "comfyfarm", Overwrite: true, Type: "input",
			})
			rc.Close()
			if err != nil {
				return nil, &nodeError{fmt.Errorf("upload input %q: %w", in.Filename, err)}
			}
			names[in.Filename] = up.LoadImageValue()
		}
		g.RewriteImages(names)
	}
	g.SetFilenamePrefix("comfyfarm/" + job.ID)
	return g.Marshal()
}

// staleCatalogue reports whether a validation failure is the node's
// catalogue gone stale: every error is value_not_in_list, and once the
// catalogue is read again the node no longer offers what the job needs. A
// node that still lists the values it refused is taken at its word: the
// workflow fails, rather than go round for ever.
func (r *runner) staleCatalogue(ctx context.Context, job *schema.Job, verr *comfy.ValidationError) bool {
	if len(verr.NodeErrors) == 0 {
		return false
	}
	for _, ne := range verr.NodeErrors {
		if len(ne.Errors) == 0 {
			return false
		}
		for _, it := range ne.Errors {
			if it.Type != "value_not_in_list" {
				return false
			}
		}
	}
	pj, err := pendingFromJob(job, r.farm.cfg.MaxGraphNodes)
	if err != nil || !r.learn(ctx) {
		return false
	}
	return !r.canRun(pj)
}

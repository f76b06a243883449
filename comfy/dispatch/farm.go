package dispatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/comfy/hub"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// FarmConfig tunes the farm. Zero values take the defaults of DefaultFarmConfig.
type FarmConfig struct {
	InstanceID     string        // lease owner; random when empty
	MaxAttempts    int           // scheduler.max_attempts
	StallTimeout   time.Duration // no event and no sign of the prompt on the node for this long: reconcile, then requeue
	JobTimeout     time.Duration // a job running longer is interrupted and failed
	Lease          time.Duration // lease of an active job, extended by a heartbeat
	ReconcileEvery time.Duration // how often active jobs without recent events are checked on their node
	HistoryWait    time.Duration // how long completion waits for the history entry
	MaxOutputBytes int64         // per output file
	MaxInputBytes  int64         // per input image
	MaxImagePixels int64         // per input image, read from its header
	MaxGraphNodes  int           // per workflow
	// CatalogueInterval is how often each node's catalogue (/object_info) is
	// read again (probe.catalogue_interval).
	CatalogueInterval time.Duration
	Weights           map[string]int // frontend -> weight for fair scheduling
	Logger            *slog.Logger
	NowFunc           func() time.Time

	// Bus, when set, makes the farm one of several replicas sharing the
	// control database (cluster.redis_url): events and notices go through
	// it, and the farm schedules only while it holds the scheduler's lease.
	Bus Bus
	// Leases holds that lease; the job store when nil (it must then be a
	// LeaseStore and a Fencer, as *dbcontrollers.Store is).
	Leases LeaseStore
	// LeaderLease is how long the lease lasts unrenewed
	// (scheduler.leader_lease): a dead leader is replaced within it.
	LeaderLease time.Duration
}

// DefaultFarmConfig is the configuration of DESIGN §5.
func DefaultFarmConfig() FarmConfig {
	return FarmConfig{
		MaxAttempts:       3,
		StallTimeout:      120 * time.Second,
		JobTimeout:        30 * time.Minute,
		Lease:             60 * time.Second,
		ReconcileEvery:    5 * time.Second,
		HistoryWait:       30 * time.Second,
		MaxOutputBytes:    512 << 20,
		MaxInputBytes:     20 << 20,
		MaxImagePixels:    50_000_000,
		MaxGraphNodes:     2000,
		CatalogueInterval: 5 * time.Minute,
		LeaderLease:       10 * time.Second,
	}
}

func (c *FarmConfig) fill() {
	d := DefaultFarmConfig()
	orDefault(&c.MaxAttempts, d.MaxAttempts)
	orDefault(&c.StallTimeout, d.StallTimeout)
	orDefault(&c.JobTimeout, d.JobTimeout)
	orDefault(&c.Lease, d.Lease)
	orDefault(&c.ReconcileEvery, d.ReconcileEvery)
	orDefault(&c.HistoryWait, d.HistoryWait)
	orDefault(&c.MaxOutputBytes, d.MaxOutputBytes)
	orDefault(&c.MaxInputBytes, d.MaxInputBytes)
	orDefault(&c.MaxImagePixels, d.MaxImagePixels)
	orDefault(&c.MaxGraphNodes, d.MaxGraphNodes)
	orDefault(&c.CatalogueInterval, d.CatalogueInterval)
	orDefault(&c.LeaderLease, d.LeaderLease)
	if c.InstanceID == "" {
		// Stable across restarts on one host, so that a restarted process
		// recognises the leases of the jobs it was following.
		if h, err := os.Hostname(); err == nil && h != "" {
			c.InstanceID = h
		} else {
			var b [6]byte
			_, _ = rand.Read(b[:])
			c.InstanceID = "cf-" + hex.EncodeToString(b[:])
		}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.NowFunc == nil {
		c.NowFunc = time.Now
	}
}

// orDefault replaces a zero or negative setting by its default.
func orDefault[T int | int64 | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// JobStore is the part of the control database the farm uses; satisfied by
// *dbcontrollers.Store.
type JobStore interface {
	JobInsert(ctx context.Context, j *schema.Job) error
	JobGet(ctx context.Context, id string) (*schema.Job, error)
	JobByIdempotencyKey(ctx context.Context, frontend, key string) (*schema.Job, error)
	JobList(ctx context.Context, f schema.JobFilter) ([]schema.Job, error)
	JobListByState(ctx context.Context, states ...schema.JobState) ([]schema.Job, error)
	JobIDsByState(ctx context.Context, state schema.JobState) ([]string, error)
	JobIDsEnded(ctx context.Context, ids []string) ([]string, error)
	JobClaim(ctx context.Context, p dbcontrollers.ClaimParams) (*schema.Job, error)
	JobUpdate(ctx context.Context, u dbcontrollers.JobUpdate) (*schema.Job, error)
	JobExtendLease(ctx context.Context, owner string, ids []string, until time.Time) (int, error)
	JobRescue(ctx context.Context, now time.Time, maxAttempts int) (requeued, failed []schema.Job, err error)
	JobCounts(ctx context.Context) (map[string]map[schema.JobState]int, error)
	JobCountsByNode(ctx context.Context) (map[string]dbcontrollers.NodeJobCounts, error)
}

// Frontends resolves a frontend name to its controller; satisfied by
// *dbcontrollers.Registry.
type Frontends interface {
	Get(name string) (dbcontrollers.Controller, error)
}

// Farm is the job path: it keeps the queue, picks nodes, dispatches
// workflows, follows them, stores their outputs and tells subscribers.
// It implements the server's JobService and NodeService.
type Farm struct {
	cfg FarmConfig
	// store is the job store as the scheduler writes it (fenced by the
	// term's epoch in cluster mode); db is the same store unfenced, for the
	// API's reads, submits and cancels, which any replica takes.
	store     JobStore
	db        JobStore
	fenced    *fencedJobs // nil in one process
	cl        clusterState
	runCtx    context.Context // Run's: bounds work that outlives a term
	bg        sync.WaitGroup  // work that outlives a term (cluster mode)
	leaseHook func() bool     // tests: false holds the lease keeper (a paused process)
	sharing   atomic.Bool     // node views being sent to the bus
	// leaderViews: on a follower, the leader's node views by name, as last
	// read from the bus (placement checks of submits use its node states).
	leaderViews atomic.Pointer[map[string]schema.NodeView]
	sig         *testSignals // tests: background rounds told
	frontends   Frontends
	storage     oss.Store
	nodes       *Nodes
	hub         *hub.Hub
	metrics     *farmMetrics
	log         *slog.Logger
	tally       nodeTally // jobs finished per node, for node views
	cats        *catalogueCache

	emu     sync.Mutex // guards enums
	enums   *enumIndex
	enumGen uint64

	mu        sync.Mutex // guards the queue and positions; taken before rmu
	queue     *fairQueue
	positions map[string]int // last published position per queued job
	pc        posCache       // positions kept between plans (planPositionsLocked)
	sigIDs    map[string]int // placement signatures numbered, for the enum index sigGen
	sigGen    uint64
	// unrunnable: since when a queued job has needed a class no node offers.
	unrunnable map[string]time.Time
	rr         uint64 // round robin tie-break among equally good nodes

	rmu      sync.RWMutex // guards runners and retiring; never held while calling the registry
	runners  map[string]*runner
	retiring map[*runner]bool // removed nodes' runners while jobs of theirs still store outputs

	lmu    sync.Mutex
	leased map[string]bool // jobs finishing off any runner whose leases the heartbeat keeps

	kick chan struct{}
	ctx  context.Context // set by Run; bounds background work

	// onSchedule, set by tests, sees each scheduling pass under f.mu: the
	// jobs it dispatched in order and every queued job's position after it.
	onSchedule  func(dispatched []string, positions map[string]int)
	wg          sync.WaitGroup
	started     chan struct{}
	startedOnce sync.Once
	stopped     chan struct{} // closed when Run returns
}

// NewFarm wires a farm. Call Run to start it.
func NewFarm(cfg FarmConfig, store JobStore, frontends Frontends, storage oss.Store, nodes *Nodes) *Farm {
	cfg.fill()
	f := &Farm{
		cfg:        cfg,
		store:      store,
		frontends:  frontends,
		storage:    storage,
		nodes:      nodes,
		hub:        hub.New(),
		metrics:    newFarmMetrics(),
		log:        cfg.Logger.With("component", "farm"),
		queue:      newFairQueue(cfg.Weights),
		cats:       newCatalogueCache(),
		positions:  make(map[string]int),
		unrunnable: make(map[string]time.Time),
		leased:     make(map[string]bool),
		runners:    make(map[string]*runner),
		retiring:   make(map[*runner]bool),
		kick:       make(chan struct{}, 1),
		started:    make(chan struct{}),
		stopped:    make(chan struct{}),
	}
	f.queue.LenFunc = f.metrics.queueLen
	f.db = store
	f.cl.role, f.cl.wake = RoleFollower, make(chan struct{}, 1)
	if cfg.Bus != nil {
		f.hub = hub.NewBus(cfg.Bus)
		if f.cfg.Leases == nil {
			f.cfg.Leases, _ = store.(LeaseStore)
		}
		if fz, ok := store.(Fencer); ok {
			f.fenced = &fencedJobs{JobStore: store, fencer: fz}
			f.fenced.epoch.Store(noTerm)
			f.store = f.fenced
		}
	}
	nodes.SetRuntimeFunc(f.runtime)
	return f
}

// Run loads the queue, adopts jobs that were active before a restart, starts
// one runner per node and schedules until ctx is done.
//
// Shutdown order: the scheduler stops taking jobs first, then runners stop
// following nodes (jobs stay dispatched/running in the database with their
// leases; the next start adopts them), then background completions finish.
// Ping reports whether the farm is running: an error until Run has loaded
// the queue and adopted the running jobs, and after Run has returned.
func (f *Farm) Ping(ctx context.Context) error {
	select {
	case <-f.stopped:
		return errors.New("scheduler stopped")
	default:
	}
	select {
	case <-f.started:
		return nil
	default:
		return errors.New("scheduler starting")
	}
}

// With a Bus the farm is one replica of several: it serves followers' work
// at once and schedules only while it holds the scheduler's lease
// (runCluster).
func (f *Farm) Run(ctx context.Context) error {
	f.runCtx = ctx
	defer close(f.stopped)
	if f.clustered() {
		if f.cfg.Leases == nil || f.fenced == nil {
			return errors.New("cluster mode needs a job store that holds leases and fences writes")
		}
		return f.runCluster(ctx)
	}
	return f.schedulerLoop(ctx)
}

// schedulerLoop is the scheduler of one term (the whole run of a process
// alone): it loads the queue, adopts the active jobs, follows the nodes and
// schedules until ctx ends.
func (f *Farm) schedulerLoop(ctx context.Context) error {
	f.ctx = ctx
	if err := f.loadQueue(ctx); err != nil {
		return fmt.Errorf("load queue: %w", err)
	}
	if err := f.tally.load(ctx, f.store); err != nil {
		// Only the node views' totals wait for it: try again on the tick.
		f.log.Warn("count jobs by node", "err", err)
	}
	changes, unsub := f.nodes.Subscribe()
	defer unsub()
	for _, v := range f.nodes.List() {
		f.startRunner(ctx, v.Name)
	}
	if err := f.adopt(ctx); err != nil {
		f.log.Error("adopt active jobs", "err", err)
	}
	f.startedOnce.Do(func() { close(f.started) })
	f.kickScheduler()
	f.publishNodes(ctx)

	tick := time.NewTicker(f.cfg.Lease / 3)
	defer tick.Stop()
	// In cluster mode: the node views shared, and the database searched for
	// jobs queued on other replicas whose notice was lost.
	var shareC <-chan time.Time // alone: nothing to share
	if f.clustered() {
		share := time.NewTicker(f.cfg.ReconcileEvery)
		defer share.Stop()
		shareC = share.C
	}
	for {
		select {
		case <-ctx.Done():
			f.stopRunners()
			f.wg.Wait()
			return nil
		case ch, ok := <-changes:
			if !ok {
				changes = nil
				continue
			}
			f.nodeChanged(ctx, ch)
			f.publishNodes(ctx)
		case <-f.kick:
			f.schedule(ctx)
		case <-shareC:
			f.publishNodes(ctx)
			f.catchUp(ctx)
		case <-tick.C:
			// Only with our own leases fresh: after a database outage an
			// expired lease of a job this instance still follows must be
			// extended before anyone's expired leases are rescued.
			if f.heartbeat(ctx) {
				f.rescue(ctx)
			}
			f.failUnrunnable(ctx)
			f.hub.GC()
			if !f.tally.loaded() {
				if err := f.tally.load(ctx, f.store); err != nil && ctx.Err() == nil {
					f.log.Warn("count jobs by node", "err", err)
				}
			}
			f.schedule(ctx)
		}
	}
}

func (f *Farm) kickScheduler() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// loadQueue puts every queued job of the control DB into the scheduler.
func (f *Farm) loadQueue(ctx context.Context) error {
	jobs, err := f.store.JobListByState(ctx, schema.JobQueued)
	if err != nil {
		return err
	}
	var unreadable []string
	f.mu.Lock()
	for i := range jobs {
		pj, err := pendingFromJob(&jobs[i], f.cfg.MaxGraphNodes)
		if err != nil {
			// Accepted under other limits, say: it can never run, so say so
			// rather than hold its place (and its credits) forever.
			unreadable = append(unreadable, jobs[i].ID)
			f.log.Warn("queued job with an unreadable workflow", "job_id", jobs[i].ID, "err", err)
			continue
		}
		f.queue.Push(pj)
	}
	f.mu.Unlock()
	for _, id := range unreadable {
		f.failQueued(ctx, id, &schema.JobError{Code: schema.CodeValidationFailed, Message: "the workflow can no longer be read under the configured limits"})
	}
	return nil
}

// failQueued fails a job that never left the queue.
func (f *Farm) failQueued(ctx context.Context, id string, jerr *schema.JobError) {
	job, err := f.store.JobUpdate(ctx, dbcontrollers.JobFailQueued(id, jerr, f.cfg.NowFunc()))
	if err != nil {
		return
	}
	f.metrics.jobFinished(job)
	f.refund(ctx, job)
	f.hub.Publish(id, schema.Event{Type: schema.EventFailed, Error: jerr})
}

// schedule starts as many queued jobs as there are free node slots.
//
// The scheduling lock is held only to pick: the job leaves the queue and
// its node slot is held before the claim (one short transaction) runs
// without the lock, so submits, cancels and position reads never wait on
// the database. A claim that loses (the job was cancelled meanwhile) gives
// the slot back; one the database could not answer puts the job back.
func (f *Farm) schedule(ctx context.Context) {
	if ctx.Err() != nil {
		return
	}
	var dispatched []string
	defer func() {
		f.mu.Lock()
		f.publishPositionsLocked(dispatched...)
		f.mu.Unlock()
	}()
	for {
		f.mu.Lock()
		pj, node := f.pickLocked()
		if pj == nil {
			f.mu.Unlock()
			return
		}
		f.queue.Take(pj.ID)
		r := f.runner(node)
		a := r.hold(pj)
		f.mu.Unlock()

		job, err := f.store.JobClaim(ctx, dbcontrollers.ClaimParams{
			ID: pj.ID, Node: node, Owner: f.cfg.InstanceID, LeaseUntil: f.cfg.NowFunc().Add(f.cfg.Lease),
		})
		if err != nil {
			r.release(a)
			if !errors.Is(err, schema.ErrConflict) && !errors.Is(err, schema.ErrNotFound) {
				if ctx.Err() == nil {
					f.log.Error("claim job", "job_id", pj.ID, "node", node, "err", err)
				}
				f.mu.Lock()
				f.queue.Push(pj) // the database will say later
				f.mu.Unlock()
				return
			}
			continue // cancelled or taken meanwhile
		}
		f.mu.Lock()
		delete(f.positions, pj.ID)
		f.mu.Unlock()
		dispatched = append(dispatched, pj.ID)
		if job.Attempts == 1 {
			f.metrics.queueWait.WithLabelValues(job.Frontend).Observe(f.cfg.NowFunc().Sub(job.CreatedAt).Seconds())
		}
		r.claimed(a, job)
		f.hub.Publish(job.ID, schema.Event{Type: schema.EventDispatched, Node: node})
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			a.post(ctx, job)
		}()
	}
}

// pickLocked finds the first job in plan order that some free node can run,
// and the best such node for it.
func (f *Farm) pickLocked() (*pendingJob, string) {
	var free, up []nodeFacts
	for _, nf := range f.facts() {
		if !nf.up {
			continue
		}
		up = append(up, nf)
		if nf.r.inflight() >= nf.limit {
			continue
		}
		free = append(free, nf)
	}
	if len(free) == 0 {
		return nil, ""
	}
	// elsewhere reports whether an up node other than those pj failed on
	// can run it: then pj waits for such a node rather than go back.
	elsewhere := func(pj *pendingJob) bool {
		for _, c := range up {
			if !slices.Contains(pj.Avoid, c.name) && c.qualifies(pj) {
				return true
			}
		}
		return false
	}
	for _, pj := range f.queue.Plan() {
		best, bestScore := "", -1.0
		avoidSome := len(pj.Avoid) > 0 && elsewhere(pj)
		for _, c := range free {
			if !c.qualifies(pj) {
				continue
			}
			if avoidSome && slices.Contains(pj.Avoid, c.name) {
				continue
			}
			// Affinity first (models already loaded), then the least loaded,
			// then the one that got work the longest ago.
			score := float64(c.r.modelsLoaded(pj.Models))*1e6 +
				(1-float64(c.r.inflight())/float64(c.limit))*1e3 -
				float64(c.r.lastAssigned())/1e12
			if score > bestScore {
				best, bestScore = c.name, score
			}
		}
		if best != "" {
			f.rr++
			f.runner(best).assigned(f.rr)
			return pj, best
		}
	}
	return nil, ""
}

// publishPositionsLocked pushes a queued event to every job whose position
// changed since it was last told.
func (f *Farm) publishPositionsLocked(dispatched ...string) {
	f.refreshPositionsLocked()
	if f.onSchedule != nil {
		f.onSchedule(dispatched, maps.Clone(f.positions))
	}
}

// refreshPositionsLocked works out the positions again from the first plan
// step that changed and publishes those that differ from what their job was
// last told. Every recomputation goes through here, so f.positions always
// holds the positions of the plan steps before the next change.
func (f *Farm) refreshPositionsLocked() {
	plan, positions, from := f.planPositionsLocked()
	for i := from; i < len(plan); i++ {
		pj, p := plan[i], positions[i]
		if old, ok := f.positions[pj.ID]; ok && old == p {
			continue
		}
		f.positions[pj.ID] = p
		pos := p // escapes only when published
		f.hub.Publish(pj.ID, schema.Event{Type: schema.EventQueued, Position: &pos})
	}
	if len(f.positions) > len(plan) {
		for id := range f.positions {
			if !f.queue.Has(id) {
				delete(f.positions, id)
			}
		}
	}
}

// position returns a queued job's place in the plan.
func (f *Farm) position(id string) (int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.positions[id]
	if !ok && f.queue.Has(id) {
		f.refreshPositionsLocked()
		p, ok = f.positions[id]
	}
	return p, ok
}

// heartbeat extends the leases of every job this instance follows. It
// reports whether they are fresh (extended now, or none to extend).
func (f *Farm) heartbeat(ctx context.Context) (fresh bool) {
	defer func() { signal(f.sigs().heartbeat, fresh) }()
	var ids []string
	f.rmu.Lock()
	runners := slices.Collect(maps.Values(f.runners))
	for r := range f.retiring {
		if r.jobCount() == 0 {
			delete(f.retiring, r)
			continue
		}
		runners = append(runners, r)
	}
	f.rmu.Unlock()
	for _, r := range runners {
		ids = append(ids, r.leaseIDs()...)
	}
	f.lmu.Lock()
	for id := range f.leased {
		ids = append(ids, id)
	}
	f.lmu.Unlock()
	if len(ids) == 0 {
		return true
	}
	if _, err := f.store.JobExtendLease(ctx, f.cfg.InstanceID, ids, f.cfg.NowFunc().Add(f.cfg.Lease)); err != nil {
		if ctx.Err() == nil {
			f.log.Error("extend leases", "err", err)
		}
		return false
	}
	return true
}

// rescue returns jobs whose lease expired (their instance died) to the queue.
func (f *Farm) rescue(ctx context.Context) {
	defer signal(f.sigs().rescued, struct{}{})
	requeued, failed, err := f.store.JobRescue(ctx, f.cfg.NowFunc(), f.cfg.MaxAttempts)
	if err != nil {
		if ctx.Err() == nil {
			f.log.Error("rescue expired leases", "err", err)
		}
		return
	}
	for i := range requeued {
		f.requeued(&requeued[i])
	}
	for i := range failed {
		j := &failed[i]
		f.tally.finished(j.Node, j.State)
		f.metrics.jobFinished(j)
		f.refund(ctx, j)
		f.hub.Publish(j.ID, schema.Event{Type: schema.EventFailed, Error: j.Error})
	}
}

// requeued puts a job that went back to queued into the scheduler; avoid
// names the nodes that failed it.
func (f *Farm) requeued(j *schema.Job, avoid ...string) {
	pj, err := pendingFromJob(j, f.cfg.MaxGraphNodes)
	if err != nil {
		f.log.Error("requeue job", "job_id", j.ID, "err", err)
		return
	}
	pj.Avoid = avoid
	f.mu.Lock()
	f.queue.Push(pj)
	f.mu.Unlock()
	f.kickScheduler()
}

// refund returns the credits a job was charged, once.
func (f *Farm) refund(ctx context.Context, j *schema.Job) {
	if j.Charged <= 0 {
		return
	}
	c, err := f.frontends.Get(j.Frontend)
	if err != nil {
		return
	}
	// A refund must not be lost because the request that caused it ended.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	err = dbcontrollers.InTx(ctx, c.DB(), func(tx *sqlx.Tx) error {
		_, err := c.CreditsApply(ctx, tx, dbcontrollers.CreditParams{
			UserID: j.UserID, Delta: j.Charged, Reason: "refund job " + j.ID, IdempotencyKey: "job:" + j.ID + ":refund",
		})
		return err
	})
	if err != nil {
		f.log.Error("refund credits", "job_id", j.ID, "err", err)
	}
}

package dispatch

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/comfy/hub"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Bus is what replicas tell each other; satisfied by *cluster.Redis.
type Bus interface {
	hub.Bus
	Notify(ctx context.Context, n cluster.Notice) error
	Run(ctx context.Context, h cluster.Handlers, ready chan<- struct{}) error
	PutNodes(ctx context.Context, views []byte, ttl time.Duration) error
	Nodes(ctx context.Context) ([]byte, error)
	PutCatalogue(ctx context.Context, node string, b []byte) error
	Catalogue(ctx context.Context, node string) ([]byte, error)
	CatalogueSums(ctx context.Context, nodes []string) ([][]byte, error)
}

// LeaseStore holds the scheduler's lease; satisfied by *dbcontrollers.Store.
type LeaseStore interface {
	LeaderAcquire(ctx context.Context, name, holder string, ttl time.Duration, epoch int64) (dbcontrollers.Leadership, error)
	LeaderResign(ctx context.Context, name, holder string, epoch int64) error
}

// Fencer gives a view of the job store whose writes apply only under one
// epoch of the scheduler's lease; satisfied by *dbcontrollers.Store.
type Fencer interface {
	Fenced(epoch int64) *dbcontrollers.Store
}

// Roles of a replica.
const (
	RoleLeader   = "leader"
	RoleFollower = "follower"
)

// noTerm is the epoch engine writes carry while this replica does not lead:
// no lease ever has it, so every such write is fenced.
const noTerm = -1

// fencedJobs is the job store as the scheduler writes it in cluster mode:
// claims, state changes, lease extensions and rescues carry the epoch of
// the current term and fail with dbcontrollers.ErrFenced once another
// replica took the lease. Reads and inserts go to the store as is.
type fencedJobs struct {
	JobStore
	fencer  Fencer
	epoch   atomic.Int64
	lost    atomic.Pointer[func()] // called on a fenced write: the term is over
	refused atomic.Int64           // writes refused by the fence, over every term
}

func (s *fencedJobs) cur() *dbcontrollers.Store { return s.fencer.Fenced(s.epoch.Load()) }

func (s *fencedJobs) check(err error) {
	if errors.Is(err, dbcontrollers.ErrFenced) {
		s.refused.Add(1)
		if lost := s.lost.Load(); lost != nil {
			(*lost)()
		}
	}
}

func (s *fencedJobs) JobClaim(ctx context.Context, p dbcontrollers.ClaimParams) (*schema.Job, error) {
	j, err := s.cur().JobClaim(ctx, p)
	s.check(err)
	return j, err
}

func (s *fencedJobs) JobUpdate(ctx context.Context, u dbcontrollers.JobUpdate) (*schema.Job, error) {
	j, err := s.cur().JobUpdate(ctx, u)
	s.check(err)
	return j, err
}

func (s *fencedJobs) JobExtendLease(ctx context.Context, owner string, ids []string, until time.Time) (int, error) {
	n, err := s.cur().JobExtendLease(ctx, owner, ids, until)
	s.check(err)
	return n, err
}

func (s *fencedJobs) JobRescue(ctx context.Context, now time.Time, maxAttempts int) ([]schema.Job, []schema.Job, error) {
	rq, fl, err := s.cur().JobRescue(ctx, now, maxAttempts)
	s.check(err)
	return rq, fl, err
}

// clusterState is what a replica knows of the lease.
type clusterState struct {
	mu     sync.Mutex
	role   string
	leader string        // the holder's instance id, "" when unknown
	wake   chan struct{} // try the lease now (the leader resigned)
}

// clustered reports whether the farm is one of several replicas.
func (f *Farm) clustered() bool { return f.cfg.Bus != nil }

// Role says whether this replica schedules (RoleLeader) or not, and which
// instance does ("" when unknown). One process alone always leads.
func (f *Farm) Role() (role, leader string) {
	if !f.clustered() {
		return RoleLeader, f.cfg.InstanceID
	}
	f.cl.mu.Lock()
	defer f.cl.mu.Unlock()
	return f.cl.role, f.cl.leader
}

// leading reports whether this replica schedules now.
func (f *Farm) leading() bool {
	role, _ := f.Role()
	return role == RoleLeader
}

// runCluster is Run for a replica: it relays the bus, serves the API as a
// follower, and leads (schedules, drives the nodes, probes) while it holds
// the scheduler's lease.
func (f *Farm) runCluster(ctx context.Context) error {
	ready := make(chan struct{})
	busDone := make(chan struct{})
	go func() {
		defer close(busDone)
		err := f.cfg.Bus.Run(ctx, cluster.Handlers{
			Event:  f.hub.Deliver,
			Notice: f.onNotice,
			Resync: func() {
				f.hub.Resync()
				f.nodesChanged(ctx)
			},
		}, ready)
		if err != nil && ctx.Err() == nil {
			f.log.Error("cluster bus", "err", err)
		}
	}()
	select {
	case <-ready:
	case <-ctx.Done():
		<-busDone
		return nil
	}
	f.startedOnce.Do(func() { close(f.started) })
	f.bg.Add(1)
	go func() {
		defer f.bg.Done()
		f.followLoop(ctx)
	}()
	defer func() { <-busDone }()
	defer f.bg.Wait() // before the bus is waited for, as each return did

	every := f.cfg.LeaderLease / 3
	for {
		l, err := f.cfg.Leases.LeaderAcquire(ctx, dbcontrollers.LeaderScheduler, f.cfg.InstanceID, f.cfg.LeaderLease, 0)
		signal(f.sigs().leaseTried, l.Holder)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			f.log.Warn("scheduler lease", "err", err)
		case l.Held:
			f.lead(ctx, l)
			if ctx.Err() != nil {
				return nil
			}
			continue // lost it: try again at once, as anyone else
		default:
			f.cl.mu.Lock()
			f.cl.role, f.cl.leader = RoleFollower, l.Holder
			f.cl.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(every):
		case <-f.cl.wake:
		}
	}
}

// lead runs one term: the scheduler with its writes fenced by the term's
// epoch, the prober, and a keeper renewing the lease. It returns when ctx
// ends (the lease is then given up, for a quick handover) or the lease is
// lost (renewal refused, not confirmed in time, or a write fenced).
func (f *Farm) lead(ctx context.Context, l dbcontrollers.Leadership) {
	tctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lost := make(chan struct{})
	var lostOnce sync.Once
	f.cl.mu.Lock()
	f.cl.role, f.cl.leader = RoleLeader, f.cfg.InstanceID
	f.cl.mu.Unlock()
	f.fenced.epoch.Store(l.Epoch)
	onLost := func() { lostOnce.Do(func() { close(lost) }) }
	f.fenced.lost.Store(&onLost)
	f.log.Info("leading the farm", "epoch", l.Epoch)

	var keeper sync.WaitGroup
	keeper.Go(func() {
		defer cancel()
		f.renewLease(tctx, l, lost)
	})
	var prober sync.WaitGroup
	prober.Go(func() {
		if err := f.nodes.Run(tctx); err != nil {
			f.log.Error("node prober", "err", err)
		}
	})
	f.resetTerm()
	_ = f.schedulerLoop(tctx)
	cancel()
	prober.Wait()
	keeper.Wait()

	f.fenced.epoch.Store(noTerm)
	f.resetTerm() // the term's runners are stopped: followers hold passive ones
	f.cl.mu.Lock()
	f.cl.role = RoleFollower
	if f.cl.leader == f.cfg.InstanceID {
		f.cl.leader = ""
	}
	f.cl.mu.Unlock()
	if ctx.Err() != nil {
		// A clean stop: hand over now rather than after the lease.
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if err := f.cfg.Leases.LeaderResign(rctx, dbcontrollers.LeaderScheduler, f.cfg.InstanceID, l.Epoch); err == nil {
			_ = f.cfg.Bus.Notify(rctx, cluster.Notice{Kind: cluster.NoticeResigned, From: f.cfg.InstanceID})
		}
		rcancel()
		f.log.Info("gave up the lead", "epoch", l.Epoch)
		return
	}
	f.log.Warn("lost the lead", "epoch", l.Epoch)
}

// renewLease renews the term's lease every third of it until ctx ends or the
// term is lost. A renewal not confirmed before the lease would run out by
// this replica's clock ends the term too: another replica may take it then.
func (f *Farm) renewLease(ctx context.Context, l dbcontrollers.Leadership, lost <-chan struct{}) {
	every := f.cfg.LeaderLease / 3
	confirmed := time.Now() // a monotonic reading: the lease runs from about now
	for {
		select {
		case <-ctx.Done():
			return
		case <-lost:
			return
		case <-time.After(every):
		}
		if f.leaseHook != nil && !f.leaseHook() {
			continue // a test holds this replica paused
		}
		start := time.Now()
		rctx, cancel := context.WithDeadline(ctx, confirmed.Add(f.cfg.LeaderLease-every/2))
		got, err := f.cfg.Leases.LeaderAcquire(rctx, dbcontrollers.LeaderScheduler, f.cfg.InstanceID, f.cfg.LeaderLease, l.Epoch)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err == nil && got.Held:
			confirmed = start
		case err == nil:
			f.log.Warn("the scheduler lease was taken over", "by", got.Holder, "epoch", got.Epoch)
			f.cl.mu.Lock()
			f.cl.leader = got.Holder
			f.cl.mu.Unlock()
			return
		case time.Since(confirmed) >= f.cfg.LeaderLease-every/2:
			f.log.Error("scheduler lease not renewed in time, stepping down", "err", err)
			return
		default:
			f.log.Warn("renew the scheduler lease", "err", err)
		}
	}
}

// resetTerm clears what a term keeps in memory; the term loads it again
// from the database (queue) and the nodes (runners, adopted jobs).
func (f *Farm) resetTerm() {
	f.mu.Lock()
	f.queue = newFairQueue(f.cfg.Weights)
	f.queue.LenFunc = f.metrics.queueLen
	f.positions = make(map[string]int)
	f.unrunnable = make(map[string]time.Time)
	f.mu.Unlock()
	f.rmu.Lock()
	f.runners = make(map[string]*runner)
	f.retiring = make(map[*runner]bool)
	f.rmu.Unlock()
	f.lmu.Lock()
	f.leased = make(map[string]bool)
	f.lmu.Unlock()
	select {
	case <-f.kick:
	default:
	}
}

// onNotice handles a notice from a replica (this one included). It runs on
// the bus's goroutine: anything that waits goes elsewhere.
func (f *Farm) onNotice(n cluster.Notice) {
	ctx := f.runCtx
	switch n.Kind {
	case cluster.NoticeResigned:
		select {
		case f.cl.wake <- struct{}{}:
		default:
		}
	case cluster.NoticeNodes:
		f.bg.Add(1)
		go func() {
			defer f.bg.Done()
			f.nodesChanged(ctx)
		}()
	case cluster.NoticeSubmitted:
		if n.From == f.cfg.InstanceID || !f.leading() {
			return // a submit here was queued here
		}
		f.bg.Add(1)
		go func() {
			defer f.bg.Done()
			f.takeQueued(ctx, n.JobID)
		}()
	case cluster.NoticeCancel:
		if n.From == f.cfg.InstanceID || !f.leading() {
			return // a cancel here took the job off here
		}
		f.bg.Add(1)
		go func() {
			defer f.bg.Done()
			f.cancelHere(ctx, n.JobID)
		}()
	case cluster.NoticeProbe:
		if !f.leading() {
			return
		}
		f.bg.Add(1)
		go func() {
			defer f.bg.Done()
			if _, err := f.probeHere(ctx, n.Node); err != nil && !errors.Is(err, schema.ErrNotFound) {
				f.log.Warn("probe asked by a replica", "node", n.Node, "err", err)
			}
		}()
	}
}

// notify tells every replica, without keeping the caller (an API request)
// waiting on Redis: a notice that cannot be sent is made up for by the
// leader's periodic look at the database and the replicas' at the nodes.
func (f *Farm) notify(ctx context.Context, n cluster.Notice) {
	if !f.clustered() {
		return
	}
	n.From = f.cfg.InstanceID
	go func() {
		nctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), busCallTimeout)
		defer cancel()
		if err := f.cfg.Bus.Notify(nctx, n); err != nil {
			f.log.Warn("notify replicas", "kind", n.Kind, "err", err)
		}
	}()
}

// busCallTimeout bounds one call to the bus made on behalf of an API
// request or the scheduler: while Redis is away they go on without it.
const busCallTimeout = 2 * time.Second

// takeQueued puts a job another replica queued into the scheduler.
func (f *Farm) takeQueued(ctx context.Context, id string) {
	f.mu.Lock()
	has := f.queue.Has(id)
	f.mu.Unlock()
	if has {
		return
	}
	j, err := f.db.JobGet(ctx, id)
	if err != nil || j.State != schema.JobQueued {
		return
	}
	pj, err := pendingFromJob(j, f.cfg.MaxGraphNodes)
	if err != nil {
		f.failQueued(ctx, id, &schema.JobError{Code: schema.CodeValidationFailed, Message: "the workflow can no longer be read under the configured limits"})
		return
	}
	f.mu.Lock()
	if !f.queue.Has(id) {
		f.queue.Push(pj)
		f.publishPositionsLocked()
	}
	f.mu.Unlock()
	f.kickScheduler()
}

// catchUp queues every queued job of the database the scheduler does not
// hold: those whose notice was lost.
func (f *Farm) catchUp(ctx context.Context) {
	ids, err := f.db.JobIDsByState(ctx, schema.JobQueued)
	if err != nil {
		if ctx.Err() == nil {
			f.log.Warn("look for queued jobs", "err", err)
		}
		return
	}
	f.mu.Lock()
	var missing []string
	for _, id := range ids {
		if !f.queue.Has(id) {
			missing = append(missing, id)
		}
	}
	f.mu.Unlock()
	for _, id := range missing {
		f.takeQueued(ctx, id)
	}
}

// nodesChanged reads the node registrations again (another replica added,
// changed or removed one).
func (f *Farm) nodesChanged(ctx context.Context) {
	if err := f.nodes.Sync(ctx); err != nil && ctx.Err() == nil {
		f.log.Warn("read node registrations", "err", err)
	}
	f.kickScheduler()
}

// nodeViewsTTL is how long the leader's node views stay readable without a
// refresh: a few publications.
func (f *Farm) nodeViewsTTL() time.Duration { return 3 * f.cfg.ReconcileEvery }

// publishNodes shares the leader's node views with the other replicas, off
// the scheduler's goroutine (one at a time: a slow Redis never holds the
// scheduler, and views skipped meanwhile are sent by the next call).
func (f *Farm) publishNodes(ctx context.Context) {
	if !f.clustered() || !f.sharing.CompareAndSwap(false, true) {
		return
	}
	b, err := json.Marshal(f.nodes.List())
	if err != nil {
		f.sharing.Store(false)
		return
	}
	go func() {
		defer f.sharing.Store(false)
		pctx, cancel := context.WithTimeout(ctx, busCallTimeout)
		defer cancel()
		if err := f.cfg.Bus.PutNodes(pctx, b, f.nodeViewsTTL()); err != nil && ctx.Err() == nil {
			f.log.Warn("share node views", "err", err)
		}
	}()
}

// nodeViews is the node list as this replica answers it: the leader's own;
// on a follower the leader's views (as followViews last read them, as often
// as the leader shares them) for the nodes registered here (a node the
// leader has not read yet shows as this replica knows it).
func (f *Farm) nodeViews() []schema.NodeView {
	local := f.nodes.List()
	theirs := f.theirViews()
	for i, v := range local {
		if t, ok := theirs[v.Name]; ok {
			local[i] = t
		}
	}
	return local
}

// theirViews is, on a follower, the leader's node views by name as
// followViews last read them; nil on the leader and alone, whose own views
// are the truth.
func (f *Farm) theirViews() map[string]schema.NodeView {
	if !f.clustered() || f.leading() {
		return nil
	}
	if p := f.leaderViews.Load(); p != nil {
		return *p
	}
	return nil
}

// followLoop keeps a replica's own view current whatever its role: node
// registrations read again, idle streams forgotten; on a follower, the
// leader's node views and catalogues, so that its submits are checked
// against the nodes as the leader's are.
func (f *Farm) followLoop(ctx context.Context) {
	// The leader's node views are read as often as it shares them; the
	// rest (catalogues, registrations, idle streams) once a lease.
	fast := time.NewTicker(min(f.cfg.ReconcileEvery, f.cfg.LeaderLease))
	defer fast.Stop()
	slow := time.NewTicker(f.cfg.LeaderLease)
	defer slow.Stop()
	if !f.leading() {
		f.followViews(ctx)
		f.followCatalogues(ctx)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-fast.C:
			if !f.leading() {
				f.followViews(ctx)
			}
		case <-slow.C:
			f.hub.GC()
			f.settleStreams(ctx)
			if !f.leading() {
				f.nodesChanged(ctx)
				f.followCatalogues(ctx)
			}
		}
	}
}

// settleStreams ends the streams followed here of jobs that ended without
// their terminal event: a replica that wrote a job's end and died before its
// queue sent the event to the bus leaves the job's subscribers waiting on
// every replica. The database says how the job ended; restated, that end
// closes the stream everywhere (the bus keeps the first terminal event of a
// job and nothing after it, so a late original adds nothing).
func (f *Farm) settleStreams(ctx context.Context) {
	ids := f.hub.Unsettled(f.cfg.LeaderLease)
	if len(ids) == 0 {
		return
	}
	ended, err := f.db.JobIDsEnded(ctx, ids)
	if err != nil {
		return // the next round asks again
	}
	for _, id := range ended {
		job, err := f.db.JobGet(ctx, id)
		if err != nil || !job.State.Terminal() {
			continue
		}
		f.log.Warn("job ended without its terminal event reaching the bus; restated from the database", "job_id", id, "state", job.State)
		f.hub.Publish(id, hub.Ended(job))
	}
}

// followViews reads the leader's node views, for a follower's placement
// checks.
func (f *Farm) followViews(ctx context.Context) {
	bctx, cancel := context.WithTimeout(ctx, busCallTimeout)
	defer cancel()
	b, err := f.cfg.Bus.Nodes(bctx)
	if err != nil || b == nil {
		return
	}
	var views []schema.NodeView
	if json.Unmarshal(b, &views) != nil {
		return
	}
	m := make(map[string]schema.NodeView, len(views))
	for _, v := range views {
		m[v.Name] = v
	}
	f.leaderViews.Store(&m)
}

// shareCatalogue gives the other replicas what the leader read of a node.
func (f *Farm) shareCatalogue(node string, c *catalogue) {
	if !f.clustered() || !f.leading() || c == nil {
		return
	}
	b, err := c.encode()
	if err != nil {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), busCallTimeout)
		defer cancel()
		if err := f.cfg.Bus.PutCatalogue(ctx, node, b); err != nil {
			f.log.Warn("share a node's catalogue", "node", node, "err", err)
		}
	}()
}

// followCatalogues brings a follower's node catalogues in line with the
// leader's. Each registered node gets a passive runner: it holds
// the node's catalogue (and may read it again from the node, rate-limited,
// when a submit names a value nobody offers) but never follows the node.
func (f *Farm) followCatalogues(ctx context.Context) {
	bctx, cancel := context.WithTimeout(ctx, busCallTimeout)
	defer cancel()
	changed := false
	registered := map[string]bool{}
	views := f.nodes.List()
	names := make([]string, len(views))
	for i, v := range views {
		names[i] = v.Name
	}
	// The sums first (one round trip): a catalogue, which can be large, is
	// read again only when its sum changed, or when the leader wrote none.
	sums, err := f.cfg.Bus.CatalogueSums(bctx, names)
	if err != nil {
		sums = nil
	}
	for i, name := range names {
		registered[name] = true
		var have [sha256.Size]byte
		if r := f.runner(name); r != nil {
			r.mu.Lock()
			have = r.catSum
			r.mu.Unlock()
		}
		if i < len(sums) && len(sums[i]) == sha256.Size && [sha256.Size]byte(sums[i]) == have {
			continue
		}
		b, err := f.cfg.Bus.Catalogue(bctx, name)
		if err != nil || b == nil {
			continue
		}
		r := f.passiveRunner(name)
		if r == nil {
			return // this replica leads now
		}
		sum := sha256.Sum256(b)
		r.mu.Lock()
		same := r.catSum == sum
		r.mu.Unlock()
		if same {
			continue
		}
		c, err := f.cats.decode(b, f.liveCatalogues(r))
		if err != nil {
			f.log.Warn("read a node's catalogue from the bus", "node", name, "err", err)
			continue
		}
		r.mu.Lock()
		r.cat, r.catAt, r.catSum = c, f.cfg.NowFunc(), sum
		r.mu.Unlock()
		changed = true
	}
	f.cl.mu.Lock()
	if f.cl.role != RoleLeader {
		f.rmu.Lock()
		for name := range f.runners {
			if !registered[name] {
				delete(f.runners, name)
				changed = true
			}
		}
		f.rmu.Unlock()
	}
	f.cl.mu.Unlock()
	if changed {
		f.placementChanged()
	}
}

// passiveRunner returns a follower's runner of a node, making it when
// there is none; nil when this replica leads (its runners are its own).
func (f *Farm) passiveRunner(name string) *runner {
	f.cl.mu.Lock()
	defer f.cl.mu.Unlock()
	if f.cl.role == RoleLeader {
		return nil
	}
	f.rmu.Lock()
	defer f.rmu.Unlock()
	if r := f.runners[name]; r != nil {
		return r
	}
	n, ok := f.nodes.Node(name)
	if !ok {
		return nil
	}
	r, err := f.newRunner(name, n.URL)
	if err != nil {
		return nil
	}
	r.stop, r.done = func() {}, make(chan struct{})
	close(r.done) // nothing runs to stop
	f.runners[name] = r
	return r
}

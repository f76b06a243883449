package dispatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// NodeStore is what Nodes needs from the control database.
type NodeStore interface {
	NodeList(ctx context.Context) ([]schema.Node, error)
	NodeGet(ctx context.Context, name string) (*schema.Node, error)
	NodeUpsert(ctx context.Context, n *schema.Node) error
	NodeDelete(ctx context.Context, name string) error
	NodeSetDrain(ctx context.Context, name string, drain bool) error
}

// ProbeConfig tunes the node prober. Zero fields take the defaults.
type ProbeConfig struct {
	Interval      time.Duration // between probes of a healthy node; default 5s
	Timeout       time.Duration // whole probe (connect + system_stats + queue); default 3s
	SlowThreshold time.Duration // a probe slower than this makes the node degraded; default 1s
	MaxBackoff    time.Duration // cap of the doubling interval of a node that stays down; default 1m
	Jitter        float64       // fraction of the interval each delay is spread by; default 0.2, negative = none
	Concurrency   int           // probes running at once; default 64
	Allow         []string      // hosts, IPs and CIDRs ProbeURL may target; empty = loopback only
	// FailureLimit is scheduler.node_failure_limit: jobs in a row that fail
	// for reasons of the node's own before it goes degraded; default 3.
	FailureLimit int
	// FaultBackoff is how long a node degraded by job failures first stays
	// out of placement before a good probe lets it back; it doubles each time
	// the node is degraded again without a success in between, up to
	// maxFaultBackoff; default 30s.
	FaultBackoff time.Duration
	NowFunc      func() time.Time
}

// maxFaultBackoff caps the doubling FaultBackoff.
const maxFaultBackoff = 10 * time.Minute

func (c ProbeConfig) withDefaults() ProbeConfig {
	if c.Interval <= 0 {
		c.Interval = 5 * time.Second
	}
	if c.Timeout <= 0 {
		c.Timeout = 3 * time.Second
	}
	if c.SlowThreshold <= 0 {
		c.SlowThreshold = time.Second
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = time.Minute
	}
	if c.MaxBackoff < c.Interval {
		c.MaxBackoff = c.Interval
	}
	if c.Jitter == 0 {
		c.Jitter = 0.2
	}
	if c.Jitter < 0 {
		c.Jitter = 0
	}
	if c.Jitter > 1 {
		c.Jitter = 1
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 64
	}
	if c.FailureLimit <= 0 {
		c.FailureLimit = 3
	}
	if c.FaultBackoff <= 0 {
		c.FaultBackoff = 30 * time.Second
	}
	if c.NowFunc == nil {
		c.NowFunc = time.Now
	}
	return c
}

// Runtime is the dispatcher's side of a node view.
type Runtime struct {
	Inflight     int
	CurrentJob   string
	ModelsLoaded []string
	JobsDone     int64
	JobsFailed   int64
	// Catalogue counts (see schema.NodeView); CatalogueAt nil until read.
	Checkpoints, Loras, CustomNodePacks int
	CatalogueAt                         *time.Time
}

// NodeChange tells subscribers that a node was added, removed, drained or
// changed state. View is the node after the change (before it, for Removed).
type NodeChange struct {
	Name     string
	Old, New schema.NodeState
	Removed  bool
	Added    bool
	View     schema.NodeView

	seq uint64
}

// Nodes is the registry of ComfyUI nodes and their prober: it keeps the
// registered nodes (config file and API) in the store, probes each on its own
// schedule and holds the latest health of every node.
//
// Health moves between up, degraded and down only when two probes in a row
// agree (the first probe of an unknown node decides at once), except that a
// refused connection seen by a runner marks it down at once (Suspect). A
// node whose drain flag is set shows as draining whatever its health; its
// probe fields stay current. A node that fails FailureLimit jobs in a row
// for reasons of its own shows as degraded while it answers (node_faults.go).
type Nodes struct {
	store   NodeStore
	cfg     ProbeConfig
	log     *slog.Logger
	allow   probeAllowList
	sem     chan struct{}
	metrics *nodeMetrics
	runtime atomic.Pointer[func(string) Runtime]

	mu       sync.Mutex
	entries  map[string]*nodeEntry
	reserved map[string]bool // names being added
	runCtx   context.Context // non-nil while Run runs
	workers  sync.WaitGroup
	seq      uint64 // orders changes

	subMu   sync.Mutex
	subs    map[*nodeSub]struct{}
	emitted map[string]uint64 // last change seq sent per node

	// Seams for tests and benchmarks.
	dialer      func(ctx context.Context, addr string) (net.Conn, error)
	lookupFunc  func(ctx context.Context, host string) ([]netip.Addr, error)
	onProbeFunc func(probeRecord)
	// waitFunc, when set, replaces the timer between one node's probes: it
	// waits d (or not at all) and reports false when ctx ended.
	waitFunc func(ctx context.Context, d time.Duration) bool
}

// probeRecord describes one scheduled probe (tests and benchmarks).
type probeRecord struct {
	Name     string
	Due      time.Time // when the schedule wanted it
	Started  time.Time // when it got a slot and began
	Result   schema.ProbeResult
	Answered bool
	State    schema.NodeState // the node's state after this probe
}

type nodeEntry struct {
	node       schema.Node
	host       string
	port       int
	health     schema.NodeState
	pending    schema.NodeState // a different verdict waiting for confirmation
	downStreak int              // consecutive down verdicts that timed out, while down
	suspect    string           // why the node was marked down without a probe (a refused connection)
	last       *schema.ProbeResult
	lastOKAt   *time.Time
	cancel     context.CancelFunc // stops its worker

	faults       int           // jobs in a row that failed for reasons of the node's own
	faulty       bool          // degraded by faults: out of placement
	faultyUntil  time.Time     // no good probe lets a faulty node back before this
	faultBackoff time.Duration // the next faulty period; 0 = ProbeConfig.FaultBackoff
	faultReason  string
}

func (e *nodeEntry) state() schema.NodeState {
	if e.node.Drain {
		return schema.NodeDraining
	}
	if e.faulty && (e.health == schema.NodeUp || e.health == schema.NodeDegraded) {
		return schema.NodeDegraded
	}
	return e.health
}

// reason says why the node is not up, for the view.
func (e *nodeEntry) reason(slow time.Duration) string {
	switch {
	case e.node.Drain:
		return "drained: finishes its current work, takes no new work"
	case e.faulty && (e.health == schema.NodeUp || e.health == schema.NodeDegraded):
		return e.faultReason
	case e.health == schema.NodeDown && e.suspect != "" && (e.last == nil || e.last.PortOpen):
		return e.suspect
	case e.health == schema.NodeDown || e.health == schema.NodeDegraded:
		if e.last == nil {
			return ""
		}
		if e.last.Error != "" {
			return "probe: " + e.last.Error
		}
		if e.health == schema.NodeDegraded {
			return fmt.Sprintf("probe: slow answers (%.0f ms, more than %s)", e.last.LatencyMS, slow)
		}
	}
	return ""
}

// NewNodes builds an empty registry; call Load, then Run.
func NewNodes(store NodeStore, cfg ProbeConfig, logger *slog.Logger) *Nodes {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	cfg = cfg.withDefaults()
	n := &Nodes{
		store:      store,
		cfg:        cfg,
		log:        logger,
		sem:        make(chan struct{}, cfg.Concurrency),
		metrics:    newNodeMetrics(),
		entries:    map[string]*nodeEntry{},
		reserved:   map[string]bool{},
		subs:       map[*nodeSub]struct{}{},
		emitted:    map[string]uint64{},
		dialer:     dialTCP,
		lookupFunc: lookupNetIP,
	}
	n.allow = parseProbeAllowList(cfg.Allow, logger)
	return n
}

// SetRuntimeFunc sets the source of the inflight, current_job, models_loaded
// and jobs_* fields of views. f is called without any lock of Nodes held; it
// must be safe for concurrent use and must not call back into Nodes.
func (n *Nodes) SetRuntimeFunc(f func(name string) Runtime) {
	if f == nil {
		n.runtime.Store(nil)
		return
	}
	n.runtime.Store(&f)
}

var nodeNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,63}$`)

// Limits of a registered node.
const (
	MaxNodeInflight = 64
	maxNodeTags     = 32
	maxNodeTagLen   = 64
)

// normalizeNode validates a node registration and returns it cleaned up:
// URL without trailing slash, max_inflight 0 taken as 1, tags trimmed and
// de-duplicated.
func normalizeNode(nd schema.Node) (schema.Node, probeTarget, error) {
	if !nodeNameRE.MatchString(nd.Name) {
		return nd, probeTarget{}, schema.Invalid("name", "must match ^[a-z0-9][a-z0-9_.-]{0,63}$")
	}
	u := strings.TrimSpace(nd.URL)
	t, err := parseProbeTarget(u)
	if err != nil {
		return nd, probeTarget{}, err
	}
	if i := strings.Index(u, "://"); i < 0 || !hasExplicitPort(u[i+3:]) {
		return nd, probeTarget{}, schema.Invalid("url", "must name a port, like http://10.0.0.5:8188")
	}
	nd.URL = t.base
	if nd.MaxInflight == 0 {
		nd.MaxInflight = 1
	}
	if nd.MaxInflight < 1 || nd.MaxInflight > MaxNodeInflight {
		return nd, probeTarget{}, schema.Invalid("max_inflight", "must be 1..%d", MaxNodeInflight)
	}
	tags := make([]string, 0, len(nd.Tags))
	for _, tag := range nd.Tags {
		tag = strings.TrimSpace(tag)
		if tag == "" || len(tag) > maxNodeTagLen {
			return nd, probeTarget{}, schema.Invalid("tags", "each tag must be 1..%d characters", maxNodeTagLen)
		}
		if !slices.Contains(tags, tag) {
			tags = append(tags, tag)
		}
	}
	if len(tags) > maxNodeTags {
		return nd, probeTarget{}, schema.Invalid("tags", "at most %d tags", maxNodeTags)
	}
	nd.Tags = tags
	return nd, t, nil
}

// hasExplicitPort reports whether the authority part of a URL (after
// "scheme://") carries a port.
func hasExplicitPort(rest string) bool {
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	_, port, err := net.SplitHostPort(rest)
	return err == nil && port != ""
}

func newNodeEntry(nd schema.Node, t probeTarget) *nodeEntry {
	return &nodeEntry{node: nd, host: t.host, port: t.port, health: schema.NodeUnknown}
}

// Load registers the nodes of the config file (Source "config"; a drain flag
// set earlier through the API is kept), deletes config-sourced rows no longer
// in the config, and loads every stored node into the registry.
func (n *Nodes) Load(ctx context.Context, configNodes []schema.Node) error {
	now := n.cfg.NowFunc().UTC()
	seen := map[string]bool{}
	for i, cn := range configNodes {
		nd, _, err := normalizeNode(cn)
		if err != nil {
			return fmt.Errorf("config node %d (%q): %w", i, cn.Name, err)
		}
		if seen[nd.Name] {
			return fmt.Errorf("config node %q: %w: listed twice", nd.Name, schema.ErrConflict)
		}
		seen[nd.Name] = true
		nd.Source, nd.CreatedAt, nd.UpdatedAt = "config", now, now
		old, err := n.store.NodeGet(ctx, nd.Name)
		switch {
		case err == nil:
			nd.Drain, nd.CreatedAt = old.Drain, old.CreatedAt
			if old.Source != "config" {
				n.log.Warn("config node replaces a node registered through the API", "node", nd.Name)
			}
		case !errors.Is(err, schema.ErrNotFound):
			return fmt.Errorf("load node %s: %w", nd.Name, err)
		}
		if err := n.store.NodeUpsert(ctx, &nd); err != nil {
			return fmt.Errorf("save node %s: %w", nd.Name, err)
		}
	}
	rows, err := n.store.NodeList(ctx)
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	keep := rows[:0]
	for _, r := range rows {
		if r.Source == "config" && !seen[r.Name] {
			if err := n.store.NodeDelete(ctx, r.Name); err != nil && !errors.Is(err, schema.ErrNotFound) {
				return fmt.Errorf("delete node %s (gone from config): %w", r.Name, err)
			}
			n.log.Info("node removed from config", "node", r.Name)
			continue
		}
		keep = append(keep, r)
	}
	n.applyStored(keep)
	return nil
}

// Sync reads the stored nodes again and brings the registry in line: nodes
// another replica added, changed (URL, tags, drain) or removed.
func (n *Nodes) Sync(ctx context.Context) error {
	rows, err := n.store.NodeList(ctx)
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	n.applyStored(rows)
	return nil
}

// applyStored makes the registry hold exactly the stored nodes keep.
func (n *Nodes) applyStored(keep []schema.Node) {
	var changes []NodeChange
	n.mu.Lock()
	inStore := map[string]bool{}
	for _, r := range keep {
		nd, t, err := normalizeNode(r)
		if err != nil {
			n.log.Warn("stored node is invalid, skipped", "node", r.Name, "err", err)
			continue
		}
		inStore[nd.Name] = true
		if e, ok := n.entries[nd.Name]; ok {
			old := e.state()
			if e.node.URL != nd.URL {
				*e = nodeEntry{health: schema.NodeUnknown, cancel: e.cancel}
			}
			e.node, e.host, e.port = nd, t.host, t.port
			if e.state() != old {
				changes = append(changes, n.changeLocked(e, old, false, false))
			}
			continue
		}
		e := newNodeEntry(nd, t)
		n.entries[nd.Name] = e
		n.metrics.setState(nd.Name, e.state())
		n.startWorkerLocked(e)
		changes = append(changes, n.changeLocked(e, "", true, false))
	}
	for name, e := range n.entries {
		if !inStore[name] {
			changes = append(changes, n.removeLocked(e))
		}
	}
	n.mu.Unlock()
	n.emit(changes...)
}

// List returns every node's view, sorted by name.
func (n *Nodes) List() []schema.NodeView {
	n.mu.Lock()
	views := make([]schema.NodeView, 0, len(n.entries))
	for _, e := range n.entries {
		views = append(views, n.viewLocked(e))
	}
	n.mu.Unlock()
	slices.SortFunc(views, func(a, b schema.NodeView) int { return strings.Compare(a.Name, b.Name) })
	for i := range views {
		n.fillRuntime(&views[i])
	}
	return views
}

// Get returns one node's view.
func (n *Nodes) Get(name string) (schema.NodeView, bool) {
	n.mu.Lock()
	e, ok := n.entries[name]
	var v schema.NodeView
	if ok {
		v = n.viewLocked(e)
	}
	n.mu.Unlock()
	if ok {
		n.fillRuntime(&v)
	}
	return v, ok
}

// Node returns one node's registration (url, max_inflight, tags, drain).
func (n *Nodes) Node(name string) (schema.Node, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.entries[name]
	if !ok {
		return schema.Node{}, false
	}
	nd := e.node
	nd.Tags = slices.Clone(nd.Tags)
	return nd, true
}

// Health returns a node's health (up, degraded, down or unknown) without the
// drain overlay: whether a draining node still answers.
func (n *Nodes) Health(name string) (schema.NodeState, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.entries[name]
	if !ok {
		return "", false
	}
	return e.health, true
}

// Add registers a node through the API (Source "api"). A taken name is
// schema.ErrConflict; bad fields are a *schema.ValidationError.
func (n *Nodes) Add(ctx context.Context, node schema.Node) (schema.NodeView, error) {
	nd, t, err := normalizeNode(node)
	if err != nil {
		return schema.NodeView{}, err
	}
	now := n.cfg.NowFunc().UTC()
	nd.Source, nd.CreatedAt, nd.UpdatedAt, nd.Drain = "api", now, now, node.Drain

	n.mu.Lock()
	if _, ok := n.entries[nd.Name]; ok || n.reserved[nd.Name] {
		n.mu.Unlock()
		return schema.NodeView{}, fmt.Errorf("node %s: %w: already registered", nd.Name, schema.ErrConflict)
	}
	n.reserved[nd.Name] = true
	n.mu.Unlock()
	defer func() {
		n.mu.Lock()
		delete(n.reserved, nd.Name)
		n.mu.Unlock()
	}()

	if _, err := n.store.NodeGet(ctx, nd.Name); err == nil {
		return schema.NodeView{}, fmt.Errorf("node %s: %w: already stored", nd.Name, schema.ErrConflict)
	} else if !errors.Is(err, schema.ErrNotFound) {
		return schema.NodeView{}, fmt.Errorf("add node %s: %w", nd.Name, err)
	}
	if err := n.store.NodeUpsert(ctx, &nd); err != nil {
		return schema.NodeView{}, fmt.Errorf("add node %s: %w", nd.Name, err)
	}

	n.mu.Lock()
	e := newNodeEntry(nd, t)
	n.entries[nd.Name] = e
	n.metrics.setState(nd.Name, e.state())
	n.startWorkerLocked(e)
	c := n.changeLocked(e, "", true, false)
	n.mu.Unlock()
	n.emit(c)
	n.log.Info("node added", "node", nd.Name, "url", nd.URL)
	v, _ := n.Get(nd.Name)
	return v, nil
}

// Remove deletes a node from the store and the registry and stops probing it.
func (n *Nodes) Remove(ctx context.Context, name string) error {
	n.mu.Lock()
	_, ok := n.entries[name]
	n.mu.Unlock()
	if !ok {
		return fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	if err := n.store.NodeDelete(ctx, name); err != nil && !errors.Is(err, schema.ErrNotFound) {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	n.mu.Lock()
	e, ok := n.entries[name]
	var c NodeChange
	if ok {
		c = n.removeLocked(e)
	}
	n.mu.Unlock()
	if ok {
		n.emit(c)
		n.log.Info("node removed", "node", name)
	}
	return nil
}

// removeLocked drops e from the registry and returns its Removed change.
func (n *Nodes) removeLocked(e *nodeEntry) NodeChange {
	delete(n.entries, e.node.Name)
	if e.cancel != nil {
		e.cancel()
	}
	n.metrics.forget(e.node.Name)
	return n.changeLocked(e, e.state(), false, true)
}

// SetDrain sets or clears a node's drain flag: a draining node finishes its
// current work and takes no new work.
func (n *Nodes) SetDrain(ctx context.Context, name string, drain bool) (schema.NodeView, error) {
	n.mu.Lock()
	_, ok := n.entries[name]
	n.mu.Unlock()
	if !ok {
		return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	if err := n.store.NodeSetDrain(ctx, name, drain); err != nil {
		return schema.NodeView{}, fmt.Errorf("drain node %s: %w", name, err)
	}
	n.mu.Lock()
	e, ok := n.entries[name]
	if !ok {
		n.mu.Unlock()
		return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	var changes []NodeChange
	if e.node.Drain != drain {
		old := e.state()
		e.node.Drain = drain
		e.node.UpdatedAt = n.cfg.NowFunc().UTC()
		n.metrics.setState(name, e.state())
		changes = append(changes, n.changeLocked(e, old, false, false))
	}
	v := n.viewLocked(e)
	n.mu.Unlock()
	n.emit(changes...)
	n.fillRuntime(&v)
	n.log.Info("node drain set", "node", name, "drain", drain)
	return v, nil
}

// viewLocked builds the probe and registration part of a view.
func (n *Nodes) viewLocked(e *nodeEntry) schema.NodeView {
	v := schema.NodeView{
		Name:         e.node.Name,
		URL:          e.node.URL,
		Host:         e.host,
		Port:         e.port,
		Tags:         slices.Clone(e.node.Tags),
		MaxInflight:  e.node.MaxInflight,
		State:        e.state(),
		Reason:       e.reason(n.cfg.SlowThreshold),
		Devices:      []schema.Device{},
		ModelsLoaded: []string{},
	}
	if v.Tags == nil {
		v.Tags = []string{}
	}
	if r := e.last; r != nil {
		at := r.ProbedAt
		v.HostReachable, v.PortOpen, v.ComfyOK = r.HostReachable, r.PortOpen, r.ComfyOK
		v.LatencyMS, v.LastProbeAt, v.Error = r.LatencyMS, &at, r.Error
		v.ComfyUIVersion = r.ComfyUIVersion
		v.Devices = append(v.Devices, r.Devices...)
		v.QueueRunning, v.QueuePending = r.QueueRunning, r.QueuePending
	}
	if e.lastOKAt != nil {
		at := *e.lastOKAt
		v.LastOKAt = &at
	}
	return v
}

func (n *Nodes) fillRuntime(v *schema.NodeView) {
	f := n.runtime.Load()
	if f == nil {
		return
	}
	rt := (*f)(v.Name)
	v.Inflight, v.CurrentJob, v.JobsDone, v.JobsFailed = rt.Inflight, rt.CurrentJob, rt.JobsDone, rt.JobsFailed
	v.Checkpoints, v.Loras, v.CustomNodePacks, v.CatalogueAt = rt.Checkpoints, rt.Loras, rt.CustomNodePacks, rt.CatalogueAt
	if rt.ModelsLoaded != nil {
		v.ModelsLoaded = slices.Clone(rt.ModelsLoaded)
	}
}

// changeLocked builds a change of e numbered in registry order.
func (n *Nodes) changeLocked(e *nodeEntry, old schema.NodeState, added, removed bool) NodeChange {
	n.seq++
	return NodeChange{Name: e.node.Name, Old: old, New: e.state(), Added: added, Removed: removed,
		View: n.viewLocked(e), seq: n.seq}
}

// nodeSubBuffer is each subscriber's channel capacity; when it is full the
// oldest change is dropped so the prober never waits.
const nodeSubBuffer = 256

type nodeSub struct{ ch chan NodeChange }

// Subscribe returns a channel of node changes and a func that ends the
// subscription and closes the channel. A subscriber that falls behind loses
// its oldest changes, never blocks the prober. Call List after Subscribe for
// the current state.
func (n *Nodes) Subscribe() (<-chan NodeChange, func()) {
	s := &nodeSub{ch: make(chan NodeChange, nodeSubBuffer)}
	n.subMu.Lock()
	n.subs[s] = struct{}{}
	n.subMu.Unlock()
	return s.ch, sync.OnceFunc(func() {
		n.subMu.Lock()
		delete(n.subs, s)
		close(s.ch)
		n.subMu.Unlock()
	})
}

// emit sends changes to every subscriber without blocking. Runtime fields are
// filled here, outside the registry lock; a change that lost a race to a
// newer one of the same node is not sent.
func (n *Nodes) emit(changes ...NodeChange) {
	for _, c := range changes {
		n.fillRuntime(&c.View)
		n.subMu.Lock()
		if c.seq <= n.emitted[c.Name] {
			n.subMu.Unlock()
			continue
		}
		n.emitted[c.Name] = c.seq
		for s := range n.subs {
			select {
			case s.ch <- c:
			default:
				select { // drop the oldest
				case <-s.ch:
				default:
				}
				select {
				case s.ch <- c:
				default:
				}
			}
		}
		n.subMu.Unlock()
	}
}

// probeAllowList says which addresses ProbeURL may connect to.
type probeAllowList struct {
	prefixes []netip.Prefix
	hosts    []string // resolved when checked
}

func parseProbeAllowList(entries []string, log *slog.Logger) probeAllowList {
	var a probeAllowList
	for _, s := range entries {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if p, err := netip.ParsePrefix(s); err == nil {
			a.prefixes = append(a.prefixes, p.Masked())
			continue
		}
		if ip, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
			ip = ip.Unmap().WithZone("")
			a.prefixes = append(a.prefixes, netip.PrefixFrom(ip, ip.BitLen()))
			continue
		}
		if strings.ContainsAny(s, "/: ") {
			log.Error("probe allow entry ignored: not a host, IP or CIDR", "entry", s)
			continue
		}
		a.hosts = append(a.hosts, strings.ToLower(strings.TrimSuffix(s, ".")))
	}
	return a
}

func lookupNetIP(ctx context.Context, host string) ([]netip.Addr, error) {
	return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
}

// allowed reports whether ProbeURL may connect to addr.
func (n *Nodes) allowed(ctx context.Context, addr netip.Addr) bool {
	addr = addr.Unmap().WithZone("")
	if len(n.allow.prefixes) == 0 && len(n.allow.hosts) == 0 {
		return addr.IsLoopback()
	}
	for _, p := range n.allow.prefixes {
		if p.Contains(addr) {
			return true
		}
	}
	for _, h := range n.allow.hosts {
		ips, err := n.lookupFunc(ctx, h)
		if err != nil {
			continue
		}
		for _, ip := range ips {
			if ip.Unmap().WithZone("") == addr {
				return true
			}
		}
	}
	return false
}

// ProbeURL probes an unregistered host and port. The host is resolved first
// and every address it has must be in the allow list (loopback only when the
// list is empty), else schema.ErrForbidden and no connection is made. The
// probe then connects only to those checked addresses.
func (n *Nodes) ProbeURL(ctx context.Context, rawURL string) (schema.ProbeResult, error) {
	t, err := parseProbeTarget(rawURL)
	if err != nil {
		return schema.ProbeResult{}, err
	}
	var addrs []netip.Addr
	if ip, err := netip.ParseAddr(t.host); err == nil {
		addrs = []netip.Addr{ip}
	} else {
		lctx, cancel := context.WithTimeout(ctx, n.cfg.Timeout)
		addrs, err = n.lookupFunc(lctx, t.host)
		cancel()
		if err != nil || len(addrs) == 0 {
			msg := "resolve host: no address"
			var dnsErr *net.DNSError
			if errors.As(err, &dnsErr) {
				msg = "resolve host: " + dnsErr.Err
			}
			return schema.ProbeResult{URL: t.base, Host: t.host, Port: t.port, Error: msg,
				Devices: []schema.Device{}, ProbedAt: n.cfg.NowFunc().UTC()}, nil
		}
	}
	actx, cancel := context.WithTimeout(ctx, n.cfg.Timeout)
	defer cancel()
	for _, a := range addrs {
		if !n.allowed(actx, a) {
			return schema.ProbeResult{}, fmt.Errorf("%w: %s (%s) is not in the probe allow list", schema.ErrForbidden, t.host, a)
		}
	}
	dial := dialAddrs(addrs, t.port, n.dialer)
	res, _ := runProbe(ctx, t, n.cfg.Timeout, dial, n.cfg.NowFunc)
	return res, nil
}

package dispatch

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// catalogueRetryEvery bounds how often a submit naming a value no up node
// offers makes a node's catalogue be read again.
const catalogueRetryEvery = 30 * time.Second

// nodeFacts is what placement reads of one registered node.
type nodeFacts struct {
	name      string
	r         *runner
	tags      []string
	vramGB    float64 // total of its GPUs, from the last probe
	vramKnown bool
	up        bool // up and not draining
	limit     int
}

// facts lists every node with a runner, by name.
func (f *Farm) facts() []nodeFacts {
	runners := f.runnerList()
	theirs := f.theirViews()
	out := make([]nodeFacts, 0, len(runners))
	for name, r := range runners {
		n, ok := f.nodes.Node(name)
		if !ok {
			continue
		}
		view, ok := theirs[name]
		if !ok {
			view, _ = f.nodes.Get(name)
		}
		nf := nodeFacts{name: name, r: r, tags: n.Tags, limit: max(n.MaxInflight, 1),
			up: view.State == schema.NodeUp && !n.Drain}
		var total int64
		for _, d := range view.Devices {
			if d.Type != "cpu" {
				total += d.VRAMTotal
			}
		}
		if view.LastProbeAt != nil && view.ComfyOK {
			nf.vramGB, nf.vramKnown = float64(total)/(1<<30), true
		}
		out = append(out, nf)
	}
	slices.SortFunc(out, func(a, b nodeFacts) int { return strings.Compare(a.name, b.name) })
	return out
}

// meets reports whether the node has every tag and enough VRAM. A node not
// probed yet is given the benefit of the doubt on VRAM.
func (nf *nodeFacts) meets(req *schema.Requirements) bool {
	if req == nil {
		return true
	}
	for _, t := range req.Tags {
		if !slices.Contains(nf.tags, t) {
			return false
		}
	}
	return req.MinVRAMGB <= 0 || !nf.vramKnown || nf.vramGB >= req.MinVRAMGB
}

// qualifies reports whether the node may run pj, free slots aside.
func (nf *nodeFacts) qualifies(pj *pendingJob) bool {
	return nf.meets(pj.Req) && nf.r.canRun(pj)
}

// liveCatalogues lists the catalogues runners other than except hold.
func (f *Farm) liveCatalogues(except *runner) []*catalogue {
	f.rmu.RLock()
	defer f.rmu.RUnlock()
	var out []*catalogue
	for _, r := range f.runners {
		if r != except {
			out = append(out, r.catalogue())
		}
	}
	for r := range f.retiring {
		if r != except {
			out = append(out, r.catalogue())
		}
	}
	return out
}

// placementChanged is called when what a node offers changed: the index
// of enum inputs is rebuilt and the scheduler looks again (and publishes
// positions).
func (f *Farm) placementChanged() {
	idx := &enumIndex{inputs: map[[2]string]bool{}}
	for _, c := range f.liveCatalogues(nil) {
		if c == nil {
			continue
		}
		for class, inputs := range c.choices {
			for input := range inputs {
				idx.inputs[[2]string{class, input}] = true
			}
		}
	}
	f.emu.Lock()
	if f.enums == nil || !maps.Equal(f.enums.inputs, idx.inputs) {
		f.enumGen++
		idx.gen = f.enumGen
		f.enums = idx
	}
	f.emu.Unlock()
	f.kickScheduler()
}

// enumIndex is the union of the enum inputs of every known catalogue.
type enumIndex struct {
	gen    uint64
	inputs map[[2]string]bool // {class, input}
}

// sigIDLocked returns pj's placement signature under the enum index idx,
// as a small number: jobs with equal signatures may run on the same nodes.
// Literal inputs no node lists as a choice (prompts, seeds as text) are left
// out of it. The number is kept on pj until the index changes.
func (f *Farm) sigIDLocked(pj *pendingJob, idx *enumIndex) int {
	gen := enumGenOf(idx)
	if pj.sigGen == gen+1 {
		return pj.sigID
	}
	if f.sigGen != gen || f.sigIDs == nil {
		f.sigIDs, f.sigGen = make(map[string]int), gen
	}
	var needs []need
	if idx != nil {
		for _, n := range pj.Needs {
			if idx.inputs[[2]string{n.class, n.input}] {
				needs = append(needs, n)
			}
		}
	}
	sig := jobSig(pj.Classes, needs, pj.Req)
	id, ok := f.sigIDs[sig]
	if !ok {
		id = len(f.sigIDs)
		f.sigIDs[sig] = id
	}
	pj.sigID, pj.sigGen = id, gen+1
	return id
}

// checkPlacement refuses, with *schema.NoNodeError, a job no node can run:
// no registered node meets its requirements; or the nodes that are up and
// meet them offer none of some enum value it uses. Before refusing for a
// value it reads again, at most once per catalogueRetryEvery per node, the
// catalogues of the up nodes that meet the requirements: a model copied onto
// a node a minute ago is found. Nothing is refused while no catalogue of an
// eligible up node is known.
func (f *Farm) checkPlacement(ctx context.Context, pj *pendingJob) error {
	all := f.facts()
	var fit []nodeFacts
	for _, nf := range all {
		if nf.meets(pj.Req) {
			fit = append(fit, nf)
		}
	}
	if len(all) > 0 && len(fit) == 0 {
		return &schema.NoNodeError{
			Reason:       fmt.Sprintf("no registered node meets the requirements (%s)", pj.Req),
			Requirements: pj.Req,
		}
	}
	missing, closest := f.missingValues(fit, pj)
	if missing == nil && closest == nil {
		return nil
	}
	// Read again what may be stale, then look again.
	f.refreshCatalogues(ctx, fit)
	missing, closest = f.missingValues(fit, pj)
	switch {
	case missing != nil:
		return &schema.NoNodeError{
			Reason:  "no node offers " + describeMissing(missing),
			Missing: missing, Requirements: pj.Req,
		}
	case closest != nil:
		return &schema.NoNodeError{
			Reason:  "no one node offers all of its values; the closest lacks " + describeMissing(closest),
			Missing: closest, Requirements: pj.Req,
		}
	}
	return nil
}

// refreshCatalogues reads again the catalogues of the up nodes among
// nodes, each at most once per catalogueRetryEvery, and waits for them.
func (f *Farm) refreshCatalogues(ctx context.Context, nodes []nodeFacts) {
	var wg sync.WaitGroup
	now := f.cfg.NowFunc()
	for _, nf := range nodes {
		if !nf.up {
			continue
		}
		r := nf.r
		r.mu.Lock()
		due := now.Sub(r.catTried) >= catalogueRetryEvery
		if due {
			r.catTried = now
		}
		r.mu.Unlock()
		if !due {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.learn(ctx)
		}()
	}
	wg.Wait()
}

// refreshForStale follows a job placed again because a node's catalogue was
// stale: when no other up node qualifies for it by what the farm knows,
// their catalogues may be stale too (the file was moved, not removed), so
// they are read again (rate-limited as for a submit).
func (f *Farm) refreshForStale(ctx context.Context, pj *pendingJob, from string) {
	var others []nodeFacts
	for _, nf := range f.facts() {
		if nf.name == from || !nf.up || !nf.meets(pj.Req) {
			continue
		}
		if nf.r.canRun(pj) {
			return
		}
		others = append(others, nf)
	}
	f.refreshCatalogues(ctx, others)
}

// missingValues looks at the up nodes among fit whose catalogue is known.
// missing maps input names to the values none of them offers; when each
// value is offered somewhere but no one node offers all (a prompt runs on
// one node), closest is what the node lacking fewest lacks. Both are nil
// when a node can run pj, or when no catalogue is known.
func (f *Farm) missingValues(fit []nodeFacts, pj *pendingJob) (missing, closest map[string][]string) {
	var cats []*catalogue
	for _, nf := range fit {
		if !nf.up {
			continue
		}
		c := nf.r.catalogue()
		if c == nil {
			return nil, nil // it may offer them
		}
		cats = append(cats, c)
	}
	if len(cats) == 0 {
		return nil, nil
	}
	var best []need
	for i, c := range cats {
		if missingIn([]map[string]bool{c.classes}, pj.Classes) != nil {
			continue // the class check speaks for it
		}
		lack := c.lacking(pj.Needs)
		if len(lack) == 0 {
			return nil, nil
		}
		if i == 0 || best == nil || len(lack) < len(best) {
			best = lack
		}
	}
	var none []need
	for _, n := range pj.Needs {
		offered := false
		for _, c := range cats {
			if set := c.choices[n.class][n.input]; set == nil || set.has(n.value) {
				offered = true
				break
			}
		}
		if !offered {
			none = append(none, n)
		}
	}
	if len(none) > 0 {
		return byInput(none), nil
	}
	if best == nil {
		return nil, nil
	}
	return nil, byInput(best)
}

func byInput(needs []need) map[string][]string {
	out := map[string][]string{}
	for _, n := range needs {
		if !slices.Contains(out[n.input], n.value) {
			out[n.input] = append(out[n.input], n.value)
		}
	}
	for k := range out {
		slices.Sort(out[k])
	}
	return out
}

func describeMissing(m map[string][]string) string {
	keys := slices.Sorted(maps.Keys(m))
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+" "+strings.Join(m[k], ", "))
	}
	return strings.Join(parts, "; ")
}

// nodeSet is a set of nodes by their index in facts.
type nodeSet []uint64

func (s nodeSet) intersects(o nodeSet) bool {
	for i := range s {
		if s[i]&o[i] != 0 {
			return true
		}
	}
	return false
}

func (s nodeSet) empty() bool {
	for _, w := range s {
		if w != 0 {
			return false
		}
	}
	return true
}

// planPositionsLocked returns the plan and each queued job's position in
// it. A job's position is the number of jobs planned before it that
// compete with it: whose set of eligible nodes (registered nodes that meet
// their requirements and offer their classes and values, whatever their
// state and load) shares a node with its own. When every job may run on
// every node this is its index in the plan. A job no node is eligible for
// (it waits for one) competes with every job.
//
// Positions are kept between calls (f.pc) and worked out again only from
// the first plan step the queue changed (from, also returned): the counts of
// jobs of each eligible set planned so far are saved every planCheckpoint
// steps. What nodes are registered and what they offer is checked at every
// call (one eligible set per distinct placement signature, not per job);
// when any set changed, every position is worked out again.
func (f *Farm) planPositionsLocked() (plan []*pendingJob, pos []int, from int) {
	plan = f.queue.Plan()
	from = min(f.queue.ChangedFrom(), len(plan))
	facts := f.facts()
	f.emu.Lock()
	idx := f.enums
	f.emu.Unlock()
	pc := &f.pc
	if !pc.current(facts, idx) {
		pc.reset(facts, idx)
		from = 0
	}
	c := min(from/planCheckpoint, len(pc.counts)-1)
	counts := make([]int, len(pc.sets))
	copy(counts, pc.counts[c])
	for s := c * planCheckpoint; s < from; s++ {
		counts[pc.sigOf[s]]++
	}
	pc.counts = pc.counts[:c+1]
	pc.sigOf, pc.pos = pc.sigOf[:from], pc.pos[:from]
	for s := from; s < len(plan); s++ {
		if s%planCheckpoint == 0 && s/planCheckpoint == len(pc.counts) {
			pc.counts = append(pc.counts, slices.Clone(counts))
		}
		k := pc.setOf(f, plan[s], facts, idx)
		if k == len(counts) {
			counts = append(counts, 0)
		}
		p := 0
		for b, n := range counts {
			if n > 0 && pc.meet[k][b] {
				p += n
			}
		}
		pc.pos = append(pc.pos, p)
		pc.sigOf = append(pc.sigOf, k)
		counts[k]++
	}
	return plan, pc.pos, from
}

// posCache is what planPositionsLocked keeps between calls.
type posCache struct {
	valid   bool
	enumGen uint64
	nodes   []string      // the facts' node names it was made for
	words   int           // of a nodeSet
	bySig   map[int]int   // placement signature -> index of its eligible set
	sets    []nodeSet     // eligible sets
	reps    []*pendingJob // a job of each set, to check the set against new facts
	meet    [][]bool      // meet[a][b]: sets a and b share a node
	sigOf   []int         // per plan step: the set of the job planned there
	pos     []int         // per plan step: the position of that job
	counts  [][]int       // counts[c][k]: jobs of set k planned before step c*planCheckpoint
}

// current reports whether the cache was made for these nodes, offering
// what they offer now.
func (pc *posCache) current(facts []nodeFacts, idx *enumIndex) bool {
	if !pc.valid || pc.enumGen != enumGenOf(idx) || len(pc.nodes) != len(facts) {
		return false
	}
	for i := range facts {
		if pc.nodes[i] != facts[i].name {
			return false
		}
	}
	for k, rep := range pc.reps {
		if !slices.Equal(pc.eligible(rep, facts), pc.sets[k]) {
			return false
		}
	}
	return true
}

func enumGenOf(idx *enumIndex) uint64 {
	if idx == nil {
		return 0
	}
	return idx.gen
}

// reset empties the cache for these nodes.
func (pc *posCache) reset(facts []nodeFacts, idx *enumIndex) {
	*pc = posCache{
		valid: true, enumGen: enumGenOf(idx), words: (len(facts) + 63) / 64, bySig: map[int]int{},
		sigOf: pc.sigOf[:0], pos: pc.pos[:0], counts: [][]int{nil},
	}
	for _, nf := range facts {
		pc.nodes = append(pc.nodes, nf.name)
	}
}

// eligible is the set of nodes pj may run on; every node when none.
func (pc *posCache) eligible(pj *pendingJob, facts []nodeFacts) nodeSet {
	set := make(nodeSet, pc.words)
	for j := range facts {
		if facts[j].qualifies(pj) {
			set[j/64] |= 1 << (j % 64)
		}
	}
	if set.empty() {
		for j := range facts {
			set[j/64] |= 1 << (j % 64)
		}
	}
	return set
}

// setOf returns the index of pj's eligible set, adding the set when pj is
// the first job of its placement signature. Jobs that ask the same share a
// set: it is computed once.
func (pc *posCache) setOf(f *Farm, pj *pendingJob, facts []nodeFacts, idx *enumIndex) int {
	sig := f.sigIDLocked(pj, idx)
	if k, ok := pc.bySig[sig]; ok {
		return k
	}
	set := pc.eligible(pj, facts)
	k := len(pc.sets)
	pc.bySig[sig] = k
	pc.sets = append(pc.sets, set)
	pc.reps = append(pc.reps, pj)
	for a := range pc.meet {
		pc.meet[a] = append(pc.meet[a], pc.sets[a].intersects(set))
	}
	row := make([]bool, k+1)
	for b := range pc.sets {
		row[b] = set.intersects(pc.sets[b])
	}
	pc.meet = append(pc.meet, row)
	return k
}

// jobSig is the part of a queued job that decides where it may run.
func jobSig(classes []string, needs []need, req *schema.Requirements) string {
	var b strings.Builder
	for _, c := range classes {
		b.WriteString(c)
		b.WriteByte(0)
	}
	b.WriteByte(1)
	ns := slices.Clone(needs)
	sort.Slice(ns, func(i, j int) bool {
		if ns[i].class != ns[j].class {
			return ns[i].class < ns[j].class
		}
		if ns[i].input != ns[j].input {
			return ns[i].input < ns[j].input
		}
		return ns[i].value < ns[j].value
	})
	for _, n := range ns {
		b.WriteString(n.class + "\x00" + n.input + "\x00" + n.value + "\x00")
	}
	b.WriteByte(1)
	if req != nil {
		b.WriteString(req.String())
	}
	return b.String()
}

// Models maps every enum input of the known catalogues to its values and,
// for each value, the nodes offering it (sorted): what GET /models shows.
// Inputs whose every value every node offers alike are there too: an
// operator filters by input name (ckpt_name, lora_name, image...).
func (f *Farm) Models(ctx context.Context) (map[string]map[string][]string, error) {
	out := map[string]map[string][]string{}
	for _, nf := range f.facts() {
		c := nf.r.catalogue()
		if c == nil {
			continue
		}
		seen := map[*choiceSet]bool{}
		for _, inputs := range c.choices {
			for input, set := range inputs {
				if seen[set] && out[input] != nil {
					continue
				}
				seen[set] = true
				m := out[input]
				if m == nil {
					m = map[string][]string{}
					out[input] = m
				}
				for _, v := range set.sorted {
					if !slices.Contains(m[v], nf.name) {
						m[v] = append(m[v], nf.name)
					}
				}
			}
		}
	}
	return out, ctx.Err()
}

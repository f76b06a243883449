package dispatch

import (
	"sort"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// pendingJob is what the scheduler keeps in memory about a queued job.
type pendingJob struct {
	ID       string
	Frontend string
	Priority int
	Created  time.Time
	Classes  []string // class types of the graph
	Models   []string // checkpoints and other model files it loads
	Avoid    []string // nodes it failed on for reasons of theirs: placed elsewhere when another node can run it
	Needs    []need   // literal string inputs: a node listing one as an enum input must offer the value
	Req      *schema.Requirements

	sigID  int    // placement signature (see Farm.sigIDLocked)
	sigGen uint64 // the enum index generation sigID is for, plus one; 0: none yet
	step   int    // its index in the queue's cached plan; -1 when pushed since
}

// before orders jobs of one frontend: priority first, then FIFO.
func (a *pendingJob) before(b *pendingJob) bool {
	if a.Priority != b.Priority {
		return a.Priority > b.Priority
	}
	if !a.Created.Equal(b.Created) {
		return a.Created.Before(b.Created)
	}
	return a.ID < b.ID
}

// fairQueue orders queued jobs: fair across frontends by smooth weighted round
// robin, by priority and then FIFO within a frontend.
//
// Smooth weighted round robin (as in nginx): at each pick every frontend with
// work adds its weight to its credit, the one with the most credit is picked
// and pays the total weight. With equal weights this is plain round robin, so
// a frontend that arrives behind another's backlog of 100 jobs waits for at
// most one pick. Ties go to the frontend served least recently.
//
// The same procedure, run on a copy of the state, gives the order in which the
// scheduler will start every queued job: that order is each job's position.
//
// That plan is kept between calls and only its tail is planned again: a
// change to one frontend's list (a submit, a cancel) leaves every step before
// the first one that picked from the changed part of that list as it was.
// The round robin state is saved every planCheckpoint steps, so planning
// resumes from the last checkpoint before that step. A submit behind the
// queue of its frontend thus costs O(planCheckpoint + the jobs planned after
// it), not O(queue). Starting a job (Take) and a frontend's list becoming
// empty or non-empty change the state every step starts from: the plan is
// made again in full (every queued job moves up one place then, so every
// position changes anyway).
type fairQueue struct {
	jobs    map[string][]*pendingJob // per frontend, sorted
	byID    map[string]*pendingJob
	credit  map[string]int
	served  map[string]uint64 // pick counter value when last served
	picks   uint64
	weights map[string]int
	// LenFunc, when set, is told a frontend's number of queued jobs each
	// time it changes (the queue depth gauge).
	LenFunc func(frontend string, n int)

	// The cached plan. valid false: make it again in full.
	valid   bool
	names   []string      // the frontends with jobs, sorted: the plan's frontend indexes
	plan    []*pendingJob // plan[s] is started at step s
	cps     []planState   // cps[c]: the state before step c*planCheckpoint
	dirty   int           // plan steps from here on are stale
	changed int           // lowest step changed since the last ChangedFrom
	scratch planState
}

// planCheckpoint is how many plan steps lie between two saved states.
const planCheckpoint = 64

// planState is the round robin state between two plan steps, by frontend
// index (fairQueue.names).
type planState struct {
	credit []int
	served []uint64
	heads  []int // jobs of each frontend picked so far
	picks  uint64
}

func (s *planState) copyFrom(o *planState) {
	s.credit = append(s.credit[:0], o.credit...)
	s.served = append(s.served[:0], o.served...)
	s.heads = append(s.heads[:0], o.heads...)
	s.picks = o.picks
}

func newFairQueue(weights map[string]int) *fairQueue {
	return &fairQueue{
		jobs:    make(map[string][]*pendingJob),
		byID:    make(map[string]*pendingJob),
		credit:  make(map[string]int),
		served:  make(map[string]uint64),
		weights: weights,
	}
}

func (q *fairQueue) weight(frontend string) int {
	if w := q.weights[frontend]; w > 0 {
		return w
	}
	return 1
}

func (q *fairQueue) Len() int { return len(q.byID) }

// invalidate makes the next Plan start over.
func (q *fairQueue) invalidate() {
	q.valid = false
	q.changed = 0
}

// staleFrom marks plan steps from step on as stale. A job's step of -1
// (pushed since the plan was made) lies in the stale part already.
func (q *fairQueue) staleFrom(step int) {
	if step < 0 {
		return
	}
	q.dirty = min(q.dirty, step)
	q.changed = min(q.changed, step)
}

// ChangedFrom returns the first plan step that may differ from the plan
// of the previous call (0 on the first call), and starts counting anew.
func (q *fairQueue) ChangedFrom() int {
	c := q.changed
	q.changed = len(q.byID)
	return c
}

func (q *fairQueue) Has(id string) bool { _, ok := q.byID[id]; return ok }

// Push adds a job (no-op if present).
func (q *fairQueue) Push(j *pendingJob) {
	if q.byID[j.ID] != nil {
		return
	}
	q.byID[j.ID] = j
	j.step = -1
	list := q.jobs[j.Frontend]
	i := sort.Search(len(list), func(i int) bool { return j.before(list[i]) })
	// The plan is the same up to the step that picked the job now behind
	// j, or, when j comes last, up to the step after its frontend's last.
	switch {
	case len(list) == 0:
		q.invalidate() // a frontend joins the round robin
	case i < len(list):
		q.staleFrom(list[i].step)
	case list[i-1].step >= 0:
		q.staleFrom(list[i-1].step + 1)
	}
	list = append(list, nil)
	copy(list[i+1:], list[i:])
	list[i] = j
	q.jobs[j.Frontend] = list
	if q.LenFunc != nil {
		q.LenFunc(j.Frontend, len(list))
	}
}

// Remove takes a job out (no-op if absent).
func (q *fairQueue) Remove(id string) *pendingJob {
	j := q.byID[id]
	if j == nil {
		return nil
	}
	delete(q.byID, id)
	list := q.jobs[j.Frontend]
	for i, x := range list {
		if x == j {
			switch {
			case len(list) == 1:
				q.invalidate() // a frontend leaves the round robin
			case i < len(list)-1:
				q.staleFrom(j.step)
			case list[i-1].step >= 0:
				q.staleFrom(list[i-1].step + 1)
			}
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(q.jobs, j.Frontend)
		delete(q.credit, j.Frontend) // an idle frontend banks no credit
	} else {
		q.jobs[j.Frontend] = list
	}
	if q.LenFunc != nil {
		q.LenFunc(j.Frontend, len(list))
	}
	return j
}

// Plan returns every queued job in the order the scheduler will start them,
// assuming any node can run any job. The slice is the queue's own: read it
// before the queue changes again, and do not modify it.
func (q *fairQueue) Plan() []*pendingJob {
	if !q.valid {
		q.names = q.names[:0]
		for f := range q.jobs {
			q.names = append(q.names, f)
		}
		sort.Strings(q.names)
		k := len(q.names)
		st := planState{credit: make([]int, k), served: make([]uint64, k), heads: make([]int, k), picks: q.picks}
		for i, f := range q.names {
			st.credit[i], st.served[i] = q.credit[f], q.served[f]
		}
		q.cps = append(q.cps[:0], st)
		q.plan = q.plan[:0]
		q.dirty, q.valid = 0, true
	}
	if q.dirty >= len(q.byID) && len(q.plan) == len(q.byID) {
		return q.plan
	}
	// Resume from the last checkpoint at or before the first stale step.
	c := min(q.dirty/planCheckpoint, len(q.cps)-1)
	st := &q.scratch
	st.copyFrom(&q.cps[c])
	q.cps = q.cps[:c+1]
	q.plan = q.plan[:c*planCheckpoint]
	k := len(q.names)
	lists := make([][]*pendingJob, k)
	weight := make([]int, k)
	for i, f := range q.names {
		lists[i], weight[i] = q.jobs[f], q.weight(f)
	}
	for len(q.plan) < len(q.byID) {
		if s := len(q.plan); s > 0 && s%planCheckpoint == 0 && s/planCheckpoint == len(q.cps) {
			var cp planState
			cp.copyFrom(st)
			q.cps = append(q.cps, cp)
		}
		i := pickFrontend(lists, st.heads, st.credit, st.served, weight)
		st.picks++
		st.served[i] = st.picks
		j := lists[i][st.heads[i]]
		j.step = len(q.plan)
		q.plan = append(q.plan, j)
		st.heads[i]++
	}
	q.dirty = len(q.plan)
	return q.plan
}

// pickFrontend runs one step of smooth weighted round robin over the
// frontends (by index) that still have jobs past their head index.
func pickFrontend(lists [][]*pendingJob, heads, credit []int, served []uint64, weight []int) int {
	total := 0
	best := -1
	for i := range lists {
		if heads[i] >= len(lists[i]) {
			continue
		}
		total += weight[i]
		credit[i] += weight[i]
		if best < 0 || credit[i] > credit[best] || (credit[i] == credit[best] && served[i] < served[best]) {
			best = i
		}
	}
	credit[best] -= total
	return best
}

// Take removes job id as the scheduler starts it and charges its frontend
// the pick, keeping the round robin state as if the plan had been followed.
func (q *fairQueue) Take(id string) *pendingJob {
	j := q.byID[id]
	if j == nil {
		return nil
	}
	total := 0
	for f := range q.jobs {
		w := q.weight(f)
		total += w
		q.credit[f] += w
	}
	q.credit[j.Frontend] -= total
	q.picks++
	q.served[j.Frontend] = q.picks
	q.invalidate()
	return q.Remove(id)
}

// Positions maps every queued job to the number of jobs that start before it.
func (q *fairQueue) Positions() map[string]int {
	plan := q.Plan()
	pos := make(map[string]int, len(plan))
	for i, j := range plan {
		pos[j.ID] = i
	}
	return pos
}

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

func (q *fairQueue) Has(id string) bool { _, ok := q.byID[id]; return ok }

// Push adds a job (no-op if present).
func (q *fairQueue) Push(j *pendingJob) {
	if q.byID[j.ID] != nil {
		return
	}
	q.byID[j.ID] = j
	list := q.jobs[j.Frontend]
	i := sort.Search(len(list), func(i int) bool { return j.before(list[i]) })
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
// assuming any node can run any job. It runs in O(jobs × frontends) on
// slices indexed by frontend (it is recomputed at every scheduling pass and
// every submit, over queues thousands long).
func (q *fairQueue) Plan() []*pendingJob {
	names := make([]string, 0, len(q.jobs))
	for f := range q.jobs {
		names = append(names, f)
	}
	sort.Strings(names)
	k := len(names)
	lists := make([][]*pendingJob, k)
	credit := make([]int, k)
	served := make([]uint64, k)
	weight := make([]int, k)
	heads := make([]int, k)
	for i, f := range names {
		lists[i], credit[i], served[i], weight[i] = q.jobs[f], q.credit[f], q.served[f], q.weight(f)
	}
	out := make([]*pendingJob, 0, len(q.byID))
	picks := q.picks
	for len(out) < len(q.byID) {
		i := pickFrontend(lists, heads, credit, served, weight)
		picks++
		served[i] = picks
		out = append(out, lists[i][heads[i]])
		heads[i]++
	}
	return out
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

package dispatch

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Positions worked out incrementally (the kept plan resumed from a
// checkpoint, positions from the first changed step) equal a full
// recomputation after any sequence of submits (behind, ahead, of a frontend
// new to the queue), cancels, starts of the first or of a later job, and
// changes of what a node offers, on three nodes that offer different
// checkpoints, across four frontends of different weights.
func TestPositionsIncrementalEqualFullRecompute(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{
		withCheckpoints(ckptXL), withCheckpoints(ckpt15), withCheckpoints(ckpt15, ckptFlux),
	}, nil)
	e.waitCatalogues()
	// Keep every node busy with a held job, so that the scheduler starts
	// none of the jobs put into the queue below.
	e.holdAll()
	for _, ck := range []string{ckptXL, ckptFlux, ckpt15} {
		j := e.submit("alpha", "busy", sdGraph(ck, 1, 0), 0)
		e.waitState(j.ID, schema.JobDispatched, 10*time.Second)
	}
	f := e.farm
	rng := rand.New(rand.NewPCG(1, 2))
	fronts := []string{"alpha", "beta", "logo", "style"}
	graphs := map[string]json.RawMessage{
		"xl": sdGraph(ckptXL, 1, 1), "15": sdGraph(ckpt15, 1, 1), "flux": sdGraph(ckptFlux, 1, 1),
		"any": json.RawMessage(`{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},` +
			`"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"x"}}}`),
	}
	kinds := []string{"xl", "15", "flux", "any"}
	base := time.Now()
	n := 0
	push := func() {
		kind := kinds[rng.IntN(len(kinds))]
		g, err := comfy.ParseGraph(graphs[kind], comfy.GraphLimits{})
		if err != nil {
			t.Fatal(err)
		}
		prio := 0
		if rng.IntN(6) == 0 {
			prio = rng.IntN(11) - 5
		}
		n++
		// Mostly FIFO; now and then a job dated before others (a requeue
		// keeps its creation time).
		created := base.Add(time.Duration(n) * time.Millisecond)
		if rng.IntN(8) == 0 {
			created = base.Add(time.Duration(rng.IntN(n)) * time.Millisecond)
		}
		f.queue.Push(&pendingJob{ID: fmt.Sprintf("p%05d", n), Frontend: fronts[rng.IntN(len(fronts))], Priority: prio,
			Created: created, Classes: g.ClassTypes(), Models: g.Models(), Needs: needsOf(g, nil)})
	}
	saved := map[string]*catalogue{}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.queue = newFairQueue(map[string]int{"alpha": 3, "beta": 1, "logo": 2})
	f.pc = posCache{}
	clear(f.positions)
	partial := 0 // recomputations that kept part of the plan
	for step := range 3000 {
		ops := 1 + rng.IntN(3) // several changes between two recomputations now and then
		for range ops {
			switch r := rng.IntN(100); {
			case r < 55 || f.queue.Len() < 5:
				push()
			case r < 80:
				plan := slices.Clone(f.queue.Plan())
				f.queue.Remove(plan[rng.IntN(len(plan))].ID) // a cancel
			case r < 93:
				f.queue.Take(f.queue.Plan()[0].ID) // the scheduler starts the first job
			case r < 97:
				plan := slices.Clone(f.queue.Plan())
				f.queue.Take(plan[rng.IntN(len(plan))].ID) // or a later one a free node can run
			default:
				// What a node offers changed: it is given another node's
				// catalogue, or its own back. (Never none: a runner reads
				// an unknown catalogue again by itself, meanwhile.)
				name := e.names[rng.IntN(len(e.names))]
				other := f.runner(e.names[rng.IntN(len(e.names))]).catalogue()
				r := f.runner(name)
				r.mu.Lock()
				if c := saved[name]; c != nil {
					r.cat = c
					delete(saved, name)
				} else {
					saved[name], r.cat = r.cat, other
				}
				r.mu.Unlock()
			}
		}
		if f.queue.valid && f.queue.changed > 0 && f.pc.valid {
			partial++
		}
		f.refreshPositionsLocked()
		plan, want := f.referencePositionsLocked()
		if got := f.queue.Plan(); !slices.Equal(got, plan) {
			t.Fatalf("step %d: the kept plan differs from a new one:\n got %v\nwant %v", step, jobIDs(got), jobIDs(plan))
		}
		if len(f.positions) != len(want) {
			t.Fatalf("step %d: %d positions kept, %d jobs queued", step, len(f.positions), len(want))
		}
		for id, p := range want {
			if f.positions[id] != p {
				t.Fatalf("step %d: job %s at position %d, a full recomputation says %d", step, id, f.positions[id], p)
			}
		}
	}
	if partial < 500 {
		t.Fatalf("only %d of 3000 recomputations kept part of the plan", partial)
	}
}

func jobIDs(plan []*pendingJob) []string {
	out := make([]string, len(plan))
	for i, pj := range plan {
		out[i] = pj.ID
	}
	return out
}

// referencePositionsLocked plans the queue and works out every position
// from nothing, as the farm did before it kept them between plans.
func (f *Farm) referencePositionsLocked() ([]*pendingJob, map[string]int) {
	q := f.queue
	names := make([]string, 0, len(q.jobs))
	for fr := range q.jobs {
		names = append(names, fr)
	}
	sort.Strings(names)
	k := len(names)
	lists := make([][]*pendingJob, k)
	credit := make([]int, k)
	served := make([]uint64, k)
	weight := make([]int, k)
	heads := make([]int, k)
	for i, fr := range names {
		lists[i], credit[i], served[i], weight[i] = q.jobs[fr], q.credit[fr], q.served[fr], q.weight(fr)
	}
	plan := make([]*pendingJob, 0, len(q.byID))
	picks := q.picks
	for len(plan) < len(q.byID) {
		i := pickFrontend(lists, heads, credit, served, weight)
		picks++
		served[i] = picks
		plan = append(plan, lists[i][heads[i]])
		heads[i]++
	}

	facts := f.facts()
	words := (len(facts) + 63) / 64
	full := make(nodeSet, words)
	for i := range facts {
		full[i/64] |= 1 << (i % 64)
	}
	f.emu.Lock()
	idx := f.enums
	f.emu.Unlock()
	setOf := make([]nodeSet, len(plan))
	for i, pj := range plan {
		set := make(nodeSet, words)
		for j := range facts {
			if facts[j].qualifies(pj) {
				set[j/64] |= 1 << (j % 64)
			}
		}
		if set.empty() {
			set = full
		}
		setOf[i] = set
		_ = f.sigIDLocked(pj, idx)
	}
	pos := make(map[string]int, len(plan))
	for i, pj := range plan {
		p := 0
		for j := range i {
			if setOf[j].intersects(setOf[i]) {
				p++
			}
		}
		pos[pj.ID] = p
	}
	return plan, pos
}

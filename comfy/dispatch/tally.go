package dispatch

import (
	"context"
	"sync"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// nodeTally counts the jobs that finished on each node, for the node views'
// jobs_done and jobs_failed. It is read from the jobs table when the farm
// starts and counted on as jobs end, so the totals survive a restart and
// match what the database holds, without a scan of the jobs table per view.
type nodeTally struct {
	mu     sync.Mutex
	counts map[string]dbcontrollers.NodeJobCounts
	ok     bool // read from the database
}

func (t *nodeTally) loaded() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.ok
}

func (t *nodeTally) load(ctx context.Context, store JobStore) error {
	counts, err := store.JobCountsByNode(ctx)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	// The database's totals include every job counted here so far.
	t.counts, t.ok = counts, true
	return nil
}

// finished counts one job that reached a final state on node ("" for a job
// that never ran anywhere: not counted).
func (t *nodeTally) finished(node string, state schema.JobState) {
	if node == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.counts == nil {
		t.counts = map[string]dbcontrollers.NodeJobCounts{}
	}
	c := t.counts[node]
	switch state {
	case schema.JobSucceeded:
		c.Succeeded++
	case schema.JobFailed:
		c.Failed++
	default:
		return
	}
	t.counts[node] = c
}

func (t *nodeTally) get(node string) dbcontrollers.NodeJobCounts {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.counts[node]
}

package dispatch

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// failUnrunnable fails queued jobs that no registered node can run: no node
// with a known catalogue offers every class of the workflow, for longer than
// StallTimeout. Submit refuses such workflows at once; this catches the ones
// that became unrunnable while waiting (the node that offered a custom class
// was removed), which would otherwise hold their place, and their credits,
// for ever.
//
// While any registered node's catalogue is unknown (no node registered, or
// one has not answered yet) nothing is failed: that node may offer the
// classes, so jobs wait.
func (f *Farm) failUnrunnable(ctx context.Context) {
	cats, known := f.catalogues()
	var full []*catalogue
	for _, r := range f.runnerList() {
		full = append(full, r.catalogue())
	}
	if !known {
		f.mu.Lock()
		clear(f.unrunnable) // the wait starts again once every catalogue is known
		f.mu.Unlock()
		return
	}
	now := f.cfg.NowFunc()
	type doomed struct {
		pj      *pendingJob
		missing []string
		values  map[string][]string
	}
	var due []doomed
	f.mu.Lock()
	for id := range f.unrunnable {
		if !f.queue.Has(id) {
			delete(f.unrunnable, id)
		}
	}
	for id, pj := range f.queue.byID {
		missing := missingIn(cats, pj.Classes)
		var values map[string][]string
		if len(missing) == 0 {
			values = valuesMissingIn(full, pj)
		}
		if len(missing) == 0 && values == nil {
			delete(f.unrunnable, id)
			continue
		}
		since, seen := f.unrunnable[id]
		if !seen {
			f.unrunnable[id] = now
			f.log.Warn("queued job needs classes or values no node offers", "job_id", id, "classes", missing, "values", values)
			continue
		}
		if now.Sub(since) >= f.cfg.StallTimeout {
			due = append(due, doomed{pj, missing, values})
		}
	}
	for _, d := range due {
		f.queue.Remove(d.pj.ID)
	}
	f.mu.Unlock()
	if len(due) == 0 {
		return
	}

	var back []*pendingJob
	for _, d := range due {
		jerr := &schema.JobError{
			Code:    schema.CodeNoNode,
			Message: fmt.Sprintf("no registered node offers all of its node classes; the closest lacks %s", strings.Join(d.missing, ", ")),
			Details: map[string]any{"classes": d.missing},
		}
		if d.values != nil {
			jerr.Message = "no registered node offers all of its values: " + describeMissing(d.values)
			jerr.Details = map[string]any{"missing": d.values}
		}
		u := dbcontrollers.JobFailQueued(d.pj.ID, jerr, now)
		job, err := f.store.JobUpdate(ctx, u)
		if errors.Is(err, schema.ErrConflict) {
			// Cancelled meanwhile, or failed by an earlier try whose answer
			// was lost.
			if done, ok := f.landed(ctx, u); ok && done.Error != nil && done.Error.Code == schema.CodeNoNode {
				job, err = done, nil
			}
		}
		switch {
		case err == nil:
			f.failed(ctx, job.ID, job, nil, job.Error)
		case !errors.Is(err, schema.ErrConflict) && !errors.Is(err, schema.ErrNotFound):
			// Still queued in the database: keep it (its wait is over, so
			// the next round tries again).
			if ctx.Err() == nil {
				f.log.Error("fail unrunnable job", "job_id", d.pj.ID, "err", err)
			}
			back = append(back, d.pj)
		}
	}
	f.mu.Lock()
	for _, d := range due {
		delete(f.unrunnable, d.pj.ID)
	}
	for _, pj := range back {
		f.queue.Push(pj)
		f.unrunnable[pj.ID] = now.Add(-f.cfg.StallTimeout)
	}
	f.publishPositionsLocked()
	f.mu.Unlock()
}

// valuesMissingIn says which enum values keep every catalogue from running
// pj (nil when one can): those no catalogue offers, else what the closest
// lacks.
func valuesMissingIn(cats []*catalogue, pj *pendingJob) map[string][]string {
	var best []need
	found := false
	for _, c := range cats {
		if c == nil || missingIn([]map[string]bool{c.classes}, pj.Classes) != nil {
			continue
		}
		lack := c.lacking(pj.Needs)
		if len(lack) == 0 {
			return nil
		}
		if !found || len(lack) < len(best) {
			best, found = lack, true
		}
	}
	if !found {
		return nil
	}
	return byInput(best)
}

package dispatch

import (
	"context"
	"errors"
	"maps"
	"net"
	"slices"
	"strconv"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// updateJob is JobUpdate for the writes that end a run (storing, succeeded),
// which must not be lost to a database that is briefly away: an error that is
// not the database's answer (a conflict, a missing job, invalid input) is
// retried with back-off until the database answers or ctx ends. Meanwhile
// the job is still followed, so its lease is extended again as soon as the
// database is back, and the rescuer does not hand the finished work to
// another run.
func (f *Farm) updateJob(ctx context.Context, u dbcontrollers.JobUpdate) (*schema.Job, error) {
	wait := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		job, err := f.store.JobUpdate(ctx, u)
		if attempt > 1 && errors.Is(err, schema.ErrConflict) {
			if done, ok := f.landed(ctx, u); ok {
				return done, nil
			}
		}
		if !unanswered(ctx, err) {
			return job, err
		}
		f.log.Warn("job update failed, retrying", "job_id", u.ID, "state", u.State, "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// unanswered reports whether err says the database was not reached or could
// not finish for now (dbcontrollers.Transient), while ctx still runs: asking
// again may work. The database's answers (a conflict, a missing job, a
// constraint) are final.
func unanswered(ctx context.Context, err error) bool {
	return err != nil && ctx.Err() == nil && dbcontrollers.Transient(err)
}

// landed reports whether a compare-and-set that conflicted after an
// unanswered try had in fact been applied by that try (the commit reached the
// database, its acknowledgement did not): the job is in the state u asked
// for, at u's attempt.
func (f *Farm) landed(ctx context.Context, u dbcontrollers.JobUpdate) (*schema.Job, bool) {
	job, err := f.store.JobGet(ctx, u.ID)
	if err != nil || u.State == "" || job.State != u.State || (u.Attempt != nil && job.Attempts != *u.Attempt) {
		return nil, false
	}
	return job, true
}

// finishFailed ends a job as failed: no retry.
func (f *Farm) finishFailed(ctx context.Context, r *runner, ref jobRef, jerr *schema.JobError) {
	// The job's lease is kept until its end is written, also while the
	// runner no longer follows it: the rescuer must not run it again.
	f.keepLease(ref.id, true)
	if r != nil {
		r.forget(ref)
	}
	u := dbcontrollers.JobFail(ref.id, ref.attempt, jerr, f.cfg.NowFunc())
	job, err := f.store.JobUpdate(ctx, u)
	if unanswered(ctx, err) {
		// The database is away. Finish the job when it is back, off the
		// caller's goroutine (often a node's event stream, which must not
		// stall) and under the farm's context, not the caller's (a removed
		// node's runner stops, the job's end must still be written).
		fctx := f.ctx
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer f.keepLease(ref.id, false)
			job, err := f.updateJob(fctx, u)
			f.failed(fctx, ref.id, job, err, jerr)
		}()
		return
	}
	f.keepLease(ref.id, false)
	f.failed(ctx, ref.id, job, err, jerr)
}

// failed tells of a job finishFailed has (or has not) marked failed.
func (f *Farm) failed(ctx context.Context, id string, job *schema.Job, err error, jerr *schema.JobError) {
	if err != nil {
		if !errors.Is(err, schema.ErrConflict) && ctx.Err() == nil {
			f.log.Error("mark failed", "job_id", id, "err", err)
		}
		return
	}
	f.metrics.jobFinished(job)
	f.tally.finished(job.Node, job.State)
	f.refund(ctx, job)
	f.hub.Publish(id, schema.Event{Type: schema.EventFailed, Error: jerr})
}

// keepLease adds a job whose end is being written to the heartbeat (on), or
// takes it out (off), whether or not a runner still follows it.
func (f *Farm) keepLease(id string, on bool) {
	f.lmu.Lock()
	defer f.lmu.Unlock()
	if on {
		f.leased[id] = true
	} else {
		delete(f.leased, id)
	}
}

// requeueKind says what a requeue tells of the node and of the attempt.
type requeueKind int

const (
	requeuePlain     requeueKind = iota // the node went away, was removed, or someone interrupted it
	requeueNodeFault                    // the node failed the job: counts against it
	requeueUnposted                     // the job never reached the node: the attempt is given back
	requeueStale                        // the node lacks a value its old catalogue listed: placed again, the attempt given back
)

// requeueJob sends an active job back to the queue, or fails it when it
// has used all its attempts. ref's attempt guards against acting on a newer
// attempt than the one that failed. r is the node's runner, nil when no
// runner follows the job (its node was removed).
func (f *Farm) requeueJob(ctx context.Context, r *runner, ref jobRef, reason string, kind requeueKind) {
	var avoid []string
	if r != nil {
		r.mu.Lock()
		if a := r.jobs[ref.id]; a != nil && (ref.attempt == 0 || a.num == ref.attempt) {
			avoid = a.avoid
		}
		r.mu.Unlock()
		if kind == requeueNodeFault {
			f.nodes.JobFailed(r.name, reason)
		}
		if kind == requeueNodeFault || kind == requeueStale {
			if !slices.Contains(avoid, r.name) {
				avoid = append(slices.Clone(avoid), r.name)
			}
		}
	}
	job, err := f.store.JobGet(ctx, ref.id)
	if err != nil {
		// Stop following it all the same: its lease then runs out and the
		// rescuer returns it to the queue.
		f.log.Error("requeue: read job", "job_id", ref.id, "err", err)
		if r != nil {
			r.forget(ref)
		}
		return
	}
	if ref.attempt != 0 && job.Attempts != ref.attempt {
		if r != nil {
			r.forget(ref) // an older attempt: nothing of it is left to do
		}
		return
	}
	attempts := job.Attempts
	if (kind == requeueUnposted || kind == requeueStale) && attempts > 0 {
		attempts-- // nothing ran: the next claim takes the same attempt again
	} else if job.Attempts >= f.cfg.MaxAttempts {
		f.finishFailed(ctx, r, jobRef{ref.id, job.Attempts}, &schema.JobError{Code: schema.CodeNodeLost, Message: "gave up after " +
			strconv.Itoa(job.Attempts) + " attempts: " + reason})
		return
	}
	if r != nil {
		r.forget(ref)
	}
	job, err = f.store.JobUpdate(ctx, dbcontrollers.JobRequeue(ref.id, job.Attempts, attempts))
	if err != nil {
		if !errors.Is(err, schema.ErrConflict) {
			f.log.Error("requeue", "job_id", ref.id, "err", err)
		}
		return
	}
	f.log.Info("job requeued", "job_id", ref.id, "attempts", job.Attempts, "reason", reason, "node_fault", kind == requeueNodeFault)
	if kind != requeueUnposted && kind != requeueStale {
		f.metrics.requeued.Inc()
	}
	f.requeued(job, avoid...)
}

// waitHistory polls the history entry: it is written shortly after
// execution_success, just before executing(null). Only the entry's absence
// and failures to reach the node are waited out (up to HistoryWait); an
// answer that cannot be read is given up after badAnswerTries of them in a
// row, within milliseconds, since a node that answers garbage keeps doing so.
func (f *Farm) waitHistory(ctx context.Context, r *runner, promptID string) (*comfy.HistoryEntry, error) {
	deadline := f.cfg.NowFunc().Add(f.cfg.HistoryWait)
	wait := 5 * time.Millisecond
	bad := 0
	for {
		entry, err := r.client.History(ctx, promptID)
		if err == nil {
			return entry, nil
		}
		if badAnswer(err) {
			if bad++; bad >= badAnswerTries {
				return nil, err
			}
		} else {
			bad = 0
		}
		if f.cfg.NowFunc().After(deadline) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
		if wait < time.Second {
			wait *= 2
		}
	}
}

// badAnswerTries is how many unreadable answers in a row end a wait.
const badAnswerTries = 3

// badAnswer reports whether err is an answer of the node that cannot be
// used (not JSON, the wrong shape, a 4xx), as opposed to the entry not being
// there yet or the node not being reached (which may pass).
func badAnswer(err error) bool {
	return err != nil && !errors.Is(err, comfy.ErrNotInHistory) && !comfy.IsTransient(err) &&
		!errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// notSent reports whether a request to the node failed before any byte of it
// was sent: the connection could not be opened (refused, unreachable, timed
// out). A post that never reached the node ran nothing there.
func notSent(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "dial"
}

// adopt takes over jobs that were active when the previous process stopped:
// each is checked on its node and followed, completed, or requeued.
func (f *Farm) adopt(ctx context.Context) error {
	jobs, err := f.store.JobListByState(ctx, dbcontrollers.ActiveStates...)
	if err != nil {
		return err
	}
	touched := map[*runner]bool{}
	now := f.cfg.NowFunc()
	for i := range jobs {
		job := &jobs[i]
		// Alone, a job another live instance follows is its own. In a
		// cluster only the leader follows jobs, and a term's writes are
		// fenced: the new leader takes every active job over at once.
		if !f.clustered() && job.LeaseOwner != "" && job.LeaseOwner != f.cfg.InstanceID && job.LeaseExpiresAt != nil && job.LeaseExpiresAt.After(now) {
			continue // another live instance follows it
		}
		r := f.runner(job.Node)
		if r == nil {
			f.requeueJob(ctx, nil, jobRef{job.ID, job.Attempts}, "its node is no longer registered", requeuePlain)
			continue
		}
		if _, err := f.store.JobUpdate(ctx, dbcontrollers.JobAdopt(job.ID, f.cfg.InstanceID, f.cfg.NowFunc().Add(f.cfg.Lease))); err != nil {
			continue
		}
		pj, _ := pendingFromJob(job, f.cfg.MaxGraphNodes)
		if pj == nil {
			pj = &pendingJob{ID: job.ID, Frontend: job.Frontend}
		}
		a := r.adoptAttempt(job, pj)
		pid := job.PromptID
		if pid == "" {
			pid = promptFor(job) // posted but the response was lost: we chose this id
		}
		r.bind(job.ID, pid)
		if job.State == schema.JobStoring {
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				a.complete(ctx)
			}()
			continue
		}
		touched[r] = true
	}
	for r := range touched {
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			r.reconcile(ctx, true)
		}()
	}
	if len(jobs) > 0 {
		f.log.Info("adopted active jobs", "count", len(jobs))
	}
	return nil
}

// runner returns the runner of a node, or nil.
func (f *Farm) runner(name string) *runner {
	f.rmu.RLock()
	defer f.rmu.RUnlock()
	return f.runners[name]
}

// runnerList copies the runners map.
func (f *Farm) runnerList() map[string]*runner {
	f.rmu.RLock()
	defer f.rmu.RUnlock()
	return maps.Clone(f.runners)
}

// nodeChanged follows the registry: new nodes get a runner, removed nodes
// give their jobs back to the queue, a node coming up may take work.
func (f *Farm) nodeChanged(ctx context.Context, ch NodeChange) {
	defer signal(f.sigs().nodeChanged, ch)
	switch {
	case ch.Added:
		f.startRunner(ctx, ch.Name)
	case ch.Removed:
		f.rmu.Lock()
		r := f.runners[ch.Name]
		delete(f.runners, ch.Name)
		if r != nil {
			f.retiring[r] = true // its finishing jobs keep their leases
		}
		f.rmu.Unlock()
		if r == nil {
			break
		}
		// Off the farm loop: interrupting a hung node can take a while.
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.retire(ctx, r)
		}()
	}
	f.kickScheduler()
}

// retire stops a removed node's runner and gives its unfinished jobs back to
// the queue. Jobs whose run the node already finished keep storing their
// outputs: that GPU work is not done again.
func (f *Farm) retire(ctx context.Context, r *runner) {
	r.stop()
	<-r.done
	r.mu.Lock()
	var back []*attempt
	for _, a := range r.jobs {
		if a.phase == phasePosting || a.phase == phaseFollowing {
			back = append(back, a)
		}
	}
	r.mu.Unlock()
	for _, a := range back {
		ictx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_ = a.interrupt(ictx)
		cancel()
		a.requeue(ctx, "node removed", requeuePlain)
	}
}

// runtime is what the dispatcher knows of a node, for the node view. It must
// not take f.mu: the registry calls it under its own lock.
func (f *Farm) runtime(name string) Runtime {
	counts := f.tally.get(name)
	r := f.runner(name)
	if r == nil {
		return Runtime{JobsDone: counts.Succeeded, JobsFailed: counts.Failed}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	rt := Runtime{ModelsLoaded: slices.Clone(r.models), JobsDone: counts.Succeeded, JobsFailed: counts.Failed}
	for _, a := range r.jobs {
		if a.holdsSlot() {
			rt.Inflight++
		}
	}
	if r.current != nil {
		rt.CurrentJob = r.current.jobID
	}
	if c := r.cat; c != nil {
		at := r.catAt.UTC()
		rt.Checkpoints, rt.Loras, rt.CustomNodePacks, rt.CatalogueAt = c.checkpoints, c.loras, c.packs, &at
	}
	if rt.ModelsLoaded == nil {
		rt.ModelsLoaded = []string{}
	}
	return rt
}

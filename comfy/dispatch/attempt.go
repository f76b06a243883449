package dispatch

import (
	"context"
	"errors"
	"maps"
	"slices"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// phase is where an attempt stands, as its runner owns it: it moves
// forward only (posting -> following -> finishing), except that a
// completion that found no history yet goes back to following, and any
// phase but finishing may end in abandoned.
type phase uint8

const (
	// phasePosting: claimed (or being claimed), inputs uploading, the
	// prompt in flight. Reconcile leaves it alone; the slot is taken.
	phasePosting phase = iota
	// phaseFollowing: on the node, pending or running (state says which);
	// the node's events and reconcile move it.
	phaseFollowing
	// phaseFinishing: the node ended the prompt; its history is read and
	// its outputs stored. The node's slot is free again.
	phaseFinishing
	// phaseAbandoned: cancelled or timed out by us. The prompt may still
	// occupy the node: the slot stays taken until the node lets go of it.
	phaseAbandoned
)

// attempt is one attempt of a job on one node, and its executor: it owns
// the attempt from the claim to its end, and every step of that life is
// one of its methods, in order below — post (postFailed), markRunning as
// the node starts it, finished when the node ends it, complete (the
// history, or the outputs the stream carried), store (outputs copied,
// photo rows, succeeded), or fail, requeue, timeout, takeOff (a cancel)
// and forget. Its runner holds it (jobs, byPrompt) and routes the node's
// events and reconcile's findings to it; phase and the other fields are
// guarded by the runner's mutex. The farm's scheduler makes it (hold) and
// claims it; nothing else moves its phase.
type attempt struct {
	r        *runner // the node it runs on
	jobID    string
	promptID string
	frontend string
	state    schema.JobState
	models   []string
	progress *schema.Progress
	lastSign time.Time // last event or confirmation from the node
	runSince time.Time
	num      int    // the job's attempt number
	seq      uint64 // dispatch order on this node
	phase    phase
	avoid    []string // nodes this job failed on before, carried into a requeue
	epoch    uint64   // the runner's streamEpoch when the job was taken on
	// ui collects the outputs the node's executed frames carry, from
	// execution_start on, while the stream that was open when the job was
	// taken on stays open; nil when not collecting. uiDone is set when
	// execution_success came on that same stream: ui is then the whole of
	// what the history entry will list, and completion need not ask for it.
	ui     map[string]comfy.NodeOutput
	uiDone bool
}

func (a *attempt) ref() jobRef { return jobRef{a.jobID, a.num} }

// holdsSlot reports whether a occupies the node: posted and not yet ended
// there. A prompt the node has finished frees its slot at once, before its
// history and outputs are fetched, so the next job can start.
func (a *attempt) holdsSlot() bool {
	switch a.phase {
	case phaseAbandoned:
		return true
	case phaseFinishing:
		return false
	}
	return a.state == schema.JobDispatched || a.state == schema.JobRunning
}

// post uploads the job's inputs, rewrites its graph and posts it.
func (a *attempt) post(ctx context.Context, job *schema.Job) {
	r := a.r
	f := r.farm
	start := f.cfg.NowFunc()
	posted := func() {
		r.mu.Lock()
		if a.phase == phasePosting {
			a.phase = phaseFollowing
		}
		a.lastSign = f.cfg.NowFunc()
		r.mu.Unlock()
	}
	body, err := r.prepare(ctx, job)
	if err != nil {
		posted()
		a.postFailed(ctx, job, err)
		return
	}
	pid := promptFor(job)
	r.bind(job.ID, pid)
	resp, err := r.client.Submit(ctx, comfy.SubmitRequest{Prompt: body, PromptID: pid})
	if err != nil {
		posted()
		a.postFailed(ctx, job, &nodeError{err})
		return
	}
	if resp.PromptID != pid {
		r.bind(job.ID, resp.PromptID) // an older server chose its own id
	}
	posted()
	_, err = f.store.JobUpdate(ctx, dbcontrollers.JobRecordPrompt(job.ID, job.Attempts, resp.PromptID))
	cancelled := errors.Is(err, schema.ErrConflict)
	if cancelled {
		// The job ended while it was posted; only a cancel does that.
		cur, gerr := f.store.JobGet(ctx, job.ID)
		cancelled = gerr == nil && cur.State == schema.JobCancelled
	} else if err != nil {
		r.log.Error("record prompt id", "job_id", job.ID, "err", err)
	}
	r.mu.Lock()
	cancelled = cancelled || a.phase == phaseAbandoned
	if cancelled {
		a.phase = phaseAbandoned // the slot stays taken until the node lets go of the prompt
	}
	r.mu.Unlock()
	if cancelled {
		// Cancelled while it was being posted: take it off the node now.
		_ = r.client.DeletePending(ctx, resp.PromptID)
		_ = a.interrupt(ctx)
		return
	}
	f.metrics.dispatchSeconds.Observe(f.cfg.NowFunc().Sub(start).Seconds())
}

// postFailed decides between failing a job (the node refused the
// workflow: retrying cannot help) and requeueing it (the node was unreachable).
func (a *attempt) postFailed(ctx context.Context, job *schema.Job, err error) {
	r := a.r
	var verr *comfy.ValidationError
	var aerr *comfy.APIError
	var gerr *comfy.GraphError
	switch {
	case errors.As(err, &verr) && r.staleCatalogue(ctx, job, verr):
		// The node's catalogue listed a value it no longer has: not the
		// workflow's fault. Read it again and place the job again.
		r.log.Info("node lacks a value its catalogue listed, placing the job again", "job_id", job.ID, "err", verr)
		a.requeue(ctx, "stale catalogue: "+verr.Error(), requeueStale)
		if pj, err := pendingFromJob(job, r.farm.cfg.MaxGraphNodes); err == nil {
			r.farm.refreshForStale(ctx, pj, r.name)
		}
	case errors.As(err, &verr):
		jerr := &schema.JobError{Code: schema.CodeValidationFailed, Message: verr.Error(), Details: validationDetails(verr)}
		for id, ne := range verr.NodeErrors {
			if len(verr.NodeErrors) == 1 {
				jerr.NodeID, jerr.NodeType = id, ne.ClassType // the one node the server named
			}
		}
		a.fail(ctx, jerr)
	case errors.As(err, &gerr):
		a.fail(ctx, &schema.JobError{Code: schema.CodeValidationFailed, Message: gerr.Error(), NodeID: gerr.NodeID})
	case errors.Is(err, comfy.ErrTooLarge):
		a.fail(ctx, &schema.JobError{Code: schema.CodeValidationFailed, Message: "the node refused the workflow as too large"})
	case errors.As(err, &aerr) && aerr.Status >= 400 && aerr.Status < 500 && aerr.Status != 403 && aerr.Status != 404:
		a.fail(ctx, &schema.JobError{Code: schema.CodeValidationFailed, Message: aerr.Error()})
	default:
		if ctx.Err() != nil {
			return // shutting down: the job keeps its lease and is adopted at the next start
		}
		var nerr *nodeError
		switch {
		case notSent(err):
			// Nothing reached the node: no attempt is used, and the node
			// leaves placement until the prober sees it answer again.
			r.log.Warn("node refused the connection, job back to the queue", "job_id", job.ID, "err", err)
			r.farm.nodes.Suspect(r.name, "connection failed: "+err.Error())
			a.requeue(ctx, err.Error(), requeueUnposted)
		case errors.As(err, &nerr):
			r.log.Warn("dispatch failed on the node, requeueing", "job_id", job.ID, "err", err)
			a.requeue(ctx, err.Error(), requeueNodeFault)
		default:
			r.log.Warn("dispatch failed, requeueing", "job_id", job.ID, "err", err)
			a.requeue(ctx, err.Error(), requeuePlain)
		}
	}
}

// markRunning records that the node started a's prompt.
func (a *attempt) markRunning(ctx context.Context) {
	r, f := a.r, a.r.farm
	r.mu.Lock()
	if a.state != schema.JobDispatched {
		r.mu.Unlock()
		return
	}
	now := f.cfg.NowFunc()
	a.state = schema.JobRunning
	a.runSince = now
	r.mu.Unlock()
	_, err := f.store.JobUpdate(ctx, dbcontrollers.JobMarkRunning(a.jobID, a.num, now))
	if err != nil {
		if !errors.Is(err, schema.ErrConflict) {
			r.log.Error("mark running", "job_id", a.jobID, "err", err)
		}
		return
	}
	f.hub.Publish(a.jobID, schema.Event{Type: schema.EventRunning, Node: r.name})
}

// finished starts completion of a prompt that the node says has ended.
func (a *attempt) finished() {
	r := a.r
	r.clearCurrent(a)
	r.mu.Lock()
	switch a.phase {
	case phaseAbandoned:
		r.mu.Unlock()
		a.forget()
		return
	case phaseFinishing:
		r.mu.Unlock()
		return
	}
	a.phase = phaseFinishing
	r.mu.Unlock()
	r.farm.kickScheduler() // the node is free: its next job need not wait for our copying
	r.farm.wg.Add(1)
	go func() {
		defer r.farm.wg.Done()
		a.complete(r.farm.ctx)
	}()
}

// complete confirms the end of a's prompt and stores its outputs. When the
// node's stream carried the whole run (execution_start to execution_success
// on one connection), the outputs of its executed frames are what the
// history entry lists, and the node is not asked again; otherwise (a
// reconnect on the way, a server that sends no execution_success, an adopted
// job) the history entry is read.
func (a *attempt) complete(ctx context.Context) {
	r, f := a.r, a.r.farm
	r.mu.Lock()
	var entry *comfy.HistoryEntry
	if a.uiDone {
		entry = &comfy.HistoryEntry{PromptID: a.promptID, Outputs: maps.Clone(a.ui)}
	}
	pid := a.promptID
	r.mu.Unlock()
	var err error
	if entry == nil {
		r.historyReads.Add(1)
		entry, err = f.waitHistory(ctx, r, pid)
	}
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		if badAnswer(err) {
			// The node answers, but nothing it says can be read: asking
			// again will not help, another node may.
			a.requeue(ctx, "unreadable history: "+err.Error(), requeueNodeFault)
			return
		}
		// Not in history after the wait: let reconcile look again later.
		r.log.Warn("no history for finished prompt", "job_id", a.jobID, "prompt_id", a.promptID, "err", err)
		r.mu.Lock()
		if a.phase == phaseFinishing {
			a.phase = phaseFollowing
		}
		r.mu.Unlock()
		return
	}
	switch entry.Outcome() {
	case comfy.OutcomeError:
		jerr := &schema.JobError{Code: schema.CodeExecutionError, Message: "the workflow failed on the node"}
		if ee := entry.ExecError(); ee != nil {
			jerr.Message, jerr.NodeID, jerr.NodeType = ee.ExceptionMessage, ee.NodeID, ee.NodeType
			jerr.Details = map[string]any{"exception_type": ee.ExceptionType, "traceback": ee.Traceback}
		}
		a.fail(ctx, jerr)
		return
	case comfy.OutcomeInterrupted:
		a.requeue(ctx, "interrupted on the node", requeuePlain)
		return
	}
	r.mu.Lock()
	a.state = schema.JobStoring
	for _, m := range a.models {
		if i := slices.Index(r.models, m); i >= 0 {
			r.models = slices.Delete(r.models, i, i+1)
		}
		r.models = append(r.models, m)
	}
	if len(r.models) > 8 {
		r.models = r.models[len(r.models)-8:]
	}
	r.mu.Unlock()
	f.kickScheduler() // the GPU is free while outputs are copied
	a.store(ctx, entry)
}

// store copies every output of a finished prompt into storage, records
// them as photo rows of the job's frontend and marks the job succeeded.
//
// It is idempotent: object keys are fixed by (job, output index), so a retry
// overwrites the same objects, and photo rows are unique on (job, index). The
// photo rows live in the frontend's database and the job in the control
// database, so they cannot share one transaction; the photos are written
// first and the job is marked succeeded after, so a crash in between is
// repaired by the next attempt (adoption at start re-runs a storing job).
// While storage fails the job stays storing and this retries with back-off:
// a job is never succeeded without its objects.
func (a *attempt) store(ctx context.Context, entry *comfy.HistoryEntry) {
	r, f := a.r, a.r.farm
	job, err := f.updateJob(ctx, dbcontrollers.JobMarkStoring(a.jobID, a.num))
	if err != nil {
		if !errors.Is(err, schema.ErrConflict) && ctx.Err() == nil {
			r.log.Error("mark storing", "job_id", a.jobID, "err", err)
		}
		a.forget()
		return
	}
	f.hub.Publish(job.ID, schema.Event{Type: schema.EventStoring})
	storeStart := f.cfg.NowFunc()
	if job.StartedAt != nil {
		f.metrics.runDuration.WithLabelValues(job.Frontend, r.name).Observe(storeStart.Sub(*job.StartedAt).Seconds())
	}

	wait := 200 * time.Millisecond
	var firstNodeErr time.Time
	for try := 1; ; try++ {
		outputs, err := f.copyOutputs(ctx, r, job, entry)
		if err == nil {
			f.metrics.storeDuration.Observe(f.cfg.NowFunc().Sub(storeStart).Seconds())
			f.succeed(ctx, r, job, outputs)
			return
		}
		if ctx.Err() != nil {
			return // adopted and retried at the next start
		}
		var nerr *nodeReadError
		if errors.As(err, &nerr) {
			if firstNodeErr.IsZero() {
				firstNodeErr = f.cfg.NowFunc()
			}
			if f.cfg.NowFunc().Sub(firstNodeErr) > f.cfg.StallTimeout {
				// The node lost the files (or itself): the run has to happen again.
				a.requeue(ctx, "outputs unreadable on the node: "+err.Error(), requeueNodeFault)
				return
			}
		}
		var perm *permanentError
		if errors.As(err, &perm) {
			a.fail(ctx, perm.jerr)
			return
		}
		f.metrics.storageRetries.Inc()
		r.log.Warn("storing outputs failed, retrying", "job_id", job.ID, "try", try, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		if wait < 30*time.Second {
			wait *= 2
		}
	}
}

// abandon marks the runner's attempt of job id given up by us (a cancel):
// the slot stays taken until the node lets go of its prompt. It returns the
// attempt and the phase it left, or nil when the runner holds none, or one
// still being posted: its post finds the job cancelled and takes the prompt
// off the node itself.
func (r *runner) abandon(id string) (*attempt, phase) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.jobs[id]
	if a == nil || a.phase == phasePosting {
		return nil, 0
	}
	was := a.phase
	a.phase = phaseAbandoned
	return a, was
}

// resume takes back an abandon whose cancel the database refused.
func (a *attempt) resume(was phase) {
	a.r.mu.Lock()
	a.phase = was
	a.r.mu.Unlock()
}

// fail ends the attempt's job as failed: no retry.
func (a *attempt) fail(ctx context.Context, jerr *schema.JobError) {
	a.r.farm.finishFailed(ctx, a.r, a.ref(), jerr)
}

// requeue ends the attempt and sends its job back to the queue, or fails
// it when it has used all its attempts; kind says what the requeue tells
// of the node and of the attempt.
func (a *attempt) requeue(ctx context.Context, reason string, kind requeueKind) {
	a.r.farm.requeueJob(ctx, a.r, a.ref(), reason, kind)
}

// forget ends the attempt on the runner's side without a word to the
// database: its job already moved on (cancelled, timed out, taken over).
func (a *attempt) forget() { a.r.forget(a.ref()) }

// timeout interrupts and fails a job that has run longer than job_timeout.
// Its prompt keeps the node's slot until the node says it ended.
func (a *attempt) timeout(ctx context.Context) {
	r := a.r
	r.mu.Lock()
	if a.phase == phaseFinishing || a.phase == phaseAbandoned || r.jobs[a.jobID] != a {
		r.mu.Unlock()
		return // it ended meanwhile
	}
	a.phase = phaseAbandoned
	r.mu.Unlock()
	if err := a.interrupt(ctx); err != nil && !errors.Is(err, context.Canceled) {
		r.log.Warn("interrupt timed out job", "job_id", a.jobID, "err", err)
	}
	r.farm.finishFailed(ctx, nil, a.ref(), &schema.JobError{Code: schema.CodeTimeout, Message: "the job ran longer than scheduler.job_timeout"})
}

// takeOff removes a cancelled job's prompt from its node: deleted from the
// node's queue, interrupted if it runs.
func (a *attempt) takeOff(ctx context.Context) {
	r, f := a.r, a.r.farm
	r.mu.Lock()
	pid := a.promptID
	r.mu.Unlock()
	if pid != "" {
		_ = r.client.DeletePending(ctx, pid)
		if err := a.interrupt(ctx); err != nil {
			r.log.Warn("interrupt cancelled job", "job_id", a.jobID, "err", err)
		}
	}
	// The node slot stays taken until the node says the prompt ended;
	// reconcile forgets it if it was only pending.
	r.mu.Lock()
	a.lastSign = f.cfg.NowFunc().Add(-f.cfg.ReconcileEvery)
	r.mu.Unlock()
}

// interrupt stops a's prompt on the node. Servers that know targeted
// interrupts get the prompt id; older ones interrupt whatever runs, so the
// queue is checked first and the (small) race accepted.
func (a *attempt) interrupt(ctx context.Context) error {
	r := a.r
	r.mu.Lock()
	pid := a.promptID
	targeted := r.features != nil && r.features.TargetedInterrupt
	r.mu.Unlock()
	if pid == "" {
		return nil
	}
	if !targeted {
		q, err := r.client.Queue(ctx)
		if err != nil {
			return err
		}
		if _, running, _ := q.Position(pid); !running {
			return nil
		}
	}
	return r.client.Interrupt(ctx, pid)
}

// nodeError marks a failure of a request to the node (as opposed to one of
// reading the job's own inputs from storage).
type nodeError struct{ err error }

func (e *nodeError) Error() string { return e.err.Error() }

func (e *nodeError) Unwrap() error { return e.err }

func validationDetails(v *comfy.ValidationError) map[string]any {
	d := map[string]any{}
	for id, ne := range v.NodeErrors {
		items := make([]map[string]any, 0, len(ne.Errors))
		for _, it := range ne.Errors {
			items = append(items, map[string]any{"type": it.Type, "message": it.Message, "details": it.Details})
		}
		d[id] = map[string]any{"class_type": ne.ClassType, "errors": items}
	}
	return map[string]any{"node_errors": d}
}

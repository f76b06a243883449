package dispatch

import (
	"context"
	"encoding/base64"
	"slices"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/schema"
)

// handle turns one event of the node's stream into job state. It runs on the
// stream's goroutine: anything slow (history, storage) goes elsewhere.
func (r *runner) handle(ev comfy.Event) {
	ctx := r.farm.ctx
	switch e := ev.(type) {
	case *comfy.Connected:
		r.mu.Lock()
		r.connected = true
		r.streamEpoch++
		r.mu.Unlock()
		if e.Reconnect {
			// Whatever happened while we were away is recovered from the
			// node's queue and history, never assumed. The node may have
			// been restarted, upgraded or given other custom nodes: its
			// features and catalogue are read again.
			r.farm.wg.Add(1)
			go func() {
				defer r.farm.wg.Done()
				r.reconcile(ctx, true)
				r.client.ForgetFeatures()
				r.learn(ctx)
			}()
		}
		return
	case *comfy.Disconnected:
		r.mu.Lock()
		if r.connected {
			r.connected = false
			r.streamEpoch++
		}
		r.mu.Unlock()
		return
	case *comfy.Status, *comfy.FeatureFlags, *comfy.Text, *comfy.Unknown, *comfy.UnknownBinary, *comfy.Malformed, *comfy.ProgressState, *comfy.ExecutionCached:
		return
	}

	a := r.lookup(ev)
	if a == nil {
		return
	}
	now := r.farm.cfg.NowFunc()
	r.mu.Lock()
	a.lastSign = now
	abandoned := a.phase == phaseAbandoned
	r.mu.Unlock()

	switch e := ev.(type) {
	case *comfy.ExecutionStart:
		r.mu.Lock()
		if r.streamIntact(a) {
			a.ui, a.uiDone = map[string]comfy.NodeOutput{}, false
		}
		r.mu.Unlock()
		r.setCurrent(a)
		if !abandoned {
			a.markRunning(ctx)
		}
	case *comfy.Executing:
		if e.Done {
			a.finished()
			return
		}
		r.setCurrent(a)
		if !abandoned {
			a.markRunning(ctx) // legacy servers may skip execution_start
		}
	case *comfy.Progress:
		if abandoned {
			return
		}
		// A socket that connected after the prompt started (or reconnected
		// without a reconcile yet) sees no execution_start: progress says
		// it runs all the same, and job_timeout counts from here.
		a.markRunning(ctx)
		node := e.Node
		p := schema.NewProgress(node, e.Value, e.Max)
		r.mu.Lock()
		if node == "" && a.progress != nil {
			p.NodeID = a.progress.NodeID
		}
		a.progress = &p
		r.mu.Unlock()
		r.farm.hub.Publish(a.jobID, schema.Event{Type: schema.EventProgress, NodeID: p.NodeID, Value: &p.Value, Max: &p.Max, Percent: &p.Percent})
	case *comfy.Executed:
		r.mu.Lock()
		if a.ui != nil && r.streamIntact(a) && len(e.Output) > 0 {
			a.ui[e.Node] = e.Output
		}
		r.mu.Unlock()
		if !abandoned {
			a.markRunning(ctx)
			r.farm.hub.Publish(a.jobID, schema.Event{Type: schema.EventExecuted, NodeID: e.Node})
		}
	case *comfy.Preview:
		if !abandoned && len(e.Image) > 0 && len(e.Image) <= 2<<20 {
			nodeID := ""
			if e.Meta != nil {
				nodeID = e.Meta.NodeID
			}
			r.farm.hub.Publish(a.jobID, schema.Event{Type: schema.EventPreview, NodeID: nodeID, Format: e.ContentType, Image: base64.StdEncoding.EncodeToString(e.Image)})
		}
	case *comfy.ExecutionSuccess:
		r.mu.Lock()
		a.uiDone = a.ui != nil && r.streamIntact(a)
		r.mu.Unlock()
		a.finished()
	case *comfy.ExecutionError:
		if e.Blocked() {
			return // an output was blocked; the run goes on
		}
		r.clearCurrent(a)
		if abandoned {
			a.forget()
			return
		}
		a.fail(ctx, &schema.JobError{
			Code: schema.CodeExecutionError, Message: e.ExceptionMessage, NodeID: e.NodeID, NodeType: e.NodeType,
			Details: map[string]any{"exception_type": e.ExceptionType, "traceback": e.Traceback},
		})
	case *comfy.ExecutionInterrupted:
		r.clearCurrent(a)
		if abandoned {
			a.forget()
			return
		}
		// Someone else interrupted the node: the work is not done, run it again.
		a.requeue(ctx, "interrupted on the node", requeuePlain)
	}
}

// lookup finds the job an event belongs to. Events without a prompt id
// (2023-era progress, the executing frame after a reconnect) belong to the
// prompt that runs now. Events for prompt ids not bound yet are kept until
// the /prompt response binds them.
func (r *runner) lookup(ev comfy.Event) *attempt {
	pid := ev.EventPromptID()
	r.mu.Lock()
	defer r.mu.Unlock()
	if pid == "" {
		if p, ok := ev.(*comfy.Preview); ok && p.Meta != nil {
			pid = p.Meta.PromptID
		}
	}
	if pid == "" {
		return r.current
	}
	if a := r.byPrompt[pid]; a != nil {
		return a
	}
	if slices.Contains(r.gone, pid) {
		return nil // a prompt we stopped following: late frames
	}
	// Unknown prompt: maybe ours before its /prompt response came back.
	// Keep a bounded number, evicting the oldest (other clients' broadcast
	// progress lands here too).
	if r.early[pid] == nil {
		if len(r.earlyOrder) >= maxEarlyPrompts {
			delete(r.early, r.earlyOrder[0])
			r.earlyOrder = r.earlyOrder[1:]
		}
		r.earlyOrder = append(r.earlyOrder, pid)
	}
	if len(r.early[pid]) < 256 {
		r.early[pid] = append(r.early[pid], ev)
	}
	return nil
}

func (r *runner) setCurrent(a *attempt) {
	r.mu.Lock()
	r.current = a
	r.busy.set(r.farm.cfg.NowFunc(), a != nil)
	r.mu.Unlock()
}

func (r *runner) clearCurrent(a *attempt) {
	r.mu.Lock()
	if r.current == a {
		r.current = nil
		r.busy.set(r.farm.cfg.NowFunc(), false)
	}
	r.mu.Unlock()
}

// load is the node's slots in use and its busy share of the last minute.
func (r *runner) load(now time.Time) (inflight int, busy float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.jobs {
		if a.holdsSlot() {
			inflight++
		}
	}
	return inflight, r.busy.ratio(now)
}

// reconcile checks active jobs against the node's queue and history: every
// job after a reconnect (force), otherwise those without a recent sign of life.
func (r *runner) reconcile(ctx context.Context, force bool) {
	if force {
		r.reconciling.Lock()
	} else if !r.reconciling.TryLock() {
		return
	}
	defer r.reconciling.Unlock()
	defer signal(r.farm.sigs().reconciled, r.name)
	f := r.farm
	now := f.cfg.NowFunc()
	type item struct {
		a   *attempt
		pid string
	}
	r.mu.Lock()
	var check []item
	var overdue []*attempt
	for _, a := range r.jobs {
		if a.phase == phasePosting || a.phase == phaseFinishing {
			continue
		}
		if a.phase != phaseAbandoned && !a.runSince.IsZero() && now.Sub(a.runSince) >= f.cfg.JobTimeout {
			overdue = append(overdue, a)
			continue
		}
		if a.promptID == "" {
			continue
		}
		if force || now.Sub(a.lastSign) >= f.cfg.ReconcileEvery || a.phase == phaseAbandoned {
			check = append(check, item{a, a.promptID})
		}
	}
	r.mu.Unlock()
	for _, a := range overdue {
		a.timeout(ctx)
	}
	for _, it := range check {
		a := it.a
		st, _, err := r.client.PromptStatus(ctx, it.pid)
		r.mu.Lock()
		current := r.jobs[a.jobID] == a && (a.phase == phaseFollowing || a.phase == phaseAbandoned)
		abandoned := a.phase == phaseAbandoned
		stalled := now.Sub(a.lastSign) > f.cfg.StallTimeout
		// The node's stream stayed open since the job was taken on: the
		// node was not restarted meanwhile.
		unbroken := r.streamIntact(a)
		if err == nil && st.Phase != comfy.PromptLost {
			a.lastSign = now
		}
		r.mu.Unlock()
		if !current {
			continue // moved on while we asked
		}
		if err != nil {
			if notSent(err) {
				r.farm.nodes.Suspect(r.name, "connection failed: "+err.Error())
			}
			// The node does not answer, or not readably. Give it until the
			// stall timeout.
			if stalled {
				switch {
				case abandoned:
					a.forget()
				case badAnswer(err):
					a.requeue(ctx, "unreadable answer: "+err.Error(), requeueNodeFault)
				default:
					a.requeue(ctx, "node unreachable: "+err.Error(), requeuePlain)
				}
			}
			continue
		}
		switch st.Phase {
		case comfy.PromptRunning:
			if !abandoned {
				r.setCurrent(a)
				a.markRunning(ctx)
			}
		case comfy.PromptPending:
		case comfy.PromptDone:
			a.finished()
		case comfy.PromptLost:
			switch {
			case abandoned:
				a.forget()
			case force || !unbroken:
				// The event stream dropped since the job was posted (or
				// this is the check after a reconnect or a start): a
				// restart of the node explains the loss.
				a.requeue(ctx, "prompt lost on the node (restarted?)", requeuePlain)
			default:
				a.requeue(ctx, "prompt lost on the node while connected to it", requeueNodeFault)
			}
		}
	}
}

package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// A queued job whose workflow needs a class that no node offers any more
// (it went back to the queue after the node that had the custom class was
// lost) fails with no_node after stall_timeout, its credit comes back, and
// its subscribers hear it; the runnable job beside it is untouched.
func TestFarmFailsJobNoNodeCanRun(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	ctx := context.Background()
	e.eventually(10*time.Second, "node catalogue", func() bool {
		r := e.farm.runner("n1")
		return r != nil && r.knownClasses() != nil
	})
	ctrl, err := e.reg.Get("style")
	if err != nil {
		t.Fatal(err)
	}
	credits := func() int64 {
		u, err := ctrl.UserGet(ctx, ctrl.DB(), "u-gone")
		if err != nil {
			t.Fatal(err)
		}
		return u.Credits
	}

	// The node is busy with a held job.
	e.holdAll()
	ok := e.submit("style", "u-ok", sdGraph(ckptXL, 2, 7), 0)
	e.waitState(ok.ID, schema.JobDispatched, 10*time.Second)

	// The other job, written as Submit wrote it (charged one credit), then
	// put back in the queue as the rescuer does.
	custom := json.RawMessage(`{"1":{"class_type":"GoneCustomNode","inputs":{}},` +
		`"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"x"}}}`)
	now := time.Now().UTC()
	gone := &schema.Job{ID: "01JGONE0000000000000000000", Frontend: "style", UserID: "u-gone", State: schema.JobQueued,
		Workflow: custom, Metadata: json.RawMessage(`{}`), Charged: 1, CreatedAt: now, UpdatedAt: now}
	err = dbcontrollers.InTx(ctx, ctrl.DB(), func(tx *sqlx.Tx) error {
		if _, err := ctrl.UserEnsure(ctx, tx, "u-gone"); err != nil {
			return err
		}
		_, err := ctrl.CreditsApply(ctx, tx, dbcontrollers.CreditParams{
			UserID: "u-gone", Delta: -1, Reason: "job " + gone.ID, IdempotencyKey: "job:" + gone.ID + ":charge"})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := credits(); got != 4 {
		t.Fatalf("credits after the charge = %d, want 4", got)
	}
	if err := e.store.JobInsert(ctx, gone); err != nil {
		t.Fatal(err)
	}
	events, cancel, err := e.farm.Subscribe(ctx, gone.ID, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	e.farm.requeued(gone)

	failed := e.waitState(gone.ID, schema.JobFailed, 30*time.Second)
	if failed.Error == nil || failed.Error.Code != schema.CodeNoNode || failed.Error.Details["classes"] == nil {
		t.Fatalf("error = %+v, want no_node naming the class", failed.Error)
	}
	if wait := failed.FinishedAt.Sub(now); wait < e.farm.cfg.StallTimeout {
		t.Errorf("failed after %v, before stall_timeout %v", wait, e.farm.cfg.StallTimeout)
	}
	e.eventually(10*time.Second, "the refund", func() bool { return credits() == 5 })
	evs := drain(t, events, 10*time.Second)
	if len(evs) == 0 {
		t.Fatal("no events")
	}
	if last := evs[len(evs)-1]; last.Type != schema.EventFailed || last.Error == nil || last.Error.Code != schema.CodeNoNode {
		t.Errorf("last event = %+v, want failed no_node", last)
	}
	e.farm.mu.Lock()
	queued := e.farm.queue.Has(gone.ID)
	e.farm.mu.Unlock()
	if queued {
		t.Error("the failed job is still in the scheduler's queue")
	}

	// The runnable job was never failed and runs once the node works again.
	if j := e.job(ok.ID); j.State.Terminal() {
		t.Fatalf("runnable job ended %s", j.State)
	}
	e.releaseAll()
	e.waitState(ok.ID, schema.JobSucceeded, 30*time.Second)
}

// A prompt runs on one node, so a workflow whose classes are split between
// two nodes (a custom class on each) can run nowhere: Submit refuses it, and
// a queued one counts as unrunnable.
func TestFarmClassesSplitAcrossNodes(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions(), sdOptions()}, nil)
	for _, name := range []string{"n1", "n2"} {
		e.eventually(10*time.Second, name+" catalogue", func() bool {
			r := e.farm.runner(name)
			return r != nil && r.knownClasses() != nil
		})
	}
	set := func(name string, classes ...string) {
		r := e.farm.runner(name)
		r.mu.Lock()
		r.cat = &catalogue{classes: map[string]bool{"SaveImage": true}}
		for _, c := range classes {
			r.cat.classes[c] = false
		}
		r.mu.Unlock()
	}
	set("n1", "CustomA", "Shared")
	set("n2", "CustomB", "Shared")
	both := json.RawMessage(`{"1":{"class_type":"CustomA","inputs":{}},"2":{"class_type":"CustomB","inputs":{"x":["1",0]}},` +
		`"3":{"class_type":"SaveImage","inputs":{"images":["2",0],"filename_prefix":"x"}}}`)
	_, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: "alpha", UserID: "split", Workflow: both})
	if !errors.Is(err, schema.ErrNoNode) || !strings.Contains(err.Error(), "lacks Custom") {
		t.Fatalf("submit of a split workflow: %v, want ErrNoNode naming what the closest node lacks", err)
	}
	if m := e.farm.missingClasses([]string{"CustomA", "Shared", "SaveImage"}); m != nil {
		t.Errorf("n1 offers them all, missing = %v", m)
	}
	if m := e.farm.missingClasses([]string{"CustomA", "CustomB", "Gone1", "Gone2"}); len(m) != 3 {
		t.Errorf("missing = %v, want the three the closest node lacks", m)
	}
}

// After a node restarts (perhaps upgraded, perhaps with other custom nodes)
// the farm reads its features and catalogue again.
func TestFarmRereadsCatalogueAfterNodeRestart(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	r := e.farm.runner("n1")
	e.eventually(10*time.Second, "node catalogue", func() bool { return r.knownClasses() != nil })
	r.mu.Lock()
	r.cat = &catalogue{classes: map[string]bool{"SomethingElse": false}} // what the node offered before
	r.mu.Unlock()
	if err := e.fakes["n1"].Restart(); err != nil {
		t.Fatal(err)
	}
	e.eventually(30*time.Second, "the catalogue read again", func() bool {
		c := r.knownClasses()
		_, ks := c["KSampler"]
		_, old := c["SomethingElse"]
		return ks && !old
	})
	j := e.submit("alpha", "after-restart", sdGraph(ckptXL, 1, 3), 0)
	e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
}

// A stream that missed the prompt's start (it connected, or reconnected,
// while the prompt ran) still learns from progress that the job runs: the
// job shows running, and job_timeout counts.
func TestFarmProgressMeansRunning(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	node := e.fakes["n1"]
	node.Hold()
	j := e.submit("alpha", "late-socket", sdGraph(ckptXL, 3, 5), 0)
	e.waitState(j.ID, schema.JobDispatched, 10*time.Second)
	r := e.farm.runner("n1")
	var pid string
	e.eventually(10*time.Second, "the prompt posted", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for p, a := range r.byPrompt {
			if a.jobID == j.ID && a.phase != phasePosting {
				pid = p
				return true
			}
		}
		return false
	})
	r.handle(&comfy.Progress{PromptID: pid, Node: "3", Value: 1, Max: 3})
	got := e.waitState(j.ID, schema.JobRunning, 10*time.Second)
	if got.StartedAt == nil {
		t.Fatal("running without started_at")
	}
	r.mu.Lock()
	since := r.byPrompt[pid].runSince
	r.mu.Unlock()
	if since.IsZero() {
		t.Fatal("job_timeout does not count")
	}
	node.Release()
	e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
}

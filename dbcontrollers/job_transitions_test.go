package dbcontrollers_test

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Every named transition applies from the states it names, and only from
// them, and leaves the job in its target state.
func TestJobTransitions(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		ctx := testContext(t)
		s := openStore(t, cfg)
		now := time.Now()
		jerr := &schema.JobError{Code: schema.CodeExecutionError, Message: "x"}
		all := []schema.JobState{schema.JobQueued, schema.JobDispatched, schema.JobRunning, schema.JobStoring,
			schema.JobSucceeded, schema.JobFailed, schema.JobCancelled}
		cases := []struct {
			name string
			u    func(id string) dbcontrollers.JobUpdate
			from []schema.JobState
			to   schema.JobState // "" keeps the state
		}{
			{"record prompt", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobRecordPrompt(id, 1, id+"-1") }, dbcontrollers.ActiveStates, ""},
			{"mark running", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobMarkRunning(id, 1, now) }, []schema.JobState{schema.JobDispatched}, schema.JobRunning},
			{"mark storing", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobMarkStoring(id, 1) }, dbcontrollers.ActiveStates, schema.JobStoring},
			{"succeed", func(id string) dbcontrollers.JobUpdate {
				return dbcontrollers.JobSucceed(id, 1, []schema.Output{{Key: "k", ContentType: "image/png"}}, now)
			}, []schema.JobState{schema.JobStoring}, schema.JobSucceeded},
			{"fail", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobFail(id, 1, jerr, now) }, dbcontrollers.ActiveStates, schema.JobFailed},
			{"fail queued", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobFailQueued(id, jerr, now) }, []schema.JobState{schema.JobQueued}, schema.JobFailed},
			{"requeue", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobRequeue(id, 1, 1) }, dbcontrollers.ActiveStates, schema.JobQueued},
			{"adopt", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobAdopt(id, "me", now.Add(time.Minute)) }, dbcontrollers.ActiveStates, ""},
			{"cancel queued", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobCancelQueued(id, now) }, []schema.JobState{schema.JobQueued}, schema.JobCancelled},
			{"cancel active", func(id string) dbcontrollers.JobUpdate { return dbcontrollers.JobCancelActive(id, now) }, []schema.JobState{schema.JobDispatched, schema.JobRunning}, schema.JobCancelled},
		}
		for _, c := range cases {
			for _, st := range all {
				j := mustInsert(t, s, newJob("alpha", "u", 0))
				one := 1
				if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: all, State: st, Attempts: &one}); err != nil {
					t.Fatal(err)
				}
				got, err := s.JobUpdate(ctx, c.u(j.ID))
				want := slices.Contains(c.from, st)
				switch {
				case want && err != nil:
					t.Errorf("%s from %s: %v", c.name, st, err)
				case !want && !errors.Is(err, schema.ErrConflict):
					t.Errorf("%s from %s: %v, want a conflict", c.name, st, err)
				case want && got.State != c.to && !(c.to == "" && got.State == st):
					t.Errorf("%s from %s: now %s, want %s", c.name, st, got.State, c.to)
				}
			}
			// A transition bound to attempt 1 does not move attempt 2.
			if len(c.from) > 0 && c.name != "adopt" && c.name != "fail queued" && !slices.Contains(c.from, schema.JobQueued) {
				j := mustInsert(t, s, newJob("alpha", "u", 0))
				two := 2
				if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: all, State: c.from[0], Attempts: &two}); err != nil {
					t.Fatal(err)
				}
				if _, err := s.JobUpdate(ctx, c.u(j.ID)); !errors.Is(err, schema.ErrConflict) && c.name != "cancel active" {
					t.Errorf("%s of attempt 1 applied to attempt 2: %v", c.name, err)
				}
			}
		}
	})
}

package dbcontrollers_test

import (
	"errors"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// An update bound to an attempt does not touch a later attempt of the job.
func TestJobUpdateBoundToAttempt(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		ctx := testContext(t)
		s := openStore(t, cfg)
		j := mustInsert(t, s, newJob("alpha", "u", 0))
		lease := time.Now().Add(time.Minute)
		claim := func() *schema.Job {
			c, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j.ID, Node: "n1", Owner: "o", LeaseUntil: lease})
			if err != nil {
				t.Fatal(err)
			}
			return c
		}
		first := claim()
		back := first.Attempts
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{schema.JobDispatched},
			State: schema.JobQueued, Attempt: &back, ClearLease: true}); err != nil {
			t.Fatalf("requeue of attempt %d: %v", back, err)
		}
		second := claim()
		if second.Attempts != first.Attempts+1 {
			t.Fatalf("attempts %d after %d", second.Attempts, first.Attempts)
		}
		// A late failure of the first attempt must not fail the second.
		stale := first.Attempts
		_, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{schema.JobDispatched, schema.JobRunning},
			State: schema.JobFailed, Attempt: &stale})
		if !errors.Is(err, schema.ErrConflict) {
			t.Fatalf("stale update: %v, want ErrConflict", err)
		}
		got, _ := s.JobGet(ctx, j.ID)
		if got.State != schema.JobDispatched {
			t.Fatalf("state %s after a stale update", got.State)
		}
		// The same change for the current attempt applies, even if it
		// changes nothing else.
		cur := second.Attempts
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{schema.JobDispatched}, Attempt: &cur}); err != nil {
			t.Fatalf("update of the current attempt: %v", err)
		}
	})
}

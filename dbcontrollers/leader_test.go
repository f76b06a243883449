package dbcontrollers_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// The lease goes to one holder at a time; a renewal keeps the epoch, a new
// holder (or a new term of the same one) gets the next; a resigned lease is
// free at once.
func TestLeaderLease(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		ctx := testContext(t)
		s := openStore(t, cfg)
		const name = dbcontrollers.LeaderScheduler
		ttl := time.Hour

		a, err := s.LeaderAcquire(ctx, name, "a", ttl, 0)
		if err != nil || !a.Held || a.Epoch != 1 || a.Holder != "a" {
			t.Fatalf("first acquire: %+v, %v", a, err)
		}
		b, err := s.LeaderAcquire(ctx, name, "b", ttl, 0)
		if err != nil || b.Held || b.Holder != "a" || b.Epoch != 1 {
			t.Fatalf("b while a holds it: %+v, %v", b, err)
		}
		renew, err := s.LeaderAcquire(ctx, name, "a", ttl, a.Epoch)
		if err != nil || !renew.Held || renew.Epoch != 1 {
			t.Fatalf("renew: %+v, %v", renew, err)
		}
		// A restarted "a" (epoch 0) takes a new term: the old one is fenced.
		again, err := s.LeaderAcquire(ctx, name, "a", ttl, 0)
		if err != nil || !again.Held || again.Epoch != 2 {
			t.Fatalf("new term of a: %+v, %v", again, err)
		}
		if old, err := s.LeaderAcquire(ctx, name, "a", ttl, 1); err != nil || old.Held {
			t.Fatalf("the old term renewed: %+v, %v", old, err)
		}
		if err := s.LeaderResign(ctx, name, "a", again.Epoch); err != nil {
			t.Fatal(err)
		}
		b, err = s.LeaderAcquire(ctx, name, "b", ttl, 0)
		if err != nil || !b.Held || b.Epoch != 3 {
			t.Fatalf("b after a resigned: %+v, %v", b, err)
		}
		got, err := s.LeaderGet(ctx, name)
		if err != nil || got.Holder != "b" || got.Epoch != 3 {
			t.Fatalf("get: %+v, %v", got, err)
		}
		// An expired lease is taken over.
		short, err := s.LeaderAcquire(ctx, name, "b", time.Millisecond, b.Epoch)
		if err != nil || !short.Held {
			t.Fatalf("renew short: %+v, %v", short, err)
		}
		time.Sleep(20 * time.Millisecond)
		c, err := s.LeaderAcquire(ctx, name, "c", ttl, 0)
		if err != nil || !c.Held || c.Epoch != 4 {
			t.Fatalf("takeover of an expired lease: %+v, %v", c, err)
		}
		if late, err := s.LeaderAcquire(ctx, name, "b", ttl, b.Epoch); err != nil || late.Held || late.Holder != "c" {
			t.Fatalf("the expired holder renewed: %+v, %v", late, err)
		}
	})
}

// Of many replicas racing for a free lease, exactly one gets it, and none
// of them fails (on MySQL, racers inserting the missing row under gap locks
// deadlocked each other). Several rounds, each on a lease never held.
func TestLeaderLeaseRace(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		ctx := testContext(t)
		s := openStore(t, cfg)
		for round := range 12 {
			name := fmt.Sprintf("race-%d", round)
			var mu sync.Mutex
			held := map[int64][]string{}
			start := make(chan struct{})
			var wg sync.WaitGroup
			for r := range 8 {
				h := fmt.Sprintf("r%d", r)
				wg.Go(func() {
					<-start
					l, err := s.LeaderAcquire(ctx, name, h, time.Hour, 0)
					if err != nil {
						t.Error(err)
						return
					}
					if l.Held {
						mu.Lock()
						held[l.Epoch] = append(held[l.Epoch], h)
						mu.Unlock()
					}
				})
			}
			close(start)
			wg.Wait()
			if len(held) != 1 || len(held[1]) != 1 {
				t.Fatalf("%s: holders by epoch: %v, want one holder at epoch 1", name, held)
			}
		}
	})
}

// A store fenced at an epoch writes jobs while the lease is at that epoch,
// and none of its claims, updates, lease extensions or rescues apply after
// another replica took the lease over.
func TestFencedWrites(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		ctx := testContext(t)
		base := openStore(t, cfg)
		l, err := base.LeaderAcquire(ctx, dbcontrollers.LeaderScheduler, "old", time.Hour, 0)
		if err != nil || !l.Held {
			t.Fatalf("acquire: %+v, %v", l, err)
		}
		old := base.Fenced(l.Epoch)
		j1 := mustInsert(t, base, newJob("alpha", "u", 0))
		j2 := mustInsert(t, base, newJob("alpha", "u", 0))
		lease := time.Now().Add(time.Minute)
		c1, err := old.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j1.ID, Node: "n1", Owner: "old", LeaseUntil: lease})
		if err != nil {
			t.Fatalf("claim under the current epoch: %v", err)
		}
		if _, err := old.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j1.ID, From: []schema.JobState{schema.JobDispatched},
			State: schema.JobRunning, Attempt: &c1.Attempts}); err != nil {
			t.Fatalf("update under the current epoch: %v", err)
		}

		// The lease is taken over (the old holder was paused past it).
		if err := base.LeaderResign(ctx, dbcontrollers.LeaderScheduler, "old", l.Epoch); err != nil {
			t.Fatal(err)
		}
		nl, err := base.LeaderAcquire(ctx, dbcontrollers.LeaderScheduler, "new", time.Hour, 0)
		if err != nil || !nl.Held || nl.Epoch != l.Epoch+1 {
			t.Fatalf("takeover: %+v, %v", nl, err)
		}

		if _, err := old.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j2.ID, Node: "n1", Owner: "old", LeaseUntil: lease}); !errors.Is(err, dbcontrollers.ErrFenced) {
			t.Fatalf("stale claim: %v, want ErrFenced", err)
		}
		if _, err := old.JobClaimNext(ctx, dbcontrollers.ClaimNextParams{Node: "n1", Owner: "old", LeaseUntil: lease}); !errors.Is(err, dbcontrollers.ErrFenced) {
			t.Fatalf("stale claim of the queue's head: %v, want ErrFenced", err)
		}
		for _, st := range []schema.JobState{schema.JobStoring, schema.JobSucceeded, schema.JobFailed, schema.JobQueued} {
			_, err := old.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j1.ID, From: []schema.JobState{schema.JobRunning},
				State: st, Attempt: &c1.Attempts, FinishedAt: ptrTime(time.Now())})
			if !errors.Is(err, dbcontrollers.ErrFenced) || !errors.Is(err, schema.ErrConflict) {
				t.Fatalf("stale update to %s: %v, want ErrFenced (a conflict)", st, err)
			}
		}
		if _, err := old.JobExtendLease(ctx, "old", []string{j1.ID}, time.Now().Add(time.Hour)); !errors.Is(err, dbcontrollers.ErrFenced) {
			t.Fatalf("stale lease extension: %v, want ErrFenced", err)
		}
		if _, _, err := old.JobRescue(ctx, time.Now().Add(time.Hour), 3); !errors.Is(err, dbcontrollers.ErrFenced) {
			t.Fatalf("stale rescue: %v, want ErrFenced", err)
		}
		got, err := base.JobGet(ctx, j1.ID)
		if err != nil || got.State != schema.JobRunning {
			t.Fatalf("job after stale writes: %v %v, want running", got.State, err)
		}
		if got, _ := base.JobGet(ctx, j2.ID); got.State != schema.JobQueued {
			t.Fatalf("second job %s, want queued", got.State)
		}

		// The new leader's store writes.
		cur := base.Fenced(nl.Epoch)
		if _, err := cur.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j1.ID, From: []schema.JobState{schema.JobRunning},
			State: schema.JobSucceeded, FinishedAt: ptrTime(time.Now())}); err != nil {
			t.Fatalf("update by the new leader: %v", err)
		}
		if _, err := cur.JobClaim(ctx, dbcontrollers.ClaimParams{ID: j2.ID, Node: "n1", Owner: "new", LeaseUntil: lease}); err != nil {
			t.Fatalf("claim by the new leader: %v", err)
		}
		// Unfenced writes (an API replica's cancel) are not affected.
		if _, err := base.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j2.ID, From: []schema.JobState{schema.JobDispatched},
			State: schema.JobCancelled, FinishedAt: ptrTime(time.Now())}); err != nil {
			t.Fatalf("unfenced cancel: %v", err)
		}
	})
}

func ptrTime(t time.Time) *time.Time { return &t }

package dbcontrollers_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// hookTo announces every final job of frontend "alpha" to its own
// webhook_url or to a fixed address.
func hookTo(j *schema.Job) string {
	if j.Frontend != "alpha" {
		return ""
	}
	if j.WebhookURL != "" {
		return j.WebhookURL
	}
	return "http://127.0.0.1:1/hook"
}

// Every way a job ends writes its outbox row with the final state, once, and
// only for the frontends WebhookURLFunc names an address for.
func TestWebhookOutboxWrittenWithFinalState(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		s.WebhookURLFunc = hookTo
		now := time.Now()

		// succeeded through JobUpdate, with the job's own address
		own := newJob("alpha", "u", 0)
		own.WebhookURL = "https://hooks.example.com/x?token=1"
		mustInsert(t, s, own)
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: own.ID, From: []schema.JobState{schema.JobQueued},
			State: schema.JobSucceeded, FinishedAt: &now}); err != nil {
			t.Fatal(err)
		}
		// cancelled through JobUpdate; a second, refused update adds nothing
		c := mustInsert(t, s, newJob("alpha", "u", 0))
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: c.ID, From: []schema.JobState{schema.JobQueued},
			State: schema.JobCancelled}); err != nil {
			t.Fatal(err)
		}
		_, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: c.ID, From: []schema.JobState{schema.JobQueued},
			State: schema.JobFailed})
		wantErr(t, err, schema.ErrConflict)
		// failed by the rescuer
		r := mustInsert(t, s, newJob("alpha", "u", 0))
		if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: r.ID, Node: "gpu", Owner: "me",
			LeaseUntil: now.Add(-time.Minute)}); err != nil {
			t.Fatal(err)
		}
		if _, failed, err := s.JobRescue(ctx, now, 1); err != nil || len(failed) != 1 {
			t.Fatalf("rescue: %v, %d failed", err, len(failed))
		}
		// a state that is not final, and another frontend: no row
		q := mustInsert(t, s, newJob("alpha", "u", 0))
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: q.ID, From: []schema.JobState{schema.JobQueued},
			State: schema.JobQueued}); err != nil {
			t.Fatal(err)
		}
		b := mustInsert(t, s, newJob("beta", "u", 0))
		if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: b.ID, From: []schema.JobState{schema.JobQueued},
			State: schema.JobSucceeded}); err != nil {
			t.Fatal(err)
		}

		want := map[string]struct {
			event schema.JobState
			url   string
		}{
			own.ID: {schema.JobSucceeded, own.WebhookURL},
			c.ID:   {schema.JobCancelled, "http://127.0.0.1:1/hook"},
			r.ID:   {schema.JobFailed, "http://127.0.0.1:1/hook"},
			q.ID:   {},
			b.ID:   {},
		}
		for id, w := range want {
			list, err := s.WebhookList(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if w.event == "" {
				if len(list) != 0 {
					t.Errorf("job %s: %d deliveries, want none", id, len(list))
				}
				continue
			}
			if len(list) != 1 {
				t.Fatalf("job %s: %d deliveries, want 1", id, len(list))
			}
			d := list[0]
			if d.ID != schema.WebhookMessageID(id, w.event) || d.Event != w.event || d.URL != w.url ||
				d.State != schema.WebhookPending || d.NextAttemptAt == nil || len(d.Attempts) != 0 {
				t.Errorf("job %s: delivery %+v, want %s to %s, pending", id, d, w.event, w.url)
			}
		}
		got, err := s.JobGet(ctx, own.ID)
		if err != nil || got.WebhookURL != own.WebhookURL {
			t.Fatalf("webhook_url stored as %q (%v)", got.WebhookURL, err)
		}
		pending, err := s.WebhookPending(ctx)
		if err != nil || pending["alpha"] != 3 || len(pending) != 1 {
			t.Fatalf("pending = %v (%v), want alpha 3", pending, err)
		}
	})
}

// Claims lease rows to one deliverer at a time; a result is recorded only by
// the lease's owner, and a row whose lease ran out comes due again.
func TestWebhookClaimAndRecord(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		clock := time.Now().UTC()
		var mu sync.Mutex
		s.NowFunc = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
		advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
		s.WebhookURLFunc = hookTo
		const n = 30
		for i := 0; i < n; i++ {
			j := mustInsert(t, s, newJob("alpha", "u", 0))
			if _, err := s.JobUpdate(ctx, dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{schema.JobQueued},
				State: schema.JobSucceeded}); err != nil {
				t.Fatal(err)
			}
		}
		// four claimers at once: every row to exactly one of them
		var wg sync.WaitGroup
		claimed := make([][]schema.WebhookDelivery, 4)
		for i := range claimed {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					got, err := s.WebhookClaim(ctx, dbcontrollers.WebhookClaimParams{
						Owner: string(rune('a' + i)), Limit: 3, LeaseUntil: clock.Add(time.Minute)})
					if err != nil {
						t.Error(err)
						return
					}
					if len(got) == 0 {
						return
					}
					claimed[i] = append(claimed[i], got...)
				}
			}()
		}
		wg.Wait()
		seen := map[string]string{}
		for i, list := range claimed {
			for _, d := range list {
				if prev, dup := seen[d.ID]; dup {
					t.Fatalf("%s claimed by %s and %c", d.ID, prev, 'a'+i)
				}
				seen[d.ID] = string(rune('a' + i))
			}
		}
		if len(seen) != n {
			t.Fatalf("%d rows claimed, want %d", len(seen), n)
		}
		var first schema.WebhookDelivery
		var owner string
		for i, list := range claimed {
			if len(list) > 0 {
				first, owner = list[0], string(rune('a'+i))
				break
			}
		}
		// another owner cannot record; the owner can
		err := s.WebhookRecord(ctx, dbcontrollers.WebhookResult{ID: first.ID, Owner: "zz", State: schema.WebhookDelivered})
		wantErr(t, err, schema.ErrConflict)
		err = s.WebhookRecord(ctx, dbcontrollers.WebhookResult{ID: first.ID, Owner: owner, State: schema.WebhookPending,
			Attempt:       schema.WebhookAttempt{At: clock, StatusCode: 500, Error: "answered 500", DurationMS: 1.5},
			NextAttemptAt: clock.Add(5 * time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		// nothing due until the back-off and the leases have passed
		if got, err := s.WebhookClaim(ctx, dbcontrollers.WebhookClaimParams{Owner: "b", Limit: 100,
			LeaseUntil: clock.Add(time.Minute)}); err != nil || len(got) != 0 {
			t.Fatalf("claimed %d early (%v)", len(got), err)
		}
		advance(6 * time.Second)
		got, err := s.WebhookClaim(ctx, dbcontrollers.WebhookClaimParams{Owner: "later", Limit: 100, LeaseUntil: clock.Add(time.Minute)})
		if err != nil || len(got) != 1 || got[0].ID != first.ID || len(got[0].Attempts) != 1 || got[0].Attempts[0].StatusCode != 500 {
			t.Fatalf("after back-off: %+v (%v)", got, err)
		}
		// the first owner's late result is refused
		err = s.WebhookRecord(ctx, dbcontrollers.WebhookResult{ID: first.ID, Owner: owner, State: schema.WebhookDelivered})
		wantErr(t, err, schema.ErrConflict)
		if err := s.WebhookRecord(ctx, dbcontrollers.WebhookResult{ID: first.ID, Owner: "later", State: schema.WebhookDelivered,
			Attempt: schema.WebhookAttempt{At: clock, StatusCode: 204}}); err != nil {
			t.Fatal(err)
		}
		// leases ran out: the other n-1 are due again, the delivered one is not
		advance(2 * time.Minute)
		got, err = s.WebhookClaim(ctx, dbcontrollers.WebhookClaimParams{Owner: "c", Limit: 100, LeaseUntil: clock.Add(time.Minute)})
		if err != nil || len(got) != n-1 {
			t.Fatalf("after leases ran out: %d due (%v), want %d", len(got), err, n-1)
		}
		list, err := s.WebhookList(ctx, first.JobID)
		if err != nil || len(list) != 1 || list[0].State != schema.WebhookDelivered || list[0].NextAttemptAt != nil ||
			len(list[0].Attempts) != 2 || list[0].Attempts[1].StatusCode != 204 {
			t.Fatalf("delivered row: %+v (%v)", list, err)
		}
		if err := s.WebhookRecord(ctx, dbcontrollers.WebhookResult{ID: "nope", Owner: "c", State: schema.WebhookFailed}); !errors.Is(err, schema.ErrNotFound) {
			t.Fatalf("unknown row: %v", err)
		}
	})
}

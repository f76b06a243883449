package dbcontrollers_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Benchmarks report the cost of the queue's hot paths on each database; they
// assert nothing about time.

func BenchmarkJobInsert(b *testing.B) {
	for _, n := range dbtest.Configs() {
		b.Run(n.Name, func(b *testing.B) {
			s := openStore(b, n.Config(b))
			ctx := testContext(b)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := s.JobInsert(ctx, newJob("style", "u", i%5)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkJobLifecycle is one job's database work from submit to success:
// insert, claim the head of the queue, running, storing, succeeded.
func BenchmarkJobLifecycle(b *testing.B) {
	for _, n := range dbtest.Configs() {
		b.Run(n.Name, func(b *testing.B) {
			s := openStore(b, n.Config(b))
			ctx := testContext(b)
			until := time.Now().Add(time.Hour)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := s.JobInsert(ctx, newJob("style", "u", 0)); err != nil {
					b.Fatal(err)
				}
				j, err := s.JobClaimNext(ctx, dbcontrollers.ClaimNextParams{Frontend: "style", Node: "n", Owner: "o", LeaseUntil: until})
				if err != nil {
					b.Fatal(err)
				}
				now := time.Now()
				for _, step := range []struct{ from, to schema.JobState }{
					{schema.JobDispatched, schema.JobRunning},
					{schema.JobRunning, schema.JobStoring},
					{schema.JobStoring, schema.JobSucceeded},
				} {
					u := dbcontrollers.JobUpdate{ID: j.ID, From: []schema.JobState{step.from}, State: step.to}
					if step.to == schema.JobSucceeded {
						u.FinishedAt, u.ClearLease = &now, true
					}
					if _, err := s.JobUpdate(ctx, u); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// BenchmarkJobClaimNextParallel has parallel workers claiming from a deep
// queue; each op is one claim.
func BenchmarkJobClaimNextParallel(b *testing.B) {
	for _, n := range dbtest.Configs() {
		b.Run(n.Name, func(b *testing.B) {
			s := openStore(b, n.Config(b))
			ctx := testContext(b)
			for i := 0; i < b.N; i++ {
				if err := s.JobInsert(ctx, newJob("style", "u", i%7)); err != nil {
					b.Fatal(err)
				}
			}
			until := time.Now().Add(time.Hour)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					_, err := s.JobClaimNext(ctx, dbcontrollers.ClaimNextParams{Frontend: "style", Node: "n", Owner: "o", LeaseUntil: until})
					if err != nil && !errors.Is(err, schema.ErrNotFound) {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

func BenchmarkCreditsApply(b *testing.B) {
	for _, n := range dbtest.Configs() {
		b.Run(n.Name, func(b *testing.B) {
			c := openControllerB(b, n.Config(b))
			ctx := testContext(b)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := c.CreditsApply(ctx, c.DB(), dbcontrollers.CreditParams{UserID: "u", Delta: 1, IdempotencyKey: fmt.Sprint(i)}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkPhotoInsert(b *testing.B) {
	for _, n := range dbtest.Configs() {
		b.Run(n.Name, func(b *testing.B) {
			c := openControllerB(b, n.Config(b))
			ctx := testContext(b)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := c.PhotoInsert(ctx, c.DB(), photo(fmt.Sprint("u", i%50), fmt.Sprint("job-", i), 0, `{"style":"ink"}`)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkPhotoList(b *testing.B) {
	for _, n := range dbtest.Configs() {
		b.Run(n.Name, func(b *testing.B) {
			c := openControllerB(b, n.Config(b))
			ctx := testContext(b)
			for i := 0; i < 500; i++ {
				if err := c.PhotoInsert(ctx, c.DB(), photo(fmt.Sprint("u", i%5), fmt.Sprint("job-", i), 0, "")); err != nil {
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, _, err := c.PhotoList(ctx, c.DB(), dbcontrollers.PhotoFilter{UserID: "u1", Page: 1 + i%5, Limit: 20}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func openControllerB(b *testing.B, cfg dbcontrollers.Config) dbcontrollers.Controller {
	b.Helper()
	reg, err := dbcontrollers.NewRegistry(testContext(b), cfg, []dbcontrollers.FrontendConfig{{Name: "bench", InitialCredits: 1}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { reg.Close() })
	c, err := reg.Get("bench")
	if err != nil {
		b.Fatal(err)
	}
	return c
}

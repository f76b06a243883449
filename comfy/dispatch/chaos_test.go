package dispatch

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Nodes crash and come back, and comfyfarm itself is stopped and started,
// while 30 jobs run: every job ends succeeded, with exactly one photo row
// and one object per output. Nothing is lost, nothing is stored twice.
func TestFarmChaosNoJobLostOrDuplicated(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos run takes about 20 s")
	}
	o := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 500 * time.Millisecond}}
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{o, o, o}, func(c *FarmConfig) {
		c.MaxAttempts = 10
		c.StallTimeout = time.Second
		c.ReconcileEvery = 100 * time.Millisecond
	})
	ctx := context.Background()
	var ids []string
	for i := 0; i < 30; i++ {
		fe := "alpha"
		if i%3 == 0 {
			fe = "beta"
		}
		ids = append(ids, e.submit(fe, "chaos", sdGraph(ckptXL, 3, i), 0).ID)
	}
	rng := rand.New(rand.NewPCG(7, 11))
	crashed := map[string]bool{}
	deadline := time.Now().Add(6 * time.Second)
	farmRestarted := false
	hits := 0 // crashes of a node while it ran a prompt
	for step := 0; time.Now().Before(deadline); step++ {
		time.Sleep(300 * time.Millisecond)
		name := e.names[rng.IntN(len(e.names))]
		switch {
		case step == 8 && !farmRestarted:
			e.stop()
			e.start()
			farmRestarted = true
		case crashed[name]:
			if err := e.fakes[name].Restart(); err != nil {
				t.Fatal(err)
			}
			crashed[name] = false
		case len(crashed) < 2 || rng.IntN(2) == 0:
			// Prefer a node in the middle of a job: that is the case to test.
			for _, n := range e.names {
				if !crashed[n] && e.fakes[n].Stats().Running != "" {
					name = n
					break
				}
			}
			if e.fakes[name].Stats().Running != "" {
				hits++
			}
			e.fakes[name].Crash()
			crashed[name] = true
		}
	}
	for name, down := range crashed {
		if down {
			if err := e.fakes[name].Restart(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if !farmRestarted {
		t.Fatal("the chaos run did not restart the farm")
	}
	requeued := 0
	for _, id := range ids {
		j := e.waitState(id, schema.JobSucceeded, 90*time.Second)
		if len(j.Outputs) != 1 {
			t.Fatalf("job %s has %d outputs", id, len(j.Outputs))
		}
		if j.Attempts > 1 {
			requeued++
		}
	}
	photos := 0
	for _, fe := range []string{"alpha", "beta"} {
		ctrl, _ := e.reg.Get(fe)
		list, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "chaos", Page: 1, Limit: 100})
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, p := range list {
			if seen[p.JobID] {
				t.Fatalf("job %s has two photo rows", p.JobID)
			}
			seen[p.JobID] = true
			if _, _, err := e.storage.Get(ctx, p.ObjectKey); err != nil {
				t.Fatalf("photo %d has no object: %v", p.ID, err)
			}
		}
		photos += total
	}
	if photos != len(ids) {
		t.Fatalf("%d photo rows for %d jobs", photos, len(ids))
	}
	// The run tested something only if a crash hit a running job, and that
	// job was run again (a post refused by a crashed node uses no attempt,
	// so only such a hit shows as a second attempt).
	if hits == 0 || requeued == 0 {
		t.Fatalf("%d crashes hit a running prompt, %d jobs needed another attempt: the chaos missed the jobs", hits, requeued)
	}
	t.Logf("30 jobs succeeded through node crashes and a farm restart; %d crashes hit a running prompt, %d jobs needed more than one attempt", hits, requeued)
}

package server

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/internal/redistest"
)

// countedRates counts the calls to a shared count.
type countedRates struct {
	SharedRates
	calls atomic.Int64
}

func (c *countedRates) Allow(ctx context.Context, key string, perMinute int) (bool, time.Duration, error) {
	c.calls.Add(1)
	return c.SharedRates.Allow(ctx, key, perMinute)
}

func sharedRates(r SharedRates) option {
	return func(_ *Config, d *Deps) { d.Rates = r }
}

// Two replicas on one Redis: a key's submit budget is the farm's. Three a
// minute go through, alternating replicas; the fourth is refused on both,
// with the wait the shared count gives.
func TestRateLimitSharedByReplicas(t *testing.T) {
	url, prefix := redistest.URL(t)
	var replicas [2]*bundle
	for i := range replicas {
		bus, err := cluster.Open(context.Background(), url, cluster.Options{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { bus.Close() })
		replicas[i] = setup(t, dbtest.SQLite(t), limits(0, 3), sharedRates(bus))
	}
	submit := func(b *bundle, key string) resp {
		return b.do(req{method: "POST", path: "/api/v1/jobs", key: key, body: limitedSubmit})
	}
	for i := range 3 {
		expect(t, submit(replicas[i%2], styleKey), 202)
	}
	for _, b := range replicas {
		r := submit(b, styleKey)
		expect(t, r, 429, "rate_limited")
		if got := r.header.Get("Retry-After"); got != "20" && got != "19" {
			t.Fatalf("Retry-After %q, want about 20 (one submit every 20 s)", got)
		}
	}
	if n := len(replicas[0].jobs.calls()) + len(replicas[1].jobs.calls()); n != 3 {
		t.Fatalf("%d submits reached the job services, want 3", n)
	}
	// Another frontend's key has its own budget.
	expect(t, submit(replicas[1], logoKey), 202)
}

// A shared count that cannot be reached: each replica counts alone (limits
// still hold), and the count is not asked again for a while — the API does
// not wait on an absent Redis at every request.
func TestRateLimitSharedUnreachable(t *testing.T) {
	url, prefix := redistest.URL(t)
	bus, err := cluster.Open(context.Background(), url, cluster.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	bus.Close()
	rates := &countedRates{SharedRates: bus}
	b := setup(t, dbtest.SQLite(t), limits(0, 2), sharedRates(rates))
	submit := func() resp {
		return b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: limitedSubmit})
	}
	expect(t, submit(), 202)
	expect(t, submit(), 202)
	expectLimited(t, b, submit(), 30)
	if n := rates.calls.Load(); n != 1 {
		t.Fatalf("the unreachable count was asked %d times, want once (then left alone for %v)", n, sharedRatesBackoff)
	}
}

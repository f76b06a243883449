package cluster_test

import (
	"context"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/internal/redistest"
)

// Two replicas spend one budget: a key of 4 a minute gets 4 requests,
// whichever replica serves them, then waits about 15 s for the next; another
// key has its own budget; a closed Redis is an error, never a yes.
func TestSharedRateLimit(t *testing.T) {
	url, prefix := redistest.URL(t)
	ctx := context.Background()
	var buses [2]*cluster.Redis
	for i := range buses {
		b, err := cluster.Open(ctx, url, cluster.Options{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		buses[i] = b
	}
	for i := range 4 {
		ok, wait, err := buses[i%2].Allow(ctx, "sub:k1", 4)
		if err != nil || !ok || wait != 0 {
			t.Fatalf("request %d: ok %v wait %v err %v, want allowed", i+1, ok, wait, err)
		}
	}
	for i := range 2 {
		ok, wait, err := buses[i].Allow(ctx, "sub:k1", 4)
		if err != nil || ok {
			t.Fatalf("request 5 on replica %d: ok %v err %v, want refused", i, ok, err)
		}
		if wait < 10*time.Second || wait > 15*time.Second {
			t.Fatalf("wait %v, want up to the 15 s a token takes at 4 a minute", wait)
		}
	}
	if ok, _, err := buses[1].Allow(ctx, "sub:k2", 4); err != nil || !ok {
		t.Fatalf("another key: ok %v err %v, want allowed", ok, err)
	}
	if ok, _, err := buses[0].Allow(ctx, "req:k1", 0); err != nil || !ok {
		t.Fatalf("no limit: ok %v err %v, want allowed", ok, err)
	}
	buses[0].Close()
	if ok, _, err := buses[0].Allow(ctx, "sub:k3", 4); err == nil || ok {
		t.Fatalf("closed Redis: ok %v err %v, want an error and no", ok, err)
	}
}

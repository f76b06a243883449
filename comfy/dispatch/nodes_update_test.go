package dispatch

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

func TestNodesUpdate(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenCurrent)
	b := setupNodes(t, ProbeConfig{})
	ctx := context.Background()
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	changes := subscribe(t, b.nodes)

	v, err := b.nodes.Update(ctx, "gpu-1", schema.NodeUpdate{MaxInflight: ptr(3), Tags: []string{" sdxl ", "a100", "sdxl"}})
	if err != nil || v.MaxInflight != 3 || !slices.Equal(v.Tags, []string{"sdxl", "a100"}) {
		t.Fatalf("Update = %+v, %v", v, err)
	}
	if r, _ := b.store.row("gpu-1"); r.MaxInflight != 3 || !slices.Equal(r.Tags, []string{"sdxl", "a100"}) || r.Source != "api" || r.URL != f.URL() {
		t.Errorf("stored row %+v", r)
	}
	if nd, _ := b.nodes.Node("gpu-1"); nd.MaxInflight != 3 {
		t.Errorf("registry max_inflight %d", nd.MaxInflight)
	}
	waitFor(t, "the update's change", func() bool {
		for _, c := range changes.list() {
			if c.Name == "gpu-1" && !c.Added && !c.Removed && c.View.MaxInflight == 3 {
				return true
			}
		}
		return false
	})

	// Only what is given changes; an empty list clears the tags.
	if v, err := b.nodes.Update(ctx, "gpu-1", schema.NodeUpdate{Tags: []string{}}); err != nil || v.MaxInflight != 3 || len(v.Tags) != 0 {
		t.Fatalf("clear tags = %+v, %v", v, err)
	}
	if v, err := b.nodes.Update(ctx, "gpu-1", schema.NodeUpdate{MaxInflight: ptr(2)}); err != nil || v.MaxInflight != 2 || len(v.Tags) != 0 {
		t.Fatalf("max only = %+v, %v", v, err)
	}

	// Refused like Add refuses, and nothing changes.
	for _, p := range []schema.NodeUpdate{
		{MaxInflight: ptr(0)}, {MaxInflight: ptr(-1)}, {MaxInflight: ptr(MaxNodeInflight + 1)},
		{Tags: []string{""}}, {Tags: make([]string, maxNodeTags+1)},
	} {
		var ve *schema.ValidationError
		if _, err := b.nodes.Update(ctx, "gpu-1", p); !errors.As(err, &ve) {
			t.Errorf("Update(%+v) = %v, want a validation error", p, err)
		}
	}
	if _, err := b.nodes.Update(ctx, "nope", schema.NodeUpdate{MaxInflight: ptr(2)}); !errors.Is(err, schema.ErrNotFound) {
		t.Errorf("unknown node: %v", err)
	}

	// A store that refuses leaves the registry as it was.
	b.store.UpsertFunc = func(context.Context, *schema.Node) error { return errors.New("db down") }
	if _, err := b.nodes.Update(ctx, "gpu-1", schema.NodeUpdate{MaxInflight: ptr(5)}); err == nil {
		t.Error("Update with a failing store succeeded")
	}
	if nd, _ := b.nodes.Node("gpu-1"); nd.MaxInflight != 2 {
		t.Errorf("max_inflight %d after a refused write, want 2", nd.MaxInflight)
	}

	// Removed while its row is written: the row written again is deleted.
	b.store.UpsertFunc = func(_ context.Context, n *schema.Node) error {
		b.store.UpsertFunc = nil
		if err := b.nodes.Remove(ctx, n.Name); err != nil {
			t.Errorf("remove: %v", err)
		}
		return b.store.NodeUpsert(ctx, n)
	}
	if _, err := b.nodes.Update(ctx, "gpu-1", schema.NodeUpdate{MaxInflight: ptr(4)}); !errors.Is(err, schema.ErrNotFound) {
		t.Errorf("update of a node removed meanwhile: %v", err)
	}
	if r, ok := b.store.row("gpu-1"); ok {
		t.Errorf("a removed node's row came back: %+v", r)
	}
}

// Two updates racing: whatever order they reach the store and the registry
// in, both end with the same settings, each holding both changes.
func TestNodesUpdateConcurrent(t *testing.T) {
	t.Parallel()
	f := newComfy(t, comfytest.GenCurrent)
	b := setupNodes(t, ProbeConfig{})
	ctx := context.Background()
	if _, err := b.nodes.Add(ctx, apiNode("gpu-1", f.URL())); err != nil {
		t.Fatal(err)
	}
	// The first update's store write lets the second one run to the end
	// before it returns: the first finds the registry moved on.
	second := make(chan error, 1)
	b.store.UpsertFunc = func(_ context.Context, n *schema.Node) error {
		b.store.UpsertFunc = nil
		if err := b.store.NodeUpsert(ctx, n); err != nil {
			return err
		}
		_, err := b.nodes.Update(ctx, "gpu-1", schema.NodeUpdate{Tags: []string{"late"}})
		second <- err
		return nil
	}
	v, err := b.nodes.Update(ctx, "gpu-1", schema.NodeUpdate{MaxInflight: ptr(4)})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	r, _ := b.store.row("gpu-1")
	nd, _ := b.nodes.Node("gpu-1")
	for _, got := range []schema.Node{r, nd, {MaxInflight: v.MaxInflight, Tags: v.Tags}} {
		if got.MaxInflight != 4 || !slices.Equal(got.Tags, []string{"late"}) {
			t.Errorf("after two updates: %+v (store %+v, registry %+v)", got, r, nd)
		}
	}
}

// Raising a node's max_inflight through the farm dispatches the job that
// waited for a slot, without another submit.
func TestFarmNodeUpdateRaisesLimit(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	ctx := context.Background()
	e.holdAll()
	j1 := e.submit("style", "u", sdGraph(ckptXL, 2, 1), 0)
	j2 := e.submit("style", "u", sdGraph(ckptXL, 2, 2), 0)
	e.waitState(j1.ID, schema.JobDispatched, 10*time.Second)
	if j := e.job(j2.ID); j.State != schema.JobQueued {
		t.Fatalf("second job %s with one slot, want queued", j.State)
	}
	v, err := e.farm.NodeUpdate(ctx, "n1", schema.NodeUpdate{MaxInflight: ptr(2)})
	if err != nil || v.MaxInflight != 2 {
		t.Fatalf("NodeUpdate = %+v, %v", v, err)
	}
	if j := e.waitState(j2.ID, schema.JobDispatched, 10*time.Second); j.Node != "n1" {
		t.Fatalf("second job on %q", j.Node)
	}
	if n, err := e.store.NodeGet(ctx, "n1"); err != nil || n.MaxInflight != 2 || n.Source != "config" {
		t.Fatalf("stored node %+v, %v", n, err)
	}
	e.releaseAll()
	e.waitState(j1.ID, schema.JobSucceeded, 20*time.Second)
	e.waitState(j2.ID, schema.JobSucceeded, 20*time.Second)
	if _, err := e.farm.NodeUpdate(ctx, "n9", schema.NodeUpdate{MaxInflight: ptr(2)}); !errors.Is(err, schema.ErrNotFound) {
		t.Fatalf("unknown node: %v", err)
	}
}

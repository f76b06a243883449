package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

const ckptFlux = "flux-dev.safetensors"

func withCheckpoints(names ...string) comfytest.Options {
	o := sdOptions()
	o.Checkpoints = names
	return o
}

// waitCatalogues waits until the farm has read every node's catalogue.
func (e *farmEnv) waitCatalogues() {
	e.t.Helper()
	for _, name := range e.names {
		e.eventually(10*time.Second, name+" catalogue", func() bool {
			r := e.farm.runner(name)
			return r != nil && r.catalogue() != nil
		})
	}
}

func noNode(t *testing.T, err error) *schema.NoNodeError {
	t.Helper()
	var nne *schema.NoNodeError
	if !errors.As(err, &nne) || !errors.Is(err, schema.ErrNoNode) {
		t.Fatalf("error %v, want a NoNodeError", err)
	}
	return nne
}

// Three nodes with different checkpoints: every job naming the one only n3
// has runs on n3; a checkpoint no node has is refused at once, naming it.
func TestPlacementCheckpointOnOneNode(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnv(t, cfg, []comfytest.Options{
			withCheckpoints(ckptXL), withCheckpoints(ckpt15), withCheckpoints(ckpt15, ckptFlux),
		}, nil)
		e.waitCatalogues()
		var ids []string
		for i := range 50 {
			ids = append(ids, e.submit("alpha", "flux", sdGraph(ckptFlux, 1, i), 0).ID)
		}
		for _, id := range ids {
			j := e.waitState(id, schema.JobSucceeded, 60*time.Second)
			if j.Node != "n3" || j.Attempts != 1 {
				t.Errorf("job %s ran on %s after %d attempts, want n3 and 1", id, j.Node, j.Attempts)
			}
		}
		for _, n := range []string{"n1", "n2"} {
			if got := e.fakes[n].Stats().Submitted; got != 0 {
				t.Errorf("%s got %d prompts", n, got)
			}
		}
		_, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: "alpha", UserID: "u", Workflow: sdGraph("nowhere.safetensors", 1, 1)})
		nne := noNode(t, err)
		if want := map[string][]string{"ckpt_name": {"nowhere.safetensors"}}; !reflect.DeepEqual(nne.Missing, want) {
			t.Errorf("missing %v, want %v", nne.Missing, want)
		}
	})
}

// A file copied onto a node is found without a restart: at once when a
// submit names it (the catalogue is read again before refusing), and after
// an operator's probe when the last such read was recent.
func TestPlacementNewFileFound(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{withCheckpoints(ckptXL), withCheckpoints(ckpt15)}, nil)
	e.waitCatalogues()
	ctx := context.Background()
	// Copied before any submit asked for it: the submit reads catalogues again.
	e.fakes["n1"].SetCheckpoints(ckptXL, ckptFlux)
	j := e.submit("alpha", "u", sdGraph(ckptFlux, 1, 1), 0)
	if j = e.waitState(j.ID, schema.JobSucceeded, 30*time.Second); j.Node != "n1" {
		t.Errorf("ran on %s, want n1", j.Node)
	}
	// Refused (and the catalogues just read), then copied: the operator
	// probes the node and the next submit is taken.
	const late = "late.safetensors"
	_, err := e.farm.Submit(ctx, schema.SubmitParams{Frontend: "alpha", UserID: "u", Workflow: sdGraph(late, 1, 2)})
	noNode(t, err)
	e.fakes["n2"].SetCheckpoints(ckpt15, late)
	v, err := e.farm.NodeProbe(ctx, "n2")
	if err != nil {
		t.Fatal(err)
	}
	if v.Checkpoints != 2 || v.CatalogueAt == nil {
		t.Errorf("node view after probe: %d checkpoints, catalogue at %v", v.Checkpoints, v.CatalogueAt)
	}
	j = e.submit("alpha", "u", sdGraph(late, 1, 3), 0)
	if j = e.waitState(j.ID, schema.JobSucceeded, 30*time.Second); j.Node != "n2" {
		t.Errorf("ran on %s, want n2", j.Node)
	}
	m, err := e.farm.Models(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := m["ckpt_name"][late]; !reflect.DeepEqual(got, []string{"n2"}) {
		t.Errorf("models: %s on %v", late, got)
	}
	if got := m["ckpt_name"][ckptXL]; !reflect.DeepEqual(got, []string{"n1"}) {
		t.Errorf("models: %s on %v", ckptXL, got)
	}
}

// A node whose catalogue is stale refuses the prompt (value_not_in_list):
// the job runs on the node that has the file, and the refusal uses no
// attempt and counts as no requeue.
func TestPlacementStaleCatalogue(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnv(t, cfg, []comfytest.Options{withCheckpoints(ckptXL, ckptFlux), withCheckpoints(ckptXL, ckptFlux)}, nil)
		e.waitCatalogues()
		ctx := context.Background()
		// n1 loads flux first, so affinity sends the next flux job there.
		if _, err := e.nodes.SetDrain(ctx, "n2", true); err != nil {
			t.Fatal(err)
		}
		first := e.submit("alpha", "u", sdGraph(ckptFlux, 1, 1), 0)
		e.waitState(first.ID, schema.JobSucceeded, 30*time.Second)
		if _, err := e.nodes.SetDrain(ctx, "n2", false); err != nil {
			t.Fatal(err)
		}
		e.fakes["n1"].SetCheckpoints(ckptXL) // removed behind the farm's back
		requeued := e.farm.metrics.requeued
		before := testutil.ToFloat64(requeued)
		j := e.submit("alpha", "u", sdGraph(ckptFlux, 1, 2), 0)
		j = e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
		if j.Node != "n2" || j.Attempts != 1 {
			t.Errorf("ran on %s after %d attempts, want n2 and 1", j.Node, j.Attempts)
		}
		if got := e.fakes["n1"].Stats().Submitted; got != 1 {
			t.Errorf("n1 accepted %d prompts, want the first only", got)
		}
		if got := testutil.ToFloat64(requeued); got != before {
			t.Errorf("requeued counter went from %v to %v", before, got)
		}
		if c := e.farm.runner("n1").catalogue(); c.choices["CheckpointLoaderSimple"]["ckpt_name"].has(ckptFlux) {
			t.Error("n1's catalogue was not read again")
		}

		// A file moved from n1 to n2 behind the farm's back: n1 refuses, and
		// as no other node offers it by what the farm knows, n2's
		// catalogue is read again too and the job runs there.
		const moved = "moved.safetensors"
		e.fakes["n1"].SetCheckpoints(ckptXL, moved)
		if _, err := e.farm.NodeProbe(ctx, "n1"); err != nil {
			t.Fatal(err)
		}
		e.fakes["n1"].SetCheckpoints(ckptXL)
		e.fakes["n2"].SetCheckpoints(ckptXL, ckptFlux, moved)
		j = e.submit("alpha", "u", sdGraph(moved, 1, 3), 0)
		j = e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
		if j.Node != "n2" || j.Attempts != 1 {
			t.Errorf("moved file: ran on %s after %d attempts, want n2 and 1", j.Node, j.Attempts)
		}
	})
}

// Requirements pick among a mixed farm: tags and total VRAM; none met by
// any registered node is refused with the requirement in the error.
func TestPlacementRequirements(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		big, mid, small := sdOptions(), sdOptions(), sdOptions()
		big.VRAM, mid.VRAM, small.VRAM = 48<<30, 24<<30, 12<<30
		e := newFarmEnv(t, cfg, []comfytest.Options{big, mid, small}, nil)
		ctx := context.Background()
		for name, tags := range map[string][]string{"n2": {"sdxl"}, "n3": {"sdxl", "cheap"}} {
			if _, err := e.nodes.Update(ctx, name, schema.NodeUpdate{Tags: tags}); err != nil {
				t.Fatal(err)
			}
		}
		e.waitCatalogues()
		submit := func(req *schema.Requirements, seed int) (*schema.Job, error) {
			return e.farm.Submit(ctx, schema.SubmitParams{Frontend: "alpha", UserID: "u", Workflow: sdGraph(ckptXL, 1, seed), Requirements: req})
		}
		cases := []struct {
			req  *schema.Requirements
			want string
		}{
			{&schema.Requirements{Tags: []string{"sdxl"}, MinVRAMGB: 20}, "n2"},
			{&schema.Requirements{MinVRAMGB: 40}, "n1"},
			{&schema.Requirements{Tags: []string{"cheap", "sdxl"}}, "n3"},
		}
		for i, c := range cases {
			var ids []string
			for k := range 4 {
				j, err := submit(c.req, i*10+k)
				if err != nil {
					t.Fatal(err)
				}
				ids = append(ids, j.ID)
			}
			for _, id := range ids {
				j := e.waitState(id, schema.JobSucceeded, 30*time.Second)
				if j.Node != c.want {
					t.Errorf("requirements %s: ran on %s, want %s", c.req, j.Node, c.want)
				}
				if !reflect.DeepEqual(j.Requirements, c.req) {
					t.Errorf("stored requirements %+v, want %+v", j.Requirements, c.req)
				}
			}
		}
		for _, req := range []*schema.Requirements{{Tags: []string{"flux"}}, {MinVRAMGB: 100}, {Tags: []string{"cheap"}, MinVRAMGB: 20}} {
			_, err := submit(req, 99)
			if nne := noNode(t, err); nne.Requirements == nil || nne.Details()["requirements"] == nil {
				t.Errorf("requirements %s: error %v has no requirement in its details", req, err)
			}
		}
		if _, err := submit(&schema.Requirements{MinVRAMGB: -1}, 1); !errors.As(err, new(*schema.ValidationError)) {
			t.Errorf("negative VRAM: %v", err)
		}
	})
}

// Positions when jobs can run on different nodes: a job counts only the
// jobs before it that compete for one of its nodes. Two nodes, one
// checkpoint each, both busy: the queue alternates A, B, A, B and each job
// waits behind the jobs of its own checkpoint only.
func TestPlacementPositionsRestricted(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{withCheckpoints(ckptXL), withCheckpoints(ckpt15)}, nil)
	e.waitCatalogues()
	e.holdAll()
	a0 := e.submit("alpha", "u", sdGraph(ckptXL, 1, 0), 0)
	b0 := e.submit("beta", "u", sdGraph(ckpt15, 1, 0), 0)
	e.waitState(a0.ID, schema.JobDispatched, 10*time.Second)
	e.waitState(b0.ID, schema.JobDispatched, 10*time.Second)
	var as, bs []*schema.Job
	for i := 1; i <= 3; i++ {
		as = append(as, e.submit("alpha", "u", sdGraph(ckptXL, 1, i), 0))
		bs = append(bs, e.submit("beta", "u", sdGraph(ckpt15, 1, i), 0))
	}
	// A job either node can run competes with every job before it.
	either := e.submit("alpha", "u", json.RawMessage(`{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},`+
		`"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"x"}}}`), 0)
	for i := range 3 {
		for _, j := range []*schema.Job{as[i], bs[i]} {
			if p, ok := e.farm.position(j.ID); !ok || p != i {
				t.Errorf("job %d of its checkpoint at position %d (%v), want %d", i, p, ok, i)
			}
		}
	}
	if p, _ := e.farm.position(either.ID); p != 6 {
		t.Errorf("a job any node can run at position %d, want 6", p)
	}
	// The positions published to subscribers agree.
	e.eventually(10*time.Second, "positions published", func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		last := e.passes[len(e.passes)-1].positions
		return last[as[2].ID] == 2 && last[bs[2].ID] == 2 && last[either.ID] == 6
	})
	e.releaseAll()
	for _, j := range append(as, bs...) {
		e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
	}
}

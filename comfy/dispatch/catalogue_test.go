package dispatch

import (
	"context"
	"fmt"
	"maps"
	"runtime"
	"testing"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
)

func fakeObjectInfo(t testing.TB, opts comfytest.Options) map[string]comfy.ClassInfo {
	t.Helper()
	s := comfytest.NewServer(opts)
	defer s.Close()
	c, err := comfy.NewClient(s.URL())
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.ObjectInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// 500 nodes: those with the same object_info share one catalogue, and
// nodes that differ only in their checkpoints share every other choice list.
func TestCatalogueSharing(t *testing.T) {
	base := fakeObjectInfo(t, comfytest.Options{})
	cc := newCatalogueCache()
	var live []*catalogue
	for range 500 {
		live = append(live, cc.build(base, live))
	}
	if cats, _ := cc.size(); cats != 1 {
		t.Fatalf("500 identical nodes hold %d catalogues, want 1", cats)
	}
	_, setsOne := cc.size()
	for i := range live {
		info := maps.Clone(base)
		ckpt := info["CheckpointLoaderSimple"]
		ckpt.Input = []byte(fmt.Sprintf(`{"required":{"ckpt_name":[["own-%d.safetensors","shared.safetensors"],{}]}}`, i))
		info["CheckpointLoaderSimple"] = ckpt
		live[i] = cc.build(info, append(live[:i:i], live[i+1:]...))
	}
	cats, sets := cc.size()
	if cats != 500 {
		t.Errorf("%d catalogues for 500 different nodes", cats)
	}
	// The old checkpoint list is gone, one list per node came in.
	if sets != setsOne-1+500 {
		t.Errorf("%d choice lists, want %d (shared lists once, one checkpoint list per node)", sets, setsOne-1+500)
	}
	if live[0].choices["KSampler"]["sampler_name"] != live[499].choices["KSampler"]["sampler_name"] {
		t.Error("sampler lists are not shared")
	}
	pj := &pendingJob{Classes: []string{"CheckpointLoaderSimple"}, Needs: []need{{"CheckpointLoaderSimple", "ckpt_name", "own-7.safetensors"}}}
	for i, c := range live {
		if got := c.allows(pj.Classes, pj.Needs); got != (i == 7) {
			t.Errorf("node %d allows own-7: %v", i, got)
		}
	}
}

// BenchmarkCatalogue500 reports the heap 500 nodes' catalogues take when
// each has its own checkpoint list (200 files in common, one of its own).
func BenchmarkCatalogue500(b *testing.B) {
	base := fakeObjectInfo(b, comfytest.Options{})
	infos := make([]map[string]comfy.ClassInfo, 500)
	for i := range infos {
		info := maps.Clone(base)
		ckpt := info["CheckpointLoaderSimple"]
		// 200 files every node has, and one of its own: 500 lists.
		list := fmt.Sprintf(`"own-%d.safetensors"`, i)
		for k := range 200 {
			list += fmt.Sprintf(`,"model-%d.safetensors"`, k)
		}
		ckpt.Input = []byte(`{"required":{"ckpt_name":[[` + list + `],{}]}}`)
		info["CheckpointLoaderSimple"] = ckpt
		infos[i] = info
	}
	for b.Loop() {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		cc := newCatalogueCache()
		live := make([]*catalogue, 0, 500)
		for _, info := range infos {
			live = append(live, cc.build(info, live))
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/500, "heap-B/node")
		runtime.KeepAlive(live)
	}
}

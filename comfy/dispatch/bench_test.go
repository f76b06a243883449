package dispatch

import (
	"context"
	"sort"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

func benchEnv(b *testing.B, opts []comfytest.Options) (*farmEnv, func()) {
	e := newFarmEnv(b, dbtest.SQLite(b), opts, nil)
	return e, e.stop
}

// waitTerminal subscribes to a job and waits for its terminal event.
func waitTerminal(b *testing.B, f *Farm, id string) schema.EventType {
	ch, cancel, err := f.Subscribe(context.Background(), id, 0, false)
	if err != nil {
		b.Fatal(err)
	}
	defer cancel()
	var last schema.EventType
	for ev := range ch {
		last = ev.Type
	}
	return last
}

// BenchmarkFarmEmptyJob measures submit-to-succeeded latency of a job whose
// nodes take no time on an idle fake node: what the farm adds around a run
// (claim, post, events, history, copying one PNG to local storage, photo row,
// state changes), plus the fake's own work.
func BenchmarkFarmEmptyJob(b *testing.B) {
	e, stop := benchEnv(b, []comfytest.Options{{DefaultClassTime: time.Microsecond}})
	defer stop()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		j, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: "alpha", UserID: "bench", Workflow: sdGraph(ckptXL, 1, i)})
		if err != nil {
			b.Fatal(err)
		}
		if typ := waitTerminal(b, e.farm, j.ID); typ != schema.EventSucceeded {
			b.Fatalf("job ended %s", typ)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

// BenchmarkFarmBusyFraction keeps two fake GPUs busy with 40 jobs of about
// 100 ms each and reports how much of the wall time the nodes spent
// executing: the rest is orchestration between jobs.
func BenchmarkFarmBusyFraction(b *testing.B) {
	const jobs, nodes = 40, 2
	const sampler = 100 * time.Millisecond
	o := comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": sampler}, DefaultClassTime: time.Millisecond}
	e, stop := benchEnv(b, []comfytest.Options{o, o})
	defer stop()
	// Count only the sampler as useful GPU time: a lower bound of the
	// nodes' busy time (the other classes take about 1 ms each).
	exec := sampler
	b.ResetTimer()
	var busy float64
	for i := 0; i < b.N; i++ {
		start := time.Now()
		ids := make([]string, 0, jobs)
		for k := 0; k < jobs; k++ {
			j, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: "alpha", UserID: "bench", Workflow: sdGraph(ckptXL, 1, i*jobs+k)})
			if err != nil {
				b.Fatal(err)
			}
			ids = append(ids, j.ID)
		}
		for _, id := range ids {
			waitTerminal(b, e.farm, id)
		}
		wall := time.Since(start)
		busy += float64(jobs) * float64(exec) / (float64(nodes) * float64(wall))
	}
	b.ReportMetric(100*busy/float64(b.N), "busy-%")
}

// BenchmarkFarmSubmitDeepQueue measures Submit with 5,000 jobs of three
// frontends already waiting (the node is held, so nothing leaves the queue):
// validation, the insert, and recomputing every waiting job's position.
func BenchmarkFarmSubmitDeepQueue(b *testing.B) {
	e, stop := benchEnv(b, []comfytest.Options{sdOptions()})
	defer stop()
	e.farm.mu.Lock()
	e.farm.onSchedule = nil // the tests' record of every pass would dominate
	e.farm.mu.Unlock()
	e.holdAll()
	fronts := []string{"alpha", "beta", "logo"}
	g := sdGraph(ckptXL, 1, 1)
	for i := 0; i < 5000; i++ {
		if _, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: fronts[i%3], UserID: "deep", Workflow: g}); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := e.farm.Submit(context.Background(), schema.SubmitParams{Frontend: fronts[i%3], UserID: "deep", Workflow: g}); err != nil {
			b.Fatal(err)
		}
	}
}

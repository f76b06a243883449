package cluster_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/internal/redistest"
	"github.com/comfyfarm/comfyfarm/schema"
)

type replica struct {
	bus     *cluster.Redis
	mu      sync.Mutex
	events  map[string][]schema.Event
	notices []cluster.Notice
	resyncs int
}

func (r *replica) got(job string) []schema.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]schema.Event(nil), r.events[job]...)
}

func startReplica(t *testing.T, url, prefix string) *replica {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	bus, err := cluster.Open(ctx, url, cluster.Options{Prefix: prefix, Linger: time.Minute, MaxLen: 1000})
	if err != nil {
		t.Fatal(err)
	}
	r := &replica{bus: bus, events: map[string][]schema.Event{}}
	ready := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = bus.Run(ctx, cluster.Handlers{
			Event: func(ev schema.Event) {
				r.mu.Lock()
				r.events[ev.JobID] = append(r.events[ev.JobID], ev)
				r.mu.Unlock()
			},
			Notice: func(n cluster.Notice) {
				r.mu.Lock()
				r.notices = append(r.notices, n)
				r.mu.Unlock()
			},
			Resync: func() {
				r.mu.Lock()
				r.resyncs++
				r.mu.Unlock()
			},
		}, ready)
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("subscription not established")
	}
	t.Cleanup(func() {
		cancel()
		<-done
		bus.Close()
	})
	return r
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Two replicas publish events of one job at once: every replica receives
// all of them in one order, numbered without gaps; the stream replays them;
// nothing is added after the terminal event; previews are relayed live but
// take no number and are not kept.
func TestRedisEventOrder(t *testing.T) {
	url, prefix := redistest.URL(t)
	a := startReplica(t, url, prefix)
	b := startReplica(t, url, prefix)
	ctx := context.Background()
	const job = "01JOB"
	const each = 200
	var wg sync.WaitGroup
	for i, r := range []*replica{a, b} {
		wg.Go(func() {
			for k := range each {
				v := float64(k)
				r.bus.PublishEvent(job, schema.Event{Type: schema.EventProgress, NodeID: fmt.Sprint(i), Value: &v})
			}
		})
	}
	wg.Wait()
	for _, r := range []*replica{a, b} {
		if err := r.bus.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	a.bus.PublishEvent(job, schema.Event{Type: schema.EventPreview, Image: "aGk="})
	a.bus.PublishEvent(job, schema.Event{Type: schema.EventSucceeded})
	if err := a.bus.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	b.bus.PublishEvent(job, schema.Event{Type: schema.EventFailed}) // after the end: dropped
	for _, r := range []*replica{a, b} {
		if err := r.bus.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for name, r := range map[string]*replica{"a": a, "b": b} {
		waitFor(t, name+"'s terminal event", func() bool {
			evs := r.got(job)
			return len(evs) > 0 && evs[len(evs)-1].Type.Terminal()
		})
	}
	ga, gb := a.got(job), b.got(job)
	if len(ga) != 2*each+2 || len(gb) != len(ga) {
		counts := map[string]int{}
		for _, ev := range ga {
			counts[string(ev.Type)+ev.NodeID]++
		}
		t.Fatalf("a got %d events, b %d; want %d (%v)", len(ga), len(gb), 2*each+2, counts)
	}
	perNode := map[string]float64{"0": -1, "1": -1}
	for i := range ga {
		if ga[i].Seq != gb[i].Seq || ga[i].Type != gb[i].Type {
			t.Fatalf("event %d: a has %d %s, b has %d %s", i, ga[i].Seq, ga[i].Type, gb[i].Seq, gb[i].Type)
		}
		if ga[i].Type == schema.EventProgress {
			// Each publisher's own events keep their order.
			if *ga[i].Value <= perNode[ga[i].NodeID] {
				t.Fatalf("progress of publisher %s out of order at %d", ga[i].NodeID, i)
			}
			perNode[ga[i].NodeID] = *ga[i].Value
		}
		if i > 0 && ga[i].Type != schema.EventPreview && ga[i].Seq != ga[i-1].Seq+1 {
			t.Fatalf("seq %d after %d", ga[i].Seq, ga[i-1].Seq)
		}
	}
	if p := ga[len(ga)-2]; p.Type != schema.EventPreview || p.Seq != ga[len(ga)-3].Seq {
		t.Fatalf("preview %+v: want the number of the event before it", p)
	}
	if last := ga[len(ga)-1]; last.Type != schema.EventSucceeded {
		t.Fatalf("last event %s, want succeeded (nothing after the end)", last.Type)
	}
	kept, err := a.bus.EventsAfter(ctx, job, ga[99].Seq)
	if err != nil {
		t.Fatal(err)
	}
	if len(kept) != 2*each+2-100-1 || kept[0].Seq != ga[100].Seq || kept[len(kept)-1].Type != schema.EventSucceeded {
		t.Fatalf("replay after %d: %d events from %d", ga[99].Seq, len(kept), kept[0].Seq)
	}
	for _, ev := range kept {
		if ev.Type == schema.EventPreview {
			t.Fatal("a preview was kept for replay")
		}
	}
}

// Notices reach every replica, the sender's own included; node views are
// shared.
func TestRedisNoticesAndNodes(t *testing.T) {
	url, prefix := redistest.URL(t)
	a := startReplica(t, url, prefix)
	b := startReplica(t, url, prefix)
	ctx := context.Background()
	if err := b.bus.Notify(ctx, cluster.Notice{Kind: cluster.NoticeSubmitted, JobID: "j1", From: "b"}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*replica{a, b} {
		waitFor(t, "the notice", func() bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			return len(r.notices) == 1 && r.notices[0].JobID == "j1" && r.notices[0].From == "b"
		})
	}
	if v, err := a.bus.Nodes(ctx); err != nil || v != nil {
		t.Fatalf("nodes before any: %q %v", v, err)
	}
	if err := a.bus.PutNodes(ctx, []byte(`[{"name":"gpu-1"}]`), time.Minute); err != nil {
		t.Fatal(err)
	}
	if v, err := b.bus.Nodes(ctx); err != nil || string(v) != `[{"name":"gpu-1"}]` {
		t.Fatalf("nodes: %q %v", v, err)
	}
}

// A catalogue's sum is written with it, and read for many nodes at once.
func TestCatalogueSums(t *testing.T) {
	url, prefix := redistest.URL(t)
	ctx := context.Background()
	bus, err := cluster.Open(ctx, url, cluster.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	cat := []byte(`{"classes":["SaveImage"]}`)
	if err := bus.PutCatalogue(ctx, "n1", cat); err != nil {
		t.Fatal(err)
	}
	sums, err := bus.CatalogueSums(ctx, []string{"n1", "n2"})
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(cat)
	if len(sums) != 2 || !bytes.Equal(sums[0], want[:]) || sums[1] != nil {
		t.Fatalf("sums %x, want [%x, nil]", sums, want)
	}
}

// EventsOf reads the kept events of several jobs at once: each in order,
// previews left out (never kept), an unknown job empty.
func TestEventsOf(t *testing.T) {
	url, prefix := redistest.URL(t)
	ctx := context.Background()
	r := startReplica(t, url, prefix)
	for _, job := range []string{"j1", "j2"} {
		r.bus.PublishEvent(job, schema.Event{Type: schema.EventQueued})
		r.bus.PublishEvent(job, schema.Event{Type: schema.EventPreview, Image: "aGk="})
		r.bus.PublishEvent(job, schema.Event{Type: schema.EventDispatched})
	}
	if err := r.bus.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := r.bus.EventsOf(ctx, []string{"j1", "none", "j2"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || len(got[1]) != 0 {
		t.Fatalf("%d answers, the unknown job's %v", len(got), got)
	}
	for _, i := range []int{0, 2} {
		evs := got[i]
		if len(evs) != 2 || evs[0].Type != schema.EventQueued || evs[1].Type != schema.EventDispatched || evs[0].Seq >= evs[1].Seq {
			t.Fatalf("answer %d: %+v", i, evs)
		}
	}
}

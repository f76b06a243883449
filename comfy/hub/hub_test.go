package hub

import (
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

func snap(state schema.JobState) func() (*schema.Job, error) {
	return func() (*schema.Job, error) { return &schema.Job{ID: "j", State: state}, nil }
}

func recv(t *testing.T, ch <-chan schema.Event) schema.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("channel closed")
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
	}
	return schema.Event{}
}

func TestHubSnapshotThenLiveInOrder(t *testing.T) {
	h := New()
	h.Publish("j", schema.Event{Type: schema.EventQueued})
	ch, cancel, err := h.Subscribe("j", 0, false, snap(schema.JobQueued))
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	first := recv(t, ch)
	if first.Type != schema.EventSnapshot || first.Job == nil || first.Seq != h.LastSeq("j") {
		t.Fatalf("first event = %+v", first)
	}
	h.Publish("j", schema.Event{Type: schema.EventDispatched, Node: "n1"})
	h.Publish("j", schema.Event{Type: schema.EventRunning})
	h.Publish("j", schema.Event{Type: schema.EventSucceeded})
	var types []schema.EventType
	last := first.Seq
	for ev := range ch {
		if ev.Seq <= last {
			t.Fatalf("seq %d after %d", ev.Seq, last)
		}
		last = ev.Seq
		types = append(types, ev.Type)
	}
	want := []schema.EventType{schema.EventDispatched, schema.EventRunning, schema.EventSucceeded}
	if len(types) != len(want) {
		t.Fatalf("types = %v, want %v", types, want)
	}
	for i := range want {
		if types[i] != want[i] {
			t.Fatalf("types = %v, want %v", types, want)
		}
	}
}

func TestHubSlowSubscriberLosesOnlyProgress(t *testing.T) {
	h := New()
	h.QueueSize = 8
	ch, cancel, err := h.Subscribe("j", 0, false, snap(schema.JobRunning))
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	// Nobody reads while 1,000 progress events and the state changes go out.
	h.Publish("j", schema.Event{Type: schema.EventRunning})
	for i := 0; i < 1000; i++ {
		v := float64(i)
		h.Publish("j", schema.Event{Type: schema.EventProgress, Value: &v})
		if i == 500 {
			h.Publish("j", schema.Event{Type: schema.EventStoring})
		}
	}
	h.Publish("j", schema.Event{Type: schema.EventSucceeded})
	var states []schema.EventType
	progress := 0
	for ev := range ch {
		switch ev.Type {
		case schema.EventProgress:
			progress++
		default:
			states = append(states, ev.Type)
		}
	}
	want := []schema.EventType{schema.EventSnapshot, schema.EventRunning, schema.EventStoring, schema.EventSucceeded}
	if len(states) != len(want) {
		t.Fatalf("state events = %v, want %v", states, want)
	}
	for i := range want {
		if states[i] != want[i] {
			t.Fatalf("state events = %v, want %v", states, want)
		}
	}
	if progress == 0 || progress >= 1000 {
		t.Fatalf("progress events delivered = %d, want some dropped but not all", progress)
	}
}

func TestHubResumeAfterSeq(t *testing.T) {
	h := New()
	var seqs []int64
	for _, typ := range []schema.EventType{schema.EventQueued, schema.EventDispatched, schema.EventRunning} {
		seqs = append(seqs, h.Publish("j", schema.Event{Type: typ}).Seq)
	}
	ch, cancel, err := h.Subscribe("j", seqs[0], false, func() (*schema.Job, error) {
		t.Fatal("snapshot built although the events are buffered")
		return nil, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	if ev := recv(t, ch); ev.Type != schema.EventDispatched || ev.Seq != seqs[1] {
		t.Fatalf("resumed with %+v", ev)
	}
	if ev := recv(t, ch); ev.Type != schema.EventRunning {
		t.Fatalf("then %+v", ev)
	}
	// A seq from before the ring (or another process) gets a snapshot.
	h.RingSize = 1
	h.Publish("j", schema.Event{Type: schema.EventStoring})
	ch2, cancel2, _ := h.Subscribe("j", seqs[0], false, snap(schema.JobStoring))
	defer cancel2()
	if ev := recv(t, ch2); ev.Type != schema.EventSnapshot {
		t.Fatalf("stale resume gave %+v", ev)
	}
}

func TestHubFinishedJobSnapshotAndClose(t *testing.T) {
	h := New()
	ch, cancel, err := h.Subscribe("j", 0, false, func() (*schema.Job, error) {
		return &schema.Job{ID: "j", State: schema.JobFailed, Error: &schema.JobError{Code: "x"}}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	snapEv := recv(t, ch)
	if snapEv.Type != schema.EventSnapshot {
		t.Fatalf("got %+v", snapEv)
	}
	if ev := recv(t, ch); ev.Type != schema.EventFailed || ev.Error == nil || ev.Seq <= snapEv.Seq {
		t.Fatalf("got %+v", ev)
	}
	if _, ok := <-ch; ok {
		t.Fatal("channel not closed after terminal")
	}
	// Same after the stream saw the terminal event itself: seq increases.
	h.Publish("k", schema.Event{Type: schema.EventRunning})
	term := h.Publish("k", schema.Event{Type: schema.EventSucceeded})
	ch2, cancel2, _ := h.Subscribe("k", 0, false, func() (*schema.Job, error) {
		return &schema.Job{ID: "k", State: schema.JobSucceeded}, nil
	})
	defer cancel2()
	s1, s2 := recv(t, ch2), recv(t, ch2)
	if s1.Type != schema.EventSnapshot || s2.Type != schema.EventSucceeded || s2.Seq != term.Seq || s1.Seq >= s2.Seq {
		t.Fatalf("finished stream gave %s/%d then %s/%d (terminal was %d)", s1.Type, s1.Seq, s2.Type, s2.Seq, term.Seq)
	}
	if _, ok := <-ch; ok {
		t.Fatal("channel not closed after terminal")
	}
}

func TestHubThousandSubscribersGetTerminal(t *testing.T) {
	h := New()
	const n = 1000
	var wg sync.WaitGroup
	got := make(chan schema.EventType, n)
	for i := 0; i < n; i++ {
		ch, cancel, err := h.Subscribe("j", 0, false, snap(schema.JobRunning))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cancel()
			var last schema.EventType
			for ev := range ch {
				last = ev.Type
			}
			got <- last
		}()
	}
	for i := 0; i < 200; i++ {
		v := float64(i)
		h.Publish("j", schema.Event{Type: schema.EventProgress, Value: &v})
	}
	h.Publish("j", schema.Event{Type: schema.EventSucceeded})
	wg.Wait()
	close(got)
	count := 0
	for typ := range got {
		if typ != schema.EventSucceeded {
			t.Fatalf("a subscriber ended on %s", typ)
		}
		count++
	}
	if count != n {
		t.Fatalf("%d subscribers finished, want %d", count, n)
	}
	if h.Subscribers("j") != 0 {
		t.Fatalf("%d subscribers left registered", h.Subscribers("j"))
	}
}

func BenchmarkHubFanout1000(b *testing.B) {
	h := New()
	for i := 0; i < 1000; i++ {
		ch, _, _ := h.Subscribe("j", 0, false, snap(schema.JobRunning))
		go func() {
			for range ch {
			}
		}()
	}
	v := 1.0
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		h.Publish("j", schema.Event{Type: schema.EventProgress, Value: &v})
	}
}

// Positions supersede each other in the resumption ring: a job that waited
// behind a long queue keeps one queued event, not one per place it moved up;
// live subscribers still get each position, and a resume still works.
func TestHubRingKeepsOnlyTheLatestPosition(t *testing.T) {
	h := New()
	first := h.Publish("j", schema.Event{Type: schema.EventQueued, Position: ptr(500)})
	ch, cancel, err := h.Subscribe("j", first.Seq, false, func() (*schema.Job, error) {
		t.Fatal("snapshot built although the events are buffered")
		return nil, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	for p := 499; p >= 0; p-- {
		h.Publish("j", schema.Event{Type: schema.EventQueued, Position: ptr(p)})
		if ev := recv(t, ch); ev.Type != schema.EventQueued || *ev.Position != p {
			t.Fatalf("live subscriber got %+v, want position %d", ev, p)
		}
	}
	d := h.Publish("j", schema.Event{Type: schema.EventDispatched, Node: "n1"})
	h.mu.Lock()
	ring := append([]schema.Event(nil), h.streams["j"].ring...)
	h.mu.Unlock()
	if len(ring) != 2 || ring[0].Type != schema.EventQueued || *ring[0].Position != 0 || ring[1].Seq != d.Seq {
		t.Fatalf("ring holds %d events: %+v", len(ring), ring)
	}
	// A client that saw the last position resumes with what followed it.
	ch2, cancel2, err := h.Subscribe("j", ring[0].Seq, false, func() (*schema.Job, error) {
		t.Fatal("snapshot built although the events are buffered")
		return nil, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cancel2()
	if ev := recv(t, ch2); ev.Type != schema.EventDispatched || ev.Seq != d.Seq {
		t.Fatalf("resumed with %+v", ev)
	}
}

// A reader that fell behind gets the latest progress of each node, after
// the events before it, not a backlog of stale values; nothing but stale
// progress is left out.
func TestHubSlowSubscriberGetsLatestProgress(t *testing.T) {
	h := New()
	ch, cancel, err := h.Subscribe("j", 0, false, snap(schema.JobRunning))
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	progress := func(node string, v float64) {
		h.Publish("j", schema.Event{Type: schema.EventProgress, NodeID: node, Value: &v})
	}
	for i := 1; i <= 20; i++ {
		progress("3", float64(i))
	}
	h.Publish("j", schema.Event{Type: schema.EventExecuted, NodeID: "9"})
	for i := 21; i <= 40; i++ {
		progress("3", float64(i))
		progress("5", float64(i))
	}
	h.Publish("j", schema.Event{Type: schema.EventSucceeded})
	var got []schema.Event
	for ev := range ch {
		got = append(got, ev)
	}
	// In publication order (what reached the reader's small buffer before
	// it read went as it was), ending with each node's latest value.
	n := len(got)
	if n < 4 || got[0].Type != schema.EventSnapshot || got[n-1].Type != schema.EventSucceeded || n > 12 {
		t.Fatalf("%d events: %+v", n, got)
	}
	last := map[string]float64{}
	executed := false
	for _, ev := range got[1 : n-1] {
		switch ev.Type {
		case schema.EventExecuted:
			executed = true
		case schema.EventProgress:
			v := *ev.Value
			if v <= last[ev.NodeID] || (executed && v <= 20) || (!executed && v > 20) {
				t.Fatalf("progress %s=%v out of order: %+v", ev.NodeID, v, got)
			}
			last[ev.NodeID] = v
		default:
			t.Fatalf("unexpected %s", ev.Type)
		}
	}
	if !executed || last["3"] != 40 || last["5"] != 40 {
		t.Fatalf("executed %v, last values %v", executed, last)
	}
}

func ptr[T any](v T) *T { return &v }

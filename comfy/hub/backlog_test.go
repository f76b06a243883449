package hub

import (
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

// A queued job far back in a long queue gets a queued event on every
// dispatch ahead of it. queued is not droppable, so a subscriber that stalls
// (its socket stops reading) keeps every one of them: its backlog grows with
// the queue length, not with QueueSize. Superseded position events restate
// nothing that the newest one does not; they should be coalesced.
// Expected: the backlog stays within QueueSize (plus a handful of real state
// changes).
func TestStalledSubscriberQueuedEventsBounded(t *testing.T) {
	h := New()
	_, cancel, err := h.Subscribe("j", 0, false, func() (*schema.Job, error) {
		return &schema.Job{ID: "j", State: schema.JobQueued}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	// Nobody reads: the pump holds the snapshot and waits.
	for p := 5000; p > 0; p-- {
		p := p
		h.Publish("j", schema.Event{Type: schema.EventQueued, Position: &p})
	}
	h.mu.Lock()
	var backlog int
	for sub := range h.streams["j"].subs {
		sub.mu.Lock()
		backlog += len(sub.queue)
		sub.mu.Unlock()
	}
	h.mu.Unlock()
	if backlog > h.QueueSize+8 {
		t.Fatalf("stalled subscriber holds %d events (QueueSize %d)", backlog, h.QueueSize)
	}
}

package hub

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

// fakeBus keeps each job's events and counts the reads.
type fakeBus struct {
	kept          map[string][]schema.Event
	after, ofMany atomic.Int64
}

func (b *fakeBus) PublishEvent(string, schema.Event) {}

func (b *fakeBus) EventsAfter(_ context.Context, id string, after int64) ([]schema.Event, error) {
	b.after.Add(1)
	var out []schema.Event
	for _, ev := range b.kept[id] {
		if ev.Seq > after {
			out = append(out, ev)
		}
	}
	return out, nil
}

func (b *fakeBus) EventsOf(_ context.Context, ids []string) ([][]schema.Event, error) {
	b.ofMany.Add(1)
	out := make([][]schema.Event, len(ids))
	for i, id := range ids {
		out[i] = b.kept[id]
	}
	return out, nil
}

// Many jobs followed at once are read from the bus in one call, and their
// latest place and progress are then answered without reading again.
func TestFollowAllReadsOnce(t *testing.T) {
	b := &fakeBus{kept: map[string][]schema.Event{}}
	for i, id := range []string{"a", "b", "c"} {
		pos := 10 + i
		b.kept[id] = []schema.Event{
			{JobID: id, Seq: 1, Type: schema.EventQueued, Position: ptr(pos + 1)},
			{JobID: id, Seq: 2, Type: schema.EventQueued, Position: ptr(pos)},
		}
	}
	h := NewBus(b)
	h.FollowAll([]string{"a", "b", "c"})
	for i, id := range []string{"a", "b", "c"} {
		q, _ := h.Latest(id)
		if q == nil || q.Position == nil || *q.Position != 10+i {
			t.Fatalf("%s: latest position %+v, want %d", id, q, 10+i)
		}
	}
	h.FollowAll([]string{"a", "b"}) // followed already: nothing to read
	if n, m := b.ofMany.Load(), b.after.Load(); n != 1 || m != 0 {
		t.Fatalf("%d batched reads and %d single reads, want 1 and 0", n, m)
	}
}

package hub

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Hub fans job events out to subscribers. A publisher never blocks: each
// subscriber has a bounded queue, and when it is full the oldest droppable
// events (progress, previews, executed, keep-alives) are discarded to make room.
// State changes and terminal events are never dropped; there are at most a
// handful per job, so the queue stays bounded in practice.
//
// Each job keeps a short ring of recent events so that a subscriber can resume
// with Last-Event-ID; when the asked-for event has left the ring, it gets a
// fresh snapshot instead.
type Hub struct {
	mu      sync.Mutex
	streams map[string]*jobStream
	// bus, when set (several replicas), numbers and carries every event:
	// Publish hands events to it, and they come back to every replica's hub
	// through Deliver. Only jobs followed here have a stream here.
	bus          Bus
	busDownUntil atomic.Int64 // unix ns: until then the bus is not read (a read failed)

	// RingSize is how many recent events a job keeps for resumption.
	RingSize int
	// QueueSize bounds a subscriber's backlog of droppable events.
	QueueSize int
	// Linger is how long a finished job's stream is kept for late subscribers.
	Linger  time.Duration
	NowFunc func() time.Time
}

// New makes a hub with sensible bounds.
func New() *Hub {
	return &Hub{
		streams:   make(map[string]*jobStream),
		RingSize:  256,
		QueueSize: 64,
		Linger:    10 * time.Minute,
		NowFunc:   time.Now,
	}
}

// Bus carries events between replicas; see cluster.Redis.
type Bus interface {
	// PublishEvent numbers ev and relays it to every replica; it never blocks.
	PublishEvent(jobID string, ev schema.Event)
	// EventsAfter returns the job's kept events numbered after seq, in order.
	EventsAfter(ctx context.Context, jobID string, after int64) ([]schema.Event, error)
	// EventsOf returns each job's kept events, in order, in one call.
	EventsOf(ctx context.Context, jobIDs []string) ([][]schema.Event, error)
}

// NewBus makes a hub whose events are numbered and carried by bus.
func NewBus(bus Bus) *Hub {
	h := New()
	h.bus = bus
	return h
}

type jobStream struct {
	seq      int64 // the last event's; with a bus, 0 until one is known
	lastAt   time.Time
	ring     []schema.Event
	subs     map[*subscriber]struct{}
	terminal bool
	doneAt   time.Time
}

// subscriber delivers one subscription's events on its channel, out. It has
// no goroutine of its own while its reader keeps up: push hands an event
// straight to out (a small buffer) when nothing waits before it. Only when
// out is full do events wait in queue, and a forwarder goroutine moves them
// to out, exiting once queue is empty again. queue is bounded by the drop
// policy of push. Until start, everything waits in queue (the snapshot is
// put before it).
type subscriber struct {
	mu         sync.Mutex
	queue      []schema.Event
	out        chan schema.Event
	done       chan struct{} // closed by cancel
	started    bool          // out exists; events may go to it directly
	forwarding bool          // a forwarder owns out: only it sends and closes
	closed     bool          // out is closed or is being closed: push ignores events
	previews   bool
	drain      bool // close out once queue is empty
	dropped    int64
}

// subBuffer is the capacity of a subscriber's channel: events its reader
// has not taken yet, before they wait in the queue.
const subBuffer = 4

// stream returns the job's stream, creating it with a sequence base derived
// from the clock, so that sequence numbers keep increasing across restarts of
// the process and a client's "ignore what I have seen" stays correct.
func (h *Hub) stream(jobID string) *jobStream {
	s := h.streams[jobID]
	if s == nil {
		s = &jobStream{subs: make(map[*subscriber]struct{}), lastAt: h.NowFunc()}
		if h.bus == nil {
			s.seq = h.NowFunc().UnixMilli() * 1000
		}
		h.streams[jobID] = s
	}
	return s
}

// Publish assigns the next sequence number to ev and delivers it. It returns
// the event as delivered.
//
// With a bus the event is handed to it, numbered there, and delivered when
// it comes back (Deliver); the returned event then carries no number.
func (h *Hub) Publish(jobID string, ev schema.Event) schema.Event {
	ev.JobID = jobID
	if ev.Time.IsZero() {
		ev.Time = h.NowFunc().UTC()
	}
	if h.bus != nil {
		h.bus.PublishEvent(jobID, ev)
		return ev
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.stream(jobID)
	if s.terminal {
		return ev // nothing follows a terminal event
	}
	s.seq++
	ev.Seq = s.seq
	h.appendLocked(s, ev)
	return ev
}

// appendLocked keeps a numbered event for resumption and delivers it.
func (h *Hub) appendLocked(s *jobStream, ev schema.Event) {
	if ev.Type != schema.EventPreview {
		s.seq = ev.Seq
	}
	s.lastAt = h.NowFunc()
	switch n := len(s.ring); {
	case ev.Type == schema.EventPreview:
		// Previews are never replayed.
	case ev.Type == schema.EventQueued && n > 0 && s.ring[n-1].Type == schema.EventQueued:
		// A new position supersedes the last one. Without this a job that
		// waits behind n others keeps up to RingSize stale positions, and a
		// long queue holds O(n²) events in memory.
		s.ring[n-1] = ev
	default:
		s.ring = append(s.ring, ev)
		h.trimRing(s)
	}
	for sub := range s.subs {
		if ev.Type == schema.EventPreview && !sub.previews {
			continue
		}
		sub.push(ev, h.QueueSize)
	}
	if ev.Type.Terminal() {
		s.terminal = true
		s.doneAt = h.NowFunc()
		s.subs = map[*subscriber]struct{}{}
	}
}

// trimRing keeps the newest RingSize events of s's ring.
func (h *Hub) trimRing(s *jobStream) {
	if len(s.ring) > h.RingSize {
		s.ring = append(s.ring[:0], s.ring[len(s.ring)-h.RingSize:]...)
	}
}

// busTimeout bounds one read of a job's kept events from the bus; after a
// read that failed, reads are skipped for busBackoff (Redis is away: views
// and new subscribers go on without the bus's history, instead of each
// waiting on it).
const (
	busTimeout = 2 * time.Second
	busBackoff = 5 * time.Second
)

// Deliver takes an event numbered by the bus to this replica's subscribers
// of its job, in order: an event already seen is dropped, and a gap (events
// lost while the bus connection was down) is filled from the bus first.
// Jobs nobody follows here are ignored.
func (h *Hub) Deliver(ev schema.Event) {
	h.mu.Lock()
	s := h.streams[ev.JobID]
	if s == nil || s.terminal {
		h.mu.Unlock()
		return
	}
	switch {
	case ev.Type == schema.EventPreview || (ev.Seq > s.seq && (s.seq == 0 || ev.Seq == s.seq+1)):
		h.appendLocked(s, ev) // the next one (or the first known here)
		h.mu.Unlock()
		return
	case ev.Seq <= s.seq:
		h.mu.Unlock()
		return // seen
	}
	after := s.seq
	h.mu.Unlock()
	h.fill(ev.JobID, after, true)
	h.mu.Lock()
	if s := h.streams[ev.JobID]; s != nil && !s.terminal && ev.Seq > s.seq {
		h.appendLocked(s, ev)
	}
	h.mu.Unlock()
}

// fill reads a job's events after seq from the bus and delivers those not
// seen yet. sure says the bus was just heard from (an event came, the
// subscription came back): it is read even within busBackoff of a failure. Events older than the stream's first known one are kept for
// resumption only: the stream's subscribers came later.
func (h *Hub) fill(jobID string, after int64, sure bool) {
	if h.bus == nil {
		return
	}
	if !sure && time.Now().UnixNano() < h.busDownUntil.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()
	evs, err := h.bus.EventsAfter(ctx, jobID, after)
	if err != nil {
		h.busDownUntil.Store(time.Now().Add(busBackoff).UnixNano())
		return
	}
	if len(evs) == 0 {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fillLocked(jobID, evs)
}

// fillLocked delivers the events of evs (read from the bus, in order) that
// the job's stream has not seen; those older than its first known one are
// kept for resumption only. h.mu is held.
func (h *Hub) fillLocked(jobID string, evs []schema.Event) {
	s := h.streams[jobID]
	if s == nil {
		return
	}
	var older []schema.Event
	for _, ev := range evs {
		switch {
		case s.terminal:
			return
		case ev.Seq > s.seq:
			h.appendLocked(s, ev)
		case len(s.ring) > 0 && ev.Seq < s.ring[0].Seq:
			older = append(older, ev)
		}
	}
	if len(older) > 0 {
		s.ring = append(older, s.ring...)
		h.trimRing(s)
	}
}

// Resync fills every followed stream from the bus: called after the bus
// connection came back, when events may have been missed.
func (h *Hub) Resync() {
	h.mu.Lock()
	type want struct {
		id    string
		after int64
	}
	var ws []want
	for id, s := range h.streams {
		if !s.terminal {
			ws = append(ws, want{id, s.seq})
		}
	}
	h.mu.Unlock()
	for _, w := range ws {
		h.fill(w.id, w.after, true)
	}
}

// follow makes sure the job has a stream here, filled from the bus when it
// is new: with a bus, a replica keeps only the streams of jobs followed on it.
func (h *Hub) follow(jobID string) {
	h.mu.Lock()
	_, ok := h.streams[jobID]
	if !ok {
		h.stream(jobID)
	}
	h.mu.Unlock()
	if !ok {
		h.fill(jobID, 0, false)
	}
}

// FollowAll is follow for many jobs at once, their streams read from the
// bus in one call (a list of jobs on a follower shows each one's place and
// progress).
func (h *Hub) FollowAll(jobIDs []string) {
	if h.bus == nil || time.Now().UnixNano() < h.busDownUntil.Load() {
		return
	}
	h.mu.Lock()
	var fresh []string
	for _, id := range jobIDs {
		if _, ok := h.streams[id]; !ok {
			h.stream(id)
			fresh = append(fresh, id)
		}
	}
	h.mu.Unlock()
	if len(fresh) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()
	evs, err := h.bus.EventsOf(ctx, fresh)
	if err != nil {
		h.busDownUntil.Store(time.Now().Add(busBackoff).UnixNano())
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, id := range fresh {
		h.fillLocked(id, evs[i])
	}
}

// Latest returns the newest queued and progress events kept for a job (nil
// when none): what a replica that does not schedule tells of a job's place
// and progress, as the leader published them.
func (h *Hub) Latest(jobID string) (queued, progress *schema.Event) {
	if h.bus != nil {
		h.follow(jobID)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.streams[jobID]
	if s == nil {
		return nil, nil
	}
	left := false // a later dispatch: older positions are stale
	for i := len(s.ring) - 1; i >= 0 && (queued == nil || progress == nil); i-- {
		ev := s.ring[i]
		switch ev.Type {
		case schema.EventQueued:
			if queued == nil && !left {
				queued = &ev
			}
		case schema.EventProgress:
			if progress == nil {
				progress = &ev
			}
		case schema.EventDispatched, schema.EventRunning:
			left = left || queued == nil
		}
	}
	return queued, progress
}

// LastSeq is the newest sequence number of the job's stream (0 if none).
func (h *Hub) LastSeq(jobID string) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := h.streams[jobID]; s != nil {
		return s.seq
	}
	return 0
}

// Subscribe registers a subscriber. With after > 0 and every event after it
// still in the ring, those events are replayed; otherwise the subscriber first
// gets a snapshot built by snapshot. The subscriber is registered before the
// snapshot is built (outside the hub lock, since building it may take other
// locks), so no event can slip between the snapshot and the live stream; an
// event that happened while the snapshot was built is delivered after it
// (state events restate, they never contradict).
func (h *Hub) Subscribe(jobID string, after int64, previews bool, snapshot func() (*schema.Job, error)) (<-chan schema.Event, func(), error) {
	sub := &subscriber{previews: previews}
	if h.bus != nil {
		h.follow(jobID)
	}
	h.mu.Lock()
	s := h.stream(jobID)
	resumed := false
	if after > 0 && len(s.ring) > 0 && s.ring[0].Seq <= after+1 && after <= s.seq {
		for _, ev := range s.ring {
			if ev.Seq > after {
				sub.queue = append(sub.queue, ev)
			}
		}
		resumed = true
	}
	var ended *schema.Event // the stream's own terminal event, when it has one
	if s.terminal {
		sub.drain = true // nothing more will come: close once the backlog is out
		if n := len(s.ring); n > 0 && s.ring[n-1].Type.Terminal() {
			last := s.ring[n-1]
			ended = &last
		}
	} else {
		s.subs[sub] = struct{}{}
	}
	seq := s.seq
	h.mu.Unlock()

	if !resumed {
		job, err := snapshot()
		if err != nil {
			h.unsubscribe(jobID, sub)
			return nil, nil, err
		}
		first := []schema.Event{{Seq: seq, Type: schema.EventSnapshot, JobID: jobID, Time: h.NowFunc().UTC(), Job: job}}
		sub.mu.Lock()
		hasTerminal := false
		for _, ev := range sub.queue {
			hasTerminal = hasTerminal || ev.Type.Terminal()
		}
		if job.State.Terminal() && !hasTerminal {
			// The job ended before this subscriber came: say how, then
			// close. Sequence numbers stay strictly increasing: the
			// stream's own terminal event follows a snapshot numbered just
			// before it, or a restated one follows the snapshot.
			if ended != nil {
				first[0].Seq = ended.Seq - 1
				first = append(first, *ended)
			} else {
				first = append(first, terminalEvent(job, seq+1, h.NowFunc()))
			}
			sub.drain = true
		}
		sub.queue = append(first, sub.queue...)
		sub.mu.Unlock()
		if sub.drain {
			h.unsubscribe(jobID, sub)
		}
	}

	out, cancel := sub.start(func() { h.unsubscribe(jobID, sub) })
	return out, cancel, nil
}

func (h *Hub) unsubscribe(jobID string, sub *subscriber) {
	h.mu.Lock()
	if s := h.streams[jobID]; s != nil {
		delete(s.subs, sub)
	}
	h.mu.Unlock()
}

// terminalEvent restates a finished job's end as its terminal event.
func terminalEvent(job *schema.Job, seq int64, now time.Time) schema.Event {
	ev := schema.Event{Seq: seq, JobID: job.ID, Time: now.UTC()}
	if job.FinishedAt != nil {
		ev.Time = *job.FinishedAt
	}
	switch job.State {
	case schema.JobSucceeded:
		ev.Type, ev.Outputs = schema.EventSucceeded, job.Outputs
	case schema.JobFailed:
		ev.Type, ev.Error = schema.EventFailed, job.Error
	default:
		ev.Type = schema.EventCancelled
	}
	return ev
}

func (sub *subscriber) push(ev schema.Event, limit int) {
	sub.mu.Lock()
	defer sub.mu.Unlock()
	if sub.closed {
		return
	}
	if sub.started && !sub.forwarding && len(sub.queue) == 0 {
		select {
		case sub.out <- ev:
			if ev.Type.Terminal() {
				sub.closeLocked()
			}
			return
		default: // the reader is behind: queue it
		}
	}
	if supersedes(ev) {
		// A newer position, progress of the same node or preview replaces
		// one not yet delivered: a reader that fell behind gets the latest
		// state, not a backlog of stale ones.
		kept := sub.queue[:0]
		for _, q := range sub.queue {
			if !sameKind(q, ev) {
				kept = append(kept, q)
			}
		}
		sub.queue = kept
	}
	if len(sub.queue) >= limit {
		// Make room by dropping the oldest droppable events; if the new one
		// is droppable and nothing can go, drop the new one.
		kept := sub.queue[:0]
		dropped := 0
		need := len(sub.queue) - limit + 1
		for _, q := range sub.queue {
			if dropped < need && q.Type.Droppable() {
				dropped++
				continue
			}
			kept = append(kept, q)
		}
		sub.queue = kept
		sub.dropped += int64(dropped)
		if dropped < need && ev.Type.Droppable() {
			sub.dropped++
			return
		}
	}
	sub.queue = append(sub.queue, ev)
	if sub.started && !sub.forwarding {
		sub.forwarding = true
		go sub.forward()
	}
}

// supersedes reports whether ev makes waiting events of its kind stale.
func supersedes(ev schema.Event) bool {
	switch ev.Type {
	case schema.EventQueued, schema.EventProgress, schema.EventPreview:
		return true
	}
	return false
}

// sameKind reports whether q is an older event of ev's kind: a position, the
// progress of the same node, a preview.
func sameKind(q, ev schema.Event) bool {
	return q.Type == ev.Type && (ev.Type != schema.EventProgress || q.NodeID == ev.NodeID)
}

// start makes the subscriber's channel and lets events flow to it; cancel
// unregisters it (through unsubscribe) and closes the channel. What queued
// up before (the snapshot, replayed events) is forwarded first.
func (sub *subscriber) start(unsubscribe func()) (<-chan schema.Event, func()) {
	sub.mu.Lock()
	sub.out = make(chan schema.Event, subBuffer)
	sub.done = make(chan struct{})
	sub.started = true
	switch {
	case len(sub.queue) > 0:
		sub.forwarding = true
		go sub.forward()
	case sub.drain:
		sub.closeLocked()
	}
	out := sub.out
	sub.mu.Unlock()
	var once sync.Once
	cancel := func() {
		once.Do(func() {
			unsubscribe()
			sub.mu.Lock()
			close(sub.done)
			if !sub.closed && !sub.forwarding {
				sub.closeLocked()
			}
			sub.closed = true // a running forwarder sees done and closes out
			sub.mu.Unlock()
		})
	}
	return out, cancel
}

// closeLocked closes out: after a terminal event, on cancel, or when a
// draining subscriber has nothing left. Only whoever may send on out calls
// it (push or start without a forwarder, or the forwarder).
func (sub *subscriber) closeLocked() {
	sub.closed = true
	sub.queue = nil
	close(sub.out)
}

// forward moves queued events to out until the queue is empty (then it
// returns and push sends directly again), a terminal event went out, or
// the subscription is cancelled.
func (sub *subscriber) forward() {
	for {
		sub.mu.Lock()
		if sub.closed || len(sub.queue) == 0 {
			if sub.closed || sub.drain {
				sub.closeLocked()
			}
			sub.forwarding = false
			sub.mu.Unlock()
			return
		}
		ev := sub.queue[0]
		sub.queue[0] = schema.Event{}
		sub.queue = sub.queue[1:]
		done := sub.done
		sub.mu.Unlock()
		select {
		case sub.out <- ev:
		case <-done:
			sub.mu.Lock()
			sub.closeLocked()
			sub.forwarding = false
			sub.mu.Unlock()
			return
		}
		if ev.Type.Terminal() {
			sub.mu.Lock()
			sub.closeLocked()
			sub.forwarding = false
			sub.mu.Unlock()
			return
		}
	}
}

// Unsettled lists the jobs followed here whose stream has subscribers, has
// not ended, and has had no event for quiet. With a bus their terminal event
// may have been lost: events reach the bus after the database write, from
// the publishing replica's queue, and a replica that dies in between takes
// them with it.
func (h *Hub) Unsettled(quiet time.Duration) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	cut := h.NowFunc().Add(-quiet)
	var ids []string
	for id, s := range h.streams {
		if !s.terminal && len(s.subs) > 0 && s.lastAt.Before(cut) {
			ids = append(ids, id)
		}
	}
	return ids
}

// Ended restates a finished job's end as its terminal event, for Publish.
func Ended(job *schema.Job) schema.Event {
	return terminalEvent(job, 0, time.Now())
}

// Subscribers counts live subscribers of a job.
func (h *Hub) Subscribers(jobID string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := h.streams[jobID]; s != nil {
		return len(s.subs)
	}
	return 0
}

// GC forgets streams of jobs that ended more than Linger ago.
func (h *Hub) GC() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	cut := h.NowFunc().Add(-h.Linger)
	idle := h.NowFunc().Add(-min(h.Linger, time.Minute))
	for id, s := range h.streams {
		if s.terminal && s.doneAt.Before(cut) {
			delete(h.streams, id)
			n++
		} else if h.bus != nil && len(s.subs) == 0 && s.lastAt.Before(idle) {
			// Nobody here follows it: the bus keeps it, read again on demand.
			delete(h.streams, id)
			n++
		} else if !s.terminal && len(s.subs) == 0 && len(s.ring) == 0 {
			delete(h.streams, id)
			n++
		}
	}
	return n
}

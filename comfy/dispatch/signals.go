package dispatch

// testSignals tell tests of the farm's background rounds, so that a test
// waits for the round it needs rather than sleeping (river's TestSignals are
// the model). Production farms have none: every channel is nil and a
// signal costs a nil check. Sends never block: a test reads what it needs,
// what nobody reads is dropped.
type testSignals struct {
	reconciled  chan string     // a runner finished a reconcile round: its node
	nodeChanged chan NodeChange // the farm acted on a change of the registry
	rescued     chan struct{}   // a rescue round ended
	heartbeat   chan bool       // a heartbeat ended: whether the leases are fresh
	leaseTried  chan string     // a follower asked for the scheduler's lease: who holds it
}

// newTestSignals makes every channel, with room for a burst.
func newTestSignals() *testSignals {
	const room = 1024
	return &testSignals{
		reconciled:  make(chan string, room),
		nodeChanged: make(chan NodeChange, room),
		rescued:     make(chan struct{}, room),
		heartbeat:   make(chan bool, room),
		leaseTried:  make(chan string, room),
	}
}

// signal sends v on ch unless ch is nil or full.
func signal[T any](ch chan T, v T) {
	if ch == nil {
		return
	}
	select {
	case ch <- v:
	default:
	}
}

// sigs returns the farm's signals; the zero value (nil channels) when it has none.
func (f *Farm) sigs() *testSignals {
	if f.sig == nil {
		return &noSignals
	}
	return f.sig
}

var noSignals testSignals

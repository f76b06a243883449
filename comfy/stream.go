package comfy

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Connected is a synthetic Stream event: a socket is open and the server's first frame
// arrived. Reconnect is true after a Disconnected: events sent meanwhile are lost (ComfyUI
// buffers nothing), so reconcile every in-flight prompt with PromptStatus.
type Connected struct {
	SID       string
	Reconnect bool
}

// Disconnected is a synthetic Stream event: the socket broke (or a dial failed). Attempt
// counts consecutive failures; the next try waits the backoff for Attempt.
type Disconnected struct {
	Err     error
	Attempt int
}

func (*Connected) EventType() string        { return "connected" }
func (*Connected) EventPromptID() string    { return "" }
func (*Disconnected) EventType() string     { return "disconnected" }
func (*Disconnected) EventPromptID() string { return "" }

// Stream keeps one WebSocket open to the server and calls fn for every event, in order, from
// the calling goroutine; fn must return quickly (frames are buffered while it runs, and a
// stalled reader stalls the server). Around the server's frames it emits *Connected (after
// the first frame of each socket) and *Disconnected (each time a socket breaks or a dial
// fails). A broken socket is closed fully before the next dial, which waits the reconnect
// backoff. Stream returns ctx.Err() once ctx is done.
func (c *Client) Stream(ctx context.Context, fn func(Event)) error {
	attempt := 0
	everConnected := false
	for {
		if attempt > 0 {
			t := time.NewTimer(c.backoff(attempt))
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		conn, err := c.Dial(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			attempt++
			fn(&Disconnected{Err: err, Attempt: attempt})
			continue
		}
		delivered, err := c.pump(ctx, conn, everConnected, fn)
		_ = conn.Close()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if delivered {
			everConnected = true
			attempt = 0
			// The server may have restarted or been upgraded: detect again on the next dial.
			c.ForgetFeatures()
		}
		attempt++
		fn(&Disconnected{Err: err, Attempt: attempt})
	}
}

// pump delivers the events of one connection until it fails. delivered reports whether the
// first frame arrived (and Connected was emitted).
func (c *Client) pump(ctx context.Context, conn *Conn, reconnect bool, fn func(Event)) (delivered bool, err error) {
	firstCtx, cancel := context.WithTimeout(ctx, c.reqTimeout)
	first, err := conn.Next(firstCtx)
	cancel()
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			err = fmt.Errorf("comfy: websocket: no first frame within %s", c.reqTimeout)
		}
		return false, err
	}
	sid := c.clientID
	if st, ok := first.(*Status); ok && st.SID != "" {
		sid = st.SID
	}
	fn(&Connected{SID: sid, Reconnect: reconnect})
	fn(first)
	for {
		ev, err := conn.Next(ctx)
		if err != nil {
			return true, err
		}
		fn(ev)
	}
}

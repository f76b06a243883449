package comfy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

var upgrader = websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}

// wsFrame is one recorded server frame.
type wsFrame struct {
	binary bool
	data   []byte
	typ    string // wire type of a text frame, "preview" for binary
}

// sockets splits a trace's server frames by socket (a ws_connect starts a new one).
func sockets(t *testing.T, tr *trace) [][]wsFrame {
	var out [][]wsFrame
	for _, e := range tr.Events {
		switch e.Kind {
		case "ws_connect":
			out = append(out, nil)
		case "ws_text":
			ev, err := DecodeText([]byte(e.Raw))
			if err != nil {
				t.Fatal(err)
			}
			out[len(out)-1] = append(out[len(out)-1], wsFrame{data: []byte(e.Raw), typ: ev.EventType()})
		case "ws_binary":
			out[len(out)-1] = append(out[len(out)-1], wsFrame{binary: true, data: e.frame(t), typ: "preview"})
		}
	}
	return out
}

// wsServer is a replay server for HTTP plus a scripted /ws handler called with the
// connection's index (0, 1, ...).
func wsServer(t *testing.T, dir string, handle func(n int, ws *websocket.Conn)) *replay {
	rp, _ := wsServerURL(t, dir, handle)
	return rp
}

func wsServerURL(t *testing.T, dir string, handle func(n int, ws *websocket.Conn)) (*replay, string) {
	rp, srv := newReplay(t, loadTrace(t, dir, "info_system_stats_object_info.json"))
	var mu sync.Mutex
	n := 0
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // after srv.Close (cleanups run last-in first-out)
	rp.extra["GET /ws"] = func(w http.ResponseWriter, r *http.Request) {
		ws, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			t.Errorf("upgrade: %v", err)
			return
		}
		mu.Lock()
		i := n
		n++
		mu.Unlock()
		wg.Add(1)
		defer wg.Done()
		defer ws.Close()
		handle(i, ws)
	}
	return rp, srv.URL
}

func send(t *testing.T, ws *websocket.Conn, frames []wsFrame) {
	for _, f := range frames {
		typ := websocket.TextMessage
		if f.binary {
			typ = websocket.BinaryMessage
		}
		if err := ws.WriteMessage(typ, f.data); err != nil {
			t.Errorf("write: %v", err)
			return
		}
	}
}

// drain reads until the client closes; it returns the read error.
func drain(ws *websocket.Conn) error {
	_ = ws.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		if _, _, err := ws.ReadMessage(); err != nil {
			return err
		}
	}
}

func TestConnFeatureFlagsHandshake(t *testing.T) {
	tr := loadTrace(t, curDir, "l_feature_flags_handshake.json")
	frames := sockets(t, tr)[0]
	closed := make(chan error, 1)
	rp := wsServer(t, curDir, func(n int, ws *websocket.Conn) {
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		typ, msg, err := ws.ReadMessage()
		if err != nil || typ != websocket.TextMessage || string(msg) != featureFlagsHello {
			t.Errorf("first client frame %q %v", msg, err)
		}
		send(t, ws, frames)
		closed <- drain(ws)
	})
	c := newTestClient(t, rp.baseURL, WithClientID(tr.ClientID))
	ctx := testCtx(t)
	conn, err := c.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !conn.FeatureFlagsSent {
		t.Error("handshake not reported")
	}
	var promptID string
	for i, f := range frames {
		ev, err := conn.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ev.EventType() != f.typ {
			t.Fatalf("#%d: %s, want %s", i, ev.EventType(), f.typ)
		}
		switch x := ev.(type) {
		case *FeatureFlags:
			if x.Flags["supports_preview_metadata"] != true || x.Flags["max_upload_size"] != float64(104857600) {
				t.Errorf("flags %v", x.Flags)
			}
		case *ExecutionStart:
			promptID = x.PromptID
		case *Preview:
			if x.Kind != 4 || x.EventPromptID() != promptID || promptID == "" || x.Meta.NodeID != "3" {
				t.Errorf("preview %+v", x)
			}
		}
	}
	if err := conn.Close(); err != nil {
		t.Fatal(err)
	}
	var ce *websocket.CloseError
	if err := <-closed; !errors.As(err, &ce) || ce.Code != websocket.CloseNormalClosure {
		t.Errorf("server saw %v, want a normal close", err)
	}
	if _, err := conn.Next(ctx); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Next after Close: %v", err)
	}
	if err := conn.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// A v0.3.10 server gets no handshake: its first client frame is the close.
func TestConnClassicBinaryPreviews(t *testing.T) {
	tr := loadTrace(t, oldDir, "h_progress_and_binary.json")
	frames := sockets(t, tr)[0]
	closed := make(chan error, 1)
	rp := wsServer(t, oldDir, func(n int, ws *websocket.Conn) {
		send(t, ws, frames)
		closed <- drain(ws)
	})
	c := newTestClient(t, rp.baseURL, WithClientID(tr.ClientID))
	ctx := testCtx(t)
	conn, err := c.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	previews := 0
	for i, f := range frames {
		ev, err := conn.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ev.EventType() != f.typ {
			t.Fatalf("#%d: %s, want %s", i, ev.EventType(), f.typ)
		}
		if p, ok := ev.(*Preview); ok {
			previews++
			if p.Kind != 1 || p.ContentType != "image/png" || len(p.Image) != 199 {
				t.Errorf("preview %+v", p)
			}
		}
	}
	if previews != 4 || conn.FeatureFlagsSent {
		t.Errorf("%d previews, handshake %v", previews, conn.FeatureFlagsSent)
	}
	conn.Close()
	var ce *websocket.CloseError
	if err := <-closed; !errors.As(err, &ce) {
		t.Errorf("server's first client frame: %v, want the close", err)
	}
}

func TestConnMalformedAndLargeFrames(t *testing.T) {
	big := `{"type": "executed", "data": {"node": "9", "prompt_id": "p", "output": {"text": ["` + strings.Repeat("x", 3<<20) + `"]}}}`
	rp := wsServer(t, oldDir, func(n int, ws *websocket.Conn) {
		_ = ws.WriteMessage(websocket.TextMessage, []byte("not json"))
		_ = ws.WriteMessage(websocket.BinaryMessage, []byte{0, 0})
		_ = ws.WriteMessage(websocket.TextMessage, []byte(big))
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type": "logs", "data": {"entries": []}}`))
		_ = ws.WriteMessage(websocket.BinaryMessage, []byte{0, 0, 0, 9, 1})
		_ = drain(ws)
	})
	c := newTestClient(t, rp.baseURL)
	ctx := testCtx(t)
	conn, err := c.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	want := []string{"malformed", "malformed", "executed", "logs", "binary"}
	for i, w := range want {
		ev, err := conn.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ev.EventType() != w {
			t.Fatalf("#%d: %s, want %s", i, ev.EventType(), w)
		}
		if m, ok := ev.(*Malformed); ok && m.Err == nil {
			t.Error("malformed without error")
		}
		if u, ok := ev.(*UnknownBinary); ok && (u.Kind != 9 || len(u.Data) != 1) {
			t.Errorf("unknown binary %+v", u)
		}
	}
}

type recordedEvents struct {
	mu     sync.Mutex
	events []Event
	signal chan struct{}
}

func newRecorded() *recordedEvents { return &recordedEvents{signal: make(chan struct{}, 1)} }

func (r *recordedEvents) add(ev Event) {
	r.mu.Lock()
	r.events = append(r.events, ev)
	r.mu.Unlock()
	select {
	case r.signal <- struct{}{}:
	default:
	}
}

// waitFor polls until cond holds on the events so far.
func (r *recordedEvents) waitFor(t *testing.T, what string, cond func([]Event) bool) []Event {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		r.mu.Lock()
		evs := append([]Event(nil), r.events...)
		r.mu.Unlock()
		if cond(evs) {
			return evs
		}
		select {
		case <-r.signal:
		case <-deadline:
			t.Fatalf("timed out waiting for %s; got %s", what, describe(evs))
		}
	}
}

func describe(evs []Event) string {
	var parts []string
	for _, ev := range evs {
		s := ev.EventType()
		switch x := ev.(type) {
		case *Connected:
			s = fmt.Sprintf("connected(reconnect=%v)", x.Reconnect)
		case *Executing:
			s = "executing(" + x.Node + ")"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, " ")
}

func TestStreamReconnect(t *testing.T) {
	for _, dir := range traceDirs {
		t.Run(dir, func(t *testing.T) {
			tr := loadTrace(t, dir, "j_ws_reconnect_mid_run.json")
			socks := sockets(t, tr)
			if len(socks) != 2 {
				t.Fatalf("%d sockets in trace", len(socks))
			}
			rp := wsServer(t, dir, func(n int, ws *websocket.Conn) {
				if n > 1 {
					_ = drain(ws)
					return
				}
				closed := make(chan error, 1)
				go func() { closed <- drain(ws) }() // answer pings, notice the close
				send(t, ws, socks[n])
				if n == 0 {
					// The server side goes away mid-run without a close frame.
					ws.UnderlyingConn().Close()
				}
				<-closed
			})
			var attempts []int
			var amu sync.Mutex
			c := newTestClient(t, rp.baseURL, WithClientID(tr.ClientID), WithReconnectBackoff(func(a int) time.Duration {
				amu.Lock()
				attempts = append(attempts, a)
				amu.Unlock()
				return time.Millisecond
			}))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			rec := newRecorded()
			done := make(chan error, 1)
			go func() { done <- c.Stream(ctx, rec.add) }()

			want := 1 + len(socks[0]) + 1 + 1 + len(socks[1])
			evs := rec.waitFor(t, "both sockets' frames", func(evs []Event) bool { return len(evs) >= want })
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Fatalf("Stream returned %v", err)
			}
			var got []string
			for _, ev := range evs[:want] {
				got = append(got, ev.EventType())
			}
			var exp []string
			exp = append(exp, "connected")
			for _, f := range socks[0] {
				exp = append(exp, f.typ)
			}
			exp = append(exp, "disconnected", "connected")
			for _, f := range socks[1] {
				exp = append(exp, f.typ)
			}
			if !jsonEqual(t, got, exp) {
				t.Fatalf("events\n got %v\nwant %v", got, exp)
			}
			c1, c2 := evs[0].(*Connected), evs[len(socks[0])+2].(*Connected)
			if c1.Reconnect || !c2.Reconnect || c1.SID != tr.ClientID || c2.SID != tr.ClientID {
				t.Errorf("connected events %+v %+v", c1, c2)
			}
			if d := evs[len(socks[0])+1].(*Disconnected); d.Err == nil || d.Attempt != 1 || !IsTransient(d.Err) {
				t.Errorf("disconnected %+v", d)
			}
			// After the reconnect the server re-announces the running node without a prompt id.
			ex := evs[len(socks[0])+4].(*Executing)
			if ex.PromptID != "" || ex.Node == "" || ex.Done {
				t.Errorf("re-announced %+v", ex)
			}
			amu.Lock()
			defer amu.Unlock()
			if len(attempts) == 0 || attempts[0] != 1 {
				t.Errorf("backoff attempts %v", attempts)
			}
		})
	}
}

// A half-open link: the server stops answering pings. The client must give up on the pong
// deadline, close the old socket, and only then dial again with the same client id.
func TestStreamPongTimeoutClosesBeforeRedial(t *testing.T) {
	status := []byte(`{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "farm-7"}}`)
	release := make(chan struct{})
	oldResult := make(chan error, 1)
	var once sync.Once
	rp := wsServer(t, curDir, func(n int, ws *websocket.Conn) {
		switch n {
		case 0:
			_, _, _ = ws.ReadMessage() // the handshake
			_ = ws.WriteMessage(websocket.TextMessage, status)
			<-release // stop reading: pings go unanswered
			// The client closed before redialling: its close frame or EOF is already here.
			oldResult <- drain(ws)
		case 1:
			once.Do(func() { close(release) })
			if err := <-oldResult; err == nil {
				t.Error("old socket still open")
			} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Error("old socket was not closed before the redial")
			}
			_, _, _ = ws.ReadMessage()
			_ = ws.WriteMessage(websocket.TextMessage, status)
			_ = drain(ws)
		default:
			_ = drain(ws)
		}
	})
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	c := newTestClient(t, rp.baseURL, WithClientID("farm-7"), WithKeepAlive(30*time.Millisecond, 150*time.Millisecond),
		WithReconnectBackoff(func(int) time.Duration { return time.Millisecond }))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rec := newRecorded()
	done := make(chan error, 1)
	go func() { done <- c.Stream(ctx, rec.add) }()
	evs := rec.waitFor(t, "a reconnect", func(evs []Event) bool {
		for _, ev := range evs {
			if c, ok := ev.(*Connected); ok && c.Reconnect {
				return true
			}
		}
		return false
	})
	cancel()
	<-done
	if got := describe(evs[:4]); got != "connected(reconnect=false) status disconnected connected(reconnect=true)" {
		t.Fatalf("events %s", got)
	}
	if d := evs[2].(*Disconnected); !IsTransient(d.Err) {
		t.Errorf("pong timeout %v not transient", d.Err)
	}
}

func TestStreamDialFailures(t *testing.T) {
	var mu sync.Mutex
	var delays []int
	c := newTestClient(t, "http://"+closedAddr(t), WithReconnectBackoff(func(a int) time.Duration {
		mu.Lock()
		delays = append(delays, a)
		mu.Unlock()
		return time.Millisecond
	}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rec := newRecorded()
	done := make(chan error, 1)
	go func() { done <- c.Stream(ctx, rec.add) }()
	evs := rec.waitFor(t, "three failures", func(evs []Event) bool { return len(evs) >= 3 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Stream returned %v", err)
	}
	for i, ev := range evs[:3] {
		d, ok := ev.(*Disconnected)
		if !ok || d.Attempt != i+1 || !IsTransient(d.Err) {
			t.Fatalf("#%d: %+v", i, ev)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(delays) < 2 || delays[0] != 1 || delays[1] != 2 {
		t.Errorf("backoff called with %v", delays)
	}
}

func TestDefaultBackoff(t *testing.T) {
	prevMax := time.Duration(0)
	for a := 1; a <= 12; a++ {
		d := DefaultBackoff(a)
		base := 250 * time.Millisecond << (a - 1)
		if base > 30*time.Second {
			base = 30 * time.Second
		}
		if d < base/2 || d > base {
			t.Errorf("attempt %d: %v outside [%v, %v]", a, d, base/2, base)
		}
		if base < prevMax {
			t.Errorf("cap shrank")
		}
		prevMax = base
	}
}

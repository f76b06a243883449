package comfytest

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/http"
	"sync"

	"github.com/gorilla/websocket"
)

// The WebSocket side mirrors ComfyUI's PromptServer: sockets are registered by
// sid (the clientId query parameter, or a fresh uuid hex), events go to one sid
// or to every registered socket, events for a sid without a socket are
// dropped. Each socket has its own ordered queue, so a client that stops
// reading only stalls itself.

type frame struct {
	binary bool
	data   []byte
}

type wsConn struct {
	hub *hub
	sid string
	ws  *websocket.Conn

	mu       sync.Mutex
	cond     *sync.Cond
	queue    []frame
	closed   bool
	enqueued int
	flags    *obj          // feature flags the client sent in its handshake
	done     chan struct{} // closed when the socket closes
}

type hub struct {
	srv   *Server
	mu    sync.Mutex
	socks map[string]*wsConn   // sid -> registered socket
	all   map[*wsConn]struct{} // every open socket, registered or not
}

func newHub(srv *Server) *hub {
	return &hub{srv: srv, socks: map[string]*wsConn{}, all: map[*wsConn]struct{}{}}
}

var upgrader = websocket.Upgrader{
	ReadBufferSize:  4096,
	WriteBufferSize: 4096,
	// The origin rule is applied by the HTTP middleware, as ComfyUI does.
	CheckOrigin: func(*http.Request) bool { return true },
}

// register adds a socket under sid, replacing (not closing) an older one.
func (h *hub) register(sid string, ws *websocket.Conn) *wsConn {
	c := &wsConn{hub: h, sid: sid, ws: ws, flags: newObj(), done: make(chan struct{})}
	c.cond = sync.NewCond(&c.mu)
	h.mu.Lock()
	h.socks[sid] = c
	h.all[c] = struct{}{}
	h.mu.Unlock()
	go c.writeLoop()
	return c
}

// unregister is ComfyUI's `self.sockets.pop(sid, None)` when a handler exits:
// it removes whatever socket is registered under the sid, which may be a newer
// one that reconnected with the same clientId.
func (h *hub) unregister(c *wsConn) {
	h.mu.Lock()
	delete(h.socks, c.sid)
	delete(h.all, c)
	h.mu.Unlock()
	c.close()
}

func (h *hub) closeAll() {
	h.mu.Lock()
	conns := make([]*wsConn, 0, len(h.all))
	for c := range h.all {
		conns = append(conns, c)
	}
	h.socks = map[string]*wsConn{}
	h.all = map[*wsConn]struct{}{}
	h.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
}

// send queues a frame for one sid, or for every registered socket when all is
// true.
func (h *hub) send(sid string, all bool, f frame) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if all {
		for _, c := range h.socks {
			c.enqueue(f)
		}
		return
	}
	if c := h.socks[sid]; c != nil {
		c.enqueue(f)
	}
}

// previewMeta reports whether the socket of sid negotiated type-4 previews.
func (h *hub) previewMeta(sid string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.socks[sid]
	if c == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	v, _ := c.flags.get("supports_preview_metadata")
	return pyTruthy(v)
}

// enqueued reports how many frames were queued for the socket of sid.
func (h *hub) enqueued(sid string) (int, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.socks[sid]
	if c == nil {
		return 0, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.enqueued, true
}

func (h *hub) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.all)
}

// maxQueued bounds the frames waiting for one socket. A client that stops
// reading stalls only itself; past this many frames its socket is closed.
const maxQueued = 1 << 16

func (c *wsConn) enqueue(f frame) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	if len(c.queue) >= maxQueued {
		c.mu.Unlock()
		c.close()
		return
	}
	c.queue = append(c.queue, f)
	c.enqueued++
	c.cond.Signal()
	c.mu.Unlock()
}

func (c *wsConn) close() {
	c.mu.Lock()
	already := c.closed
	c.closed = true
	c.queue = nil
	c.cond.Broadcast()
	c.mu.Unlock()
	if !already {
		close(c.done)
		_ = c.ws.Close()
	}
}

func (c *wsConn) writeLoop() {
	for {
		c.mu.Lock()
		for len(c.queue) == 0 && !c.closed {
			c.cond.Wait()
		}
		if c.closed {
			c.mu.Unlock()
			return
		}
		f := c.queue[0]
		c.queue = c.queue[1:]
		c.mu.Unlock()
		if !c.hub.srv.waitUnhung(c.done) {
			return
		}
		typ := websocket.TextMessage
		if f.binary {
			typ = websocket.BinaryMessage
		}
		if err := c.ws.WriteMessage(typ, f.data); err != nil {
			c.close()
			return
		}
	}
}

func jsonFrame(event string, data any) frame {
	return frame{data: pyJSON(newObj("type", event, "data", data))}
}

// binaryFrame builds a binary event: a big-endian uint32 type, then the body.
func binaryFrame(event uint32, body ...[]byte) frame {
	n := 4
	for _, b := range body {
		n += len(b)
	}
	out := make([]byte, 4, n)
	binary.BigEndian.PutUint32(out, event)
	for _, b := range body {
		out = append(out, b...)
	}
	return frame{binary: true, data: out}
}

func u32(v uint32) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, v)
	return b
}

// uuid4 returns a random version-4 UUID.
func uuid4() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("comfytest: random: %v", err))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// uuidHex is uuid.uuid4().hex, the sid of a socket opened without clientId.
func uuidHex() string {
	u := uuid4()
	out := make([]byte, 0, 32)
	for i := 0; i < len(u); i++ {
		if u[i] != '-' {
			out = append(out, u[i])
		}
	}
	return string(out)
}

package comfy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// featureFlagsHello is the handshake a client sends as its first text frame (>= 0.3.45).
const featureFlagsHello = `{"type":"feature_flags","data":{"supports_preview_metadata":true}}`

// eventBuffer is how many decoded frames a Conn holds for a slow consumer. The socket is read
// continuously: ComfyUI writes to all sockets from one queue, so a stalled reader would stall
// every client of the server.
const eventBuffer = 256

// closeWait bounds how long Close waits for the server to answer the close frame.
const closeWait = time.Second

// Conn is one WebSocket connection to /ws?clientId=<ClientID>. A goroutine reads and decodes
// frames continuously and pings the server; Next hands the events out in order.
type Conn struct {
	ws     *websocket.Conn
	events chan Event
	done   chan struct{}
	// err is set by the reader before it closes events.
	err error

	readerDone chan struct{}
	pingDone   chan struct{}
	closeOnce  sync.Once
	// FeatureFlagsSent reports whether the feature_flags handshake was sent.
	FeatureFlagsSent bool
}

// Dial opens the client's WebSocket. On servers with feature flags (see Features) it first
// sends {"type":"feature_flags","data":{"supports_preview_metadata":true}}, so previews come
// as kind 4 with their prompt id. Only one Conn per client id should be open at a time:
// ComfyUI routes by id, and a second socket with the same id confuses its registry.
func (c *Client) Dial(ctx context.Context) (*Conn, error) {
	feat, err := c.Features(ctx)
	if err != nil {
		return nil, fmt.Errorf("comfy: dial: detect features: %w", err)
	}
	d := websocket.Dialer{
		HandshakeTimeout: c.reqTimeout,
		Proxy:            http.ProxyFromEnvironment,
		ReadBufferSize:   64 << 10,
	}
	if t, ok := c.hc.Transport.(*http.Transport); ok && t != nil {
		d.NetDialContext = t.DialContext
		d.TLSClientConfig = t.TLSClientConfig
		d.Proxy = t.Proxy
	}
	hdr := http.Header{"User-Agent": {c.userAgent}}
	ws, resp, err := d.DialContext(ctx, c.wsURL(), hdr)
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			resp.Body.Close()
			return nil, fmt.Errorf("comfy: dial /ws: %w",
				&APIError{Method: http.MethodGet, Path: "/ws", Status: resp.StatusCode})
		}
		return nil, fmt.Errorf("comfy: dial /ws: %w", err)
	}
	ws.SetReadLimit(WSReadLimit)
	conn := &Conn{
		ws:         ws,
		events:     make(chan Event, eventBuffer),
		done:       make(chan struct{}),
		readerDone: make(chan struct{}),
		pingDone:   make(chan struct{}),
	}
	if feat.Generation == GenCurrent {
		_ = ws.SetWriteDeadline(time.Now().Add(c.reqTimeout))
		if err := ws.WriteMessage(websocket.TextMessage, []byte(featureFlagsHello)); err != nil {
			ws.Close()
			return nil, fmt.Errorf("comfy: dial: send feature flags: %w", err)
		}
		_ = ws.SetWriteDeadline(time.Time{})
		conn.FeatureFlagsSent = true
	}
	idle := c.pingEvery + c.pongWait
	ws.SetPongHandler(func(string) error {
		return ws.SetReadDeadline(time.Now().Add(idle))
	})
	go conn.read(idle)
	go conn.ping(c.pingEvery, c.pongWait)
	return conn, nil
}

func (c *Client) wsURL() string {
	u := *c.base
	if u.Scheme == "https" {
		u.Scheme = "wss"
	} else {
		u.Scheme = "ws"
	}
	u.Path = strings.TrimRight(c.base.Path, "/") + "/ws"
	u.RawPath = ""
	u.RawQuery = url.Values{"clientId": {c.clientID}}.Encode()
	return u.String()
}

func (conn *Conn) read(idle time.Duration) {
	defer close(conn.readerDone)
	defer close(conn.events)
	for {
		_ = conn.ws.SetReadDeadline(time.Now().Add(idle))
		typ, data, err := conn.ws.ReadMessage()
		if err != nil {
			select {
			case <-conn.done:
				conn.err = net.ErrClosed
			default:
				conn.err = err
			}
			return
		}
		var ev Event
		var derr error
		switch typ {
		case websocket.TextMessage:
			ev, derr = DecodeText(data)
		case websocket.BinaryMessage:
			ev, derr = DecodeBinary(data)
		default:
			continue
		}
		if derr != nil {
			ev = &Malformed{Type: frameType(typ, data), Frame: data, Err: derr}
		}
		select {
		case conn.events <- ev:
		case <-conn.done:
			conn.err = net.ErrClosed
			return
		}
	}
}

func frameType(typ int, data []byte) string {
	if typ == websocket.BinaryMessage {
		return "binary"
	}
	var env struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(data, &env)
	return env.Type
}

func (conn *Conn) ping(every, wait time.Duration) {
	defer close(conn.pingDone)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-conn.done:
			return
		case <-conn.readerDone:
			return
		case <-t.C:
			if err := conn.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(wait)); err != nil {
				return // the reader's deadline will end the connection
			}
		}
	}
}

// Next returns the next event. After the connection ends it returns the read error (a
// *websocket.CloseError, a timeout when pongs stop, or net.ErrClosed after Close).
func (conn *Conn) Next(ctx context.Context) (Event, error) {
	select {
	case ev, ok := <-conn.events:
		if !ok {
			return nil, fmt.Errorf("comfy: websocket: %w", conn.err)
		}
		return ev, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close sends a close frame, waits briefly for the server's answer, closes the socket and
// waits until the reader and pinger have stopped. Reconnecting with the same client id before
// the old socket is fully gone can make the server drop the new registration.
func (conn *Conn) Close() error {
	var err error
	conn.closeOnce.Do(func() {
		close(conn.done)
		msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
		if conn.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(closeWait)) == nil {
			t := time.NewTimer(closeWait)
			select {
			case <-conn.readerDone:
			case <-t.C:
			}
			t.Stop()
		}
		err = conn.ws.Close()
		<-conn.readerDone
		<-conn.pingDone
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
	})
	return err
}

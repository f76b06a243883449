package server

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/contrib/websocket"
	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

const localStream = "comfyfarm.stream"

// WebSocket I/O bounds.
const (
	wsCloseWait = 2 * time.Second
	wsReadLimit = 4096
)

// streamReq is an authorised request to follow one job's events.
type streamReq struct {
	jobID    string
	frontend string
	after    int64
	previews bool
	token    bool // authorised by the job's events token, not a key
	key      int  // the API key's index in the keyring (keyed streams)
}

// events serves GET /api/v1/jobs/{id}/events: a WebSocket when the request
// asks for an upgrade, Server-Sent Events when it accepts text/event-stream.
// Auth is a bearer key (frontend-scoped as everywhere) or ?token= minted by
// the submit response.
func (s *Server) events(c *fiber.Ctx) error {
	// A browser on a frontend's own origin follows a job with the token (no
	// cookies, no key), so any origin may read the stream.
	c.Set(fiber.HeaderAccessControlAllowOrigin, "*")
	jobs, err := s.jobService()
	if err != nil {
		return err
	}
	id, err := jobID(c)
	if err != nil {
		return err
	}
	req := streamReq{jobID: id}
	if _, hasKey := bearer(c); hasKey || c.Query("token") == "" {
		who, err := s.principal(c)
		if err != nil {
			return err
		}
		c.Locals(localPrincipal, who)
		req.key = who.key
		// A stream counts as one request, at connect.
		if err := s.limit(c, who, limitRequests); err != nil {
			return err
		}
		if req.frontend, err = s.frontendName(c, ""); err != nil {
			return err
		}
	} else if req.frontend, err = s.tokens.check(c.Query("token"), id); err != nil {
		return tokenError(err)
	} else {
		req.token = true
	}
	if req.after, err = resumeAfter(c); err != nil {
		return err
	}
	switch c.Query("previews") {
	case "", "0", "false":
	case "1", "true":
		req.previews = true
	default:
		return schema.Invalid("previews", "must be 1 or 0")
	}
	// The job must exist and belong to the frontend before anything is upgraded.
	if _, err := jobs.Job(c.UserContext(), req.frontend, id); err != nil {
		return err
	}
	if websocket.IsWebSocketUpgrade(c) {
		c.Locals(localStream, req)
		return s.wsUpgrade(c)
	}
	if strings.Contains(c.Get(fiber.HeaderAccept), "text/event-stream") {
		return s.sse(c, jobs, req)
	}
	return newAPIError(http.StatusUpgradeRequired, "upgrade_required",
		"ask for a WebSocket upgrade or send Accept: text/event-stream")
}

// resumeAfter reads the seq to resume after: Last-Event-ID (sent by an
// EventSource on reconnect) wins over ?after=.
func resumeAfter(c *fiber.Ctx) (int64, error) {
	raw, field := c.Get("Last-Event-ID"), "Last-Event-ID"
	if raw == "" {
		raw, field = c.Query("after"), "after"
	}
	if raw == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(raw, 10, 64)
	if err != nil || n < 0 {
		return 0, schema.Invalid(field, "must be a non-negative integer")
	}
	return n, nil
}

func tokenError(err error) error {
	switch {
	case errors.Is(err, errTokenExpired):
		return newAPIError(http.StatusUnauthorized, "token_expired", "the events token has expired")
	case errors.Is(err, errTokenOtherJob):
		return newAPIError(http.StatusForbidden, "forbidden", "the events token is for another job")
	}
	return newAPIError(http.StatusUnauthorized, "invalid_token", "the events token is not valid")
}

// prepare builds output URLs on copies: the Job and Outputs of an event may
// be shared with other subscribers.
func (s *Server) prepare(ctx context.Context, ev schema.Event) schema.Event {
	if ev.Job != nil {
		j := *ev.Job
		j.Outputs = slices.Clone(j.Outputs)
		if err := s.outputURLs(ctx, &j); err != nil {
			s.log.Warn("output urls", "job_id", ev.JobID, "err", err)
		}
		ev.Job = &j
	}
	if len(ev.Outputs) > 0 {
		j := schema.Job{Outputs: slices.Clone(ev.Outputs)}
		if err := s.outputURLs(ctx, &j); err != nil {
			s.log.Warn("output urls", "job_id", ev.JobID, "err", err)
		}
		ev.Outputs = j.Outputs
	}
	return ev
}

func (s *Server) keepAlive(jobID string, last int64) schema.Event {
	return schema.Event{Seq: last, Type: schema.EventKeepAlive, JobID: jobID, Time: s.cfg.NowFunc().UTC()}
}

// sse streams events as Server-Sent Events: "id: seq", "event: type",
// "data: the JSON object", and ": keepalive" comment lines.
//
// The connection is taken over from fasthttp (hijacked, with the response
// head written here): a stream then holds one goroutine and no buffers of
// its own between events, instead of fasthttp's serving goroutine, a body
// stream writer goroutine and the pipe and buffers between them. Events that
// read the same for all subscribers are encoded once (frameCache); what is
// ready at once goes out in one write.
//
// A client that stops reading is dropped, not buffered for: every write to
// the connection must finish within Config.StreamWriteTimeout.
func (s *Server) sse(c *fiber.Ctx, jobs JobService, req streamReq) error {
	if r := s.takeStream(req); r != streamAllowed {
		if r == streamRefusedTotal {
			c.Set(fiber.HeaderRetryAfter, "5")
		}
		return s.streamError(r)
	}
	release := func() { s.streams.give(req) }
	ctx, cancel := context.WithCancel(context.Background())
	ch, unsubscribe, err := jobs.Subscribe(ctx, req.jobID, req.after, req.previews)
	if err != nil {
		cancel()
		release()
		return err
	}
	c.Set(fiber.HeaderContentType, "text/event-stream; charset=utf-8")
	c.Set(fiber.HeaderCacheControl, "no-cache")
	c.Set("X-Accel-Buffering", "no")
	c.Status(http.StatusOK)
	// The body runs until the stream ends and the connection is closed.
	c.Response().Header.SetConnectionClose()
	head := append([]byte(nil), c.Response().Header.Header()...)
	head = append(head, "retry: 2000\n\n"...)
	s.metrics.streams.WithLabelValues("sse").Inc()
	c.Context().HijackSetNoResponse(true)
	c.Context().Hijack(func(conn net.Conn) {
		defer release()
		defer s.metrics.streams.WithLabelValues("sse").Dec()
		defer cancel()
		defer unsubscribe()
		s.writeSSE(ctx, conn, head, ch, req.jobID)
	})
	return nil
}

// sseBuffers holds the write buffers of event streams between writes.
var sseBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// sseBatch bounds what one write gathers of the events that are ready.
const sseBatch = 32 << 10

// writeSSE writes head, then ch's events until a terminal one, the channel
// closes, a write fails or the server shuts down.
func (s *Server) writeSSE(ctx context.Context, conn net.Conn, head []byte, ch <-chan schema.Event, jobID string) {
	// Every write must end within StreamWriteTimeout. The deadline is moved
	// on when less than half of that is left, not at every write: setting
	// it is a good part of a small write's cost. A write thus gets between
	// half of the timeout and all of it.
	var deadline time.Time
	write := func(b []byte) bool {
		if now := time.Now(); deadline.Sub(now) < s.cfg.StreamWriteTimeout/2 {
			deadline = now.Add(s.cfg.StreamWriteTimeout)
			_ = conn.SetWriteDeadline(deadline)
		}
		_, err := conn.Write(b)
		return err == nil
	}
	if !write(head) {
		return
	}
	ticker := time.NewTicker(s.cfg.KeepAlive)
	defer ticker.Stop()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return
			}
			bp := sseBuffers.Get().(*[]byte)
			buf, end, ok := s.appendSSE(ctx, (*bp)[:0], ev, jobID)
			// Gather what else is ready, up to a batch.
		gather:
			for ok && !end && len(buf) < sseBatch {
				select {
				case ev, open := <-ch:
					if !open {
						end = true // the channel closed: write what came, then stop
						break gather
					}
					buf, end, ok = s.appendSSE(ctx, buf, ev, jobID)
				default:
					break gather
				}
			}
			sent := ok && write(buf)
			if cap(buf) <= 64<<10 {
				*bp = buf[:0]
				sseBuffers.Put(bp)
			}
			if !sent || end {
				return
			}
		case <-ticker.C:
			if !write([]byte(": keepalive\n\n")) {
				return
			}
		case <-s.done:
			return
		}
	}
}

// appendSSE appends ev's frame to buf; end reports a terminal event, ok
// false an event that cannot be encoded.
func (s *Server) appendSSE(ctx context.Context, buf []byte, ev schema.Event, jobID string) (out []byte, end, ok bool) {
	_, frame, err := s.encoded(ctx, ev)
	if err != nil {
		s.log.Error("encode event", "job_id", jobID, "err", err)
		return buf, true, false
	}
	return append(buf, frame...), ev.Type.Terminal(), true
}

func (s *Server) newWSUpgrader() fiber.Handler {
	return websocket.New(s.serveWS, websocket.Config{
		HandshakeTimeout: 10 * time.Second,
		RecoverHandler: func(conn *websocket.Conn) {
			if r := recover(); r != nil {
				s.log.Error("websocket handler panicked", "panic", r)
			}
		},
	})
}

// serveWS streams events on an upgraded WebSocket, one JSON text frame per
// event, and a {"type":"keepalive"} frame every Config.KeepAlive.
func (s *Server) serveWS(conn *websocket.Conn) {
	req, _ := conn.Locals(localStream).(streamReq)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.metrics.streams.WithLabelValues("websocket").Inc()
	defer s.metrics.streams.WithLabelValues("websocket").Dec()

	// The reader handles control frames and notices the client leaving. It
	// must be gone before this handler returns: the Conn is pooled.
	conn.SetReadLimit(wsReadLimit)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		defer cancel()
		for {
			if _, _, err := conn.ReadMessage(); err != nil {
				return
			}
		}
	}()
	closeCode, closeText := websocket.CloseNormalClosure, ""
	defer func() {
		msg := websocket.FormatCloseMessage(closeCode, closeText)
		_ = conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		_ = conn.SetReadDeadline(time.Now().Add(wsCloseWait))
		<-readerDone
	}()

	jobs, err := s.jobService()
	if err != nil {
		closeCode, closeText = websocket.CloseTryAgainLater, "not ready"
		return
	}
	switch s.takeStream(req) {
	case streamAllowed:
		defer s.streams.give(req)
	case streamRefusedKey:
		closeCode, closeText = websocket.ClosePolicyViolation, "too many event streams on this api key"
		return
	case streamRefusedToken:
		closeCode, closeText = websocket.ClosePolicyViolation, "too many event streams on this job's token"
		return
	case streamRefusedTotal:
		closeCode, closeText = websocket.CloseTryAgainLater, "too many event streams on this server"
		return
	}
	ch, unsubscribe, err := jobs.Subscribe(ctx, req.jobID, req.after, req.previews)
	if err != nil {
		s.log.Error("subscribe", "job_id", req.jobID, "err", err)
		closeCode, closeText = websocket.CloseInternalServerErr, "internal error"
		return
	}
	defer unsubscribe()
	ticker := time.NewTicker(s.cfg.KeepAlive)
	defer ticker.Stop()
	var last int64
	write := func(ev schema.Event) bool {
		data, err := s.encodedJSON(ctx, ev)
		if err != nil {
			s.log.Error("encode event", "job_id", req.jobID, "err", err)
			return false
		}
		_ = conn.SetWriteDeadline(time.Now().Add(s.cfg.StreamWriteTimeout))
		return conn.WriteMessage(websocket.TextMessage, data) == nil
	}
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return
			}
			if !write(ev) {
				return
			}
			last = ev.Seq
			if ev.Type.Terminal() {
				return
			}
		case <-ticker.C:
			if !write(s.keepAlive(req.jobID, last)) {
				return
			}
		case <-ctx.Done():
			return
		case <-s.done:
			closeCode, closeText = websocket.CloseGoingAway, "server shutting down"
			return
		}
	}
}

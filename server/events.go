package server

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
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

// Stream I/O bounds.
const (
	streamWriteTimeout = 10 * time.Second
	wsCloseWait        = 2 * time.Second
	wsReadLimit        = 4096
)

// streamReq is an authorised request to follow one job's events.
type streamReq struct {
	jobID    string
	frontend string
	after    int64
	previews bool
	token    bool // authorised by the job's events token, not a key
}

// maxTokenStreamsPerJob bounds the streams open at once on one job's events
// token. Keyed streams count against the key's rate limit instead; a token
// is not limited that way, and whoever holds one could otherwise open
// streams without end.
const maxTokenStreamsPerJob = 32

// streamSlots counts the token streams open per job.
type streamSlots struct {
	mu   sync.Mutex
	open map[string]int
}

func (s *streamSlots) take(jobID string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open[jobID] >= maxTokenStreamsPerJob {
		return false
	}
	s.open[jobID]++
	return true
}

func (s *streamSlots) give(jobID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open[jobID]--; s.open[jobID] <= 0 {
		delete(s.open, jobID)
	}
}

var errTooManyStreams = newAPIError(http.StatusTooManyRequests, "rate_limited",
	"too many event streams are open on this job's token; close one first")

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
func (s *Server) sse(c *fiber.Ctx, jobs JobService, req streamReq) error {
	if req.token && !s.slots.take(req.jobID) {
		return errTooManyStreams
	}
	release := func() {
		if req.token {
			s.slots.give(req.jobID)
		}
	}
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
	s.metrics.streams.WithLabelValues("sse").Inc()
	c.Context().SetBodyStreamWriter(func(w *bufio.Writer) {
		defer release()
		defer s.metrics.streams.WithLabelValues("sse").Dec()
		defer cancel()
		defer unsubscribe()
		ticker := time.NewTicker(s.cfg.KeepAlive)
		defer ticker.Stop()
		if _, err := w.WriteString("retry: 2000\n\n"); err != nil || w.Flush() != nil {
			return
		}
		for {
			select {
			case ev, ok := <-ch:
				if !ok {
					return
				}
				data, err := json.Marshal(s.prepare(ctx, ev))
				if err != nil {
					s.log.Error("encode event", "job_id", req.jobID, "err", err)
					return
				}
				w.WriteString("id: ")
				w.WriteString(strconv.FormatInt(ev.Seq, 10))
				w.WriteString("\nevent: ")
				w.WriteString(string(ev.Type))
				w.WriteString("\ndata: ")
				w.Write(data)
				w.WriteString("\n\n")
				if err := w.Flush(); err != nil {
					return
				}
				if ev.Type.Terminal() {
					return
				}
			case <-ticker.C:
				if _, err := w.WriteString(": keepalive\n\n"); err != nil || w.Flush() != nil {
					return
				}
			case <-s.done:
				return
			}
		}
	})
	return nil
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
	if req.token {
		if !s.slots.take(req.jobID) {
			closeCode, closeText = websocket.ClosePolicyViolation, "too many event streams on this job's token"
			return
		}
		defer s.slots.give(req.jobID)
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
		data, err := json.Marshal(ev)
		if err != nil {
			s.log.Error("encode event", "job_id", req.jobID, "err", err)
			return false
		}
		_ = conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
		return conn.WriteMessage(websocket.TextMessage, data) == nil
	}
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return
			}
			if !write(s.prepare(ctx, ev)) {
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

package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/gofiber/contrib/websocket"
	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// A ComfyUI client opens GET /ws?clientId=C, then posts prompts with
// client_id C and reads, for each, ComfyUI's own messages until
// executing{node: null}. A comfySession is one such socket: it follows the
// farm's events of every job posted with its client id (those posted while
// it is open, and the unfinished ones it finds when it opens) and writes
// them as ComfyUI would:
//
//	farm event           ComfyUI messages
//	running              execution_start, execution_cached{nodes: []}
//	progress             [executing{node}] progress{value, max, prompt_id, node}
//	executed             [executing{node}]
//	succeeded            executed{node, output} per output node, execution_success,
//	                     status, executing{node: null}
//	failed               execution_error, status, executing{node: null}
//	cancelled            execution_interrupted, status, executing{node: null}
//
// "executed" waits for the outputs to be stored, so its file references
// point at /view of this API.

// Bounds of a ComfyUI WebSocket session.
const (
	comfySessionBuffer = 256  // frames queued for the writer
	maxSessionJobs     = 1000 // jobs one socket follows at once
	comfyRescanEvery   = 2 * time.Second
	comfyRescanLimit   = 20 // newest jobs of the user a rescan reads
	comfyClockSkew     = 5 * time.Second
)

// comfySession is one open /ws socket.
type comfySession struct {
	a        *comfyAPI
	who      comfyWho
	clientID string
	key      sessionKey
	ctx      context.Context
	out      chan []byte

	opened time.Time // jobs created since are this session's to relay

	mu        sync.Mutex
	following map[string]bool // jobs relayed now
	seen      map[string]bool // jobs relayed now or before, while scans still see them
	closed    bool            // the socket is done: follow no more jobs
	wg        sync.WaitGroup
}

// ws serves GET /ws?clientId=: checks, then the upgrade.
func (a *comfyAPI) ws(c *fiber.Ctx) error {
	if _, err := a.s.jobService(); err != nil {
		return err
	}
	if !websocket.IsWebSocketUpgrade(c) {
		return newAPIError(http.StatusUpgradeRequired, "upgrade_required", "ask for a WebSocket upgrade")
	}
	clientID := c.Query("clientId")
	if clientID == "" {
		var b [16]byte
		_, _ = rand.Read(b[:])
		clientID = hex.EncodeToString(b[:])
	}
	if err := schema.CheckIdent("clientId", clientID, maxClientIDBytes); err != nil {
		return err
	}
	c.Locals(localComfyClient, clientID)
	return a.upgrade(c)
}

const localComfyClient = "comfyfarm.comfy_client"

func (a *comfyAPI) newUpgrader() fiber.Handler {
	return websocket.New(a.serveWS, websocket.Config{
		HandshakeTimeout: 10 * time.Second,
		RecoverHandler: func(conn *websocket.Conn) {
			if r := recover(); r != nil {
				a.s.log.Error("comfy websocket handler panicked", "panic", r)
			}
		},
	})
}

// serveWS runs one session: a reader that notices the client leaving and
// answers the feature_flags handshake, job followers that turn events into
// frames, and this writer.
func (a *comfyAPI) serveWS(conn *websocket.Conn) {
	who, _ := conn.Locals(localComfyWho).(comfyWho)
	clientID, _ := conn.Locals(localComfyClient).(string)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	sess := &comfySession{
		a: a, who: who, clientID: clientID, key: sessionKey{who.frontend, who.user, clientID},
		ctx: ctx, out: make(chan []byte, comfySessionBuffer), following: map[string]bool{}, seen: map[string]bool{},
		// A little early: a job's creation time comes from another clock
		// when another process took the prompt.
		opened: a.s.cfg.NowFunc().Add(-comfyClockSkew),
	}
	conn.SetReadLimit(wsReadLimit)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		defer cancel()
		first := true
		for {
			_, msg, err := conn.ReadMessage()
			if err != nil {
				return
			}
			if first {
				first = false
				var m struct {
					Type string `json:"type"`
				}
				if json.Unmarshal(msg, &m) == nil && m.Type == "feature_flags" {
					sess.send("feature_flags", map[string]any{
						"supports_preview_metadata": false, "max_upload_size": a.s.cfg.MaxUploadBytes,
					})
				}
			}
		}
	}()
	closeCode := websocket.CloseNormalClosure
	defer func() {
		msg := websocket.FormatCloseMessage(closeCode, "")
		_ = conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		_ = conn.SetReadDeadline(time.Now().Add(wsCloseWait))
		<-readerDone
	}()

	// The socket counts as an event stream: against its key, or, opened
	// with a token, per user as an events token's streams count per job.
	req := streamReq{key: who.key}
	if who.token != "" {
		req = streamReq{token: true, jobID: "comfy\x00" + who.frontend + "\x00" + who.user}
	}
	switch a.s.takeStream(req) {
	case streamAllowed:
		defer a.s.streams.give(req)
	case streamRefusedTotal:
		closeCode = websocket.CloseTryAgainLater
		return
	default:
		closeCode = websocket.ClosePolicyViolation
		return
	}
	a.s.metrics.streams.WithLabelValues("websocket").Inc()
	defer a.s.metrics.streams.WithLabelValues("websocket").Dec()

	// First frame: status with the sid, as ComfyUI sends it.
	sess.send("status", map[string]any{
		"status": map[string]any{"exec_info": map[string]any{"queue_remaining": a.queueRemaining(ctx, who)}},
		"sid":    clientID,
	})
	a.register(sess)
	defer func() {
		a.unregister(sess)
		// No follower starts once closed is set: wg.Wait is not raced by an Add.
		sess.mu.Lock()
		sess.closed = true
		sess.mu.Unlock()
		cancel()
		sess.wg.Wait()
	}()
	sess.scan(false)
	sess.wg.Add(1)
	go func() {
		defer sess.wg.Done()
		t := time.NewTicker(comfyRescanEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				sess.scan(true)
			case <-ctx.Done():
				return
			}
		}
	}()

	ping := time.NewTicker(a.s.cfg.KeepAlive)
	defer ping.Stop()
	for {
		select {
		case frame := <-sess.out:
			_ = conn.SetWriteDeadline(time.Now().Add(a.s.cfg.StreamWriteTimeout))
			if conn.WriteMessage(websocket.TextMessage, frame) != nil {
				return
			}
		case <-ping.C:
			if conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(a.s.cfg.StreamWriteTimeout)) != nil {
				return
			}
		case <-ctx.Done():
			return
		case <-a.s.done:
			closeCode = websocket.CloseGoingAway
			return
		}
	}
}

func (a *comfyAPI) register(sess *comfySession) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.sessions[sess.key] == nil {
		a.sessions[sess.key] = map[*comfySession]bool{}
	}
	a.sessions[sess.key][sess] = true
}

func (a *comfyAPI) unregister(sess *comfySession) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.sessions[sess.key], sess)
	if len(a.sessions[sess.key]) == 0 {
		delete(a.sessions, sess.key)
	}
}

// notify tells the sessions of a client id about a prompt posted for it.
func (a *comfyAPI) notify(k sessionKey, jobID, pid string) {
	a.mu.Lock()
	var list []*comfySession
	for sess := range a.sessions[k] {
		list = append(list, sess)
	}
	a.mu.Unlock()
	for _, sess := range list {
		sess.follow(jobID, pid)
	}
}

// scan follows the user's recent jobs posted with this client id that it
// has not relayed yet: when the socket opens, the unfinished ones (a
// reconnect, or a prompt posted first); later (again), also those created
// since it opened, finished or not — prompts posted through another
// comfyfarm process, which cannot tell this one.
func (sess *comfySession) scan(again bool) {
	limit := comfyListLimit
	if again {
		limit = comfyRescanLimit
	}
	jobs, err := sess.a.s.jobService()
	if err != nil {
		return
	}
	list, err := jobs.Jobs(sess.ctx, schema.JobFilter{Frontend: sess.who.frontend, UserID: sess.who.user, Limit: limit})
	if err != nil {
		if sess.ctx.Err() == nil {
			sess.a.s.log.Warn("comfy session scan", "err", err)
		}
		return
	}
	window := make(map[string]bool, len(list))
	for i := len(list) - 1; i >= 0; i-- {
		j := &list[i]
		window[j.ID] = true
		if metaOf(j).Comfy.ClientID != sess.clientID {
			continue
		}
		if !j.State.Terminal() || again && !j.CreatedAt.Before(sess.opened) {
			sess.follow(j.ID, promptIDOf(j))
		}
	}
	if again {
		// A job out of the window is never looked at again: forget it.
		sess.mu.Lock()
		for id := range sess.seen {
			if !window[id] && !sess.following[id] {
				delete(sess.seen, id)
			}
		}
		sess.mu.Unlock()
	}
}

// send queues one {"type","data"} frame; it waits while the writer is
// behind, until the session ends.
func (sess *comfySession) send(typ string, data any) {
	frame, err := json.Marshal(map[string]any{"type": typ, "data": data})
	if err != nil {
		sess.a.s.log.Error("encode comfy message", "type", typ, "err", err)
		return
	}
	select {
	case sess.out <- frame:
	case <-sess.ctx.Done():
	}
}

// follow starts relaying a job's events, once per job.
func (sess *comfySession) follow(jobID, pid string) {
	sess.mu.Lock()
	if sess.closed || sess.seen[jobID] || len(sess.following) >= maxSessionJobs {
		sess.mu.Unlock()
		return
	}
	sess.seen[jobID] = true
	sess.following[jobID] = true
	sess.wg.Add(1)
	sess.mu.Unlock()
	go func() {
		defer sess.wg.Done()
		defer func() {
			sess.mu.Lock()
			delete(sess.following, jobID)
			sess.mu.Unlock()
		}()
		sess.relay(jobID, pid)
	}()
}

// relay turns one job's events into ComfyUI messages until the job ends.
func (sess *comfySession) relay(jobID, pid string) {
	jobs, err := sess.a.s.jobService()
	if err != nil {
		return
	}
	ch, unsubscribe, err := jobs.Subscribe(sess.ctx, jobID, 0, false)
	if err != nil {
		sess.a.s.log.Warn("comfy session subscribe", "job_id", jobID, "err", err)
		return
	}
	defer unsubscribe()
	r := relayState{sess: sess, jobID: jobID, pid: pid}
	sess.sendStatus()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return
			}
			if r.handle(ev) {
				return
			}
		case <-sess.ctx.Done():
			return
		}
	}
}

func (sess *comfySession) sendStatus() {
	sess.send("status", map[string]any{
		"status": map[string]any{"exec_info": map[string]any{"queue_remaining": sess.a.queueRemaining(sess.ctx, sess.who)}},
	})
}

// relayState is what one job's relay has told the client so far.
type relayState struct {
	sess    *comfySession
	jobID   string
	pid     string
	started bool
	node    string // the node last announced by executing
}

func nowMillis() int64 { return time.Now().UnixMilli() }

func (r *relayState) start() {
	if r.started {
		return
	}
	r.started = true
	ts := nowMillis()
	r.sess.send("execution_start", map[string]any{"prompt_id": r.pid, "timestamp": ts})
	r.sess.send("execution_cached", map[string]any{"nodes": []string{}, "prompt_id": r.pid, "timestamp": ts})
}

func (r *relayState) executing(node string) {
	if node == "" || node == r.node {
		return
	}
	r.node = node
	r.sess.send("executing", map[string]any{"node": node, "display_node": node, "prompt_id": r.pid})
}

// handle relays one event; true once the job has ended.
func (r *relayState) handle(ev schema.Event) bool {
	switch ev.Type {
	case schema.EventSnapshot:
		if ev.Job == nil {
			return false
		}
		switch {
		case ev.Job.State.Terminal():
			return r.end(ev.Job.State)
		case ev.Job.State == schema.JobRunning || ev.Job.State == schema.JobStoring:
			r.start()
			if ev.Job.Progress != nil {
				r.executing(ev.Job.Progress.NodeID)
			}
		}
	case schema.EventRunning:
		r.start()
	case schema.EventProgress:
		r.start()
		r.executing(ev.NodeID)
		var value, max float64
		if ev.Value != nil {
			value = *ev.Value
		}
		if ev.Max != nil {
			max = *ev.Max
		}
		r.sess.send("progress", map[string]any{"value": value, "max": max, "prompt_id": r.pid, "node": ev.NodeID})
	case schema.EventExecuted:
		r.start()
		r.executing(ev.NodeID)
	case schema.EventSucceeded, schema.EventFailed, schema.EventCancelled:
		return r.end(schema.JobState(ev.Type))
	}
	return false
}

// end sends a finished job's closing messages. They are built from the job
// as stored, so that the outputs carry the names /view knows them by.
func (r *relayState) end(state schema.JobState) bool {
	sess := r.sess
	jobs, err := sess.a.s.jobService()
	if err != nil {
		return true
	}
	j, err := jobs.Job(sess.ctx, sess.who.frontend, r.jobID)
	if err != nil {
		sess.a.s.log.Warn("comfy session: read finished job", "job_id", r.jobID, "err", err)
		j = &schema.Job{ID: r.jobID, State: state}
	}
	r.start()
	ts := nowMillis()
	switch j.State {
	case schema.JobSucceeded:
		outputs, order := nodeOutputs(j)
		for _, node := range order {
			r.executing(node)
			sess.send("executed", map[string]any{
				"node": node, "display_node": node, "output": outputs[node], "prompt_id": r.pid,
			})
		}
		sess.send("execution_success", map[string]any{"prompt_id": r.pid, "timestamp": ts})
	case schema.JobCancelled:
		sess.send("execution_interrupted", interruptedData(j, r.pid, ts))
	default:
		sess.send("execution_error", errorData(j, r.pid, ts))
	}
	sess.sendStatus()
	sess.send("executing", map[string]any{"node": nil, "prompt_id": r.pid})
	return true
}

package dispatch

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Probe checks one ComfyUI server: a TCP connect to the URL's host and port,
// then GET /system_stats and GET /queue over that connection, all within
// timeout. It never returns an error; what went wrong is in the result:
//
//	connect refused            host_reachable, !port_open
//	connect timeout/unreachable !host_reachable
//	connected, HTTP failed     host_reachable, port_open, !comfy_ok, error
//	connected, both answered   comfy_ok, version, devices, queue counts
//
// LatencyMS is the time of the whole probe (connect and both requests).
func Probe(ctx context.Context, rawURL string, timeout time.Duration) schema.ProbeResult {
	t, err := parseProbeTarget(rawURL)
	if err != nil {
		return schema.ProbeResult{URL: rawURL, Error: err.Error(), Devices: []schema.Device{}, ProbedAt: time.Now().UTC()}
	}
	res, _ := runProbe(ctx, t, timeout, dialHost(t, dialTCP), time.Now)
	return res
}

// probeTarget is a parsed node URL.
type probeTarget struct {
	base string // scheme://host:port[/path], no trailing slash
	host string // without brackets
	port int
}

// parseProbeTarget accepts http(s) URLs with a host; the port defaults to the
// scheme's. Query, fragment and user info are refused.
func parseProbeTarget(raw string) (probeTarget, error) {
	u, err := url.Parse(strings.TrimSpace(raw))
	if err != nil {
		return probeTarget{}, schema.Invalid("url", "not a URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return probeTarget{}, schema.Invalid("url", "scheme must be http or https")
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return probeTarget{}, schema.Invalid("url", "must not carry user info, query or fragment")
	}
	host := u.Hostname()
	if host == "" {
		return probeTarget{}, schema.Invalid("url", "missing host")
	}
	if strings.ContainsAny(host, " %\t") {
		return probeTarget{}, schema.Invalid("url", "bad host")
	}
	port := 80
	if u.Scheme == "https" {
		port = 443
	}
	if p := u.Port(); p != "" {
		port, err = strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return probeTarget{}, schema.Invalid("url", "port must be 1..65535")
		}
	} else if strings.HasSuffix(u.Host, ":") {
		return probeTarget{}, schema.Invalid("url", "empty port")
	}
	path := strings.TrimRight(u.EscapedPath(), "/")
	base := u.Scheme + "://" + net.JoinHostPort(host, strconv.Itoa(port)) + path
	return probeTarget{base: base, host: host, port: port}, nil
}

// dialFunc opens the TCP connection of a probe.
type dialFunc func(ctx context.Context) (net.Conn, error)

var probeDialer = &net.Dialer{KeepAlive: -1}

// dialTCP opens a TCP connection to addr ("host:port").
func dialTCP(ctx context.Context, addr string) (net.Conn, error) {
	return probeDialer.DialContext(ctx, "tcp", addr)
}

// dialHost dials the target's host name (resolving it).
func dialHost(t probeTarget, dial func(context.Context, string) (net.Conn, error)) dialFunc {
	addr := net.JoinHostPort(t.host, strconv.Itoa(t.port))
	return func(ctx context.Context) (net.Conn, error) {
		return dial(ctx, addr)
	}
}

// dialAddrs dials only the given (already checked) addresses, in order, so a
// second name lookup cannot lead the probe somewhere else.
func dialAddrs(addrs []netip.Addr, port int, dial func(context.Context, string) (net.Conn, error)) dialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		var last error
		for _, a := range addrs {
			c, err := dial(ctx, netip.AddrPortFrom(a, uint16(port)).String())
			if err == nil {
				return c, nil
			}
			last = err
			if ctx.Err() != nil {
				break
			}
		}
		if last == nil {
			last = errors.New("no address")
		}
		return nil, last
	}
}

// runProbe runs one probe. answered reports whether any HTTP response
// came back (a server that answers badly is degraded; one that accepts the
// connection but never answers is down).
func runProbe(ctx context.Context, t probeTarget, timeout time.Duration, dial dialFunc, now func() time.Time) (res schema.ProbeResult, answered bool) {
	res = schema.ProbeResult{URL: t.base, Host: t.host, Port: t.port, Devices: []schema.Device{}}
	start := time.Now()
	res.ProbedAt = now().UTC()
	defer func() { res.LatencyMS = float64(time.Since(start).Microseconds()) / 1000 }()
	if timeout <= 0 {
		timeout = 3 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	conn, err := dial(ctx)
	if err != nil {
		res.HostReachable, res.Error = classifyDialError(err, timeout)
		return res, false
	}
	res.HostReachable, res.PortOpen = true, true

	var handed atomic.Bool
	tr := &http.Transport{
		// The first connection is the one just checked; a later one (the
		// server closed after an answer) is dialed the same way.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			if handed.CompareAndSwap(false, true) {
				return conn, nil
			}
			return dial(ctx)
		},
		MaxIdleConnsPerHost: 1,
		TLSHandshakeTimeout: timeout,
	}
	defer func() {
		if !handed.Load() {
			conn.Close()
		}
		tr.CloseIdleConnections()
	}()
	answered, err = askComfy(ctx, tr, t.base, timeout, &res)
	if err != nil {
		return res, answered
	}
	res.ComfyOK = true
	return res, true
}

// askComfy asks the node over tr (fetchComfy) and reports whether any
// HTTP answer came; a failure is described in res.Error.
func askComfy(ctx context.Context, tr http.RoundTripper, base string, timeout time.Duration, res *schema.ProbeResult) (answered bool, err error) {
	var got atomic.Bool
	hc := &http.Client{
		Transport: answerRecorder{rt: tr, answered: &got},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
	err = fetchComfy(ctx, hc, base, timeout, res)
	answered = got.Load()
	if err != nil {
		if ctx.Err() != nil && !answered {
			res.Error = fmt.Sprintf("no HTTP answer within %s", timeout)
		} else {
			res.Error = err.Error()
		}
	}
	return answered, err
}

// probeSession is one node's connection kept by its probe loop from a good
// probe to the next. Those probes ask over it with two plain HTTP/1.1
// requests written here and answers read by http.ReadResponse: no connect,
// no transport with its two goroutines per connection, no client. Only
// when asking that way fails is the node probed again the full way
// (runProbe, a new connection), which tells a closed port from an
// unreachable host and an answer from none. Plain http only: an https node
// is always probed the full way.
//
// /queue (the node answers, and its queue) is asked at every probe;
// /system_stats (version, devices and their free VRAM) at every
// statsEvery-th, the others carrying its last answer: a node's version and
// devices change only with a restart, which ends the connection (the full
// probe then reads them at once), and free VRAM is shown, not scheduled on.
type probeSession struct {
	base  string // the target it was made for
	host  string // Host header
	path  string // the base URL's path prefix
	dial  dialFunc
	conn  net.Conn
	br    *bufio.Reader
	asked int    // probes made over the session
	buf   []byte // answers are read into it: a body is good until the next get
	// The last /system_stats answer: version and devices.
	version string
	devices []schema.Device
}

// statsEvery is how often a kept connection's probe reads /system_stats:
// every 6th probe, 30 s at the default interval.
const statsEvery = 6

// newProbeSession starts a session after the good full probe res.
func newProbeSession(t probeTarget, dial dialFunc, res schema.ProbeResult) *probeSession {
	u, err := url.Parse(t.base)
	if err != nil || u.Scheme != "http" {
		return nil
	}
	return &probeSession{base: t.base, host: u.Host, path: u.EscapedPath(), dial: dial,
		version: res.ComfyUIVersion, devices: res.Devices}
}

// probe asks the node over the kept connection (opening it the first
// time); ok false when that failed.
func (s *probeSession) probe(ctx context.Context, t probeTarget, timeout time.Duration, now func() time.Time) (res schema.ProbeResult, ok bool) {
	res = schema.ProbeResult{URL: t.base, Host: t.host, Port: t.port, Devices: []schema.Device{}}
	start := time.Now()
	res.ProbedAt = now().UTC()
	if timeout <= 0 {
		timeout = 3 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if s.conn == nil {
		c, err := s.dial(ctx)
		if err != nil {
			return res, false
		}
		s.conn, s.br = c, bufio.NewReaderSize(c, 4<<10)
	}
	deadline, _ := ctx.Deadline()
	if s.conn.SetDeadline(deadline) != nil {
		return res, false
	}
	// The connection as it is now: a failed request closes the session
	// (s.conn becomes nil) while this may still run at the deadline.
	conn := s.conn
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	s.asked++
	if s.asked%statsEvery == 0 {
		body, status, err := s.get("/system_stats")
		switch {
		case err != nil:
			return res, false
		case status == http.StatusOK:
			var stats comfy.SystemStats
			if json.Unmarshal(body, &stats) != nil {
				return res, false
			}
			s.version, s.devices = stats.System.ComfyUIVersion, appendDevices(make([]schema.Device, 0, len(stats.Devices)), &stats)
		case status != http.StatusNotFound: // builds from before mid-2023 have none
			return res, false
		}
	}
	res.ComfyUIVersion = s.version
	res.Devices = append(res.Devices, s.devices...)
	body, status, err := s.get("/queue")
	if err != nil || status != http.StatusOK {
		return res, false
	}
	if res.QueueRunning, res.QueuePending, err = comfy.DecodeQueueCounts(body); err != nil {
		return res, false
	}
	res.HostReachable, res.PortOpen, res.ComfyOK = true, true, true
	res.LatencyMS = float64(time.Since(start).Microseconds()) / 1000
	return res, true
}

// get sends GET path on the kept connection and reads the whole answer
// (at most probeMaxJSON bytes). A connection the answer does not leave
// reusable is closed; the next get opens none (the session is done).
func (s *probeSession) get(path string) (body []byte, status int, err error) {
	if s.conn == nil {
		return nil, 0, errors.New("connection closed")
	}
	req := "GET " + s.path + path + " HTTP/1.1\r\nHost: " + s.host + "\r\nUser-Agent: comfyfarm\r\nAccept: application/json\r\n\r\n"
	if _, err := io.WriteString(s.conn, req); err != nil {
		s.close()
		return nil, 0, err
	}
	resp, err := http.ReadResponse(s.br, nil)
	if err != nil {
		s.close()
		return nil, 0, err
	}
	body, err = readInto(s.buf[:0], io.LimitReader(resp.Body, probeMaxJSON+1))
	s.buf = body
	resp.Body.Close()
	if err == nil && len(body) > probeMaxJSON {
		err = fmt.Errorf("answer larger than %d bytes", probeMaxJSON)
	}
	if err != nil || resp.Close {
		s.close()
	}
	return body, resp.StatusCode, err
}

// readInto appends all of r to buf, growing it only when it is too short.
func readInto(buf []byte, r io.Reader) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

func (s *probeSession) close() {
	if s != nil && s.conn != nil {
		s.conn.Close()
		s.conn, s.br = nil, nil
	}
}

// probeKept probes t over *sess when it holds a connection to t, else (or
// when that fails) from a new connection, keeping that one in *sess when
// the probe was good.
func (n *Nodes) probeKept(ctx context.Context, t probeTarget, sess **probeSession) (schema.ProbeResult, bool) {
	if s := *sess; s != nil {
		if s.base == t.base {
			if res, ok := s.probe(ctx, t, n.cfg.Timeout, n.cfg.NowFunc); ok {
				return res, true
			}
		}
		s.close()
		*sess = nil
	}
	if ctx.Err() != nil {
		return schema.ProbeResult{URL: t.base, Host: t.host, Port: t.port, Devices: []schema.Device{}, Error: "probe cancelled"}, false
	}
	dial := dialHost(t, n.dialer)
	res, answered := runProbe(ctx, t, n.cfg.Timeout, dial, n.cfg.NowFunc)
	if res.ComfyOK {
		*sess = newProbeSession(t, dial, res)
	}
	return res, answered
}

// answerRecorder notes that a response (any status) arrived.
type answerRecorder struct {
	rt       http.RoundTripper
	answered *atomic.Bool
}

func (a answerRecorder) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := a.rt.RoundTrip(r)
	if resp != nil {
		a.answered.Store(true)
	}
	return resp, err
}

// classifyDialError maps a failed connect to (host reachable, message).
func classifyDialError(err error, timeout time.Duration) (bool, string) {
	var dnsErr *net.DNSError
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return true, "connection refused: port closed"
	case errors.Is(err, syscall.ECONNRESET):
		return true, "connection reset: port closed"
	case errors.As(err, &dnsErr):
		return false, "resolve host: " + dnsErr.Err
	case errors.Is(err, syscall.EHOSTUNREACH):
		return false, "host unreachable"
	case errors.Is(err, syscall.ENETUNREACH):
		return false, "network unreachable"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return false, fmt.Sprintf("connect timeout after %s", timeout)
	case errors.Is(err, context.Canceled):
		return false, "probe cancelled"
	default:
		return false, "connect: " + err.Error()
	}
}

// jitterDuration spreads d by ±jitter/2 of d.
func jitterDuration(d time.Duration, jitter float64) time.Duration {
	if jitter <= 0 || d <= 0 {
		return d
	}
	f := 1 + jitter*(rand.Float64()-0.5)
	return time.Duration(float64(d) * f)
}

// probeMaxJSON caps each probe answer: /queue carries every queued graph.
const probeMaxJSON = 32 << 20

// fetchComfy reads /system_stats (version, devices) and /queue (counts)
// into res.
func fetchComfy(ctx context.Context, hc *http.Client, base string, timeout time.Duration, res *schema.ProbeResult) error {
	c, err := comfy.NewClient(base, comfy.WithHTTPClient(hc), comfy.WithRequestTimeout(timeout),
		comfy.WithMaxJSONBytes(probeMaxJSON))
	if err != nil {
		return err
	}
	stats, err := c.SystemStats(ctx)
	var apiErr *comfy.APIError
	switch {
	case err == nil:
		res.ComfyUIVersion = stats.System.ComfyUIVersion
		res.Devices = appendDevices(res.Devices, stats)
	case errors.As(err, &apiErr) && apiErr.Status == http.StatusNotFound:
		// Builds from before mid-2023 have no /system_stats: /queue decides.
	default:
		return err
	}
	running, pending, err := c.QueueCounts(ctx)
	if err != nil {
		return err
	}
	res.QueueRunning, res.QueuePending = running, pending
	return nil
}

// Run probes every node on its own schedule until ctx is done, then waits for
// the probes in flight to end. Each node has its own loop: a hung node holds
// only its own loop (and one of Concurrency slots, for at most Timeout).
func (n *Nodes) Run(ctx context.Context) error {
	n.mu.Lock()
	if n.runCtx != nil {
		n.mu.Unlock()
		return errors.New("node prober already running")
	}
	n.runCtx = ctx
	for _, e := range n.entries {
		n.startWorkerLocked(e)
	}
	n.mu.Unlock()

	<-ctx.Done()

	n.mu.Lock()
	n.runCtx = nil
	for _, e := range n.entries {
		if e.cancel != nil {
			e.cancel()
			e.cancel = nil
		}
	}
	n.mu.Unlock()
	n.workers.Wait()
	return nil
}

// startWorkerLocked starts e's probe loop if Run is running.
func (n *Nodes) startWorkerLocked(e *nodeEntry) {
	if n.runCtx == nil || e.cancel != nil {
		return
	}
	ctx, cancel := context.WithCancel(n.runCtx)
	e.cancel = cancel
	n.workers.Add(1)
	go func() {
		defer n.workers.Done()
		n.probeLoop(ctx, e, e.node.Name)
	}()
}

// probeLoop probes one node until ctx ends (Run stops or the node is
// removed). The next probe is due a (jittered, backed-off) delay after the
// previous one ended; the first comes within Jitter of one interval so nodes
// loaded together do not all go at once.
func (n *Nodes) probeLoop(ctx context.Context, e *nodeEntry, name string) {
	var sess *probeSession // the connection of the last good probe
	defer func() { sess.close() }()
	delay := time.Duration(rand.Float64() * n.cfg.Jitter * float64(n.cfg.Interval))
	due := time.Now().Add(delay)
	wait := n.waitFunc
	if wait == nil {
		timer := time.NewTimer(delay)
		defer timer.Stop()
		first := true
		wait = func(ctx context.Context, d time.Duration) bool {
			if !first {
				timer.Reset(d)
			}
			first = false
			select {
			case <-ctx.Done():
				return false
			case <-timer.C:
				return true
			}
		}
	}
	for {
		if !wait(ctx, delay) {
			return
		}
		select {
		case n.sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		started := time.Now()
		t, ok := n.targetOf(e)
		if !ok {
			<-n.sem
			return
		}
		res, answered := n.probeKept(ctx, t, &sess)
		<-n.sem
		if ctx.Err() != nil {
			return // stopping or removed: the result says nothing about the node
		}
		n.metrics.lag.Observe(max(0, started.Sub(due).Seconds()))
		next, state, ok := n.apply(e, res, answered)
		if hook := n.onProbeFunc; hook != nil {
			hook(probeRecord{Name: name, Due: due, Started: started, Result: res, Answered: answered, State: state})
		}
		if !ok {
			return
		}
		due = time.Now().Add(next)
		delay = next
	}
}

// targetOf reads e's current URL; false once e left the registry.
func (n *Nodes) targetOf(e *nodeEntry) (probeTarget, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.entries[e.node.Name] != e {
		return probeTarget{}, false
	}
	t, err := parseProbeTarget(e.node.URL)
	return t, err == nil
}

// ProbeNow probes a registered node at once and returns its view. The result
// counts like a scheduled probe (health still needs two agreeing probes).
func (n *Nodes) ProbeNow(ctx context.Context, name string) (schema.NodeView, error) {
	n.mu.Lock()
	e, ok := n.entries[name]
	n.mu.Unlock()
	if !ok {
		return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	t, ok := n.targetOf(e)
	if !ok {
		return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	res, answered := runProbe(ctx, t, n.cfg.Timeout, dialHost(t, n.dialer), n.cfg.NowFunc)
	if err := ctx.Err(); err != nil {
		return schema.NodeView{}, err
	}
	if _, _, ok := n.apply(e, res, answered); !ok {
		return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	v, ok := n.Get(name)
	if !ok {
		return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
	}
	return v, nil
}

// probeVerdict is the health one probe shows on its own.
func probeVerdict(res schema.ProbeResult, answered bool, slow time.Duration) schema.NodeState {
	switch {
	case !res.PortOpen:
		return schema.NodeDown
	case res.ComfyOK && time.Duration(res.LatencyMS*float64(time.Millisecond)) > slow:
		return schema.NodeDegraded
	case res.ComfyOK:
		return schema.NodeUp
	case answered:
		return schema.NodeDegraded // answers, but with errors or not JSON
	default:
		return schema.NodeDown // accepts connections, never answers
	}
}

// apply records a probe of e and returns the delay to its next probe and the
// node's state after it; false when e is no longer registered.
func (n *Nodes) apply(e *nodeEntry, res schema.ProbeResult, answered bool) (time.Duration, schema.NodeState, bool) {
	v := probeVerdict(res, answered, n.cfg.SlowThreshold)
	n.mu.Lock()
	if n.entries[e.node.Name] != e {
		n.mu.Unlock()
		return 0, "", false
	}
	name := e.node.Name
	old := e.state()
	switch {
	case e.health == schema.NodeUnknown || v == e.health:
		e.health, e.pending = v, ""
	case e.pending == v:
		e.health, e.pending = v, ""
	default:
		e.pending = v
	}
	switch {
	case v != schema.NodeDown:
		e.downStreak = 0
	case res.HostReachable && !res.PortOpen:
		// Refused: the host answers at once, so asking again costs nothing,
		// and a restarted node is seen within one interval of listening.
		e.downStreak = 0
	case e.health == schema.NodeDown:
		e.downStreak++ // a probe that timed out: back off
	}
	if e.health != schema.NodeDown {
		e.suspect = ""
	}
	r := res
	e.last = &r
	if res.ComfyOK {
		at := res.ProbedAt
		e.lastOKAt = &at
	}
	now := n.cfg.NowFunc()
	if e.faulty && e.health == schema.NodeUp && !now.Before(e.faultyUntil) {
		// Back-off over and the node answers well: one job decides. Its
		// success clears the faults; one more failure of its own degrades
		// it again, for twice as long.
		e.faulty = false
		e.faults = n.cfg.FailureLimit - 1
		n.log.Info("node taken back after its failure back-off", "node", name)
	}
	n.metrics.observe(name, res, answered)
	next := nextProbeDelay(n.cfg, e.health, e.pending, e.downStreak)
	if e.faulty && e.pending == "" {
		next = max(next, e.faultyUntil.Sub(now))
	}
	var changes []NodeChange
	s := e.state()
	if s != old {
		n.metrics.setState(name, s)
		changes = append(changes, n.changeLocked(e, old, false, false))
		n.log.Info("node state changed", "node", name, "from", string(old), "to", string(s), "err", res.Error)
	}
	n.mu.Unlock()
	n.emit(changes...)
	return next, s, true
}

// nextProbeDelay: one interval normally, while a change waits for its
// confirming probe, and while connections are refused (cheap to ask, and a
// restarted node is seen as soon as it listens); for a node whose probes
// time out, doubling per further such probe up to MaxBackoff. Jitter spreads
// each delay.
func nextProbeDelay(cfg ProbeConfig, health, pending schema.NodeState, downStreak int) time.Duration {
	d := cfg.Interval
	if health == schema.NodeDown && pending == "" {
		for i := 1; i < downStreak && d < cfg.MaxBackoff; i++ {
			d *= 2
		}
		d = min(d, cfg.MaxBackoff)
	}
	return jitterDuration(d, cfg.Jitter)
}

var nodeStates = []schema.NodeState{schema.NodeUp, schema.NodeDegraded, schema.NodeDown, schema.NodeDraining, schema.NodeUnknown}

// nodeMetrics are the prober's Prometheus collectors.
type nodeMetrics struct {
	state   *prometheus.GaugeVec
	latency prometheus.Histogram
	errors  *prometheus.CounterVec
	lag     prometheus.Histogram
}

func newNodeMetrics() *nodeMetrics {
	buckets := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	return &nodeMetrics{
		state: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "comfyfarm_node_state",
			Help: "1 for the node's current state (up, degraded, down, draining, unknown), 0 for the others.",
		}, []string{"node", "state"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "comfyfarm_node_probe_duration_seconds",
			Help:    "Time of one node probe: connect, /system_stats and /queue.",
			Buckets: buckets,
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_node_probe_errors_total",
			Help: "Failed node probes by reason (host_unreachable, port_closed, no_answer, bad_answer).",
		}, []string{"node", "reason"}),
		lag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "comfyfarm_node_probe_lag_seconds",
			Help:    "How late a scheduled probe started (timer and concurrency limit).",
			Buckets: buckets,
		}),
	}
}

// Collectors returns the prober's metrics for registration.
func (n *Nodes) Collectors() []prometheus.Collector {
	return []prometheus.Collector{n.metrics.state, n.metrics.latency, n.metrics.errors, n.metrics.lag}
}

func (m *nodeMetrics) setState(name string, s schema.NodeState) {
	for _, st := range nodeStates {
		v := 0.0
		if st == s {
			v = 1
		}
		m.state.WithLabelValues(name, string(st)).Set(v)
	}
}

func (m *nodeMetrics) forget(name string) {
	m.state.DeletePartialMatch(prometheus.Labels{"node": name})
	m.errors.DeletePartialMatch(prometheus.Labels{"node": name})
}

func (m *nodeMetrics) observe(name string, res schema.ProbeResult, answered bool) {
	m.latency.Observe(res.LatencyMS / 1000)
	reason := ""
	switch {
	case !res.HostReachable:
		reason = "host_unreachable"
	case !res.PortOpen:
		reason = "port_closed"
	case !res.ComfyOK && !answered:
		reason = "no_answer"
	case !res.ComfyOK:
		reason = "bad_answer"
	}
	if reason != "" {
		m.errors.WithLabelValues(name, reason).Inc()
	}
}

// appendDevices appends the GPUs (and CPU) a node's /system_stats lists.
func appendDevices(to []schema.Device, stats *comfy.SystemStats) []schema.Device {
	for _, d := range stats.Devices {
		to = append(to, schema.Device{Name: d.Name, Type: d.Type, VRAMTotal: d.VRAMTotal, VRAMFree: d.VRAMFree})
	}
	return to
}

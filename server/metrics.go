package server

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// httpMetrics are the server's Prometheus collectors. Requests are labelled
// by route pattern (never the raw path, which would grow without bound).
type httpMetrics struct {
	registry *prometheus.Registry
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	streams  *prometheus.GaugeVec

	streamsRefused *prometheus.CounterVec
}

func newHTTPMetrics(reg *prometheus.Registry) (*httpMetrics, error) {
	m := &httpMetrics{
		registry: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_http_requests_total",
			Help: "HTTP requests by method, route pattern and status.",
		}, []string{"method", "route", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "comfyfarm_http_request_duration_seconds",
			Help:    "HTTP request latency by method, route pattern and status (event streams: until the response starts).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"method", "route", "status"}),
		streams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "comfyfarm_event_streams",
			Help: "Open job event streams by kind (websocket, sse).",
		}, []string{"kind"}),
		streamsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_event_streams_refused_total",
			Help: "Event streams refused by the cap that refused them: key (limits.max_streams_per_key), token (per job token), total (limits.max_streams).",
		}, []string{"reason"}),
	}
	for _, kind := range []string{"sse", "websocket"} {
		m.streams.WithLabelValues(kind) // export 0 before the first stream
	}
	for _, r := range []streamRefusal{streamRefusedKey, streamRefusedToken, streamRefusedTotal} {
		m.streamsRefused.WithLabelValues(r.String())
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.streams, m.streamsRefused} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return nil, err
			}
		}
	}
	return m, nil
}

// metricsHandler serves /metrics: open when no metrics key is configured,
// else only to "Authorization: Bearer <metrics key or admin key>" (what a
// Prometheus scrape config's authorization block sends). The metrics key
// opens nothing else.
func (s *Server) metricsHandler() fiber.Handler {
	serve := adaptor.HTTPHandler(promhttp.HandlerFor(s.metrics.registry, promhttp.HandlerOpts{}))
	if s.cfg.MetricsKey == "" {
		return serve
	}
	want := sha256.Sum256([]byte(s.cfg.MetricsKey))
	return func(c *fiber.Ctx) error {
		key, ok := bearer(c)
		if !ok {
			c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="comfyfarm metrics"`)
			return newAPIError(http.StatusUnauthorized, "unauthorized", "missing metrics key: send Authorization: Bearer <key>")
		}
		got := sha256.Sum256([]byte(key))
		if subtle.ConstantTimeCompare(got[:], want[:]) == 1 {
			return serve(c)
		}
		if who, ok := s.keys.lookup(key); ok && who.admin {
			return serve(c)
		}
		c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="comfyfarm metrics", error="invalid_token"`)
		return newAPIError(http.StatusUnauthorized, "unauthorized", "not the metrics key")
	}
}

// observe wraps every request: it runs the handlers, turns an error into its
// response through the ErrorHandler (so what is logged and counted is what
// the client got), then writes the access log and the metrics.
func (s *Server) observe(c *fiber.Ctx) error {
	start := time.Now()
	if err := c.Next(); err != nil {
		if herr := s.handleError(c, err); herr != nil {
			return herr
		}
	}
	status := c.Response().StatusCode()
	route := c.Route().Path // the pattern, not the path
	if c.Locals(localUnmatched) != nil {
		route = "unmatched"
	}
	elapsed := time.Since(start)
	code := strconv.Itoa(status)
	method := methodLabel(c.Method())
	s.metrics.requests.WithLabelValues(method, route, code).Inc()
	s.metrics.duration.WithLabelValues(method, route, code).Observe(elapsed.Seconds())

	level := slog.LevelInfo
	switch route {
	case "/healthz", "/readyz", "/metrics":
		level = slog.LevelDebug
	}
	if s.log.Enabled(c.UserContext(), level) {
		rid, _ := c.Locals("requestid").(string)
		attrs := []any{
			"method", method,
			"route", route,
			"path", logPath(c.Path()),
			"status", status,
			"duration_ms", float64(elapsed.Microseconds()) / 1000,
			"bytes", responseBytes(c),
			"ip", s.requestIP(c),
			"request_id", rid,
		}
		if err, ok := c.Locals(localError).(error); ok && status < 500 {
			// What the client was not told (5xx are logged with it already).
			attrs = append(attrs, "err", err.Error())
		}
		s.log.Log(c.UserContext(), level, "http", attrs...)
	}
	return nil
}

// methodLabel maps a request method to a constant label value: a label is
// kept by its series for the life of the process, so it must not share
// memory with a request, and unknown methods must not add series.
func methodLabel(m string) string {
	switch m {
	case fiber.MethodGet:
		return fiber.MethodGet
	case fiber.MethodHead:
		return fiber.MethodHead
	case fiber.MethodPost:
		return fiber.MethodPost
	case fiber.MethodPut:
		return fiber.MethodPut
	case fiber.MethodPatch:
		return fiber.MethodPatch
	case fiber.MethodDelete:
		return fiber.MethodDelete
	case fiber.MethodOptions:
		return fiber.MethodOptions
	case fiber.MethodConnect:
		return fiber.MethodConnect
	case fiber.MethodTrace:
		return fiber.MethodTrace
	}
	return "other"
}

// responseBytes is the body size, -1 for a stream (whose Body() would drain it).
func responseBytes(c *fiber.Ctx) int {
	if c.Response().IsBodyStream() {
		return -1
	}
	return len(c.Response().Body())
}

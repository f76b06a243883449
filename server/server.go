package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/recover"
	"github.com/gofiber/fiber/v2/middleware/requestid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// JobService is what the server needs from the farm's job side.
type JobService interface {
	// Submit validates and queues a job. Validation problems are a
	// *schema.ValidationError; also schema.ErrInsufficientCredits and
	// schema.ErrNoNode. The Inputs' Open funcs are valid only during the call.
	Submit(ctx context.Context, p schema.SubmitParams) (*schema.Job, error)
	// Job returns one job of one frontend; schema.ErrNotFound also for a job
	// of another frontend.
	Job(ctx context.Context, frontend, id string) (*schema.Job, error)
	Jobs(ctx context.Context, f schema.JobFilter) ([]schema.Job, error)
	// Cancel cancels a job; schema.ErrTerminal when it has already finished.
	Cancel(ctx context.Context, frontend, id string) (*schema.Job, error)
	QueueStatus(ctx context.Context, frontend, id string) (*schema.QueueStatus, error)
	// Subscribe: first a snapshot (or, with after>0, the events after that seq
	// while still buffered, else a snapshot), then live events; the channel
	// closes after the terminal event or when cancel is called.
	Subscribe(ctx context.Context, jobID string, after int64, previews bool) (<-chan schema.Event, func(), error)
}

// NodeService is what the server needs from the farm's node side.
type NodeService interface {
	Nodes(ctx context.Context) ([]schema.NodeView, error)
	NodeAdd(ctx context.Context, n schema.Node) (*schema.NodeView, error)
	NodeRemove(ctx context.Context, name string) error
	NodeDrain(ctx context.Context, name string, drain bool) (*schema.NodeView, error)
	NodeProbe(ctx context.Context, name string) (*schema.NodeView, error)
	// NodeUpdate changes a node's max_inflight and tags (nil: unchanged).
	NodeUpdate(ctx context.Context, name string, p schema.NodeUpdate) (*schema.NodeView, error)
	// ProbeURL checks an unregistered host and port. A host outside the
	// allowed networks is schema.ErrForbidden or a *schema.ValidationError.
	ProbeURL(ctx context.Context, rawURL string) (*schema.ProbeResult, error)
}

// JobCounter is optionally implemented by a JobService to give the dashboard
// exact job counts by frontend and state. Without it the dashboard counts
// each frontend's unfinished jobs through Jobs.
type JobCounter interface {
	JobCounts(ctx context.Context) (map[string]map[schema.JobState]int, error)
}

// Frontends resolves a frontend name to its controller (the registry map).
type Frontends interface {
	Get(name string) (dbcontrollers.Controller, error) // schema.ErrUnknownFrontend
	Names() []string
	Ping(ctx context.Context) error // every frontend database
}

// FileServer serves objects of local storage under /files/{key}.
type FileServer interface {
	Verify(key string, q url.Values) error // signature and expiry
	Open(key string) (*os.File, oss.ObjectInfo, error)
}

// Pinger is something /readyz checks.
type Pinger interface {
	Ping(ctx context.Context) error
}

// PingFunc adapts a function to Pinger.
type PingFunc func(ctx context.Context) error

// Ping calls f.
func (f PingFunc) Ping(ctx context.Context) error { return f(ctx) }

// Config holds the server's settings. Zero values get the defaults noted.
type Config struct {
	AdminKey       string              // required
	MetricsKey     string              // when set, /metrics needs it (or the admin key) as a bearer key
	FrontendKeys   map[string][]string // frontend name -> its API keys
	MaxBodyBytes   int                 // whole request body; default 32 MiB
	MaxUploadBytes int64               // one uploaded file; default 20 MiB
	TokenSecret    []byte              // signs event tokens; required, >= 16 bytes
	TokenTTL       time.Duration       // event token lifetime; default 1h
	KeepAlive      time.Duration       // event stream keep-alive; default 15s
	// Event streams open at once per API key (default 2000) and in all
	// (default 20000); beyond them SSE answers 429 / 503, a WebSocket is
	// closed with 1008 / 1013.
	MaxStreamsPerKey int
	MaxStreams       int
	// StreamWriteTimeout bounds every write to an event stream's connection:
	// a client that stops reading is dropped after it. Default 10s.
	StreamWriteTimeout time.Duration
	ShutdownTimeout    time.Duration    // Run's graceful shutdown; default 10s
	Version            string           // shown by /healthz
	NowFunc            func() time.Time // default time.Now
	// Per frontend API key; the admin key is never limited. 0: no limit.
	RatePerMinute   int // keyed requests (an event stream counts once, at connect)
	SubmitPerMinute int // POST /api/v1/jobs, on top of RatePerMinute
	// PublicURL is the address clients reach the server at, when set in
	// the configuration: events_url in submit answers is absolute
	// (PublicURL + path), and ComfyUI API tokens' base_url starts with it
	// (else with the address the request came to).
	PublicURL string
	// MaxGraphNodes bounds a template's workflow; default 5000.
	MaxGraphNodes int
	// RawWorkflows maps a frontend to false when its keys may submit
	// templates only (403 raw_workflows_disabled on a raw workflow); a
	// frontend not in it may submit both. The admin key always may.
	RawWorkflows map[string]bool
	// TrustedProxies are the addresses or networks of reverse proxies whose
	// X-Forwarded-For names the client (for logs); empty: none.
	TrustedProxies []string

	// mutableCtx turns Fiber's Immutable mode off; for the benchmark that
	// measures what Immutable costs (docs/benchmarks.md).
	mutableCtx bool
}

// Deps are the parts the server talks to. Jobs and Nodes may be nil: their
// routes then answer 503 not_ready.
type Deps struct {
	Logger    *slog.Logger
	Frontends Frontends // required
	Control   Pinger    // control database, checked by /readyz
	Scheduler Pinger    // the farm, checked by /readyz: ready once it has loaded its queue
	Store     oss.Store // builds photo and output URLs, deletes photo objects
	Files     FileServer
	Jobs      JobService
	Nodes     NodeService
	Metrics   *prometheus.Registry // HTTP metrics are registered here and served on /metrics
	Samples   *Sampler             // the dashboard's charts; nil: empty charts
	Templates TemplateStore        // workflow templates; nil: their routes answer 503
	Webhooks  WebhookService       // job webhooks; nil: webhook_url refused, no deliveries listed
	Rates     SharedRates          // rate limits counted across replicas; nil: this process counts alone
}

// Server is the HTTP application.
type Server struct {
	cfg     Config
	log     *slog.Logger
	deps    Deps
	keys    *keyring
	limiter *limiter
	// ratesDownUntil (unix ns): until then the shared rate count is not
	// asked (it failed); the replica's own buckets decide.
	ratesDownUntil atomic.Int64
	tokens         *tokenSigner
	metrics        *httpMetrics
	proxies        proxySet // trusted reverse proxies
	app            *fiber.App

	wsUpgrade fiber.Handler

	done     chan struct{} // closed on shutdown: event streams end
	streams  *streamLimits
	frames   *frameCache // events encoded once for all their streams
	doneOnce sync.Once
	stopErr  error // of the one app shutdown
}

// New builds the server and its routes.
func New(cfg Config, deps Deps) (*Server, error) {
	if deps.Frontends == nil {
		return nil, errors.New("server: Frontends is required")
	}
	if len(cfg.TokenSecret) < 16 {
		return nil, errors.New("server: TokenSecret must be at least 16 bytes")
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 32 << 20
	}
	if cfg.MaxUploadBytes <= 0 {
		cfg.MaxUploadBytes = 20 << 20
	}
	if cfg.TokenTTL <= 0 {
		cfg.TokenTTL = time.Hour
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = 15 * time.Second
	}
	if cfg.MaxStreamsPerKey <= 0 {
		cfg.MaxStreamsPerKey = defaultMaxStreamsPerKey
	}
	if cfg.MaxStreams <= 0 {
		cfg.MaxStreams = defaultMaxStreams
	}
	if cfg.StreamWriteTimeout <= 0 {
		cfg.StreamWriteTimeout = 10 * time.Second
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	if cfg.NowFunc == nil {
		cfg.NowFunc = time.Now
	}
	if cfg.RatePerMinute < 0 || cfg.SubmitPerMinute < 0 {
		return nil, errors.New("server: RatePerMinute and SubmitPerMinute must not be negative")
	}
	proxies, err := parseProxies(cfg.TrustedProxies)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if deps.Logger == nil {
		deps.Logger = slog.Default()
	}
	keys, err := newKeyring(cfg.AdminKey, cfg.FrontendKeys)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if deps.Metrics == nil {
		deps.Metrics = prometheus.NewRegistry()
	}
	metrics, err := newHTTPMetrics(deps.Metrics)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if deps.Rates != nil {
		keys.rateIDs(cfg.TokenSecret)
	}
	s := &Server{
		cfg:     cfg,
		log:     deps.Logger,
		deps:    deps,
		keys:    keys,
		limiter: newLimiter(cfg.RatePerMinute, cfg.SubmitPerMinute, bucketIdle),
		tokens:  &tokenSigner{key: cfg.TokenSecret, ttl: cfg.TokenTTL, now: cfg.NowFunc},
		metrics: metrics,
		proxies: proxies,
		done:    make(chan struct{}),
		streams: newStreamLimits(cfg.MaxStreamsPerKey, cfg.MaxStreams),
		frames:  newFrameCache(),
	}
	s.app = fiber.New(fiber.Config{
		AppName:               "comfyfarm",
		BodyLimit:             cfg.MaxBodyBytes,
		ReadTimeout:           2 * time.Minute,
		IdleTimeout:           2 * time.Minute,
		DisableStartupMessage: true,
		// Strings read from a Ctx (method, path, params, query, headers) are
		// copies, not views of fasthttp's request buffers, which are reused
		// for the connection's next request. Values kept past the handler —
		// metrics labels, maps, goroutines, a WebSocket after its upgrade —
		// then stay what they were. The cost is a few small allocations per
		// request (docs/benchmarks.md). Request().Body() and other fasthttp
		// byte slices are not covered: they are copied where they are kept.
		Immutable: !cfg.mutableCtx,
		// Multipart forms are parsed by the handler, after authentication,
		// not by fasthttp while it reads any request.
		DisablePreParseMultipartForm: true,
		ErrorHandler:                 s.handleError,
	})
	s.wsUpgrade = s.newWSUpgrader()
	s.routes()
	return s, nil
}

// App returns the Fiber app (for tests and embedding).
func (s *Server) App() *fiber.App { return s.app }

func (s *Server) routes() {
	app := s.app
	app.Use(requestid.New())
	app.Use(s.observe)
	app.Use(recover.New())
	app.Use(refuseContentEncoding)

	app.Get("/healthz", s.healthz)
	app.Get("/readyz", s.readyz)
	app.Get("/metrics", s.metricsHandler())
	app.Get("/files/*", s.file)
	app.Get("/dashboard", s.dashboard)
	app.Get("/dashboard/assets/:file", s.dashboardAsset)
	app.Get("/openapi.json", s.openAPI)

	api := app.Group("/api/v1")
	api.Get("/jobs/:id/events", s.events)

	key := s.authenticate
	api.Post("/jobs", key, s.limitSubmit, s.jobSubmit)
	api.Get("/jobs", key, s.jobList)
	api.Get("/jobs/:id", key, s.jobGet)
	api.Get("/jobs/:id/webhooks", key, s.jobWebhooks)
	api.Delete("/jobs/:id", key, s.jobCancel)
	api.Get("/queue", key, s.queueStatus)

	api.Get("/photos", key, s.photoList)
	api.Get("/photos/:id", key, s.photoGet)
	api.Delete("/photos/:id", key, s.photoDelete)

	api.Put("/users/:id", key, s.userPut)
	api.Get("/users/:id", key, s.userGet)
	api.Post("/users/:id/credits", key, s.userCredits)

	admin := s.requireAdmin
	api.Get("/templates", key, s.templateList)
	api.Get("/templates/:name", key, s.templateGet)
	api.Put("/templates/:name", key, admin, s.templatePut)
	api.Delete("/templates/:name", key, admin, s.templateDelete)

	api.Get("/nodes", key, admin, s.nodeList)
	api.Post("/nodes", key, admin, s.nodeAdd)
	api.Delete("/nodes/:name", key, admin, s.nodeRemove)
	api.Patch("/nodes/:name", key, admin, s.nodeUpdate)
	api.Post("/nodes/:name/drain", key, admin, s.nodeDrain)
	api.Post("/nodes/:name/probe", key, admin, s.nodeProbe)
	api.Post("/probe", key, admin, s.probe)
	api.Get("/models", key, admin, s.modelList)
	api.Get("/dashboard", key, admin, s.dashboardData)
	api.Get("/dashboard/jobs", key, admin, s.dashboardJobs)
	api.Get("/dashboard/samples", key, admin, s.dashboardSamples)

	s.comfyRoutes()

	// Last: anything no route took.
	app.Use(func(c *fiber.Ctx) error {
		c.Locals(localUnmatched, true)
		return newAPIError(http.StatusNotFound, "not_found", "no such route")
	})
}

const localUnmatched = "comfyfarm.unmatched"

// Run serves on ln until ctx ends, then shuts down gracefully: event streams
// are closed, in-flight requests get Config.ShutdownTimeout to finish.
func (s *Server) Run(ctx context.Context, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- s.app.Listener(ln) }()
	select {
	case err := <-errc:
		if err != nil {
			return fmt.Errorf("serve http: %w", err)
		}
		return nil // stopped by Shutdown
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
	defer cancel()
	err := s.Shutdown(sctx)
	// Shutdown misses a listener the app has not registered yet; closing it
	// here makes Listener return in every case.
	_ = ln.Close()
	if serr := <-errc; serr != nil && err == nil {
		err = serr
	}
	return err
}

// Shutdown ends every event stream, stops accepting connections and waits
// for in-flight requests until ctx ends.
// Calling it again returns the first call's result.
func (s *Server) Shutdown(ctx context.Context) error {
	s.doneOnce.Do(func() {
		close(s.done)
		if err := s.app.ShutdownWithContext(ctx); err != nil {
			s.stopErr = fmt.Errorf("shutdown http: %w", err)
		}
	})
	return s.stopErr
}

func (s *Server) jobService() (JobService, error) {
	if s.deps.Jobs == nil {
		return nil, schema.ErrNotReady
	}
	return s.deps.Jobs, nil
}

func (s *Server) nodeService() (NodeService, error) {
	if s.deps.Nodes == nil {
		return nil, schema.ErrNotReady
	}
	return s.deps.Nodes, nil
}

package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Defaults of Config.
const (
	DefaultConcurrency  = 8
	DefaultTimeout      = 10 * time.Second
	DefaultMaxAge       = 24 * time.Hour
	DefaultPollInterval = time.Second
)

// DefaultBackoff are the waits after the 1st, 2nd, ... failed attempt; the
// last repeats.
var DefaultBackoff = []time.Duration{
	5 * time.Second, 30 * time.Second, 2 * time.Minute, 10 * time.Minute,
	30 * time.Minute, time.Hour, 2 * time.Hour, 4 * time.Hour,
}

// leaseSlack is how much longer than a request a claim lasts: the time to
// read the job and record the attempt.
const leaseSlack = 30 * time.Second

// maxAnswerBytes bounds what is read of a receiver's answer (only to let the
// connection be reused).
const maxAnswerBytes = 64 << 10

// Outcomes of one attempt, the outcome label of
// comfyfarm_webhook_deliveries_total.
const (
	OutcomeDelivered   = "delivered"   // 2xx
	OutcomeRetry       = "retry"       // another status or no answer; tried again later
	OutcomeGone        = "gone"        // 410: the receiver asked to stop
	OutcomeExpired     = "expired"     // failed, and the next try would be past max_age
	OutcomeInterrupted = "interrupted" // the deliverer stopped during the request; tried again
)

// Store is what the deliverer needs from the control database.
type Store interface {
	WebhookClaim(ctx context.Context, p dbcontrollers.WebhookClaimParams) ([]schema.WebhookDelivery, error)
	WebhookRelease(ctx context.Context, owner string, ids []string) error
	WebhookRecord(ctx context.Context, r dbcontrollers.WebhookResult) error
	WebhookPending(ctx context.Context) (map[string]int, error)
	JobGet(ctx context.Context, id string) (*schema.Job, error)
}

// Config tunes a Deliverer. Zero values get the defaults.
type Config struct {
	Owner       string // lease owner (the instance id); required
	Concurrency int    // requests in flight at once
	// PerFrontend caps one frontend's requests in flight, so receivers
	// that hang take at most that many of the Concurrency slots; default
	// half of Concurrency (at least 1).
	PerFrontend  int
	Timeout      time.Duration   // one request, connection to answer
	MaxAge       time.Duration   // no try starts later than this after the event
	Backoff      []time.Duration // waits between tries, the last repeating
	PollInterval time.Duration   // how often due rows are looked for
	NowFunc      func() time.Time
	Logger       *slog.Logger
	// Transport sends the requests; nil: a clone of http.DefaultTransport.
	Transport http.RoundTripper
	// ViewFunc renders the body: the job view (outputs with URLs) as
	// GET /api/v1/jobs/{id} shows it. Nil: the job as JSON.
	ViewFunc func(ctx context.Context, j *schema.Job) ([]byte, error)
}

// Deliverer sends the outbox's due webhooks.
type Deliverer struct {
	cfg     Config
	store   Store
	targets *Targets
	client  *http.Client
	log     *slog.Logger
	wake    chan struct{}

	mu   sync.Mutex
	busy map[string]int // requests in flight by frontend

	deliveries *prometheus.CounterVec
	pending    *prometheus.GaugeVec
	seen       map[string]bool // frontends with a pending gauge
}

// New returns a deliverer of store's outbox, signing with targets' keys.
func New(cfg Config, store Store, targets *Targets) (*Deliverer, error) {
	if cfg.Owner == "" {
		return nil, errors.New("webhook: Owner is required")
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = DefaultConcurrency
	}
	if cfg.PerFrontend <= 0 {
		cfg.PerFrontend = max(1, cfg.Concurrency/2)
	}
	cfg.PerFrontend = min(cfg.PerFrontend, cfg.Concurrency)
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = DefaultMaxAge
	}
	if len(cfg.Backoff) == 0 {
		cfg.Backoff = DefaultBackoff
	}
	for _, b := range cfg.Backoff {
		if b <= 0 {
			return nil, errors.New("webhook: back-off steps must be positive")
		}
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.NowFunc == nil {
		cfg.NowFunc = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Transport == nil {
		cfg.Transport = http.DefaultTransport.(*http.Transport).Clone()
	}
	if cfg.ViewFunc == nil {
		cfg.ViewFunc = func(_ context.Context, j *schema.Job) ([]byte, error) { return json.Marshal(j) }
	}
	return &Deliverer{
		cfg:     cfg,
		store:   store,
		targets: targets,
		client: &http.Client{
			Transport: cfg.Transport,
			// A redirect is an answer like any other non-2xx: followed, it
			// would carry a signed body to an address nobody allowed.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		log:  cfg.Logger,
		wake: make(chan struct{}, 1),
		busy: map[string]int{},
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_webhook_deliveries_total",
			Help: "Webhook delivery attempts by frontend and outcome (delivered, retry, gone, expired, interrupted).",
		}, []string{"frontend", "outcome"}),
		pending: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "comfyfarm_webhook_pending",
			Help: "Webhook deliveries not yet delivered or given up, by frontend.",
		}, []string{"frontend"}),
		seen: map[string]bool{},
	}, nil
}

// Collectors are the deliverer's metrics.
func (d *Deliverer) Collectors() []prometheus.Collector {
	return []prometheus.Collector{d.deliveries, d.pending}
}

// notify asks for a look at the outbox now rather than at the next poll.
func (d *Deliverer) notify() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Run delivers until ctx ends. Requests in flight then are abandoned and
// recorded as interrupted (due again at once, for this or another process);
// Run returns when they have been.
func (d *Deliverer) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, d.cfg.Concurrency)
	poll := time.NewTicker(d.cfg.PollInterval)
	defer poll.Stop()
	var gaugeAt time.Time
	for {
		if free := cap(slots) - len(slots); free > 0 {
			list, err := d.store.WebhookClaim(ctx, dbcontrollers.WebhookClaimParams{
				Owner: d.cfg.Owner, Limit: free, LeaseUntil: d.cfg.NowFunc().Add(d.cfg.Timeout + leaseSlack),
				ExcludeFrontends: d.fullFrontends(),
			})
			if err != nil && ctx.Err() == nil {
				d.log.Warn("claim webhooks", "err", err)
			}
			var back []string
			for _, w := range list {
				if !d.take(w.Frontend) {
					back = append(back, w.ID) // that frontend filled up within this batch
					continue
				}
				slots <- struct{}{}
				wg.Add(1)
				go func() {
					defer wg.Done()
					d.deliver(ctx, w)
					d.done(w.Frontend)
					<-slots
					d.notify()
				}()
			}
			if err := d.store.WebhookRelease(ctx, d.cfg.Owner, back); err != nil && ctx.Err() == nil {
				d.log.Warn("release webhooks", "err", err) // they come due when the lease ends
			}
		}
		if time.Since(gaugeAt) >= 5*d.cfg.PollInterval {
			gaugeAt = time.Now()
			d.refreshPending(ctx)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-poll.C:
		case <-d.wake:
		}
	}
}

// fullFrontends are the frontends with PerFrontend requests in flight.
func (d *Deliverer) fullFrontends() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for f, n := range d.busy {
		if n >= d.cfg.PerFrontend {
			out = append(out, f)
		}
	}
	return out
}

// take counts a request of frontend in flight, if its cap allows one more.
func (d *Deliverer) take(frontend string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.busy[frontend] >= d.cfg.PerFrontend {
		return false
	}
	d.busy[frontend]++
	return true
}

func (d *Deliverer) done(frontend string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.busy[frontend]--; d.busy[frontend] <= 0 {
		delete(d.busy, frontend)
	}
}

func (d *Deliverer) refreshPending(ctx context.Context) {
	counts, err := d.store.WebhookPending(ctx)
	if err != nil {
		if ctx.Err() == nil {
			d.log.Warn("count pending webhooks", "err", err)
		}
		return
	}
	for f := range d.seen {
		if _, ok := counts[f]; !ok {
			d.pending.WithLabelValues(f).Set(0)
		}
	}
	for f, n := range counts {
		d.seen[f] = true
		d.pending.WithLabelValues(f).Set(float64(n))
	}
}

// deliver makes one attempt at a claimed delivery and records it.
func (d *Deliverer) deliver(ctx context.Context, w schema.WebhookDelivery) {
	log := d.log.With("job_id", w.JobID, "frontend", w.Frontend, "webhook_id", w.ID)
	started := d.cfg.NowFunc()
	clock := time.Now()
	status, aerr := d.attempt(ctx, w)
	a := schema.WebhookAttempt{At: started, StatusCode: status, DurationMS: float64(time.Since(clock).Microseconds()) / 1000}
	res := dbcontrollers.WebhookResult{ID: w.ID, Owner: d.cfg.Owner, State: schema.WebhookPending}
	var outcome string
	switch {
	case ctx.Err() != nil && aerr != nil:
		a.Error = "interrupted: the deliverer stopped"
		res.NextAttemptAt, outcome = d.cfg.NowFunc(), OutcomeInterrupted
	case aerr == nil && status >= 200 && status < 300:
		res.State, outcome = schema.WebhookDelivered, OutcomeDelivered
	case aerr == nil && status == http.StatusGone:
		a.Error = "410 Gone: the receiver asked to stop"
		res.State, outcome = schema.WebhookFailed, OutcomeGone
	default:
		if aerr != nil {
			a.Error = aerr.Error()
		} else {
			a.Error = "answered " + strconv.Itoa(status)
		}
		next := d.cfg.NowFunc().Add(d.backoff(len(w.Attempts) + 1))
		if next.After(w.CreatedAt.Add(d.cfg.MaxAge)) {
			res.State, outcome = schema.WebhookFailed, OutcomeExpired
			a.Error += "; no further try within " + d.cfg.MaxAge.String() + " of the event"
		} else {
			res.NextAttemptAt, outcome = next, OutcomeRetry
		}
	}
	res.Attempt = a
	d.deliveries.WithLabelValues(w.Frontend, outcome).Inc()
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := d.store.WebhookRecord(rctx, res); err != nil {
		// The lease ran out and another deliverer has the row: it will
		// send again (at least once).
		log.Warn("record webhook attempt", "err", err)
		return
	}
	switch outcome {
	case OutcomeDelivered:
		log.Debug("webhook delivered", "status", status, "attempts", len(w.Attempts)+1)
	case OutcomeRetry:
		log.Info("webhook not delivered, will retry", "err", a.Error, "next_attempt_at", res.NextAttemptAt)
	case OutcomeGone, OutcomeExpired:
		log.Warn("webhook given up", "err", a.Error, "attempts", len(w.Attempts)+1)
	}
}

// backoff is the wait after the n-th failed attempt (n >= 1).
func (d *Deliverer) backoff(n int) time.Duration {
	return d.cfg.Backoff[min(n, len(d.cfg.Backoff))-1]
}

// attempt sends the job view once; the status code, or an error when there
// was no usable answer.
func (d *Deliverer) attempt(ctx context.Context, w schema.WebhookDelivery) (int, error) {
	key := d.targets.Key(w.Frontend)
	if key == nil {
		return 0, fmt.Errorf("frontend %s has no webhook secret configured", w.Frontend)
	}
	job, err := d.store.JobGet(ctx, w.JobID)
	if err != nil {
		return 0, fmt.Errorf("read job: %w", err)
	}
	body, err := d.cfg.ViewFunc(ctx, job)
	if err != nil {
		return 0, fmt.Errorf("render job view: %w", err)
	}
	rctx, cancel := context.WithTimeout(ctx, d.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, w.URL, bytes.NewReader(body))
	if err != nil {
		return 0, fmt.Errorf("build request: %w", err)
	}
	ts := d.cfg.NowFunc().Unix()
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "comfyfarm-webhook")
	req.Header.Set(HeaderID, w.ID)
	req.Header.Set(HeaderTimestamp, strconv.FormatInt(ts, 10))
	req.Header.Set(HeaderSignature, Sign(key, w.ID, ts, body))
	res, err := d.client.Do(req)
	if err != nil {
		if errors.Is(rctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil {
			return 0, fmt.Errorf("no answer within %s", d.cfg.Timeout)
		}
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, maxAnswerBytes))
	res.Body.Close()
	return res.StatusCode, nil
}

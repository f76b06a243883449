package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"runtime"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"

	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/comfy/dispatch"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/server"
	"github.com/comfyfarm/comfyfarm/webhook"
)

func init() {
	register(command{name: "serve", summary: "run the farm: HTTP API, scheduler, dispatch", run: cmdServe})
}

func cmdServe(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "serve", "[--config FILE] [--listen ADDR]")
	configPath := fs.String("config", "", "YAML configuration file (default: built-in defaults)")
	listen := fs.String("listen", "", "listen address, e.g. :9090 (overrides listen; public_url follows it when not set)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, log, err := loadConfig(e, *configPath)
	if err != nil {
		return err
	}
	if *listen != "" {
		if err := cfg.setListen(*listen); err != nil {
			return err
		}
	}
	// Listen first: a derived public_url takes the port of a ":0" listener.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	cfg.listening(ln.Addr())
	a, err := buildApp(ctx, cfg, log, e.stdout)
	if err != nil {
		ln.Close()
		return err
	}
	defer a.close()
	log.Info("comfyfarm listening", "addr", ln.Addr().String(), "public_url", cfg.PublicURL,
		"dashboard", strings.TrimRight(cfg.PublicURL, "/")+"/dashboard", "version", buildVersion())
	if e.ready != nil {
		e.ready(ln.Addr())
	}
	return a.run(ctx, ln)
}

// app is everything serve runs, wired from the configuration.
type app struct {
	cfg      *Config
	log      *slog.Logger
	secrets  *secrets
	metrics  *prometheus.Registry
	control  *dbcontrollers.DB
	registry *dbcontrollers.Registry
	store    oss.Store
	local    *oss.Local // set when storage.kind is local
	farm     *dispatch.Farm
	bus      *cluster.Redis // set when replicas share a Redis (cluster.redis_url)
	// controlStore is the control database's store, shared by the farm and
	// the webhook deliverer.
	controlStore   *dbcontrollers.Store
	webhookTargets *webhook.Targets
	jobs           server.JobService
	nodes          server.NodeService
	server         *server.Server

	// workers run beside the HTTP server until their context ends (see run).
	workers []func(ctx context.Context) error
	// closers release resources; close calls them in reverse order.
	closers []func() error
}

// buildApp opens and wires every part: secrets, metrics, the control
// database, the frontend registry, storage, the farm, the HTTP server.
func buildApp(ctx context.Context, cfg *Config, log *slog.Logger, out io.Writer) (_ *app, err error) {
	// a is not the named result: a failed build returns nil, and the deferred
	// close must still reach what was opened.
	a := &app{cfg: cfg, log: log}
	defer func() {
		if err != nil {
			a.close()
		}
	}()
	if a.secrets, err = loadSecrets(cfg.DataDir, cfg.AdminKey, out); err != nil {
		return nil, err
	}
	if cfg.Cluster.Secret != "" {
		// Replicas sign with one secret: a token one gives out, any checks.
		sum := sha256.Sum256([]byte("comfyfarm/cluster/" + cfg.Cluster.Secret))
		a.secrets.master = sum[:]
	}
	warnExampleKeys(cfg, log)

	a.metrics = prometheus.NewRegistry()
	a.metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildInfo())

	dbcfg := cfg.dbConfig(log)
	if a.control, err = dbcontrollers.OpenControl(ctx, dbcfg); err != nil {
		return nil, fmt.Errorf("control database: %w", err)
	}
	a.closers = append(a.closers, a.control.Close)
	a.controlStore = dbcontrollers.NewStore(a.control)
	if err := a.openWebhooks(); err != nil {
		return nil, err
	}
	if a.registry, err = dbcontrollers.NewRegistry(ctx, dbcfg, cfg.frontendConfigs()); err != nil {
		return nil, fmt.Errorf("frontends: %w", err)
	}
	a.closers = append(a.closers, a.registry.Close)

	if err := a.openStorage(); err != nil {
		return nil, err
	}
	if err := a.loadTemplates(ctx); err != nil {
		return nil, err
	}

	if err := a.openFarm(ctx); err != nil {
		return nil, err
	}

	keys := map[string][]string{}
	raw := map[string]bool{}
	for name, f := range cfg.Frontends {
		keys[name] = f.APIKeys
		raw[name] = f.RawWorkflowsAllowed()
	}
	deps := server.Deps{
		Logger:    log,
		Frontends: a.registry,
		Control:   a.control,
		Store:     a.store,
		Jobs:      a.jobs,
		Nodes:     a.nodes,
		Metrics:   a.metrics,
		Templates: dbcontrollers.NewStore(a.control),
		Webhooks:  webhookService{targets: a.webhookTargets, store: a.controlStore},
	}
	if a.local != nil {
		deps.Files = a.local
	}
	if a.farm != nil {
		deps.Scheduler = a.farm
	}
	if a.bus != nil {
		deps.Rates = a.bus // rate limits count once for all replicas
	}
	// The dashboard's charts: a sample of the farm every
	// dashboard.sample_interval, kept in memory, run beside the farm.
	counter, _ := a.jobs.(server.JobCounter)
	deps.Samples = server.NewSampler(server.SamplerConfig{
		Interval: cfg.Dashboard.SampleInterval,
		Logger:   log.With("component", "dashboard"),
	}, a.nodes, counter)
	a.workers = append(a.workers, deps.Samples.Run)
	a.server, err = server.New(server.Config{
		AdminKey:         a.secrets.adminKey,
		MetricsKey:       cfg.MetricsKey,
		FrontendKeys:     keys,
		MaxBodyBytes:     cfg.Limits.MaxBodyMB << 20,
		MaxUploadBytes:   int64(cfg.Limits.MaxUploadMB) << 20,
		TokenSecret:      a.secrets.derive("events-token"),
		TokenTTL:         cfg.Events.TokenTTL,
		KeepAlive:        cfg.Events.KeepAlive,
		ShutdownTimeout:  cfg.ShutdownTimeout,
		Version:          buildVersion(),
		RatePerMinute:    cfg.Limits.RatePerMinute,
		SubmitPerMinute:  cfg.Limits.SubmitPerMinute,
		TrustedProxies:   cfg.Server.TrustedProxies,
		MaxStreamsPerKey: cfg.Limits.MaxStreamsPerKey,
		MaxStreams:       cfg.Limits.MaxStreams,
		MaxGraphNodes:    cfg.Limits.MaxGraphNodes,
		RawWorkflows:     raw,
		PublicURL:        cfg.explicitPublicURL(),
	}, deps)
	if err != nil {
		return nil, err
	}
	if err := a.startWebhooks(); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *app) openStorage() error {
	cfg := a.cfg
	switch cfg.Storage.Kind {
	case "oss":
		o := cfg.Storage.OSS
		s, err := oss.NewAliyun(oss.AliyunConfig{
			Endpoint:        o.Endpoint,
			Bucket:          o.Bucket,
			AccessKeyID:     o.AccessKeyID,
			AccessKeySecret: o.AccessKeySecret,
			PublicBaseURL:   o.PublicBaseURL,
			SignURLs:        o.SignURLs,
			URLTTL:          o.URLTTL,
			AuthVersion:     o.AuthVersion,
			Region:          o.Region,
		})
		if err != nil {
			return fmt.Errorf("storage: %w", err)
		}
		a.store = s
	case "s3":
		o := cfg.Storage.S3
		s, err := oss.NewS3(oss.S3Config{
			Endpoint:        o.Endpoint,
			Region:          o.Region,
			Bucket:          o.Bucket,
			AccessKeyID:     o.AccessKeyID,
			SecretAccessKey: o.SecretAccessKey,
			PathStyle:       o.PathStyle,
			PublicBaseURL:   o.PublicBaseURL,
			SignURLs:        o.SignURLs,
			URLTTL:          o.URLTTL,
		})
		if err != nil {
			return fmt.Errorf("storage: %w", err)
		}
		a.store = s
	default:
		l, err := oss.NewLocal(oss.LocalConfig{
			Dir:      cfg.Storage.Local.Dir,
			BaseURL:  strings.TrimRight(cfg.PublicURL, "/") + "/files/",
			SignURLs: cfg.Storage.Local.SignURLs,
			Secret:   a.secrets.derive("files"),
			TTL:      cfg.Storage.Local.URLTTL,
		})
		if err != nil {
			return fmt.Errorf("storage: %w", err)
		}
		a.store, a.local = l, l
		a.closers = append(a.closers, l.Close)
	}
	return nil
}

// run serves on ln until ctx ends or a part fails, then shuts down in this
// order (each step waits for the one before):
//
//  1. the HTTP server stops accepting connections, ends every event stream and
//     gives in-flight requests shutdown_timeout to finish, so no new job
//     enters while the farm stops;
//  2. the workers (the dispatch farm, the webhook deliverer) are cancelled and
//     waited for; a job on a node keeps its lease and is reconciled on the
//     next start; a webhook request in flight is abandoned and recorded as
//     interrupted, due again at once (for this process's next start or
//     another process);
//  3. close (deferred by the caller) releases storage and the databases, in
//     reverse order of opening.
func (a *app) run(ctx context.Context, ln net.Listener) error {
	serverCtx, stopServer := context.WithCancel(ctx)
	defer stopServer()
	workersCtx, stopWorkers := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWorkers()

	var workers errgroup.Group
	for _, w := range a.workers {
		workers.Go(func() error {
			err := w(workersCtx)
			if workersCtx.Err() != nil {
				return nil // stopped on purpose
			}
			if err == nil {
				err = errors.New("a worker stopped by itself")
			}
			stopServer() // a failing worker brings the whole process down, in order
			return err
		})
	}
	serverErr := a.server.Run(serverCtx, ln) // step 1, once serverCtx ends
	stopWorkers()                            // step 2
	workerErr := workers.Wait()
	if err := errors.Join(serverErr, workerErr); err != nil {
		return err
	}
	a.log.Info("comfyfarm stopped")
	return nil
}

// close releases every resource, newest first.
func (a *app) close() {
	for _, c := range slices.Backward(a.closers) {
		if err := c(); err != nil {
			a.log.Warn("close", "err", err)
		}
	}
	a.closers = nil
}

// warnExampleKeys warns about frontend keys from the built-in example config.
func warnExampleKeys(cfg *Config, log *slog.Logger) {
	for name, f := range cfg.Frontends {
		for _, k := range f.APIKeys {
			if k == name+"-key" {
				log.Warn("frontend uses the example api key; set frontends."+name+".api_keys before exposing this server", "frontend", name)
			}
		}
	}
}

func (c *Config) dbConfig(log *slog.Logger) dbcontrollers.Config {
	return dbcontrollers.Config{
		Driver: c.Database.Driver,
		Path:   c.Database.Path,
		DSN:    c.Database.DSN,
		Prefix: c.Database.Prefix,
		Logger: log,
	}
}

func (c *Config) frontendConfigs() []dbcontrollers.FrontendConfig {
	var out []dbcontrollers.FrontendConfig
	for _, name := range slices.Sorted(maps.Keys(c.Frontends)) {
		f := c.Frontends[name]
		out = append(out, dbcontrollers.FrontendConfig{
			Name:            name,
			Controller:      f.Controller,
			Database:        f.Database,
			InitialCredits:  f.Credits.Initial,
			CostPerJob:      f.Credits.CostPerJob,
			Options:         f.Options,
			KeepTempOutputs: f.KeepTempOutputs,
		})
	}
	return out
}

// buildInfo is comfyfarm_build_info{version,goversion} 1: which build runs,
// to join with other series or to spot a mixed fleet.
func buildInfo() prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "comfyfarm_build_info",
		Help: "Always 1; the labels say which build runs.",
	}, []string{"version", "goversion"})
	g.WithLabelValues(buildVersion(), runtime.Version()).Set(1)
	return g
}

package main

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/schema"
)

//go:embed sample_workflow.json
var sampleWorkflow []byte

func init() {
	register(command{name: "demo", summary: "run the whole farm here: two fake GPU nodes, two frontends, a sample job", run: cmdDemo})
}

// cmdDemo runs the farm on embedded defaults with two fake ComfyUI nodes (one
// current, one of the v0.3.10 generation), submits sample jobs as the style
// frontend would, follows the first with a progress bar, prints the output
// URLs and keeps serving until interrupted.
func cmdDemo(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "demo", "[--config FILE] [--jobs N] [--exit]")
	configPath := fs.String("config", "", "YAML configuration file laid over the built-in defaults")
	jobs := fs.Int("jobs", 3, "sample jobs to submit (one is followed with a progress bar)")
	exit := fs.Bool("exit", false, "stop once the sample jobs are done instead of serving on")
	stepTime := fs.Duration("step-time", 150*time.Millisecond, "time of one sampler step on the fake nodes")
	verbose := fs.Bool("verbose", false, "log every request (the demo logs only warnings by default)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *jobs < 1 || *jobs > 100 {
		return fmt.Errorf("--jobs %d: want 1 to 100", *jobs)
	}
	cfg, log, err := loadConfig(e, *configPath)
	if err != nil {
		return err
	}
	if !*verbose {
		log = newLogger(e.stderr, LogConfig{Level: "warn", Format: cfg.Log.Format})
	}

	// Two fake GPU nodes: a farm mixes generations.
	fakeOpts := func(gen comfytest.Generation) comfytest.Options {
		return comfytest.Options{
			Generation:     gen,
			ClassTime:      map[string]time.Duration{"KSampler": 20 * *stepTime},
			CheckpointLoad: 10 * *stepTime,
			Previews:       true,
		}
	}
	gpu1 := comfytest.NewServer(fakeOpts(comfytest.GenCurrent))
	defer gpu1.Close()
	gpu2 := comfytest.NewServer(fakeOpts(comfytest.GenClassic))
	defer gpu2.Close()
	cfg.Nodes = []NodeConfig{
		{Name: "demo-gpu-1", URL: gpu1.URL(), MaxInflight: 1},
		{Name: "demo-gpu-2", URL: gpu2.URL(), MaxInflight: 1},
	}
	cfg.Scheduler.ProbeInterval = time.Second

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		// The usual port is taken: any free loopback port will do for a demo.
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		log.Warn("listen address taken, using another", "addr", ln.Addr().String())
	}
	if u, err := url.Parse(cfg.PublicURL); err == nil && u.Port() != "" {
		// Links must point where the demo really listens.
		if _, port, _ := net.SplitHostPort(ln.Addr().String()); port != u.Port() {
			u.Host = net.JoinHostPort(u.Hostname(), port)
			cfg.PublicURL = u.String()
		}
	}
	a, err := buildApp(ctx, cfg, log, e.stdout)
	if err != nil {
		ln.Close()
		return err
	}
	defer a.close()
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	runErr := make(chan error, 1)
	go func() { runErr <- a.run(runCtx, ln) }()

	base := strings.TrimRight(cfg.PublicURL, "/")
	if err := waitNodesUp(ctx, a, 30*time.Second); err != nil {
		stop()
		<-runErr
		return err
	}
	fmt.Fprintf(e.stdout, "\ncomfyfarm demo is running at %s\n", base)
	fmt.Fprintf(e.stdout, "  dashboard: %s/dashboard (admin key: %s)\n", base, a.secrets.adminKey)
	fmt.Fprintf(e.stdout, "  nodes:     demo-gpu-1 %s (ComfyUI v0.8 protocol), demo-gpu-2 %s (v0.3.10 protocol)\n", gpu1.URL(), gpu2.URL())
	fmt.Fprintf(e.stdout, "  frontends: style (key %q), logo (key %q)\n\n", firstKey(cfg, "style"), firstKey(cfg, "logo"))

	err = demoJobs(ctx, e, base, firstKey(cfg, "style"), *jobs)
	if err != nil && ctx.Err() == nil {
		fmt.Fprintf(e.stderr, "demo job: %v\n", err)
	}
	if *exit || ctx.Err() != nil {
		stop()
		return errors.Join(err, <-runErr)
	}
	fmt.Fprintf(e.stdout, "\nStill serving at %s — try:\n  go run ./cmd/comfyfarm submit --server %s --key %s --frontend style --workflow docs/examples/txt2img.json --wait\nCtrl-C stops.\n",
		base, base, firstKey(cfg, "style"))
	return <-runErr
}

func firstKey(cfg *Config, frontend string) string {
	if f, ok := cfg.Frontends[frontend]; ok && len(f.APIKeys) > 0 {
		return f.APIKeys[0]
	}
	return ""
}

// waitNodesUp waits until every configured node has been probed up.
func waitNodesUp(ctx context.Context, a *app, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		views, err := a.nodes.Nodes(ctx)
		if err != nil {
			return err
		}
		up := 0
		for _, v := range views {
			if v.State == schema.NodeUp {
				up++
			}
		}
		if up == len(a.cfg.Nodes) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the demo nodes did not come up within %v", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// demoJobs submits n sample jobs over HTTP, as a frontend's backend would,
// follows the last one (so the bar shows it waiting in the queue first) and
// prints the output URLs of all.
func demoJobs(ctx context.Context, e *env, base, key string, n int) error {
	c, err := newAPIClient(base, key)
	if err != nil {
		return err
	}
	// The style frontend charges a credit per job: top the demo user up, as
	// a frontend's backend does after a payment.
	topUp, _ := json.Marshal(map[string]any{"delta": n + 1, "reason": "demo top-up"})
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	req, err := c.request(rctx, "POST", "/api/v1/users/demo-user/credits?frontend=style", bytes.NewReader(topUp), "application/json")
	if err == nil {
		req.Header.Set("Idempotency-Key", fmt.Sprintf("demo-%d", time.Now().UnixNano()))
		err = c.do(rctx, req, nil)
	}
	cancel()
	if err != nil {
		return fmt.Errorf("top up credits: %w", err)
	}
	var subs []*submitAnswer
	for i := 0; i < n; i++ {
		graph := json.RawMessage(strings.Replace(string(sampleWorkflow), `"seed": 42`, fmt.Sprintf(`"seed": %d`, 42+i), 1))
		sub, err := submitJob(ctx, c, submitOptions{frontend: "style", user: "demo-user", metadata: `{"style":"watercolor"}`}, graph, nil)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "submitted job %s: %s, %d ahead\n", sub.ID, sub.State, sub.Position)
		subs = append(subs, sub)
	}
	last := subs[len(subs)-1]
	fmt.Fprintf(e.stdout, "following job %s:\n", last.ID)
	job, err := followJob(ctx, c, last.EventsURL, e.stdout, 0)
	if err != nil {
		return err
	}
	if job.State != schema.JobSucceeded {
		return fmt.Errorf("job %s ended %s", job.ID, job.State)
	}
	for _, s := range subs {
		var j schema.Job
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		req, err := c.request(rctx, "GET", "/api/v1/jobs/"+s.ID, nil, "")
		if err == nil {
			err = c.do(rctx, req, &j)
		}
		cancel()
		if err != nil {
			return err
		}
		for _, out := range j.Outputs {
			fmt.Fprintf(e.stdout, "job %s %s on %s: %s\n", j.ID, j.State, j.Node, out.URL)
		}
	}
	return demoTemplateJob(ctx, e, c)
}

// demoTemplateJob runs the style frontend's example template with a few
// inputs and waits for it in the submit request itself.
func demoTemplateJob(ctx context.Context, e *env, c *apiClient) error {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout+time.Minute)
	defer cancel()
	var j schema.Job
	err := c.call(rctx, "POST", "/api/v1/jobs?frontend=style&wait=60s", map[string]any{
		"user_id": "demo-user", "template": "portrait", "inputs": map[string]any{"width": 320, "height": 400, "sigma": 3},
	}, &j)
	if err != nil {
		return fmt.Errorf("template job: %w", err)
	}
	if j.State != schema.JobSucceeded {
		return fmt.Errorf("template job %s ended %s", j.ID, j.State)
	}
	for _, out := range j.Outputs {
		fmt.Fprintf(e.stdout, "template %s job %s: %s, node %s: %s\n", j.Template, j.ID, j.State, j.Node, out.URL)
	}
	return nil
}

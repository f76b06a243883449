package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

func init() {
	register(command{name: "bench", summary: "measure the farm's added latency and submit rate against fake or given ComfyUI nodes", run: cmdBench})
}

// benchGraph is a model-free workflow every ComfyUI runs: an image made,
// inverted and saved. color varies it, so ComfyUI's cache never answers.
func benchGraph(color int) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": %d}},
 "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
 "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}}`, color))
}

type benchOptions struct {
	nodes      []string // ComfyUI URLs; empty: two fake nodes in their own processes
	jobs       int      // trivial jobs in a row, per path
	burst      int      // jobs submitted at once
	submits    int      // submissions for the rate
	clients    int      // concurrent submitters
	classDur   time.Duration
	db         string // database of the submit rate: sqlite or mysql
	mysqlDSN   string
	subs       int           // event stream subscribers (0: skip)
	subJobs    int           // running jobs they follow
	sampler    time.Duration // sampler time of those jobs
	cpuProfile string
	// The subscribers run's child process.
	role, server, key, jobIDs string
}

func cmdBench(ctx context.Context, e *env, args []string) error {
	var o benchOptions
	var nodes stringList
	fs := newFlagSet(e, "bench", "[--node URL]... [--jobs 30] [--burst 20] [--submits 2000] [--clients 32] [--db sqlite|mysql] [--subscribers 1000]")
	fs.Var(&nodes, "node", "a ComfyUI server to measure against (repeatable); default: two fake nodes in their own processes")
	fs.IntVar(&o.jobs, "jobs", 30, "trivial jobs in a row, directly and through the farm")
	fs.IntVar(&o.burst, "burst", 20, "jobs submitted at once")
	fs.IntVar(&o.submits, "submits", 2000, "submissions for the submit rate (0: skip)")
	fs.IntVar(&o.clients, "clients", 32, "concurrent submitters for the submit rate")
	fs.DurationVar(&o.classDur, "class-time", time.Millisecond, "fake nodes: time of each workflow node")
	fs.StringVar(&o.db, "db", "sqlite", "database for the submit rate: sqlite (in a temporary folder) or mysql (--mysql-dsn; its databases are made for the run and dropped)")
	fs.StringVar(&o.mysqlDSN, "mysql-dsn", "root@tcp(127.0.0.1:3306)/", "MySQL/MariaDB server for --db mysql")
	fs.IntVar(&o.subs, "subscribers", 1000, "SSE subscribers on running jobs (0: skip; each is a connection in the server and in a client process)")
	fs.IntVar(&o.subJobs, "subscriber-jobs", 10, "running jobs the subscribers follow (one fake node each)")
	fs.DurationVar(&o.sampler, "subscriber-sampler", 10*time.Second, "sampler time of those jobs (200 progress events each)")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of this process (the farm's side of every run) to this file")
	fs.StringVar(&o.role, "role", "", "internal: run as the subscribers run's client process")
	fs.StringVar(&o.server, "server", "", "internal: the farm the client process connects to")
	fs.StringVar(&o.key, "key", "", "internal: the API key of the client process")
	fs.StringVar(&o.jobIDs, "job-ids", "", "internal: the jobs the client process follows")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if o.role == "subscribers" {
		return runSubscriberClients(ctx, e, o.server, o.key, o.subs, strings.Split(o.jobIDs, ","))
	}
	o.nodes = nodes
	if o.jobs < 1 || o.burst < 1 || o.clients < 1 || o.submits < 0 || o.subs < 0 || o.subJobs < 1 {
		return fmt.Errorf("--jobs, --burst, --clients and --subscriber-jobs must be at least 1")
	}
	if o.db != "sqlite" && o.db != "mysql" {
		return fmt.Errorf("--db %q: want sqlite or mysql", o.db)
	}
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	dir, err := os.MkdirTemp("", "comfyfarm-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	if len(o.nodes) == 0 {
		urls, stop, err := startSimProcesses(ctx, 2, o.classDur)
		if err != nil {
			return err
		}
		defer stop()
		o.nodes = urls
	}
	fmt.Fprintf(e.stdout, "nodes: %s\n", strings.Join(o.nodes, ", "))
	var rows [][]string

	base, key, stopFarm, err := benchFarm(ctx, e, filepath.Join(dir, "latency"), o.nodes, nil)
	if err != nil {
		return err
	}
	direct, err := benchDirect(ctx, o.nodes[0], o.jobs)
	if err != nil {
		stopFarm()
		return fmt.Errorf("direct: %w", err)
	}
	farm, err := benchViaFarm(ctx, base, key, o.jobs, 1)
	if err != nil {
		stopFarm()
		return fmt.Errorf("through the farm: %w", err)
	}
	slices.Sort(direct)
	slices.Sort(farm)
	rows = append(rows,
		[]string{fmt.Sprintf("trivial job, %d in a row, direct to ComfyUI", o.jobs), "p50 " + ms(pct(direct, 50)), "p90 " + ms(pct(direct, 90))},
		[]string{fmt.Sprintf("trivial job, %d in a row, through comfyfarm", o.jobs), "p50 " + ms(pct(farm, 50)), "p90 " + ms(pct(farm, 90))},
		[]string{"added by comfyfarm (queue, dispatch, storage, photo row)", "p50 +" + ms(pct(farm, 50)-pct(direct, 50)), "p90 +" + ms(pct(farm, 90)-pct(direct, 90))},
	)
	if len(o.nodes) >= 2 {
		// Two clients at once: directly, each on a node of its own; through
		// the farm, on the same two nodes.
		var direct2 []time.Duration
		var mu sync.Mutex
		var wg sync.WaitGroup
		var errs []error
		for k := range 2 {
			wg.Go(func() {
				d, err := benchDirect(ctx, o.nodes[k], o.jobs)
				mu.Lock()
				defer mu.Unlock()
				direct2 = append(direct2, d...)
				errs = append(errs, err)
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			stopFarm()
			return fmt.Errorf("direct, 2 clients: %w", err)
		}
		farm2, err := benchViaFarm(ctx, base, key, 2*o.jobs, 2)
		if err != nil {
			stopFarm()
			return fmt.Errorf("through the farm, 2 clients: %w", err)
		}
		slices.Sort(direct2)
		slices.Sort(farm2)
		rows = append(rows,
			[]string{"2 clients at once, direct (a node each)", "p50 " + ms(pct(direct2, 50)), "p90 " + ms(pct(direct2, 90))},
			[]string{"2 clients at once, through comfyfarm (2 nodes)", "p50 " + ms(pct(farm2, 50)), "p90 " + ms(pct(farm2, 90))},
			[]string{"added by comfyfarm, 2 clients", "p50 +" + ms(pct(farm2, 50)-pct(direct2, 50)), "p90 +" + ms(pct(farm2, 90)-pct(direct2, 90))},
		)
	}
	start := time.Now()
	if _, err := benchViaFarm(ctx, base, key, o.burst, o.burst); err != nil {
		stopFarm()
		return fmt.Errorf("burst: %w", err)
	}
	rows = append(rows, []string{fmt.Sprintf("%d jobs at once on %d nodes, all done", o.burst, len(o.nodes)), ms(time.Since(start)), ""})
	stopFarm()

	if o.submits > 0 {
		// A node that holds every prompt: the queue only grows.
		held := comfytest.NewServer(comfytest.Options{})
		defer held.Close()
		held.Hold()
		var mod func(*Config)
		dbName := "SQLite"
		if o.db == "mysql" {
			prefix := fmt.Sprintf("comfyfarm_bench_%d", time.Now().UnixNano())
			defer func() {
				if err := dbcontrollers.DropPrefix(o.mysqlDSN, prefix); err != nil {
					fmt.Fprintf(e.stderr, "bench: drop databases %s*: %v\n", prefix, err)
				}
			}()
			mod = func(c *Config) { c.Database = DatabaseConfig{Driver: "mysql", DSN: o.mysqlDSN, Prefix: prefix} }
			dbName = "MySQL"
		}
		base, key, stopFarm, err := benchFarm(ctx, e, filepath.Join(dir, "submit"), []string{held.URL()}, mod)
		if err != nil {
			return err
		}
		rate, first, last, err := benchSubmits(ctx, base, key, o.submits, o.clients)
		stopFarm()
		if err != nil {
			return fmt.Errorf("submit rate: %w", err)
		}
		rows = append(rows,
			[]string{fmt.Sprintf("submits, %d clients, queue 0 to %d (%s)", o.clients, o.submits, dbName), fmt.Sprintf("%.0f/s", rate), ""},
			[]string{"  first and last 10% of them", fmt.Sprintf("%.0f/s", first), fmt.Sprintf("%.0f/s", last)},
		)
	}

	if o.subs > 0 {
		sub, err := benchSubscribers(ctx, e, filepath.Join(dir, "subscribers"), o.subs, o.subJobs, o.sampler, 200)
		if err != nil {
			return fmt.Errorf("subscribers: %w", err)
		}
		rows = append(rows, sub...)
	}

	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nMEASURE\tRESULT\t")
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t")+"\t")
	}
	return tw.Flush()
}

// startSimProcesses runs n fake ComfyUI nodes as `comfyfarm sim` processes
// on free loopback ports and returns their URLs.
func startSimProcesses(ctx context.Context, n int, classTime time.Duration) ([]string, func(), error) {
	self, err := os.Executable()
	if err != nil {
		return nil, nil, err
	}
	var cmds []*exec.Cmd
	stop := func() {
		for _, c := range cmds {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}
	var urls []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			stop()
			return nil, nil, err
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		cmd := exec.CommandContext(ctx, self, "sim", "--port", strconv.Itoa(port), "--class-time", classTime.String(), "--log-level", "warn")
		if err := cmd.Start(); err != nil {
			stop()
			return nil, nil, err
		}
		cmds = append(cmds, cmd)
		urls = append(urls, fmt.Sprintf("http://127.0.0.1:%d", port))
	}
	for _, u := range urls {
		if err := waitHTTP(ctx, u+"/system_stats", 20*time.Second); err != nil {
			stop()
			return nil, nil, err
		}
	}
	return urls, stop, nil
}

func waitHTTP(ctx context.Context, u string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		res, err := http.Get(u)
		if err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not answer within %v", u, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// benchFarm starts the farm in this process on the built-in defaults (SQLite
// and local storage in dir) with the given nodes, and returns its address and
// the logo frontend's key.
func benchFarm(ctx context.Context, e *env, dir string, nodes []string, mod func(*Config)) (string, string, func(), error) {
	cfg, _, err := LoadConfig("", nil)
	if err != nil {
		return "", "", nil, err
	}
	cfg.DataDir, cfg.Database.Path, cfg.Storage.Local.Dir = dir, dir, filepath.Join(dir, "files")
	cfg.Listen = "127.0.0.1:0"
	cfg.Limits.RatePerMinute, cfg.Limits.SubmitPerMinute = 0, 0
	cfg.Scheduler.ProbeInterval = time.Second
	cfg.Nodes = nil
	for i, u := range nodes {
		cfg.Nodes = append(cfg.Nodes, NodeConfig{Name: fmt.Sprintf("bench-%d", i+1), URL: u, MaxInflight: 1, Tags: []string{}})
	}
	if mod != nil {
		mod(cfg)
	}
	log := newLogger(io.Discard, LogConfig{Level: "error", Format: "text"})
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return "", "", nil, err
	}
	cfg.listening(ln.Addr())
	a, err := buildApp(ctx, cfg, log, io.Discard)
	if err != nil {
		ln.Close()
		return "", "", nil, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.run(runCtx, ln) }()
	stop := func() {
		cancel()
		<-done
		a.close()
	}
	if err := waitNodesUp(ctx, a, 30*time.Second); err != nil {
		stop()
		return "", "", nil, err
	}
	if err := waitHTTP(ctx, "http://"+ln.Addr().String()+"/readyz", 30*time.Second); err != nil {
		stop()
		return "", "", nil, err
	}
	return "http://" + ln.Addr().String(), firstKey(cfg, "logo"), stop, nil
}

// benchDirect runs n trivial jobs one after another straight on a ComfyUI
// node, as a client of ComfyUI alone would: post the prompt, wait on the
// WebSocket for its end, read its history, download the output.
func benchDirect(ctx context.Context, node string, n int) ([]time.Duration, error) {
	u, err := url.Parse(node)
	if err != nil {
		return nil, err
	}
	clientID := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	ws, _, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+u.Host+"/ws?clientId="+clientID, nil)
	if err != nil {
		return nil, err
	}
	defer ws.Close()
	var out []time.Duration
	for i := range n {
		start := time.Now()
		body, _ := json.Marshal(map[string]any{"prompt": benchGraph(1000 + i), "client_id": clientID})
		res, err := http.Post(node+"/prompt", "application/json", bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		var posted struct {
			PromptID string `json:"prompt_id"`
		}
		err = json.NewDecoder(res.Body).Decode(&posted)
		res.Body.Close()
		if err != nil || res.StatusCode != 200 {
			return nil, fmt.Errorf("post prompt: %d %v", res.StatusCode, err)
		}
		if err := waitPromptDone(ws, posted.PromptID); err != nil {
			return nil, err
		}
		file, err := firstOutput(node, posted.PromptID)
		if err != nil {
			return nil, err
		}
		if err := download(node + "/view?" + file); err != nil {
			return nil, err
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

// waitPromptDone reads ComfyUI's WebSocket until the prompt has ended:
// executing with node null, which ComfyUI sends once the history is written
// (execution_success comes before that).
func waitPromptDone(ws *websocket.Conn, pid string) error {
	_ = ws.SetReadDeadline(time.Now().Add(60 * time.Second))
	for {
		typ, data, err := ws.ReadMessage()
		if err != nil {
			return err
		}
		if typ != websocket.TextMessage {
			continue
		}
		var m struct {
			Type string `json:"type"`
			Data struct {
				PromptID string          `json:"prompt_id"`
				Node     json.RawMessage `json:"node"`
			} `json:"data"`
		}
		if json.Unmarshal(data, &m) != nil || m.Data.PromptID != pid {
			continue
		}
		switch {
		case m.Type == "executing" && (len(m.Data.Node) == 0 || string(m.Data.Node) == "null"):
			return nil
		case m.Type == "execution_error":
			return fmt.Errorf("prompt %s failed: %s", pid, data)
		}
	}
}

// firstOutput reads a prompt's history and returns the query of its first
// output file for /view.
func firstOutput(node, pid string) (string, error) {
	res, err := http.Get(node + "/history/" + pid)
	if err != nil {
		return "", err
	}
	defer res.Body.Close()
	var h map[string]struct {
		Outputs map[string]map[string]json.RawMessage `json:"outputs"`
	}
	if err := json.NewDecoder(res.Body).Decode(&h); err != nil {
		return "", err
	}
	for _, out := range h[pid].Outputs {
		var files []struct{ Filename, Subfolder, Type string }
		if json.Unmarshal(out["images"], &files) == nil && len(files) > 0 {
			return url.Values{"filename": {files[0].Filename}, "subfolder": {files[0].Subfolder}, "type": {files[0].Type}}.Encode(), nil
		}
	}
	return "", fmt.Errorf("prompt %s has no output image", pid)
}

func download(u string) error {
	res, err := http.Get(u)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	n, err := io.Copy(io.Discard, res.Body)
	if err != nil || res.StatusCode != 200 || n == 0 {
		return fmt.Errorf("GET %s: %d, %d bytes, %v", u, res.StatusCode, n, err)
	}
	return nil
}

// benchViaFarm runs n trivial jobs through the farm, `parallel` at a time:
// submit, follow the job's events to its end, download its output. It
// returns each job's time.
func benchViaFarm(ctx context.Context, base, key string, n, parallel int) ([]time.Duration, error) {
	c, err := newAPIClient(base, key)
	if err != nil {
		return nil, err
	}
	var (
		mu   sync.Mutex
		out  []time.Duration
		errs []error
		next atomic.Int64
		wg   sync.WaitGroup
	)
	for range parallel {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				start := time.Now()
				err := oneFarmJob(ctx, c, base, i)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					out = append(out, time.Since(start))
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

func oneFarmJob(ctx context.Context, c *apiClient, base string, i int) error {
	sub, err := submitJob(ctx, c, submitOptions{user: "bench"}, benchGraph(i%256), nil)
	if err != nil {
		return err
	}
	var job *schema.Job
	_, _, err = streamEvents(ctx, c, apiPath(sub.EventsURL), "", func(_ string, ev schema.Event) {
		if ev.Type == schema.EventSucceeded {
			job = &schema.Job{Outputs: ev.Outputs}
		}
	})
	if err != nil && job == nil {
		return err
	}
	if job == nil || len(job.Outputs) == 0 {
		return fmt.Errorf("job %s did not succeed", sub.ID)
	}
	u := job.Outputs[0].URL
	if strings.HasPrefix(u, "/") {
		u = base + u
	}
	return download(u)
}

// benchSubmits submits n jobs from `clients` goroutines and returns the rate
// over all of them and over the first and the last tenth.
func benchSubmits(ctx context.Context, base, key string, n, clients int) (all, first, last float64, err error) {
	c, err := newAPIClient(base, key)
	if err != nil {
		return 0, 0, 0, err
	}
	c.http = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	done := make([]time.Time, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	start := time.Now()
	for range clients {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if _, err := submitJob(ctx, c, submitOptions{user: "bench"}, benchGraph(i%256), nil); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					return
				}
				done[i] = time.Now()
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, 0, 0, err
	}
	end := time.Now()
	slices.SortFunc(done, func(a, b time.Time) int { return a.Compare(b) })
	tenth := max(n/10, 1)
	rate := func(from, to time.Time, k int) float64 { return float64(k) / to.Sub(from).Seconds() }
	return rate(start, end, n), rate(start, done[tenth-1], tenth), rate(done[n-tenth-1], done[n-1], tenth), nil
}

// pct is the p-th percentile of sorted durations.
func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := min((len(sorted)*p+99)/100-1, len(sorted)-1)
	return sorted[max(i, 0)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

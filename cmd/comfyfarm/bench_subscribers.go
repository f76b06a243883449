package main

import (
	"bufio"
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
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// The subscribers run: many event streams on a few running jobs. The farm
// runs in this process with fake nodes (comfytest, in this process too, on
// loopback) whose sampler sends a progress frame every few tens of
// milliseconds; the SSE clients run in a child process (`comfyfarm bench
// --role subscribers`), so that this process's memory is the server's. The
// child reports, per progress event, how long after the first client each
// client received it.

// subscriberGraph is a sampling workflow on the fake's classes: steps
// progress frames over the sampler's time.
func subscriberGraph(steps, seed int) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "bench", "clip": ["4", 1]}},
 "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": %d, "steps": %d, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}}}`, seed, steps))
}

// subscriberReport is what the client process prints when its streams end.
type subscriberReport struct {
	Streams  int     `json:"streams"`
	Failed   int     `json:"failed"`
	Events   int     `json:"events"` // progress events received, over all streams
	LagP50MS float64 `json:"lag_p50_ms"`
	LagP99MS float64 `json:"lag_p99_ms"`
	LagMaxMS float64 `json:"lag_max_ms"`
}

// benchSubscribers opens n streams spread over jobs running jobs and
// returns the table rows.
func benchSubscribers(ctx context.Context, e *env, dir string, n, jobs int, sampler time.Duration, steps int) ([][]string, error) {
	var fakes []*comfytest.Server
	var urls []string
	for range jobs {
		s := comfytest.NewServer(comfytest.Options{
			ClassTime:        map[string]time.Duration{"KSampler": sampler},
			DefaultClassTime: time.Millisecond,
		})
		defer s.Close()
		s.Hold() // the jobs start once every stream is open
		fakes = append(fakes, s)
		urls = append(urls, s.URL())
	}
	base, key, stopFarm, err := benchFarm(ctx, e, dir, urls, func(c *Config) {
		c.Limits.MaxStreams = n + 100
		c.Limits.MaxStreamsPerKey = n + 100
	})
	if err != nil {
		return nil, err
	}
	defer stopFarm()
	c, err := newAPIClient(base, key)
	if err != nil {
		return nil, err
	}
	var ids []string
	for i := range jobs {
		sub, err := submitJob(ctx, c, submitOptions{user: "bench"}, subscriberGraph(steps, i), nil)
		if err != nil {
			return nil, err
		}
		ids = append(ids, sub.ID)
	}
	for _, id := range ids {
		if err := waitJobState(ctx, c, id, schema.JobDispatched, 30*time.Second); err != nil {
			return nil, err
		}
	}
	baseRSS, baseHeap := memNow()

	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, self, "bench", "--role", "subscribers", "--server", base, "--key", key,
		"--subscribers", strconv.Itoa(n), "--job-ids", strings.Join(ids, ","))
	cmd.Stderr = e.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	lines := bufio.NewScanner(out)
	if !lines.Scan() || lines.Text() != "connected" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("subscriber process: %q, %v", lines.Text(), lines.Err())
	}
	// fasthttp keeps the workers that served the streams' requests idle for
	// 10 s before they exit: measure the streams' own memory after that.
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(11 * time.Second):
	}
	openRSS, openHeap := memNow()
	// Every stream is open: run the jobs, and watch memory while events flow.
	var peakRSS atomic.Uint64
	peakRSS.Store(openRSS)
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopWatch:
				return
			case <-t.C:
				if r := rssNow(); r > peakRSS.Load() {
					peakRSS.Store(r)
				}
			}
		}
	}()
	for _, s := range fakes {
		s.Release()
	}
	var rep subscriberReport
	if lines.Scan() {
		err = json.Unmarshal(lines.Bytes(), &rep)
	} else {
		err = fmt.Errorf("subscriber process gave no report: %v", lines.Err())
	}
	close(stopWatch)
	<-watched
	if werr := cmd.Wait(); err == nil && werr != nil {
		err = fmt.Errorf("subscriber process: %w", werr)
	}
	if err != nil {
		return nil, err
	}
	per := func(a, b uint64) string {
		if a < b {
			return "0 KiB"
		}
		return fmt.Sprintf("%.1f KiB", float64(a-b)/float64(n)/1024)
	}
	return [][]string{
		{fmt.Sprintf("%d SSE subscribers on %d running jobs (%d failed)", rep.Streams, jobs, rep.Failed),
			fmt.Sprintf("%d progress events delivered", rep.Events), ""},
		{"  progress lag behind the first subscriber", fmt.Sprintf("p50 %.1f ms", rep.LagP50MS), fmt.Sprintf("p99 %.1f ms  max %.1f ms", rep.LagP99MS, rep.LagMaxMS)},
		{"  server memory per open stream (RSS)", per(openRSS, baseRSS) + " idle", per(peakRSS.Load(), baseRSS) + " peak while streaming"},
		{"  server heap and stacks in use per open stream", per(openHeap, baseHeap) + " idle", ""},
	}, nil
}

// waitJobState polls a job until it reached state (or any state after it).
func waitJobState(ctx context.Context, c *apiClient, id string, state schema.JobState, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		var j schema.Job
		if err := c.call(ctx, http.MethodGet, "/api/v1/jobs/"+id, nil, &j); err != nil {
			return err
		}
		if j.State == state || j.State == schema.JobRunning || j.State.Terminal() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("job %s still %s after %v", id, j.State, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// memNow is the process's resident set and the Go heap and goroutine
// stacks in use, after garbage collection (twice: a stack shrinks by half
// per collection when mostly unused) and after the freed memory was given
// back to the system.
func memNow() (rss, heap uint64) {
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return rssNow(), ms.HeapInuse + ms.StackInuse
}

// rssNow reads VmRSS from /proc/self/status (0 where there is none).
func rssNow() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// runSubscriberClients is the child process of the subscribers run: n SSE
// streams spread over the jobs, each read to its terminal event. It prints
// "connected" once every stream has its snapshot, and its report as JSON
// when they have all ended.
func runSubscriberClients(ctx context.Context, e *env, base, key string, n int, ids []string) error {
	if len(ids) == 0 || n < 1 {
		return errors.New("--role subscribers needs --job-ids and --subscribers")
	}
	type receipt struct {
		job int
		seq int64
		at  time.Time
	}
	var (
		connected sync.WaitGroup
		done      sync.WaitGroup
		mu        sync.Mutex
		all       [][]receipt
		failed    atomic.Int64
	)
	connected.Add(n)
	for i := range n {
		job := i % len(ids)
		done.Go(func() {
			first := true
			ready := func() {
				if first {
					first = false
					connected.Done()
				}
			}
			defer ready()
			got, err := readStream(ctx, base, "/api/v1/jobs/"+ids[job]+"/events", key, ready)
			if err != nil {
				failed.Add(1)
				return
			}
			rs := make([]receipt, len(got))
			for k, g := range got {
				rs[k] = receipt{job, g.seq, g.at}
			}
			mu.Lock()
			all = append(all, rs)
			mu.Unlock()
		})
		if i%500 == 499 {
			time.Sleep(20 * time.Millisecond) // let the server's accept loop breathe
		}
	}
	connected.Wait()
	fmt.Fprintln(e.stdout, "connected")
	done.Wait()

	type key2 struct {
		job int
		seq int64
	}
	firstAt := map[key2]time.Time{}
	events := 0
	for _, rs := range all {
		for _, r := range rs {
			k := key2{r.job, r.seq}
			if t, ok := firstAt[k]; !ok || r.at.Before(t) {
				firstAt[k] = r.at
			}
			events++
		}
	}
	lags := make([]time.Duration, 0, events)
	for _, rs := range all {
		for _, r := range rs {
			lags = append(lags, r.at.Sub(firstAt[key2{r.job, r.seq}]))
		}
	}
	slices.Sort(lags)
	msf := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	rep := subscriberReport{Streams: n, Failed: int(failed.Load()), Events: events}
	if len(lags) > 0 {
		rep.LagP50MS, rep.LagP99MS, rep.LagMaxMS = msf(pct(lags, 50)), msf(pct(lags, 99)), msf(lags[len(lags)-1])
	}
	return json.NewEncoder(e.stdout).Encode(rep)
}

type progressReceipt struct {
	seq int64
	at  time.Time
}

// readStream reads one job's SSE stream to its terminal event over a raw
// connection (an HTTP/1.1 GET written by hand, one goroutine and a 4 KiB
// buffer per stream, so that the clients take as little of the machine as
// they can), calls ready after the first event, and returns when each
// progress event arrived. Only the id and event lines are looked at.
func readStream(ctx context.Context, base, path, key string, ready func()) ([]progressReceipt, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	req := "GET " + path + " HTTP/1.1\r\nHost: " + u.Host + "\r\nAuthorization: Bearer " + key +
		"\r\nAccept: text/event-stream\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(conn, 4<<10)
	status, err := br.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	if !bytes.Contains(status, []byte(" 200 ")) {
		return nil, fmt.Errorf("GET %s: %s", path, bytes.TrimSpace(status))
	}
	var out []progressReceipt
	var seq int64
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A long data line (a snapshot): skip the rest of it.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return out, errors.New("stream ended before the job")
			}
			return out, err
		}
		switch {
		case bytes.HasPrefix(line, []byte("id: ")):
			seq, _ = strconv.ParseInt(string(bytes.TrimSpace(line[4:])), 10, 64)
		case bytes.HasPrefix(line, []byte("event: ")):
			typ := schema.EventType(bytes.TrimSpace(line[7:]))
			ready()
			if typ == schema.EventProgress {
				out = append(out, progressReceipt{seq, time.Now()})
			}
			if typ.Terminal() {
				return out, nil
			}
		}
	}
}

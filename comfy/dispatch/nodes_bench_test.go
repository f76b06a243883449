package dispatch

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// The farm benchmark probes many loopback ComfyUI stand-ins on the real
// schedule and reports the prober's CPU use and how late probes start. The
// stand-ins run in a child process (this test binary, re-run in server mode)
// so the CPU measured with getrusage(RUSAGE_SELF) is the prober's alone.
//
//	COMFYFARM_BENCH=1 go test -run TestProbeFarmBench -v ./comfy/dispatch/
//
// Knobs: COMFYFARM_BENCH_NODES (500), COMFYFARM_BENCH_INTERVAL (5s),
// COMFYFARM_BENCH_ROUNDS (4).

const benchServersEnv = "COMFYFARM_PROBE_BENCH_SERVERS"

// TestProbeBenchServers is the child process: it serves N stand-ins, prints
// their addresses, and exits when its stdin closes.
func TestProbeBenchServers(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv(benchServersEnv))
	if n <= 0 {
		t.Skip("server mode of the farm benchmark")
	}
	stats := traceBody(t, "comfy-traces-current/system_stats.json", "/system_stats")
	queue := traceBody(t, "comfy-traces-current/e_multi_queue.json", "/queue")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		switch r.URL.Path {
		case "/system_stats":
			_, _ = w.Write(stats)
		case "/queue":
			_, _ = w.Write(queue)
		default:
			http.NotFound(w, r)
		}
	}), ReadHeaderTimeout: 10 * time.Second}
	out := bufio.NewWriter(os.Stdout)
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listener: %v", err)
		}
		go func() { _ = srv.Serve(ln) }()
		fmt.Fprintf(out, "ADDR %s\n", ln.Addr())
	}
	fmt.Fprintln(out, "READY")
	out.Flush()
	_, _ = io.Copy(io.Discard, os.Stdin)
	srv.Close()
}

func benchEnvInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func TestProbeFarmBench(t *testing.T) {
	if os.Getenv("COMFYFARM_BENCH") != "1" {
		t.Skip("set COMFYFARM_BENCH=1 to run the farm probe benchmark")
	}
	nodes := benchEnvInt("COMFYFARM_BENCH_NODES", 500)
	rounds := benchEnvInt("COMFYFARM_BENCH_ROUNDS", 4)
	interval := 5 * time.Second
	if d, err := time.ParseDuration(os.Getenv("COMFYFARM_BENCH_INTERVAL")); err == nil && d > 0 {
		interval = d
	}

	cmd := exec.Command(os.Args[0], "-test.run=^TestProbeBenchServers$", "-test.count=1")
	cmd.Env = append(os.Environ(), benchServersEnv+"="+strconv.Itoa(nodes))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var addrs []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		if line == "READY" {
			break
		}
		if a, ok := strings.CutPrefix(line, "ADDR "); ok {
			addrs = append(addrs, a)
		}
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	defer func() {
		stdin.Close()
		_ = cmd.Wait()
	}()
	if len(addrs) != nodes {
		t.Fatalf("server process started %d of %d stand-ins", len(addrs), nodes)
	}

	var mu sync.Mutex
	var lags, lats []time.Duration
	perNode := map[string]int{}
	failed := 0
	n := NewNodes(newMemStore(), ProbeConfig{Interval: interval}, slog.New(slog.DiscardHandler))
	n.onProbeFunc = func(r probeRecord) {
		mu.Lock()
		defer mu.Unlock()
		lags = append(lags, r.Started.Sub(r.Due))
		lats = append(lats, time.Duration(r.Result.LatencyMS*float64(time.Millisecond)))
		perNode[r.Name]++
		if !r.Result.ComfyOK {
			failed++
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i, a := range addrs {
		if _, err := n.Add(ctx, schema.Node{Name: fmt.Sprintf("gpu-%03d", i), URL: "http://" + a}); err != nil {
			t.Fatal(err)
		}
	}

	runtime.GC()
	cpu0, wall0 := cpuTime(), time.Now()
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	// The first probe of each node comes within Jitter of an interval; then
	// one every interval (±10%). rounds+0.5 intervals give every node at
	// least `rounds` probes.
	// The steady state is measured from the end of the first round (every
	// node's full probe and the opening of its kept connection) on.
	time.Sleep(interval + interval/2)
	mu.Lock()
	probes1 := len(lags)
	mu.Unlock()
	cpu1, wall1 := cpuTime(), time.Now()
	time.Sleep(time.Duration(float64(rounds-1) * float64(interval)))
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	goroutines := runtime.NumGoroutine()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	cpu, wall := cpuTime()-cpu0, time.Since(wall0)
	cpuSteady, wallSteady := cpuTime()-cpu1, time.Since(wall1)

	mu.Lock()
	defer mu.Unlock()
	minRounds := len(lags)
	for i := range nodes {
		minRounds = min(minRounds, perNode[fmt.Sprintf("gpu-%03d", i)])
	}
	up := 0
	for _, v := range n.List() {
		if v.State == schema.NodeUp {
			up++
		}
	}
	stdin.Close()
	_ = cmd.Wait()
	var serverCPU time.Duration
	if cmd.ProcessState != nil {
		serverCPU = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}

	t.Logf("nodes %d, interval %s, wall %s, probes %d (failed %d), every node probed >= %d times, up at end %d",
		nodes, interval, wall.Round(time.Millisecond), len(lags), failed, minRounds, up)
	t.Logf("prober CPU %s = %.2f%% of one core; %.0f µs CPU per probe",
		cpu.Round(time.Millisecond), 100*cpu.Seconds()/wall.Seconds(), float64(cpu.Microseconds())/float64(max(1, len(lags))))
	t.Logf("steady state (after the first round): %s CPU over %s = %.2f%% of one core; %.0f µs CPU per probe",
		cpuSteady.Round(time.Millisecond), wallSteady.Round(time.Millisecond), 100*cpuSteady.Seconds()/wallSteady.Seconds(),
		float64(cpuSteady.Microseconds())/float64(max(1, len(lags)-probes1)))
	t.Logf("probe lag (scheduled -> started): p50 %s, p99 %s, max %s",
		percentile(lags, .5), percentile(lags, .99), percentile(lags, 1))
	t.Logf("probe latency: p50 %s, p99 %s, max %s",
		percentile(lats, .5).Round(time.Microsecond), percentile(lats, .99).Round(time.Microsecond), percentile(lats, 1).Round(time.Microsecond))
	t.Logf("heap in use %.1f MiB, goroutines %d; stand-in process CPU %s (whole life, incl. start-up)",
		float64(ms.HeapInuse)/(1<<20), goroutines, serverCPU.Round(time.Millisecond))
	if minRounds < 3 {
		t.Errorf("some node was probed only %d times, want >= 3 rounds", minRounds)
	}
	if failed > 0 {
		t.Errorf("%d probes of healthy stand-ins failed", failed)
	}
}

// BenchmarkProbe measures one probe (connect, /system_stats, /queue) of a
// loopback stand-in.
func BenchmarkProbe(b *testing.B) {
	f := newTraceServer(b, "comfy-traces-current")
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if res := Probe(ctx, f.URL(), 5*time.Second); !res.ComfyOK {
			b.Fatal(res.Error)
		}
	}
}

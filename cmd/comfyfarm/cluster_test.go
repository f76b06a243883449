package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/internal/redistest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// clusterLease is the scheduler's lease in the cluster tests.
const clusterLease = 2 * time.Second

// clusterEnv is a farm of comfyfarm replicas, each its own process of the
// binary the Dockerfile builds, on one MariaDB control database, one Redis
// and one storage folder (a shared volume), in front of fake nodes.
type clusterEnv struct {
	t        *testing.T
	bin      string
	dir      string
	conf     string
	env      []string
	fakes    []*comfytest.Server
	replicas []*replicaProc
}

type replicaProc struct {
	name string
	addr string
	logs *syncBuffer
	// run is the current process: replaced by start while the test's
	// clients look at it from their goroutines.
	run atomic.Pointer[procRun]
}

type procRun struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

func (r *replicaProc) base() string { return "http://" + r.addr }

func (r *replicaProc) alive() bool {
	p := r.run.Load()
	if p == nil {
		return false
	}
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// signal sends sig to the current process.
func (r *replicaProc) signal(sig os.Signal) error { return r.run.Load().cmd.Process.Signal(sig) }

// exited is closed when the current process has ended.
func (r *replicaProc) exited() <-chan struct{} { return r.run.Load().exited }

// newClusterEnv starts n replicas on nodes fake nodes.
func newClusterEnv(t *testing.T, n, nodes int, nodeOpts comfytest.Options) *clusterEnv {
	t.Helper()
	db := dbtest.MySQL(t)
	redisURL, prefix := redistest.URL(t)
	c := &clusterEnv{t: t, bin: dockerfileBinary(t), dir: t.TempDir()}
	var conf strings.Builder
	conf.WriteString("nodes:\n")
	for i := range nodes {
		f := comfytest.NewServer(nodeOpts)
		t.Cleanup(f.Close)
		c.fakes = append(c.fakes, f)
		fmt.Fprintf(&conf, "  - {name: gpu-%d, url: %q, max_inflight: 2}\n", i+1, f.URL())
	}
	fmt.Fprintf(&conf, `scheduler: {probe_interval: 100ms, leader_lease: %s}
frontends:
  style: {api_keys: [style-key], controller: style, credits: {initial: 1000, cost_per_job: 1}}
  logo: {api_keys: [logo-key], controller: logo}
limits: {rate_per_minute: 0, submit_per_minute: 0}
`, clusterLease)
	c.conf = filepath.Join(c.dir, "comfyfarm.yaml")
	if err := os.WriteFile(c.conf, []byte(conf.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	c.env = append(os.Environ(),
		"COMFYFARM_ADMIN_KEY="+testAdminKey, "COMFYFARM_LOG_LEVEL=warn",
		"COMFYFARM_DATABASE_DRIVER=mysql", "COMFYFARM_DATABASE_DSN="+db.DSN, "COMFYFARM_DATABASE_PREFIX="+db.Prefix,
		"COMFYFARM_CLUSTER_REDIS_URL="+redisURL, "COMFYFARM_CLUSTER_REDIS_PREFIX="+prefix,
		"COMFYFARM_CLUSTER_SECRET=cluster-test-secret-0123456789abcdef",
		"COMFYFARM_STORAGE_LOCAL_DIR="+filepath.Join(c.dir, "files"))
	for i := range n {
		r := &replicaProc{name: fmt.Sprintf("r%d", i+1)}
		c.replicas = append(c.replicas, r)
		c.start(i)
	}
	for i := range n {
		c.waitReady(i)
	}
	t.Cleanup(func() {
		for _, r := range c.replicas {
			if r.alive() {
				_ = r.signal(syscall.SIGKILL)
				<-r.exited()
			}
		}
		if t.Failed() {
			for _, r := range c.replicas {
				t.Logf("logs of %s:\n%s", r.name, r.logs.String())
			}
		}
	})
	return c
}

// start runs replica i (again), on its old address when it had one.
func (c *clusterEnv) start(i int) {
	t := c.t
	r := c.replicas[i]
	if r.addr == "" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		r.addr = ln.Addr().String()
		ln.Close()
	}
	data := filepath.Join(c.dir, r.name)
	cmd := exec.Command(c.bin, "serve", "--config", c.conf, "--listen", r.addr)
	cmd.Dir = c.dir
	cmd.Env = append(c.env, "COMFYFARM_DATA_DIR="+data, "COMFYFARM_SCHEDULER_INSTANCE_ID="+r.name)
	if r.logs == nil {
		r.logs = &syncBuffer{}
	}
	cmd.Stdout, cmd.Stderr = r.logs, r.logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &procRun{cmd: cmd, exited: make(chan struct{})}
	r.run.Store(p)
	go func() { _ = cmd.Wait(); close(p.exited) }()
}

func (c *clusterEnv) waitReady(i int) {
	r := c.replicas[i]
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, _, ok := c.role(i); ok {
			return
		}
		if !r.alive() || time.Now().After(deadline) {
			c.t.Fatalf("replica %s not ready\n%s", r.name, r.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// role asks replica i's /readyz.
func (c *clusterEnv) role(i int) (role, leader string, ok bool) {
	r := c.replicas[i]
	hc := &http.Client{Timeout: 2 * time.Second}
	res, err := hc.Get(r.base() + "/readyz")
	if err != nil {
		return "", "", false
	}
	defer res.Body.Close()
	var body struct {
		Role   string `json:"role"`
		Leader string `json:"leader"`
	}
	if res.StatusCode != http.StatusOK || json.NewDecoder(res.Body).Decode(&body) != nil {
		return "", "", false
	}
	return body.Role, body.Leader, true
}

// leader waits until the live replicas agree on a leader among them and
// returns its index.
func (c *clusterEnv) leader(within time.Duration) int {
	deadline := time.Now().Add(within)
	for {
		lead, agree := -1, true
		var seen string
		for i, r := range c.replicas {
			if !r.alive() {
				continue
			}
			role, l, ok := c.role(i)
			if !ok || l == "" || (seen != "" && l != seen) {
				agree = false
				break
			}
			seen = l
			if role == "leader" {
				lead = i
			}
		}
		if agree && lead >= 0 && seen == c.replicas[lead].name {
			return lead
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no agreed leader within %s", within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// next is the live replica after i.
func (c *clusterEnv) next(i int) int {
	for k := 1; k <= len(c.replicas); k++ {
		j := (i + k) % len(c.replicas)
		if c.replicas[j].alive() {
			return j
		}
	}
	return i
}

// submit posts job n's workflow to replica i, going on to the next live
// replica when a connection fails (the one asked is restarting). The
// Idempotency-Key makes a retried submit the same job, charged once.
func (c *clusterEnv) submit(i, n int, failures *atomic.Int64) (id string, on int) {
	body := fmt.Sprintf(`{"user_id":"u-cluster","workflow":%s}`, benchGraph(n))
	hc := &http.Client{Timeout: 30 * time.Second}
	for try := 0; try < 20; try++ {
		req, _ := http.NewRequest("POST", c.replicas[i].base()+"/api/v1/jobs", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer style-key")
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", fmt.Sprintf("cluster-%d", n))
		res, err := hc.Do(req)
		if err != nil {
			i = c.next(i)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusAccepted && res.StatusCode != http.StatusOK && res.StatusCode != http.StatusCreated {
			failures.Add(1)
			c.t.Errorf("submit %d on %s: %d %s", n, c.replicas[i].name, res.StatusCode, b)
			return "", i
		}
		var j schema.Job
		if err := json.Unmarshal(b, &j); err != nil || j.ID == "" {
			c.t.Errorf("submit %d: %v %s", n, err, b)
			return "", i
		}
		return j.ID, i
	}
	c.t.Errorf("submit %d: no replica answered", n)
	return "", i
}

// streamResult is what one follower of a job saw.
type streamResult struct {
	terminal   schema.EventType
	reconnects int
	err        error
}

// follow reads job id's events from replica i, reconnecting to the next
// live replica with Last-Event-ID when the connection breaks, until the
// terminal event. Sequence numbers must only grow across reconnects.
func (c *clusterEnv) follow(ctx context.Context, i int, id string) streamResult {
	var res streamResult
	last := ""
	var lastSeq int64
	for ctx.Err() == nil {
		cl, err := newAPIClient(c.replicas[i].base(), "style-key")
		if err != nil {
			return streamResult{err: err}
		}
		final, seq, err := streamEvents(ctx, cl, "/api/v1/jobs/"+id+"/events", last, func(_ string, ev schema.Event) {
			if ev.Seq < lastSeq && ev.Type != schema.EventSnapshot {
				res.err = fmt.Errorf("event %d (%s) after %d", ev.Seq, ev.Type, lastSeq)
			}
			lastSeq = max(lastSeq, ev.Seq)
			if ev.Type.Terminal() {
				res.terminal = ev.Type
			}
		})
		if seq != "" {
			last = seq
		}
		if final {
			return res
		}
		_ = err
		res.reconnects++
		i = c.next(i)
		time.Sleep(20 * time.Millisecond)
	}
	res.err = errors.Join(res.err, ctx.Err())
	return res
}

// checkRunsOnce fails unless every job ran exactly once on the nodes.
func (c *clusterEnv) checkRunsOnce(ids []string) {
	t := c.t
	runs := map[string]int{}
	executed := 0
	for _, f := range c.fakes {
		for pid := range f.History() {
			job, _, _ := strings.Cut(pid, "-")
			runs[job]++
		}
		executed += f.Stats().Executed
	}
	for _, id := range ids {
		if runs[id] != 1 {
			t.Errorf("job %s ran %d times on the nodes", id, runs[id])
		}
	}
	if executed != len(ids) {
		t.Errorf("the nodes executed %d prompts for %d jobs", executed, len(ids))
	}
}

// checkJobs fails unless every job succeeded with one output, the user has
// one photo per job and was charged once per job.
func (c *clusterEnv) checkJobs(ids []string) {
	t := c.t
	i := c.next(0)
	s := &stack{t: t, base: c.replicas[i].base(), http: &http.Client{Timeout: 30 * time.Second}}
	again := 0
	for _, id := range ids {
		var j schema.Job
		s.getJSON("/api/v1/jobs/"+id, "style-key", &j)
		// A second attempt is a claim whose prompt never reached a node
		// (the leader died between the two): it still ran once.
		if j.State != schema.JobSucceeded || len(j.Outputs) != 1 || j.Attempts > 2 {
			t.Errorf("job %s: %s, %d outputs, %d attempts", id, j.State, len(j.Outputs), j.Attempts)
		}
		if j.Attempts > 1 {
			again++
		}
	}
	t.Logf("%d jobs claimed a second time", again)
	var u schema.User
	s.getJSON("/api/v1/users/u-cluster", "style-key", &u)
	if u.Credits != 1000-int64(len(ids)) || u.PhotoCount != int64(len(ids)) {
		t.Errorf("user: %d credits, %d photos; want %d and %d", u.Credits, u.PhotoCount, 1000-len(ids), len(ids))
	}
}

// Three replicas, three nodes, 300 jobs submitted round robin to every
// replica, each followed on another replica than the one that took it. The
// leader is killed (SIGKILL) a third of the way in: another replica leads
// within the lease, every job succeeds, ran once on the nodes, has its photo
// and its one charge, and every stream saw its terminal event.
func TestClusterLeaderKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test: runs three processes")
	}
	c := newClusterEnv(t, 3, 3, comfytest.Options{ClassTime: map[string]time.Duration{"ImageInvert": 60 * time.Millisecond}})
	first := c.leader(4 * clusterLease)
	t.Logf("leader: %s", c.replicas[first].name)

	const jobs = 300
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var failures atomic.Int64
	ids := make([]string, jobs)
	results := make([]streamResult, jobs)
	var wg sync.WaitGroup
	var killedAt time.Time
	for n := range jobs {
		if n == jobs/3 {
			killedAt = time.Now()
			_ = c.replicas[first].signal(syscall.SIGKILL)
			<-c.replicas[first].exited()
		}
		on := n % 3
		if !c.replicas[on].alive() {
			on = c.next(on)
		}
		id, took := c.submit(on, n, &failures)
		if id == "" {
			continue
		}
		ids[n] = id
		wg.Go(func() { results[n] = c.follow(ctx, c.next(took), id) })
	}
	second := c.leader(4 * clusterLease)
	if second == first {
		t.Fatal("the killed replica still leads")
	}
	t.Logf("new leader %s, agreed %s after the kill", c.replicas[second].name, time.Since(killedAt).Round(time.Millisecond))
	wg.Wait()
	if failures.Load() > 0 {
		t.Fatalf("%d submits failed", failures.Load())
	}
	reconnects := 0
	for n, r := range results {
		if r.err != nil || r.terminal != schema.EventSucceeded {
			t.Errorf("job %d (%s): stream ended with %q, %v", n, ids[n], r.terminal, r.err)
		}
		reconnects += r.reconnects
	}
	t.Logf("%d stream reconnects", reconnects)
	c.checkRunsOnce(ids)
	c.checkJobs(ids)
}

// A rolling restart: each of three replicas stopped (SIGTERM) and started
// again in turn while a client submits steadily. No request fails but the
// connections to the replica restarting (the client goes on to another), no
// job is lost or run twice.
func TestClusterRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test: runs three processes")
	}
	c := newClusterEnv(t, 3, 2, comfytest.Options{ClassTime: map[string]time.Duration{"ImageInvert": 30 * time.Millisecond}})
	c.leader(4 * clusterLease)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	var failures atomic.Int64
	var mu sync.Mutex
	var ids []string
	stop := make(chan struct{})
	load := make(chan struct{})
	go func() {
		defer close(load)
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			case <-time.After(25 * time.Millisecond):
			}
			on := n % 3
			if !c.replicas[on].alive() {
				on = c.next(on)
			}
			if id, _ := c.submit(on, n, &failures); id != "" {
				mu.Lock()
				ids = append(ids, id)
				mu.Unlock()
			}
		}
	}()
	for i := range c.replicas {
		time.Sleep(500 * time.Millisecond)
		r := c.replicas[i]
		_ = r.signal(syscall.SIGTERM)
		select {
		case <-r.exited():
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not stop", r.name)
		}
		c.start(i)
		c.waitReady(i)
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	<-load
	c.leader(4 * clusterLease)
	mu.Lock()
	all := append([]string(nil), ids...)
	mu.Unlock()
	if failures.Load() > 0 {
		t.Fatalf("%d submits failed", failures.Load())
	}
	t.Logf("%d jobs submitted across the restarts", len(all))
	var wg sync.WaitGroup
	results := make([]streamResult, len(all))
	for n, id := range all {
		wg.Go(func() { results[n] = c.follow(ctx, n%3, id) })
	}
	wg.Wait()
	for n, r := range results {
		if r.err != nil || r.terminal != schema.EventSucceeded {
			t.Errorf("job %s: %q, %v", all[n], r.terminal, r.err)
		}
	}
	c.checkRunsOnce(all)
	c.checkJobs(all)
}

// The leader's process is stopped (SIGSTOP) while its jobs run, past the
// lease: another replica takes over and adopts them. Resumed (SIGCONT), the
// old leader's writes are refused by the fence, it becomes a follower, and
// every job still ends once, run once on the nodes.
func TestClusterStoppedLeaderIsFenced(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test: runs three processes")
	}
	c := newClusterEnv(t, 2, 2, comfytest.Options{ClassTime: map[string]time.Duration{"ImageInvert": 150 * time.Millisecond}})
	first := c.leader(4 * clusterLease)
	other := c.next(first)
	var failures atomic.Int64
	var ids []string
	for n := range 30 {
		if id, _ := c.submit(other, n, &failures); id != "" {
			ids = append(ids, id)
		}
	}
	stopped := c.replicas[first]
	if err := stopped.signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(4 * clusterLease)
	for {
		if role, leader, ok := c.role(other); ok && role == "leader" && leader == c.replicas[other].name {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no takeover while the leader is stopped")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(clusterLease / 2) // the new leader adopts and runs jobs meanwhile
	if err := stopped.signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, id := range ids {
		if r := c.follow(ctx, other, id); r.terminal != schema.EventSucceeded || r.err != nil {
			t.Errorf("job %s: %q %v", id, r.terminal, r.err)
		}
	}
	deadline = time.Now().Add(4 * clusterLease)
	for {
		role, leader, ok := c.role(first)
		if ok && role == "follower" && leader == c.replicas[other].name {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the resumed replica: %s, leader %q", role, leader)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.checkRunsOnce(ids)
	c.checkJobs(ids)
}

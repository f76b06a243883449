package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/internal/redistest"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// replicaFarm is one replica of a cluster test, in this process.
type replicaFarm struct {
	farm   *Farm
	paused atomic.Bool // holds the lease keeper, as if the process were stopped
	cancel context.CancelFunc
	done   chan struct{}
}

func startReplicaFarm(t *testing.T, id string, dbcfg dbcontrollers.Config, redisURL, prefix string, reg *dbcontrollers.Registry, storage oss.Store, node *comfytest.Server, opts ...func(*FarmConfig)) *replicaFarm {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	control, err := dbcontrollers.OpenControl(ctx, dbcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { control.Close() })
	store := dbcontrollers.NewStore(control)
	bus, err := cluster.Open(ctx, redisURL, cluster.Options{Prefix: prefix, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bus.Close() })
	nodes := NewNodes(store, ProbeConfig{Interval: 50 * time.Millisecond, Timeout: 2 * time.Second, SlowThreshold: 2 * time.Second, Jitter: -1}, testLogger())
	if err := nodes.Load(ctx, []schema.Node{{Name: "n1", URL: node.URL(), MaxInflight: 1}}); err != nil {
		t.Fatal(err)
	}
	r := &replicaFarm{cancel: cancel, done: make(chan struct{})}
	cfg := FarmConfig{
		InstanceID: id, Bus: bus, Leases: store, LeaderLease: time.Second,
		StallTimeout: 2 * time.Second, ReconcileEvery: 150 * time.Millisecond, Lease: 3 * time.Second,
		HistoryWait: 5 * time.Second, Logger: testLogger().With("replica", id),
	}
	for _, o := range opts {
		o(&cfg)
	}
	f := NewFarm(cfg, store, reg, storage, nodes)
	f.leaseHook = func() bool { return !r.paused.Load() }
	f.sig = newTestSignals()
	r.farm = f
	go func() {
		defer close(r.done)
		_ = f.Run(ctx)
	}()
	t.Cleanup(r.stop)
	return r
}

func (r *replicaFarm) stop() {
	r.cancel()
	<-r.done
}

func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A leader paused past its lease (its keeper held, as in a stopped process)
// loses the lease to another replica, which adopts the running job; the
// stale leader, running on, cannot write: its writes are refused by the
// fence, it steps down, and the job ends once, run once, with one photo.
func TestClusterStaleLeaderIsFenced(t *testing.T) {
	dbcfg := dbtest.MySQL(t)
	redisURL, prefix := redistest.URL(t)
	ctx := context.Background()
	reg, err := dbcontrollers.NewRegistry(ctx, dbcfg, []dbcontrollers.FrontendConfig{{Name: "style", Controller: "style", InitialCredits: 5, CostPerJob: 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	local, err := oss.NewLocal(oss.LocalConfig{Dir: t.TempDir(), BaseURL: "http://127.0.0.1:1/files/"})
	if err != nil {
		t.Fatal(err)
	}
	node := comfytest.NewServer(sdOptions())
	t.Cleanup(node.Close)

	a := startReplicaFarm(t, "a", dbcfg, redisURL, prefix, reg, local, node)
	eventually(t, 10*time.Second, "a leads", func() bool { return a.farm.leading() })
	b := startReplicaFarm(t, "b", dbcfg, redisURL, prefix, reg, local, node)
	eventually(t, 10*time.Second, "b follows a", func() bool {
		role, leader := b.farm.Role()
		return role == RoleFollower && leader == "a"
	})

	// Submitted on the follower: the leader runs it; held on the node.
	node.Hold()
	j, err := b.farm.Submit(ctx, schema.SubmitParams{Frontend: "style", UserID: "u", Workflow: sdGraph(ckptXL, 2, 1)})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the job on the node", func() bool { return len(node.Stats().Pending) == 1 })

	a.paused.Store(true)
	eventually(t, 10*time.Second, "b leads", func() bool { return b.farm.leading() })
	if role, _ := a.farm.Role(); role != RoleLeader {
		t.Logf("a noticed before any write: %s", role)
	}
	node.Release()
	eventually(t, 20*time.Second, "the job succeeded", func() bool {
		cur, err := b.farm.db.JobGet(ctx, j.ID)
		return err == nil && cur.State == schema.JobSucceeded
	})
	eventually(t, 10*time.Second, "a stepped down", func() bool { return !a.farm.leading() })
	if a.farm.fenced.refused.Load() == 0 {
		t.Error("the stale leader made no write that the fence refused")
	}
	if b.farm.fenced.refused.Load() != 0 {
		t.Errorf("the new leader's writes were refused %d times", b.farm.fenced.refused.Load())
	}
	done, _ := b.farm.db.JobGet(ctx, j.ID)
	if done.Attempts != 1 || len(done.Outputs) != 1 {
		t.Errorf("job: %d attempts, %d outputs", done.Attempts, len(done.Outputs))
	}
	if st := node.Stats(); st.Executed != 1 || st.Submitted != 1 {
		t.Errorf("node: %d submitted, %d executed; want 1 and 1", st.Submitted, st.Executed)
	}
	ctrl, _ := reg.Get("style")
	photos, _, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "u", Page: 1, Limit: 10})
	if err != nil || len(photos) != 1 {
		t.Errorf("photos: %d, %v; want 1", len(photos), err)
	}
	// Unpaused, a stays a follower of b: two more tries of the lease.
	for len(a.farm.sig.leaseTried) > 0 {
		<-a.farm.sig.leaseTried
	}
	a.paused.Store(false)
	for range 2 {
		select {
		case <-a.farm.sig.leaseTried:
		case <-time.After(10 * time.Second):
			t.Fatal("a does not try the lease")
		}
	}
	if role, leader := a.farm.Role(); role != RoleFollower || leader != "b" {
		t.Errorf("a after resuming: %s, leader %q", role, leader)
	}
}

// privateRedis runs a redis-server of its own on a free loopback port, so a
// test may kill and restart it.
type privateRedis struct {
	t    *testing.T
	port int
	cmd  *exec.Cmd
	done chan struct{}
}

func startPrivateRedis(t *testing.T) *privateRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv(redistest.EnvRequireRedis) == "1" {
			t.Fatal("redis-server is required")
		}
		t.Skip("no redis-server on this machine")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &privateRedis{t: t, port: ln.Addr().(*net.TCPAddr).Port}
	ln.Close()
	p.start()
	t.Cleanup(p.kill)
	return p
}

func (p *privateRedis) url() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", p.port) }

func (p *privateRedis) start() {
	p.cmd = exec.Command("redis-server", "--port", strconv.Itoa(p.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(p.cmd, p.done)
	eventually(p.t, 10*time.Second, "redis-server answering", func() bool {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.port))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

func (p *privateRedis) kill() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	p.cmd = nil
}

// Redis is killed (everything in it lost) and restarted while jobs run
// and are followed on a follower: every job still succeeds once, and every
// subscriber gets its terminal event (events waited for Redis, the streams
// were read again after the reconnect).
func TestClusterRedisRestart(t *testing.T) {
	dbcfg := dbtest.MySQL(t)
	rds := startPrivateRedis(t)
	ctx := context.Background()
	reg, err := dbcontrollers.NewRegistry(ctx, dbcfg, []dbcontrollers.FrontendConfig{{Name: "style", Controller: "style", InitialCredits: 100, CostPerJob: 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	local, err := oss.NewLocal(oss.LocalConfig{Dir: t.TempDir(), BaseURL: "http://127.0.0.1:1/files/"})
	if err != nil {
		t.Fatal(err)
	}
	node := comfytest.NewServer(comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 100 * time.Millisecond}})
	t.Cleanup(node.Close)
	a := startReplicaFarm(t, "a", dbcfg, rds.url(), "cf:", reg, local, node)
	eventually(t, 10*time.Second, "a leads", func() bool { return a.farm.leading() })
	b := startReplicaFarm(t, "b", dbcfg, rds.url(), "cf:", reg, local, node)
	eventually(t, 10*time.Second, "b follows", func() bool { _, l := b.farm.Role(); return l == "a" })

	const jobs = 20
	ids := make([]string, jobs)
	ends := make(chan schema.EventType, jobs)
	for i := range jobs {
		j, err := b.farm.Submit(ctx, schema.SubmitParams{Frontend: "style", UserID: "u", Workflow: sdGraph(ckptXL, 2, i)})
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = j.ID
		evs, cancel, err := b.farm.Subscribe(ctx, j.ID, 0, false)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(cancel)
		go func() {
			var last schema.EventType
			for ev := range evs {
				last = ev.Type
			}
			ends <- last
		}()
	}
	eventually(t, 30*time.Second, "a few jobs done", func() bool { return node.Stats().Executed >= 4 })
	rds.kill()
	time.Sleep(time.Second) // jobs go on meanwhile; their events wait
	rds.start()
	for range jobs {
		select {
		case last := <-ends:
			if last != schema.EventSucceeded {
				t.Errorf("a stream ended with %q", last)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("a stream got no terminal event after Redis came back")
		}
	}
	for _, id := range ids {
		j, err := b.farm.db.JobGet(ctx, id)
		if err != nil || j.State != schema.JobSucceeded {
			t.Errorf("job %s: %v %v", id, j.State, err)
		}
	}
	if st := node.Stats(); st.Executed != jobs {
		t.Errorf("the node ran %d prompts for %d jobs", st.Executed, jobs)
	}
}

// A follower checks a submit against the nodes as the leader does, from the
// catalogues the leader shares: a class or a model no node has is refused
// at once (schema.NoNodeError, a 422), what a node offers is accepted and
// runs.
func TestClusterFollowerChecksSubmits(t *testing.T) {
	dbcfg := dbtest.MySQL(t)
	redisURL, prefix := redistest.URL(t)
	ctx := context.Background()
	reg, err := dbcontrollers.NewRegistry(ctx, dbcfg, []dbcontrollers.FrontendConfig{{Name: "style", Controller: "style", InitialCredits: 5, CostPerJob: 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	local, err := oss.NewLocal(oss.LocalConfig{Dir: t.TempDir(), BaseURL: "http://127.0.0.1:1/files/"})
	if err != nil {
		t.Fatal(err)
	}
	node := comfytest.NewServer(sdOptions())
	t.Cleanup(node.Close)
	a := startReplicaFarm(t, "a", dbcfg, redisURL, prefix, reg, local, node)
	eventually(t, 10*time.Second, "a leads", func() bool { return a.farm.leading() })
	b := startReplicaFarm(t, "b", dbcfg, redisURL, prefix, reg, local, node)
	eventually(t, 10*time.Second, "the follower has the leader's catalogue and views", func() bool {
		cats, _ := b.farm.catalogues()
		lv := b.farm.leaderViews.Load()
		return len(cats) == 1 && lv != nil && (*lv)["n1"].State == schema.NodeUp
	})
	var nne *schema.NoNodeError
	_, err = b.farm.Submit(ctx, schema.SubmitParams{Frontend: "style", UserID: "u",
		Workflow: json.RawMessage(`{"1": {"class_type": "NoSuchNode", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}`)})
	if !errors.As(err, &nne) || !slices.Contains(nne.Classes, "NoSuchNode") {
		t.Fatalf("unknown class on the follower: %v", err)
	}
	_, err = b.farm.Submit(ctx, schema.SubmitParams{Frontend: "style", UserID: "u", Workflow: sdGraph("no-such-model.safetensors", 1, 1)})
	if !errors.As(err, &nne) || !strings.Contains(err.Error(), "no-such-model.safetensors") {
		t.Fatalf("unknown model on the follower: %v", err)
	}
	j, err := b.farm.Submit(ctx, schema.SubmitParams{Frontend: "style", UserID: "u", Workflow: sdGraph(ckptXL, 1, 1)})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "the job succeeded", func() bool {
		cur, err := b.farm.db.JobGet(ctx, j.ID)
		return err == nil && cur.State == schema.JobSucceeded
	})
	if views, _ := b.farm.Nodes(ctx); len(views) != 1 || views[0].State != schema.NodeUp || views[0].Checkpoints == 0 {
		t.Fatalf("the follower's node view: %+v", views)
	}
}

// The control database goes away for several leases while two replicas run
// jobs: the leader cannot renew and steps down, nobody leads while it is
// away, then a replica takes the lease again, adopts the jobs, and each
// ends once: every prompt ran once on the node, every job has its photo.
func TestClusterDatabaseOutage(t *testing.T) {
	dbcfg := dbtest.MySQL(t)
	mc, err := mysql.ParseDSN(dbcfg.DSN)
	if err != nil {
		t.Fatal(err)
	}
	proxy := startDBProxy(t, mc.Addr)
	mc.Addr = proxy.ln.Addr().String()
	mc.Timeout = 2 * time.Second
	dbcfg.DSN = mc.FormatDSN()
	dbcfg.Logger = testLogger()
	redisURL, prefix := redistest.URL(t)
	ctx := context.Background()
	reg, err := dbcontrollers.NewRegistry(ctx, dbcfg, []dbcontrollers.FrontendConfig{{Name: "style", Controller: "style", InitialCredits: 100, CostPerJob: 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	local, err := oss.NewLocal(oss.LocalConfig{Dir: t.TempDir(), BaseURL: "http://127.0.0.1:1/files/"})
	if err != nil {
		t.Fatal(err)
	}
	node := comfytest.NewServer(comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 150 * time.Millisecond}})
	t.Cleanup(node.Close)
	a := startReplicaFarm(t, "a", dbcfg, redisURL, prefix, reg, local, node)
	eventually(t, 10*time.Second, "a leads", func() bool { return a.farm.leading() })
	b := startReplicaFarm(t, "b", dbcfg, redisURL, prefix, reg, local, node)
	eventually(t, 10*time.Second, "b follows", func() bool { _, l := b.farm.Role(); return l == "a" })

	const jobs = 12
	var ids []string
	for i := range jobs {
		j, err := b.farm.Submit(ctx, schema.SubmitParams{Frontend: "style", UserID: "u", Workflow: sdGraph(ckptXL, 2, i)})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, j.ID)
	}
	eventually(t, 30*time.Second, "a few jobs done", func() bool { return node.Stats().Executed >= 3 })
	proxy.cut()
	eventually(t, 10*time.Second, "nobody leads while the database is away", func() bool { return !a.farm.leading() && !b.farm.leading() })
	time.Sleep(2 * time.Second) // jobs on the node end meanwhile; nothing can be written
	proxy.restore()
	eventually(t, 30*time.Second, "a replica leads again", func() bool { return a.farm.leading() || b.farm.leading() })
	for _, id := range ids {
		eventually(t, 60*time.Second, "job "+id+" succeeded", func() bool {
			j, err := b.farm.db.JobGet(ctx, id)
			return err == nil && j.State == schema.JobSucceeded
		})
	}
	if st := node.Stats(); st.Executed != jobs {
		t.Errorf("the node ran %d prompts for %d jobs", st.Executed, jobs)
	}
	ctrl, _ := reg.Get("style")
	_, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "u", Page: 1, Limit: 50})
	if err != nil || total != jobs {
		t.Errorf("photos: %d, %v; want %d", total, err, jobs)
	}
}

// losesTerminals is a replica's bus whose terminal events never reach Redis,
// as when the replica dies between the job's end in the database and its
// queue's write of the event.
type losesTerminals struct {
	Bus
	lost atomic.Int64
}

func (b *losesTerminals) PublishEvent(jobID string, ev schema.Event) {
	if ev.Type.Terminal() {
		b.lost.Add(1)
		return
	}
	b.Bus.PublishEvent(jobID, ev)
}

// A job's end written by the leader whose terminal event never reached the
// bus: the follower's subscriber still gets the end, restated from the
// database, with the job's outputs, and the stream closes.
func TestClusterLostTerminalEventIsRestated(t *testing.T) {
	dbcfg := dbtest.MySQL(t)
	redisURL, prefix := redistest.URL(t)
	ctx := context.Background()
	reg, err := dbcontrollers.NewRegistry(ctx, dbcfg, []dbcontrollers.FrontendConfig{{Name: "style", Controller: "style", InitialCredits: 5, CostPerJob: 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	local, err := oss.NewLocal(oss.LocalConfig{Dir: t.TempDir(), BaseURL: "http://127.0.0.1:1/files/"})
	if err != nil {
		t.Fatal(err)
	}
	node := comfytest.NewServer(sdOptions())
	t.Cleanup(node.Close)

	var lossy *losesTerminals
	a := startReplicaFarm(t, "a", dbcfg, redisURL, prefix, reg, local, node, func(c *FarmConfig) {
		lossy = &losesTerminals{Bus: c.Bus}
		c.Bus = lossy
	})
	eventually(t, 10*time.Second, "a leads", func() bool { return a.farm.leading() })
	b := startReplicaFarm(t, "b", dbcfg, redisURL, prefix, reg, local, node)
	eventually(t, 10*time.Second, "b follows a", func() bool {
		role, leader := b.farm.Role()
		return role == RoleFollower && leader == "a"
	})

	node.Hold()
	j, err := b.farm.Submit(ctx, schema.SubmitParams{Frontend: "style", UserID: "u", Workflow: sdGraph(ckptXL, 2, 1)})
	if err != nil {
		t.Fatal(err)
	}
	events, cancel, err := b.farm.Subscribe(ctx, j.ID, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	eventually(t, 10*time.Second, "the job on the node", func() bool { return len(node.Stats().Pending) == 1 })
	node.Release()

	timeout := time.After(20 * time.Second)
	var last schema.Event
	for done := false; !done; {
		select {
		case ev, ok := <-events:
			if !ok {
				done = true
				break
			}
			last = ev
		case <-timeout:
			t.Fatalf("no terminal event 20 s after the job was released; last %s (%d terminal events lost)", last.Type, lossy.lost.Load())
		}
	}
	if last.Type != schema.EventSucceeded || len(last.Outputs) != 1 {
		t.Fatalf("the stream ended with %s and %d outputs, want succeeded with 1", last.Type, len(last.Outputs))
	}
	if lossy.lost.Load() == 0 {
		t.Fatal("the leader published no terminal event to lose: the test tested nothing")
	}
}

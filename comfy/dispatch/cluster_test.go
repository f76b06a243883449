package dispatch

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

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

func startReplicaFarm(t *testing.T, id string, dbcfg dbcontrollers.Config, redisURL, prefix string, reg *dbcontrollers.Registry, storage oss.Store, node *comfytest.Server) *replicaFarm {
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
	f := NewFarm(FarmConfig{
		InstanceID: id, Bus: bus, Leases: store, LeaderLease: time.Second,
		StallTimeout: 2 * time.Second, ReconcileEvery: 150 * time.Millisecond, Lease: 3 * time.Second,
		HistoryWait: 5 * time.Second, Logger: testLogger().With("replica", id),
	}, store, reg, storage, nodes)
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

package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// dbProxy stands between the farm and MariaDB so a test can take the
// database away (every connection reset, new ones refused) and give it back.
type dbProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]struct{}
}

func startDBProxy(t *testing.T, target string) *dbProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &dbProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() {
		ln.Close()
		p.cut()
	})
	go p.serve()
	return p
}

func (p *dbProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		down := p.down
		p.mu.Unlock()
		if down {
			c.Close()
			continue
		}
		go p.pipe(c)
	}
}

func (p *dbProxy) pipe(c net.Conn) {
	up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		c.Close()
		up.Close()
		return
	}
	p.conns[c], p.conns[up] = struct{}{}, struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}

// cut takes the database away: open connections are reset, new ones closed
// at once.
func (p *dbProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
}

func (p *dbProxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

// outageEnv is a farm on MariaDB reached through a dbProxy, with one node.
func outageEnv(t *testing.T) (*farmEnv, *dbProxy) {
	t.Helper()
	cfg := dbtest.MySQL(t)
	mc, err := mysql.ParseDSN(cfg.DSN)
	if err != nil {
		t.Fatal(err)
	}
	proxy := startDBProxy(t, mc.Addr)
	mc.Addr = proxy.ln.Addr().String()
	mc.Timeout = 2 * time.Second
	cfg.DSN = mc.FormatDSN()
	cfg.Logger = testLogger() // the driver reports every broken connection
	return newFarmEnv(t, cfg, []comfytest.Options{sdOptions()}, nil), proxy
}

// outage takes the database away while the node runs the job it holds, and
// past the end of the job on the node and of its lease, then gives it back.
func outage(e *farmEnv, proxy *dbProxy, node *comfytest.Server) {
	e.t.Helper()
	e.eventually(10*time.Second, "the prompt in the node's queue", func() bool { return len(node.Stats().Pending) == 1 })
	proxy.cut()
	node.Release()
	e.eventually(20*time.Second, "the prompt done on the node", func() bool { return node.Stats().Executed == 1 })
	time.Sleep(e.farm.cfg.Lease + time.Second)
	proxy.restore()
}

// The database goes away while a job runs, and stays away past the job's
// end on the node and past its lease. When it comes back the job ends
// succeeded, once: one run on the GPU, one photo row, its outputs stored.
func TestFarmSurvivesDatabaseOutage(t *testing.T) {
	e, proxy := outageEnv(t)
	ctx := context.Background()
	node := e.fakes["n1"]
	node.Hold()
	j := e.submit("style", "u-outage", sdGraph(ckptXL, 3, 11), 0)
	outage(e, proxy, node)

	done := e.waitState(j.ID, schema.JobSucceeded, 60*time.Second)
	if done.Attempts != 1 || node.Stats().Submitted != 1 {
		t.Errorf("attempts %d, prompts submitted %d: the job ran again", done.Attempts, node.Stats().Submitted)
	}
	if len(done.Outputs) != 1 {
		t.Fatalf("outputs %+v", done.Outputs)
	}
	ctrl, _ := e.reg.Get("style")
	photos, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "u-outage", Limit: 10})
	if err != nil || total != 1 || len(photos) != 1 {
		t.Fatalf("photos %d (%v), want 1", total, err)
	}
}

// The same outage, but the workflow raises on the node: the job ends failed
// with the node's error once the database is back, without a second run, and
// its credit comes back.
func TestFarmFailsOnceThroughDatabaseOutage(t *testing.T) {
	e, proxy := outageEnv(t)
	ctx := context.Background()
	node := e.fakes["n1"]
	node.Hold()
	j := e.submit("style", "u-outage-err", sdGraph(ckptXL, 3, 12), 0)
	node.FailNth(1)
	outage(e, proxy, node)

	done := e.waitState(j.ID, schema.JobFailed, 60*time.Second)
	if done.Error == nil || done.Error.Code != schema.CodeExecutionError {
		t.Fatalf("error %+v, want execution_error", done.Error)
	}
	if done.Attempts != 1 || node.Stats().Submitted != 1 {
		t.Errorf("attempts %d, prompts submitted %d: the job ran again", done.Attempts, node.Stats().Submitted)
	}
	ctrl, _ := e.reg.Get("style")
	e.eventually(10*time.Second, "the refund", func() bool {
		u, err := ctrl.UserGet(ctx, ctrl.DB(), "u-outage-err")
		return err == nil && u.Credits == 5
	})
}

// ackLost applies a job update but reports the connection lost, as when a
// commit reaches the database and its acknowledgement does not.
type ackLost struct {
	JobStore
	lose int
}

func (s *ackLost) JobUpdate(ctx context.Context, u dbcontrollers.JobUpdate) (*schema.Job, error) {
	job, err := s.JobStore.JobUpdate(ctx, u)
	if err == nil && s.lose > 0 {
		s.lose--
		return nil, fmt.Errorf("update job %s: commit: %w", u.ID, mysql.ErrInvalidConn)
	}
	return job, err
}

// A retried end-of-run write whose first try did land is not mistaken for a
// conflict with someone else: the caller learns it succeeded (and so tells
// subscribers and refunds).
func TestUpdateJobAfterLostAcknowledgement(t *testing.T) {
	ctx := context.Background()
	control, err := dbcontrollers.OpenControl(ctx, dbtest.SQLite(t))
	if err != nil {
		t.Fatal(err)
	}
	defer control.Close()
	store := dbcontrollers.NewStore(control)
	now := time.Now().UTC()
	job := &schema.Job{ID: "01JACKLOST0000000000000000", Frontend: "alpha", UserID: "u", State: schema.JobQueued,
		Workflow: sdGraph(ckptXL, 1, 1), Metadata: json.RawMessage(`{}`), CreatedAt: now, UpdatedAt: now}
	if err := store.JobInsert(ctx, job); err != nil {
		t.Fatal(err)
	}
	claimed, err := store.JobClaim(ctx, dbcontrollers.ClaimParams{ID: job.ID, Node: "n1", Owner: "me", LeaseUntil: now.Add(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	f := &Farm{store: &ackLost{JobStore: store, lose: 1}, log: testLogger(), cfg: FarmConfig{NowFunc: time.Now}}
	u := dbcontrollers.JobUpdate{ID: job.ID, From: activeStates, State: schema.JobFailed, Attempt: &claimed.Attempts,
		Error: &schema.JobError{Code: schema.CodeExecutionError, Message: "boom"}, FinishedAt: ptr(now), ClearLease: true}
	got, err := f.updateJob(ctx, u)
	if err != nil || got == nil || got.State != schema.JobFailed {
		t.Fatalf("updateJob = %+v, %v; want the failed job", got, err)
	}
	// A conflict with another writer stays a conflict.
	u.State, u.From = schema.JobSucceeded, []schema.JobState{schema.JobStoring}
	f.store = &ackLost{JobStore: store, lose: 0}
	if _, err := f.updateJob(ctx, u); !errors.Is(err, schema.ErrConflict) {
		t.Fatalf("a real conflict: %v", err)
	}
}

package dispatch

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// slowPromptProxy fronts a fake node and delays every POST /prompt by d
// (as a busy node validating a large graph, or a slow link, would). Other
// routes and the WebSocket pass through at once.
func slowPromptProxy(t *testing.T, d time.Duration) func(string, *comfytest.Server) string {
	return func(name string, s *comfytest.Server) string {
		target, _ := url.Parse(s.URL())
		proxy := httputil.NewSingleHostReverseProxy(target)
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/prompt") {
				time.Sleep(d)
			}
			proxy.ServeHTTP(w, r)
		})
		srv := httptest.NewServer(h)
		t.Cleanup(srv.Close)
		return srv.URL
	}
}

// A POST /prompt that takes longer than reconcile_every: the runner has bound
// the prompt id before posting, so a reconcile pass during the post finds it
// neither in /queue nor in /history, calls it lost and requeues the job while
// the post is still under way. The post then lands, so the node runs the
// job once per attempt, and the job burns its attempts (or fails outright).
// Expected: one prompt on the node, one attempt, succeeded.
func TestSlowSubmitIsNotDeclaredLost(t *testing.T) {
	e := newFarmEnvWith(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil, nil,
		slowPromptProxy(t, 800*time.Millisecond))
	j := e.submit("alpha", "slow-post", sdGraph(ckptXL, 1, 1), 0)
	var done *schema.Job
	e.eventually(30*time.Second, "job terminal", func() bool {
		done = e.job(j.ID)
		return done.State.Terminal()
	})
	// Let any stray posts land.
	time.Sleep(1500 * time.Millisecond)
	submitted := e.fakes["n1"].Stats().Submitted
	if done.State != schema.JobSucceeded || done.Attempts != 1 || submitted != 1 {
		t.Fatalf("job ended %s after %d attempts (error %+v); the node got %d prompts for it, want succeeded/1/1",
			done.State, done.Attempts, done.Error, submitted)
	}
}

// gatedStore blocks every Put until gate is closed.
type gatedStore struct {
	oss.Store
	gate chan struct{}
}

func (g *gatedStore) Put(ctx context.Context, key string, r io.Reader, size int64, contentType string) error {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.Store.Put(ctx, key, r, size, contentType)
}

// Removing a node while one of its jobs is storing (the GPU work is done and
// confirmed by /history; only the copy into storage remains) requeues the
// job: nodeChanged requeues every active id, storing included, and requeue's
// CAS accepts storing. The job runs a second time on another node.
// Expected: it finishes from the first run (attempts 1).
func TestNodeRemovedWhileStoringDoesNotRerun(t *testing.T) {
	gate := make(chan struct{})
	local, err := oss.NewLocal(oss.LocalConfig{Dir: t.TempDir(), BaseURL: "http://127.0.0.1:1/files/"})
	if err != nil {
		t.Fatal(err)
	}
	e := newFarmEnvWith(t, dbtest.SQLite(t), []comfytest.Options{sdOptions(), sdOptions()}, nil,
		&gatedStore{Store: local, gate: gate}, nil)
	ctx := context.Background()
	if _, err := e.farm.NodeDrain(ctx, "n2", true); err != nil { // the job runs on n1
		t.Fatal(err)
	}
	j := e.submit("alpha", "rm-storing", sdGraph(ckptXL, 1, 1), 0)
	st := e.waitState(j.ID, schema.JobStoring, 30*time.Second)
	if _, err := e.farm.NodeDrain(ctx, "n2", false); err != nil { // a rerun could go there
		t.Fatal(err)
	}
	if err := e.farm.NodeRemove(ctx, st.Node); err != nil {
		t.Fatal(err)
	}
	e.nodeChangeSeen(st.Node, true)
	close(gate)
	var done *schema.Job
	e.eventually(30*time.Second, "job terminal", func() bool {
		done = e.job(j.ID)
		return done.State.Terminal()
	})
	if done.State != schema.JobSucceeded || done.Attempts != 1 {
		t.Fatalf("job ended %s after %d attempts on %s (was storing on %s); want succeeded from the first run",
			done.State, done.Attempts, done.Node, st.Node)
	}
}

// Cancel while POST /prompt is in flight. Once (when a cancelled entry was
// marked at once and reconciled) the next reconcile found the prompt nowhere
// yet (Lost) and forgot the entry; when the post returned, dispatch never saw
// the cancel and left the prompt on the node, in its pending queue for ever.
// Now an attempt being posted is left to its post, which finds the job
// cancelled and takes the prompt off. Expected: the node's queue holds
// nothing once the cancel settled.
func TestCancelDuringSlowSubmitTakesPromptOff(t *testing.T) {
	e := newFarmEnvWith(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil, nil,
		slowPromptProxy(t, 800*time.Millisecond))
	node := e.fakes["n1"]
	node.Hold()
	j := e.submit("alpha", "cancel-post", sdGraph(ckptXL, 1, 1), 0)
	e.waitState(j.ID, schema.JobDispatched, 10*time.Second)
	if _, err := e.farm.Cancel(context.Background(), "alpha", j.ID); err != nil {
		t.Fatal(err)
	}
	// The post lands (the node counts it) and is then taken off again.
	// The deadline only bounds a prompt that stays for good.
	e.eventually(30*time.Second, "the slow post to land", func() bool { return node.Stats().Submitted == 1 })
	deadline := time.Now().Add(30 * time.Second)
	for p := node.Stats().Pending; len(p) != 0; p = node.Stats().Pending {
		if time.Now().After(deadline) {
			t.Fatalf("a cancelled job's prompt is still queued on the node: %v (runner inflight %d)", p, e.farm.runtime("n1").Inflight)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

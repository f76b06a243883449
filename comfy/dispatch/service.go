package dispatch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"

	"github.com/jmoiron/sqlx"
	"github.com/oklog/ulid/v2"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// pendingFromJob reads what the scheduler needs from a stored job.
func pendingFromJob(j *schema.Job, maxNodes int) (*pendingJob, error) {
	g, err := comfy.ParseGraph(j.Workflow, comfy.GraphLimits{MaxNodes: maxNodes})
	if err != nil {
		return nil, err
	}
	uploads := make([]string, len(j.Inputs))
	for i, in := range j.Inputs {
		uploads[i] = in.Filename
	}
	return &pendingJob{
		ID: j.ID, Frontend: j.Frontend, Priority: j.Priority, Created: j.CreatedAt,
		Classes: g.ClassTypes(), Models: g.Models(), Needs: needsOf(g, uploads), Req: j.Requirements,
	}, nil
}

// Submit validates and queues a job (DESIGN §3 steps 1–2).
func (f *Farm) Submit(ctx context.Context, p schema.SubmitParams) (*schema.Job, error) {
	ctrl, err := f.frontends.Get(p.Frontend)
	if err != nil {
		return nil, err
	}
	if p.UserID == "" || len(p.UserID) > 128 {
		return nil, schema.Invalid("user_id", "must be 1 to 128 characters")
	}
	if p.Priority < schema.MinPriority || p.Priority > schema.MaxPriority {
		return nil, schema.Invalid("priority", "must be between %d and %d", schema.MinPriority, schema.MaxPriority)
	}
	meta, err := checkMetadata(p.Metadata)
	if err != nil {
		return nil, err
	}
	if len(p.Workflow) == 0 {
		return nil, schema.Invalid("workflow", "is required")
	}
	g, err := comfy.ParseGraph(p.Workflow, comfy.GraphLimits{MaxNodes: f.cfg.MaxGraphNodes})
	if err != nil {
		var ge *comfy.GraphError
		if errors.As(err, &ge) {
			field := "workflow"
			if ge.NodeID != "" {
				field = "workflow." + ge.NodeID
				if ge.Field != "" {
					field += "." + ge.Field
				}
			}
			return nil, schema.Invalid(field, "%s", ge.Reason)
		}
		return nil, schema.Invalid("workflow", "%v", err)
	}
	if len(g.OutputNodes(f.outputClasses())) == 0 {
		return nil, schema.Invalid("workflow", "has no output node (SaveImage or similar)")
	}
	if missing := f.missingClasses(g.ClassTypes()); len(missing) > 0 {
		return nil, &schema.NoNodeError{
			Reason:  "no node offers all of its node classes; the closest lacks " + strings.Join(missing, ", "),
			Classes: missing,
		}
	}
	req, err := p.Requirements.Check()
	if err != nil {
		return nil, err
	}
	uploads := make([]string, len(p.Inputs))
	for i, in := range p.Inputs {
		uploads[i] = in.Filename
	}
	probe := &pendingJob{Classes: g.ClassTypes(), Needs: needsOf(g, uploads), Req: req}
	if p.IdempotencyKey != "" {
		if len(p.IdempotencyKey) > 128 {
			return nil, schema.Invalid("Idempotency-Key", "must be at most 128 characters")
		}
		if prev, err := f.store.JobByIdempotencyKey(ctx, p.Frontend, p.IdempotencyKey); err == nil {
			return f.replay(ctx, prev, p)
		}
	}
	// After the replay: a retried submit gets its job even when the nodes
	// changed since.
	if err := f.checkPlacement(ctx, probe); err != nil {
		return nil, err
	}

	id := ulid.Make().String()
	now := f.cfg.NowFunc().UTC()
	job := &schema.Job{
		ID: id, Frontend: p.Frontend, UserID: p.UserID, State: schema.JobQueued, Priority: p.Priority,
		Workflow: p.Workflow, Template: p.Template, Metadata: meta, IdempotencyKey: p.IdempotencyKey,
		CreatedAt: now, UpdatedAt: now,
		WebhookURL:   p.WebhookURL,
		Requirements: req,
	}
	if err := f.storeInputs(ctx, job, g, p.Inputs); err != nil {
		return nil, err
	}
	cost := ctrl.CostPerJob()
	// The charge (frontend database) and the job (control database) cannot
	// share a transaction. A submit with an Idempotency-Key charges under
	// that key, so that a retry after a crash between the two finds the
	// earlier charge instead of adding a second one.
	chargeKey := "job:" + id + ":charge"
	if p.IdempotencyKey != "" {
		chargeKey = "submit:" + p.IdempotencyKey + ":charge"
	}
	var earlier string // the job an earlier try of this submit charged for
	err = dbcontrollers.InTx(ctx, ctrl.DB(), func(tx *sqlx.Tx) error {
		if _, err := ctrl.UserEnsure(ctx, tx, p.UserID); err != nil {
			return err
		}
		if cost <= 0 {
			return nil
		}
		e, err := ctrl.CreditsApply(ctx, tx, dbcontrollers.CreditParams{
			UserID: p.UserID, Delta: -cost, Reason: "job " + id, IdempotencyKey: chargeKey,
		})
		if err == nil && e.Reason != "job "+id {
			earlier = strings.TrimPrefix(e.Reason, "job ")
		}
		return err
	})
	if err == nil && earlier != "" {
		var prev *schema.Job
		if prev, err = f.store.JobGet(ctx, earlier); err == nil {
			f.dropInputs(job)
			return f.replay(ctx, prev, p) // recorded after all: a concurrent submit with the key
		}
		if errors.Is(err, schema.ErrNotFound) {
			err = f.recharge(ctx, ctrl, p.UserID, earlier, id, cost)
		}
	}
	if err != nil {
		f.dropInputs(job)
		return nil, err
	}
	if cost > 0 {
		job.Charged = cost
	}
	if err := f.store.JobInsert(ctx, job); err != nil {
		f.refund(ctx, job)
		f.dropInputs(job)
		if errors.Is(err, schema.ErrConflict) && p.IdempotencyKey != "" {
			// A concurrent submit with the same key won.
			if prev, err2 := f.store.JobByIdempotencyKey(ctx, p.Frontend, p.IdempotencyKey); err2 == nil {
				return f.replay(ctx, prev, p)
			}
		}
		return nil, err
	}
	f.metrics.submitted.WithLabelValues(p.Frontend).Inc()
	if f.leading() {
		f.mu.Lock()
		f.queue.Push(&pendingJob{ID: id, Frontend: p.Frontend, Priority: p.Priority, Created: now, Classes: probe.Classes,
			Models: g.Models(), Needs: probe.Needs, Req: req})
		f.publishPositionsLocked()
		f.mu.Unlock()
		f.kickScheduler()
	}
	// The leader, when it is another replica, queues it now.
	f.notify(ctx, cluster.Notice{Kind: cluster.NoticeSubmitted, JobID: id})
	return f.view(ctx, job), nil
}

// recharge settles the charge of an earlier try of a keyed submit whose job
// was never recorded (the process died between the charge and the job, or
// the job's insert failed and its charge was refunded): that charge is
// refunded, once (the refund key is the one a failed insert uses), and the
// new job id is charged under its own key, in one transaction. Two
// identical submits racing between one's charge and its insert may leave
// that job uncharged; a retry after a crash, the case this is for, is exact.
func (f *Farm) recharge(ctx context.Context, ctrl dbcontrollers.Controller, user, earlier, id string, cost int64) error {
	return dbcontrollers.InTx(ctx, ctrl.DB(), func(tx *sqlx.Tx) error {
		if _, err := ctrl.CreditsApply(ctx, tx, dbcontrollers.CreditParams{
			UserID: user, Delta: cost, Reason: "refund job " + earlier, IdempotencyKey: "job:" + earlier + ":refund",
		}); err != nil {
			return err
		}
		_, err := ctrl.CreditsApply(ctx, tx, dbcontrollers.CreditParams{
			UserID: user, Delta: -cost, Reason: "job " + id, IdempotencyKey: "job:" + id + ":charge",
		})
		return err
	})
}

// outputClasses returns a test of whether a class is an output node: by the
// core list, or by the catalogue of any node that offers it (custom nodes).
// The catalogues are looked up once, for all the classes of a graph.
func (f *Farm) outputClasses() func(class string) bool {
	if f.clustered() && !f.leading() {
		if cats, _ := f.catalogues(); len(cats) == 0 {
			// No catalogue from the leader yet: a class this replica cannot
			// look up may be a custom output node. The node's own validation
			// refuses a workflow that has none.
			return func(string) bool { return true }
		}
	}
	var known []map[string]bool
	for _, r := range f.runnerList() {
		if k := r.knownClasses(); k != nil {
			known = append(known, k)
		}
	}
	return func(class string) bool {
		if comfy.DefaultOutputClasses[class] {
			return true
		}
		for _, k := range known {
			if k[class] {
				return true
			}
		}
		return false
	}
}

// missingClasses says what keeps the nodes with a known catalogue from
// running a workflow of these classes: nil when one node offers them all, or
// when no catalogue is known yet; otherwise the classes that the closest
// node (the one missing fewest) lacks. One node must offer all of them: a
// prompt runs on one node.
func (f *Farm) missingClasses(classes []string) []string {
	cats, _ := f.catalogues()
	return missingIn(cats, classes)
}

// catalogues returns the known node catalogues, and whether every registered
// node's is known (false too when no node is registered).
func (f *Farm) catalogues() (cats []map[string]bool, all bool) {
	runners := f.runnerList()
	all = len(runners) > 0
	for _, r := range runners {
		if c := r.knownClasses(); c != nil {
			cats = append(cats, c)
		} else {
			all = false
		}
	}
	return cats, all
}

// missingIn is missingClasses over given catalogues.
func missingIn(cats []map[string]bool, classes []string) []string {
	var best []string
	for _, cat := range cats {
		var miss []string
		for _, c := range classes {
			if _, ok := cat[c]; !ok {
				miss = append(miss, c)
			}
		}
		if len(miss) == 0 {
			return nil
		}
		if best == nil || len(miss) < len(best) {
			best = miss
		}
	}
	slices.Sort(best)
	return best
}

// replay answers a submit whose Idempotency-Key names an earlier job: that
// job, when the request is the same; a conflict when the key was used for
// another request.
func (f *Farm) replay(ctx context.Context, prev *schema.Job, p schema.SubmitParams) (*schema.Job, error) {
	if prev.UserID != p.UserID || prev.Priority != p.Priority || !sameJSON(prev.Workflow, p.Workflow) {
		return nil, fmt.Errorf("%w: Idempotency-Key %q was used for another request (job %s)", schema.ErrConflict, p.IdempotencyKey, prev.ID)
	}
	return f.view(ctx, prev), nil
}

func sameJSON(a, b json.RawMessage) bool {
	if bytes.Equal(a, b) {
		return true
	}
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

func checkMetadata(m json.RawMessage) (json.RawMessage, error) {
	m = bytes.TrimSpace(m)
	if len(m) == 0 || string(m) == "null" {
		return json.RawMessage("{}"), nil
	}
	if len(m) > schema.MaxMetadataBytes {
		return nil, fmt.Errorf("%w: metadata is larger than %d bytes", schema.ErrTooLarge, schema.MaxMetadataBytes)
	}
	var obj map[string]any
	if err := json.Unmarshal(m, &obj); err != nil {
		return nil, schema.Invalid("metadata", "must be a JSON object")
	}
	return m, nil
}

// storeInputs checks each uploaded image by its bytes (type, size, pixel
// count from the header, before any decoding) and keeps it in storage until
// dispatch uploads it to the chosen node.
func (f *Farm) storeInputs(ctx context.Context, job *schema.Job, g *comfy.Graph, files []schema.InputFile) error {
	if len(files) == 0 {
		return nil
	}
	if len(files) > 16 {
		return schema.Invalid("images", "at most 16 files")
	}
	seen := map[string]bool{}
	for i, file := range files {
		name := safeBase(file.Filename)
		if name == "" || seen[name] {
			return schema.Invalid("images", "file %d needs a unique file name", i)
		}
		seen[name] = true
		if file.Size > f.cfg.MaxInputBytes {
			return fmt.Errorf("%w: image %q is larger than %d bytes", schema.ErrTooLarge, name, f.cfg.MaxInputBytes)
		}
		rc, err := file.Open()
		if err != nil {
			return err
		}
		data, err := io.ReadAll(io.LimitReader(rc, f.cfg.MaxInputBytes+1))
		rc.Close()
		if err != nil {
			return err
		}
		meta, err := oss.CheckInputImage(bytes.NewReader(data), f.cfg.MaxInputBytes, f.cfg.MaxImagePixels)
		if err != nil {
			f.dropInputs(job)
			return fmt.Errorf("image %q: %w", name, err)
		}
		sum := sha256Hex(data)
		key := fmt.Sprintf("%s/inputs/%s/%d.%s", job.Frontend, job.ID, i, meta.Ext)
		if err := f.storage.Put(ctx, key, bytes.NewReader(data), int64(len(data)), meta.ContentType); err != nil {
			f.dropInputs(job)
			return fmt.Errorf("store input: %w", err)
		}
		job.Inputs = append(job.Inputs, schema.JobInput{
			Field: "images", Filename: name, Key: key, ContentType: meta.ContentType,
			Bytes: int64(len(data)), Width: meta.Width, Height: meta.Height, SHA256: sum,
		})
	}
	return nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func (f *Farm) dropInputs(job *schema.Job) {
	for _, in := range job.Inputs {
		_ = f.storage.Delete(context.Background(), in.Key)
	}
}

// view fills the computed parts of a job: position and live progress.
// Output URLs are built by the server when it answers (signed URLs expire).
func (f *Farm) view(ctx context.Context, j *schema.Job) *schema.Job {
	v := *j
	v.Position = 0
	switch v.State {
	case schema.JobQueued:
		if p, ok := f.position(v.ID); ok {
			v.Position = p
		} else if f.clustered() {
			// Another replica schedules: its last published position.
			if q, _ := f.hub.Latest(v.ID); q != nil && q.Position != nil {
				v.Position = *q.Position
			}
		}
	case schema.JobDispatched, schema.JobRunning:
		if f.clustered() && !f.leading() {
			if _, pr := f.hub.Latest(v.ID); pr != nil && pr.Value != nil && pr.Max != nil {
				p := schema.NewProgress(pr.NodeID, *pr.Value, *pr.Max)
				v.Progress = &p
			}
		}
		if r := f.runner(v.Node); r != nil {
			r.mu.Lock()
			if a := r.jobs[v.ID]; a != nil && a.progress != nil {
				p := *a.progress
				v.Progress = &p
			}
			r.mu.Unlock()
			if v.State == schema.JobDispatched {
				v.Position = r.aheadOf(v.ID)
			}
		}
	}
	if v.Outputs == nil {
		v.Outputs = []schema.Output{}
	}
	return &v
}

// aheadOf is a dispatched job's place in its node's queue: the jobs posted
// to the node before it that have not finished.
func (r *runner) aheadOf(jobID string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	me := r.jobs[jobID]
	if me == nil {
		return 0
	}
	ahead := 0
	for _, a := range r.jobs {
		if a == me {
			continue
		}
		if a.phase == phaseAbandoned || a.state == schema.JobRunning || (a.state == schema.JobDispatched && a.seq < me.seq) {
			ahead++
		}
	}
	return ahead
}

// Job returns one job of a frontend.
func (f *Farm) Job(ctx context.Context, frontend, id string) (*schema.Job, error) {
	j, err := f.store.JobGet(ctx, id)
	if err != nil {
		return nil, err
	}
	if j.Frontend != frontend {
		return nil, schema.ErrNotFound
	}
	return f.view(ctx, j), nil
}

// Jobs lists a frontend's jobs, newest first.
func (f *Farm) Jobs(ctx context.Context, flt schema.JobFilter) ([]schema.Job, error) {
	if flt.State != "" && !flt.State.Valid() {
		return nil, schema.Invalid("state", "unknown state %q", flt.State)
	}
	if flt.Limit <= 0 {
		flt.Limit = 50
	}
	if flt.Limit > 500 {
		flt.Limit = 500
	}
	jobs, err := f.store.JobList(ctx, flt)
	if err != nil {
		return nil, err
	}
	if f.clustered() && !f.leading() {
		// Places and progress come from the leader's events: read the
		// streams of the listed jobs in one call, not one by one in view.
		ids := make([]string, 0, len(jobs))
		for _, j := range jobs {
			if !j.State.Terminal() {
				ids = append(ids, j.ID)
			}
		}
		f.hub.FollowAll(ids)
	}
	for i := range jobs {
		jobs[i] = *f.view(ctx, &jobs[i])
	}
	return jobs, nil
}

// QueueStatus answers "is my job running, and if not, how many are ahead".
func (f *Farm) QueueStatus(ctx context.Context, frontend, id string) (*schema.QueueStatus, error) {
	j, err := f.Job(ctx, frontend, id)
	if err != nil {
		return nil, err
	}
	return &schema.QueueStatus{
		JobID: j.ID, State: j.State, Running: j.State == schema.JobRunning,
		Ahead: j.Position, Progress: j.Progress,
	}, nil
}

// Subscribe follows a job's events: a snapshot first, then live events.
func (f *Farm) Subscribe(ctx context.Context, jobID string, after int64, previews bool) (<-chan schema.Event, func(), error) {
	// Read once outside the hub lock to fail fast on unknown jobs.
	if _, err := f.store.JobGet(ctx, jobID); err != nil {
		return nil, nil, err
	}
	return f.hub.Subscribe(jobID, after, previews, func() (*schema.Job, error) {
		j, err := f.store.JobGet(ctx, jobID)
		if err != nil {
			return nil, err
		}
		return f.view(ctx, j), nil
	})
}

// Cancel stops a job in any state: removed from the queue, deleted from the
// node's queue, or interrupted by prompt id. A finished job gives
// schema.ErrTerminal; a job copying its outputs cannot be cancelled.
func (f *Farm) Cancel(ctx context.Context, frontend, id string) (*schema.Job, error) {
	j, err := f.store.JobGet(ctx, id)
	if err != nil {
		return nil, err
	}
	if j.Frontend != frontend {
		return nil, schema.ErrNotFound
	}
	if j.State.Terminal() {
		return nil, schema.ErrTerminal
	}
	if j.State == schema.JobStoring {
		return nil, fmt.Errorf("%w: the job is storing its outputs", schema.ErrConflict)
	}
	if j.State == schema.JobQueued {
		f.mu.Lock()
		pj := f.queue.Remove(id)
		f.mu.Unlock()
		done, err := f.db.JobUpdate(ctx, dbcontrollers.JobCancelQueued(id, f.cfg.NowFunc()))
		if err != nil {
			if errors.Is(err, schema.ErrConflict) {
				// Claimed between our read and the update: cancel it where it went.
				return f.Cancel(ctx, frontend, id)
			}
			if pj != nil {
				f.mu.Lock()
				f.queue.Push(pj) // still queued in the database: keep scheduling it
				f.mu.Unlock()
			}
			return nil, err
		}
		return f.cancelled(ctx, done), nil
	}

	// Dispatched or running: take it off the node.
	var a *attempt
	var was phase
	if r := f.runner(j.Node); r != nil {
		a, was = r.abandon(id)
	}
	done, err := f.db.JobUpdate(ctx, dbcontrollers.JobCancelActive(id, f.cfg.NowFunc()))
	if err != nil {
		if a != nil {
			a.resume(was)
		}
		if errors.Is(err, schema.ErrConflict) {
			return f.Cancel(ctx, frontend, id) // it moved on: look again
		}
		return nil, err
	}
	if a != nil {
		a.takeOff(ctx)
	}
	return f.cancelled(ctx, done), nil
}

// cancelHere does a cancel's part that belongs to the scheduler when another
// replica took it: the job leaves the queue, or its node.
func (f *Farm) cancelHere(ctx context.Context, id string) {
	f.mu.Lock()
	removed := f.queue.Remove(id) != nil
	if removed {
		f.publishPositionsLocked()
	}
	f.mu.Unlock()
	if removed {
		f.kickScheduler()
		return
	}
	for _, r := range f.runnerList() {
		if a, _ := r.abandon(id); a != nil {
			a.takeOff(ctx)
			return
		}
	}
}

func (f *Farm) cancelled(ctx context.Context, j *schema.Job) *schema.Job {
	f.notify(ctx, cluster.Notice{Kind: cluster.NoticeCancel, JobID: j.ID})
	f.metrics.jobFinished(j)
	f.refund(ctx, j)
	f.hub.Publish(j.ID, schema.Event{Type: schema.EventCancelled})
	f.mu.Lock()
	f.publishPositionsLocked()
	f.mu.Unlock()
	f.kickScheduler()
	return f.view(ctx, j)
}

// Nodes lists node views.
func (f *Farm) Nodes(ctx context.Context) ([]schema.NodeView, error) { return f.nodeViews(), nil }

// NodeAdd registers a node; the farm starts following it.
func (f *Farm) NodeAdd(ctx context.Context, n schema.Node) (*schema.NodeView, error) {
	v, err := f.nodes.Add(ctx, n)
	if err != nil {
		return nil, err
	}
	f.notify(ctx, cluster.Notice{Kind: cluster.NoticeNodes, Node: v.Name})
	return &v, nil
}

// NodeRemove unregisters a node; its jobs are requeued.
func (f *Farm) NodeRemove(ctx context.Context, name string) error {
	if err := f.nodes.Remove(ctx, name); err != nil {
		return err
	}
	f.notify(ctx, cluster.Notice{Kind: cluster.NoticeNodes, Node: name})
	return nil
}

// NodeDrain sets or clears a node's drain flag.
func (f *Farm) NodeDrain(ctx context.Context, name string, drain bool) (*schema.NodeView, error) {
	v, err := f.nodes.SetDrain(ctx, name, drain)
	if err != nil {
		return nil, err
	}
	f.kickScheduler()
	f.notify(ctx, cluster.Notice{Kind: cluster.NoticeNodes, Node: name})
	return &v, nil
}

// NodeProbe probes a node now (and has the leader probe it, when another
// replica leads).
func (f *Farm) NodeProbe(ctx context.Context, name string) (*schema.NodeView, error) {
	v, err := f.probeHere(ctx, name)
	if err != nil {
		return nil, err
	}
	if f.clustered() && !f.leading() {
		f.notify(ctx, cluster.Notice{Kind: cluster.NoticeProbe, Node: name})
	}
	return v, nil
}

// probeHere probes a node from this replica and reads its catalogue again
// when this replica follows it.
func (f *Farm) probeHere(ctx context.Context, name string) (*schema.NodeView, error) {
	v, err := f.nodes.ProbeNow(ctx, name)
	if err != nil {
		return nil, err
	}
	// An operator probes after changing a node (models copied, custom
	// nodes installed): its catalogue is read again too.
	if r := f.runner(name); r != nil && v.ComfyOK && r.learn(ctx) {
		if nv, ok := f.nodes.Get(name); ok {
			v = nv
		}
	}
	f.kickScheduler()
	return &v, nil
}

// ProbeURL probes an unregistered host and port.
func (f *Farm) ProbeURL(ctx context.Context, rawURL string) (*schema.ProbeResult, error) {
	res, err := f.nodes.ProbeURL(ctx, rawURL)
	if err != nil {
		return nil, err
	}
	return &res, nil
}

// JobCounts counts jobs by frontend and state, for the dashboard.
func (f *Farm) JobCounts(ctx context.Context) (map[string]map[schema.JobState]int, error) {
	return f.store.JobCounts(ctx)
}

package dbcontrollers

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/oklog/ulid/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Job list bounds.
const (
	DefaultJobListLimit = 50
	MaxJobListLimit     = 1000
)

// Store is the control database: the durable job queue and the registered
// nodes. Its methods are safe for concurrent use, also from several processes
// sharing one database.
type Store struct {
	db *DB
	// NowFunc is the clock (UTC is applied); time.Now when nil.
	NowFunc func() time.Time
	// WebhookURLFunc names the address a job that has just reached a final
	// state is announced to ("" or a nil func: none). It is called inside
	// the transaction writing that state, which also writes the webhook
	// outbox row (see webhooks.go), so it must only look at j and memory.
	WebhookURLFunc func(j *schema.Job) string
	// fence, when not 0, is the scheduler lease epoch every job write is
	// checked against (see Fenced).
	fence int64
	// seeded holds the names of the lease rows known to exist (see
	// LeaderAcquire); shared by the store's fenced views.
	seeded *sync.Map
}

// NewStore returns the store of an open control database.
func NewStore(db *DB) *Store { return &Store{db: db, seeded: &sync.Map{}} }

// DB returns the control database.
func (s *Store) DB() *DB { return s.db }

func (s *Store) now() time.Time {
	if s.NowFunc != nil {
		return dbTimeOf(s.NowFunc())
	}
	return dbTimeOf(time.Now())
}

func (s *Store) mysql() bool { return s.db.Dialect == DialectMySQL }

// NewJobID returns a fresh ULID for a job created at t: ids sort by creation.
func NewJobID(t time.Time) string {
	id, err := ulid.New(ulid.Timestamp(t), ulid.DefaultEntropy())
	if err != nil { // the monotonic source overflowed within one millisecond
		id = ulid.MustNew(ulid.Timestamp(t), rand.Reader)
	}
	return id.String()
}

func validateJob(j *schema.Job) error {
	if err := schema.CheckIdent("user_id", j.UserID, schema.MaxUserIDBytes); err != nil {
		return err
	}
	if j.IdempotencyKey != "" {
		if err := schema.CheckIdent("idempotency_key", j.IdempotencyKey, schema.MaxIdempotencyKeyBytes); err != nil {
			return err
		}
	}
	if j.ID != "" {
		if err := schema.CheckIdent("id", j.ID, schema.MaxJobIDBytes); err != nil {
			return err
		}
	}
	switch {
	case !schema.ValidFrontendName(j.Frontend):
		return schema.Invalid("frontend", "%q is not a valid frontend name", j.Frontend)
	case j.Priority < schema.MinPriority || j.Priority > schema.MaxPriority:
		return schema.Invalid("priority", "must be between %d and %d", schema.MinPriority, schema.MaxPriority)
	case len(j.Workflow) == 0 || !json.Valid(j.Workflow):
		return schema.Invalid("workflow", "must be a JSON object")
	case len(j.Metadata) > 0 && !json.Valid(j.Metadata):
		return schema.Invalid("metadata", "must be JSON")
	case j.State != "" && !j.State.Valid():
		return schema.Invalid("state", "unknown state %q", j.State)
	case len(j.Template) > 80:
		return schema.Invalid("template", "longer than 80 bytes")
	}
	return nil
}

// JobInsert stores a new job. Empty ID, State and CreatedAt are filled in
// (a ULID, queued, now); times are rounded to microseconds as stored. A second
// job with the same frontend and idempotency key is schema.ErrConflict.
func (s *Store) JobInsert(ctx context.Context, j *schema.Job) error {
	if err := validateJob(j); err != nil {
		return err
	}
	now := s.now()
	if j.CreatedAt.IsZero() {
		j.CreatedAt = now
	} else {
		j.CreatedAt = dbTimeOf(j.CreatedAt)
	}
	j.UpdatedAt = now
	if j.ID == "" {
		j.ID = NewJobID(j.CreatedAt)
	}
	if j.State == "" {
		j.State = schema.JobQueued
	}
	for _, p := range []**time.Time{&j.LeaseExpiresAt, &j.DispatchedAt, &j.StartedAt, &j.FinishedAt} {
		if *p != nil {
			t := dbTimeOf(**p)
			*p = &t
		}
	}
	args, err := jobArgs(j)
	if err != nil {
		return err
	}
	q := "INSERT INTO jobs (" + jobColumns + ") VALUES (" + jobPlaceholders + ")"
	if _, err := s.db.ExecContext(ctx, q, args...); err != nil {
		return fmt.Errorf("insert job: %w", interpretError(err))
	}
	return nil
}

func getJob(ctx context.Context, q sqlx.QueryerContext, where string, args ...any) (*schema.Job, error) {
	var r jobRow
	if err := sqlx.GetContext(ctx, q, &r, "SELECT "+jobColumns+" FROM jobs WHERE "+where, args...); err != nil {
		return nil, interpretError(err)
	}
	return r.job()
}

// JobGet returns one job; schema.ErrNotFound when there is none.
func (s *Store) JobGet(ctx context.Context, id string) (*schema.Job, error) {
	j, err := getJob(ctx, s.db, "id = ?", id)
	if err != nil {
		return nil, fmt.Errorf("get job %s: %w", id, err)
	}
	return j, nil
}

// JobByIdempotencyKey returns the job a frontend submitted with key.
func (s *Store) JobByIdempotencyKey(ctx context.Context, frontend, key string) (*schema.Job, error) {
	if key == "" {
		return nil, schema.ErrNotFound
	}
	j, err := getJob(ctx, s.db, "frontend = ? AND idempotency_key = ?", frontend, key)
	if err != nil {
		return nil, fmt.Errorf("get job by idempotency key: %w", err)
	}
	return j, nil
}

// JobList returns jobs newest first (by id: ULIDs sort by creation). An empty
// Frontend lists every frontend; Before pages on from an id.
func (s *Store) JobList(ctx context.Context, f schema.JobFilter) ([]schema.Job, error) {
	var where []string
	var args []any
	if f.Frontend != "" {
		where, args = append(where, "frontend = ?"), append(args, f.Frontend)
	}
	if f.UserID != "" {
		where, args = append(where, "user_id = ?"), append(args, f.UserID)
	}
	if f.State != "" {
		if !f.State.Valid() {
			return nil, schema.Invalid("state", "unknown state %q", f.State)
		}
		where, args = append(where, "state = ?"), append(args, string(f.State))
	}
	if f.Node != "" {
		where, args = append(where, "node = ?"), append(args, f.Node)
	}
	if f.Before != "" {
		where, args = append(where, "id < ?"), append(args, f.Before)
	}
	limit := f.Limit
	if limit <= 0 {
		limit = DefaultJobListLimit
	}
	limit = min(limit, MaxJobListLimit)
	q := "SELECT " + jobColumns + " FROM jobs"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY id DESC LIMIT ?"
	args = append(args, limit)
	var rows []jobRow
	if err := sqlx.SelectContext(ctx, s.db, &rows, q, args...); err != nil {
		return nil, fmt.Errorf("list jobs: %w", interpretError(err))
	}
	return jobsOf(rows)
}

// JobIDsByState returns the ids of every job in a state, oldest first: the
// light form of JobListByState, for looking for jobs one has not seen.
func (s *Store) JobIDsByState(ctx context.Context, state schema.JobState) ([]string, error) {
	if !state.Valid() {
		return nil, schema.Invalid("state", "unknown state %q", state)
	}
	var ids []string
	if err := sqlx.SelectContext(ctx, s.db, &ids, "SELECT id FROM jobs WHERE state = ? ORDER BY created_at, id", string(state)); err != nil {
		return nil, fmt.Errorf("list job ids by state: %w", interpretError(err))
	}
	return ids, nil
}

// JobIDsEnded returns those of ids whose jobs have ended (succeeded, failed
// or cancelled), in no order; unknown ids are left out.
func (s *Store) JobIDsEnded(ctx context.Context, ids []string) ([]string, error) {
	var ended []string
	for len(ids) > 0 {
		chunk := ids[:min(len(ids), 500)]
		ids = ids[len(chunk):]
		q, args, err := sqlx.In("SELECT id FROM jobs WHERE id IN (?) AND state IN (?)", chunk,
			[]string{string(schema.JobSucceeded), string(schema.JobFailed), string(schema.JobCancelled)})
		if err != nil {
			return nil, err
		}
		var got []string
		if err := sqlx.SelectContext(ctx, s.db, &got, q, args...); err != nil {
			return nil, fmt.Errorf("list ended jobs: %w", interpretError(err))
		}
		ended = append(ended, got...)
	}
	return ended, nil
}

// JobListByState returns every job in one of the states, oldest first.
func (s *Store) JobListByState(ctx context.Context, states ...schema.JobState) ([]schema.Job, error) {
	if len(states) == 0 {
		return nil, nil
	}
	names := make([]string, len(states))
	for i, st := range states {
		if !st.Valid() {
			return nil, schema.Invalid("state", "unknown state %q", st)
		}
		names[i] = string(st)
	}
	q, args, err := sqlx.In("SELECT "+jobColumns+" FROM jobs WHERE state IN (?) ORDER BY created_at, id", names)
	if err != nil {
		return nil, err
	}
	var rows []jobRow
	if err := sqlx.SelectContext(ctx, s.db, &rows, q, args...); err != nil {
		return nil, fmt.Errorf("list jobs by state: %w", interpretError(err))
	}
	return jobsOf(rows)
}

// JobCounts counts jobs by frontend and state. Every frontend that has jobs
// is present, with every state.
func (s *Store) JobCounts(ctx context.Context) (map[string]map[schema.JobState]int, error) {
	var rows []struct {
		Frontend string `db:"frontend"`
		State    string `db:"state"`
		N        int    `db:"n"`
	}
	if err := sqlx.SelectContext(ctx, s.db, &rows,
		"SELECT frontend, state, COUNT(*) AS n FROM jobs GROUP BY frontend, state"); err != nil {
		return nil, fmt.Errorf("count jobs: %w", interpretError(err))
	}
	out := map[string]map[schema.JobState]int{}
	for _, r := range rows {
		counts := out[r.Frontend]
		if counts == nil {
			counts = make(map[schema.JobState]int, len(schema.JobStates))
			for _, st := range schema.JobStates {
				counts[st] = 0
			}
			out[r.Frontend] = counts
		}
		counts[schema.JobState(r.State)] = r.N
	}
	return out, nil
}

// jobMissingOrConflict explains why a guarded update matched no row.
func jobMissingOrConflict(ctx context.Context, q sqlx.QueryerContext, id string) error {
	var state string
	err := sqlx.GetContext(ctx, q, &state, "SELECT state FROM jobs WHERE id = ?", id)
	if err != nil {
		return interpretError(err)
	}
	return fmt.Errorf("%w: job %s is %s", schema.ErrConflict, id, state)
}

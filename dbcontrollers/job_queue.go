package dbcontrollers

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

// ClaimParams claims one queued job for a node.
type ClaimParams struct {
	ID         string
	Node       string
	Owner      string // the process holding the lease
	LeaseUntil time.Time
}

// ClaimNextParams claims the head of a frontend's queue (of every frontend
// when Frontend is empty).
type ClaimNextParams struct {
	Frontend   string
	Node       string
	Owner      string
	LeaseUntil time.Time
}

// fenceCond is the condition of a single-statement write of a fenced store:
// the scheduler's lease is still at the store's epoch.
const fenceCond = " AND EXISTS (SELECT 1 FROM leader_lease WHERE name = ? AND epoch = ?)"

// claimSet moves a claimed job to dispatched; its arguments are claimArgs.
const claimSet = "state = 'dispatched', node = ?, attempts = attempts + 1, dispatched_at = ?, " +
	"started_at = NULL, prompt_id = NULL, progress = NULL, lease_owner = ?, lease_expires_at = ?, updated_at = ?"

func (s *Store) claimArgs(node, owner string, until time.Time) []any {
	now := s.now()
	return []any{node, tval(now), owner, tval(until), tval(now)}
}

func validateClaim(node, owner string, until time.Time) error {
	if err := schema.CheckIdent("node", node, schema.MaxNodeNameBytes); err != nil {
		return err
	}
	switch {
	case owner == "":
		return schema.Invalid("owner", "required")
	case until.IsZero():
		return schema.Invalid("lease_until", "required")
	}
	return nil
}

// JobClaim moves one queued job to dispatched on a node, with a lease:
// node set, attempts + 1, dispatched_at now. schema.ErrConflict when the job
// is not queued (any more), schema.ErrNotFound when there is no such job.
// Of several concurrent claims of one job exactly one wins.
func (s *Store) JobClaim(ctx context.Context, p ClaimParams) (*schema.Job, error) {
	if err := validateClaim(p.Node, p.Owner, p.LeaseUntil); err != nil {
		return nil, err
	}
	var job *schema.Job
	var err error
	if s.mysql() {
		err = s.jobTx(ctx, nil, func(tx *sqlx.Tx) error {
			var id string
			err := tx.GetContext(ctx, &id,
				"SELECT id FROM jobs WHERE id = ? AND state = 'queued' FOR UPDATE SKIP LOCKED", p.ID)
			if err != nil {
				if err = interpretError(err); errors.Is(err, schema.ErrNotFound) {
					return jobMissingOrConflict(ctx, tx, p.ID)
				}
				return err
			}
			args := append(s.claimArgs(p.Node, p.Owner, p.LeaseUntil), id)
			if _, err := tx.ExecContext(ctx, "UPDATE jobs SET "+claimSet+" WHERE id = ?", args...); err != nil {
				return interpretError(err)
			}
			job, err = getJob(ctx, tx, "id = ?", id)
			return err
		})
	} else {
		args := append(s.claimArgs(p.Node, p.Owner, p.LeaseUntil), p.ID)
		q := "UPDATE jobs SET " + claimSet + " WHERE id = ? AND state = 'queued'"
		if s.fence != 0 {
			q += fenceCond
			args = append(args, LeaderScheduler, s.fence)
		}
		job, err = s.sqliteReturning(ctx, q+" RETURNING "+jobColumns, args...)
		if errors.Is(err, schema.ErrNotFound) {
			if err = s.checkFence(ctx, s.db); err == nil {
				err = jobMissingOrConflict(ctx, s.db, p.ID)
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("claim job %s on %s: %w", p.ID, p.Node, err)
	}
	return job, nil
}

// jobTx runs fn in a transaction (retried on a lost lock race) that, for a
// fenced store, first checks the scheduler's lease is still at the store's
// epoch: every job write in a transaction goes through it.
func (s *Store) jobTx(ctx context.Context, opts *sql.TxOptions, fn func(tx *sqlx.Tx) error) error {
	return inTxRetryOpts(ctx, s.db, opts, func(tx *sqlx.Tx) error {
		if err := s.checkFence(ctx, tx); err != nil {
			return err
		}
		return fn(tx)
	})
}

// sqliteReturning runs one UPDATE ... RETURNING and scans the job it returns.
func (s *Store) sqliteReturning(ctx context.Context, q string, args ...any) (*schema.Job, error) {
	var r jobRow
	if err := sqlx.GetContext(ctx, s.db, &r, q, args...); err != nil {
		return nil, interpretError(err)
	}
	return r.job()
}

// JobClaimNext claims the head of a frontend's queue: highest priority, then
// oldest, then lowest id. schema.ErrNotFound when the queue is empty. Two
// workers never claim the same job; on MySQL a job another worker is claiming
// is skipped, not waited for.
func (s *Store) JobClaimNext(ctx context.Context, p ClaimNextParams) (*schema.Job, error) {
	if err := validateClaim(p.Node, p.Owner, p.LeaseUntil); err != nil {
		return nil, err
	}
	where := "state = 'queued'"
	var whereArgs []any
	if p.Frontend != "" {
		where = "frontend = ? AND " + where
		whereArgs = append(whereArgs, p.Frontend)
	}
	head := "SELECT id FROM jobs WHERE " + where + " ORDER BY priority DESC, created_at, id LIMIT 1"
	var job *schema.Job
	var err error
	if s.mysql() {
		err = s.jobTx(ctx, nil, func(tx *sqlx.Tx) error {
			var id string
			if err := tx.GetContext(ctx, &id, head+" FOR UPDATE SKIP LOCKED", whereArgs...); err != nil {
				return interpretError(err)
			}
			args := append(s.claimArgs(p.Node, p.Owner, p.LeaseUntil), id)
			if _, err := tx.ExecContext(ctx, "UPDATE jobs SET "+claimSet+" WHERE id = ?", args...); err != nil {
				return interpretError(err)
			}
			var err error
			job, err = getJob(ctx, tx, "id = ?", id)
			return err
		})
	} else {
		args := append(s.claimArgs(p.Node, p.Owner, p.LeaseUntil), whereArgs...)
		q := "UPDATE jobs SET " + claimSet + " WHERE id = (" + head + ") AND state = 'queued'"
		if s.fence != 0 {
			q += fenceCond
			args = append(args, LeaderScheduler, s.fence)
		}
		job, err = s.sqliteReturning(ctx, q+" RETURNING "+jobColumns, args...)
		if errors.Is(err, schema.ErrNotFound) && s.fence != 0 {
			if ferr := s.checkFence(ctx, s.db); ferr != nil {
				err = ferr
			}
		}
	}
	if err != nil {
		if errors.Is(err, schema.ErrNotFound) {
			return nil, schema.ErrNotFound
		}
		return nil, fmt.Errorf("claim next job on %s: %w", p.Node, err)
	}
	return job, nil
}

// JobUpdate changes a job if its state is still one of From (compare and
// set). Nil fields stay as they are.
type JobUpdate struct {
	ID   string
	From []schema.JobState // required: the states the change is valid from
	// State is the new state; empty keeps the current one.
	State schema.JobState
	// Node and PromptID: an empty string clears them.
	Node, PromptID *string
	Progress       *schema.Progress
	// Outputs replaces the outputs; nil leaves them unchanged.
	Outputs                             []schema.Output
	Error                               *schema.JobError
	DispatchedAt, StartedAt, FinishedAt *time.Time
	LeaseOwner                          *string
	LeaseUntil                          *time.Time
	// ClearLease removes owner and expiry (it wins over LeaseOwner/LeaseUntil).
	ClearLease      bool
	Attempts        *int
	CancelRequested *bool
	Charged         *int64
	// Attempt, when set, is a second condition: the change applies only to
	// that attempt of the job, so a late event of an earlier attempt cannot
	// move a newer one.
	Attempt *int
}

func (u *JobUpdate) set(now time.Time) (set []string, args []any, err error) {
	add := func(col string, v any) {
		set = append(set, col+" = ?")
		args = append(args, v)
	}
	if u.State != "" {
		add("state", string(u.State))
	}
	if u.Node != nil {
		add("node", strOrNil(*u.Node))
	}
	if u.PromptID != nil {
		add("prompt_id", strOrNil(*u.PromptID))
	}
	if u.Progress != nil {
		v, err := marshalText(u.Progress)
		if err != nil {
			return nil, nil, fmt.Errorf("encode progress: %w", err)
		}
		add("progress", v)
	}
	if u.Outputs != nil {
		v, err := encodeOutputs(u.Outputs)
		if err != nil {
			return nil, nil, fmt.Errorf("encode outputs: %w", err)
		}
		add("outputs", v)
	}
	if u.Error != nil {
		v, err := marshalText(u.Error)
		if err != nil {
			return nil, nil, fmt.Errorf("encode error: %w", err)
		}
		add("error", v)
	}
	if u.DispatchedAt != nil {
		add("dispatched_at", tval(*u.DispatchedAt))
	}
	if u.StartedAt != nil {
		add("started_at", tval(*u.StartedAt))
	}
	if u.FinishedAt != nil {
		add("finished_at", tval(*u.FinishedAt))
	}
	switch {
	case u.ClearLease:
		add("lease_owner", nil)
		add("lease_expires_at", nil)
	default:
		if u.LeaseOwner != nil {
			add("lease_owner", strOrNil(*u.LeaseOwner))
		}
		if u.LeaseUntil != nil {
			add("lease_expires_at", tval(*u.LeaseUntil))
		}
	}
	if u.Attempts != nil {
		add("attempts", *u.Attempts)
	}
	if u.CancelRequested != nil {
		add("cancel_requested", *u.CancelRequested)
	}
	if u.Charged != nil {
		add("charged", *u.Charged)
	}
	add("updated_at", tval(now))
	return set, args, nil
}

// JobUpdate applies u when the job's state is one of u.From and returns the
// job as stored after it. schema.ErrConflict when the state is not in From,
// schema.ErrNotFound when there is no such job.
func (s *Store) JobUpdate(ctx context.Context, u JobUpdate) (*schema.Job, error) {
	if len(u.From) == 0 {
		return nil, schema.Invalid("from", "required")
	}
	if u.State != "" && !u.State.Valid() {
		return nil, schema.Invalid("state", "unknown state %q", u.State)
	}
	from := make([]string, len(u.From))
	for i, st := range u.From {
		if !st.Valid() {
			return nil, schema.Invalid("from", "unknown state %q", st)
		}
		from[i] = string(st)
	}
	set, args, err := u.set(s.now())
	if err != nil {
		return nil, err
	}
	where := " WHERE id = ? AND state IN (?)"
	args = append(args, u.ID, from)
	if u.Attempt != nil {
		where += " AND attempts = ?"
		args = append(args, *u.Attempt)
	}
	q, args, err := sqlx.In("UPDATE jobs SET "+strings.Join(set, ", ")+where, args...)
	if err != nil {
		return nil, err
	}
	var job *schema.Job
	if s.mysql() {
		err = s.jobTx(ctx, nil, func(tx *sqlx.Tx) error {
			res, err := tx.ExecContext(ctx, q, args...)
			if err != nil {
				return interpretError(err)
			}
			n, err := res.RowsAffected()
			if err != nil {
				return err
			}
			job, err = getJob(ctx, tx, "id = ?", u.ID)
			if err != nil {
				return err
			}
			// MySQL counts changed rows: 0 is also a matched row whose
			// values were already those.
			if n == 0 && !slices.Contains(u.From, job.State) {
				return fmt.Errorf("%w: job %s is %s", schema.ErrConflict, u.ID, job.State)
			}
			if n == 0 && u.Attempt != nil && job.Attempts != *u.Attempt {
				return fmt.Errorf("%w: job %s is at attempt %d", schema.ErrConflict, u.ID, job.Attempts)
			}
			return s.finalWebhook(ctx, tx, u, job)
		})
	} else if u.State.Terminal() || s.fence != 0 {
		// A final state and its webhook outbox row commit together; a
		// fenced write checks the lease in the same transaction.
		err = s.jobTx(ctx, nil, func(tx *sqlx.Tx) error {
			var r jobRow
			if err := tx.GetContext(ctx, &r, q+" RETURNING "+jobColumns, args...); err != nil {
				if err = interpretError(err); errors.Is(err, schema.ErrNotFound) {
					return jobMissingOrConflict(ctx, tx, u.ID)
				}
				return err
			}
			var err error
			if job, err = r.job(); err != nil {
				return err
			}
			return s.finalWebhook(ctx, tx, u, job)
		})
	} else {
		job, err = s.sqliteReturning(ctx, q+" RETURNING "+jobColumns, args...)
		if errors.Is(err, schema.ErrNotFound) {
			err = jobMissingOrConflict(ctx, s.db, u.ID)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("update job %s: %w", u.ID, err)
	}
	return job, nil
}

// finalWebhook writes the webhook outbox row of an update that gave the job
// its final state, in the update's transaction.
func (s *Store) finalWebhook(ctx context.Context, tx sqlx.ExtContext, u JobUpdate, job *schema.Job) error {
	if !u.State.Terminal() || job.State != u.State {
		return nil
	}
	return s.webhookEnqueue(ctx, tx, job)
}

// leasedStates are ActiveStates as the queries bind them: the states that
// hold a node and so carry a lease.
var leasedStates = func() []string {
	out := make([]string, len(ActiveStates))
	for i, st := range ActiveStates {
		out[i] = string(st)
	}
	return out
}()

// leaseBatch bounds the ids of one statement.
const leaseBatch = 500

// JobExtendLease moves the lease of owner's active jobs among ids to until
// and returns how many it extended. Jobs another owner holds, or no longer
// active, are left alone (the caller has lost them).
func (s *Store) JobExtendLease(ctx context.Context, owner string, ids []string, until time.Time) (int, error) {
	if owner == "" {
		return 0, schema.Invalid("owner", "required")
	}
	total := 0
	now := s.now()
	for len(ids) > 0 {
		batch := ids[:min(len(ids), leaseBatch)]
		ids = ids[len(batch):]
		q, args, err := sqlx.In("UPDATE jobs SET lease_expires_at = ?, updated_at = ? "+
			"WHERE lease_owner = ? AND id IN (?) AND state IN (?)",
			tval(until), tval(now), owner, batch, leasedStates)
		if err != nil {
			return total, err
		}
		n, err := s.extendLeases(ctx, q, args, owner, batch, until)
		if err != nil {
			return total, fmt.Errorf("extend leases: %w", err)
		}
		total += n
	}
	return total, nil
}

// extendLeases runs one batch. SQLite counts matched rows; MySQL counts
// changed rows, so there the leases now held are counted in the same
// transaction.
func (s *Store) extendLeases(ctx context.Context, q string, args []any, owner string, ids []string, until time.Time) (int, error) {
	if !s.mysql() && s.fence == 0 {
		// One statement, nothing to check it against: no transaction.
		res, err := s.db.ExecContext(ctx, q, args...)
		if err != nil {
			return 0, interpretError(err)
		}
		n, err := res.RowsAffected()
		return int(n), err
	}
	if !s.mysql() {
		var n int64
		err := s.jobTx(ctx, nil, func(tx *sqlx.Tx) error {
			res, err := tx.ExecContext(ctx, q, args...)
			if err != nil {
				return interpretError(err)
			}
			n, err = res.RowsAffected()
			return err
		})
		return int(n), err
	}
	var n int
	err := s.jobTx(ctx, nil, func(tx *sqlx.Tx) error {
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return interpretError(err)
		}
		cq, cargs, err := sqlx.In("SELECT COUNT(*) FROM jobs WHERE lease_owner = ? AND id IN (?) AND state IN (?) "+
			"AND lease_expires_at = ?", owner, ids, leasedStates, tval(until))
		if err != nil {
			return err
		}
		return tx.GetContext(ctx, &n, cq, cargs...)
	})
	return n, err
}

// JobRescue returns active jobs whose lease expired before now to the queue
// (node and lease cleared, attempts kept), or fails them with node_lost once
// attempts >= maxAttempts. It is idempotent and safe to run from several
// processes at once: a job is rescued once.
func (s *Store) JobRescue(ctx context.Context, now time.Time, maxAttempts int) (requeued, failed []schema.Job, err error) {
	if maxAttempts < 1 {
		return nil, nil, schema.Invalid("max_attempts", "must be at least 1")
	}
	for {
		rq, fl, n, err := s.rescueBatch(ctx, now, maxAttempts)
		if err != nil {
			return requeued, failed, fmt.Errorf("rescue jobs: %w", err)
		}
		requeued, failed = append(requeued, rq...), append(failed, fl...)
		if n < leaseBatch {
			return requeued, failed, nil
		}
	}
}

func (s *Store) rescueBatch(ctx context.Context, now time.Time, maxAttempts int) (requeued, failed []schema.Job, n int, err error) {
	// On MySQL: SKIP LOCKED, so the rescuer never waits for a job another
	// transaction holds (it is taken at the next round), and READ COMMITTED.
	// Under REPEATABLE READ the range scan takes next-key locks: concurrent
	// rescuers then skipped rows that none of them returned (MariaDB 10.11,
	// seen about once in a hundred rounds of three rescuers), and a plain
	// FOR UPDATE instead waited, blocking every insert into the scanned gap
	// (new jobs) for as long as the held row stayed locked.
	lock := ""
	var opts *sql.TxOptions
	if s.mysql() {
		lock = " FOR UPDATE SKIP LOCKED"
		opts = &sql.TxOptions{Isolation: sql.LevelReadCommitted}
	}
	expired := "state IN (?) AND lease_expires_at IS NOT NULL AND lease_expires_at < ?"
	stamp := s.now()
	err = s.jobTx(ctx, opts, func(tx *sqlx.Tx) error {
		requeued, failed, n = nil, nil, 0
		q, args, err := sqlx.In("SELECT id, node, attempts FROM jobs WHERE "+expired+
			" ORDER BY lease_expires_at, id LIMIT ?"+lock, leasedStates, tval(now), leaseBatch)
		if err != nil {
			return err
		}
		var rows []struct {
			ID       string  `db:"id"`
			Node     *string `db:"node"`
			Attempts int     `db:"attempts"`
		}
		if err := tx.SelectContext(ctx, &rows, q, args...); err != nil {
			return interpretError(err)
		}
		n = len(rows)
		var back []string
		for _, r := range rows {
			if r.Attempts < maxAttempts {
				back = append(back, r.ID)
				continue
			}
			node := ""
			if r.Node != nil {
				node = *r.Node
			}
			jerr, err := marshalText(&schema.JobError{
				Code:    schema.CodeNodeLost,
				Message: fmt.Sprintf("lost by node %q after %d attempts", node, r.Attempts),
			})
			if err != nil {
				return err
			}
			q, args, err := sqlx.In("UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, progress = NULL, "+
				"lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ? AND "+expired,
				jerr, tval(stamp), tval(stamp), r.ID, leasedStates, tval(now))
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, q, args...); err != nil {
				return interpretError(err)
			}
			j, err := getJob(ctx, tx, "id = ?", r.ID)
			if err != nil {
				return err
			}
			if err := s.webhookEnqueue(ctx, tx, j); err != nil {
				return err
			}
			failed = append(failed, *j)
		}
		if len(back) == 0 {
			return nil
		}
		q, args, err = sqlx.In("UPDATE jobs SET state = 'queued', node = NULL, prompt_id = NULL, progress = NULL, "+
			"dispatched_at = NULL, started_at = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? "+
			"WHERE id IN (?) AND "+expired, tval(stamp), back, leasedStates, tval(now))
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return interpretError(err)
		}
		q, args, err = sqlx.In("SELECT "+jobColumns+" FROM jobs WHERE id IN (?) ORDER BY created_at, id", back)
		if err != nil {
			return err
		}
		var jr []jobRow
		if err := tx.SelectContext(ctx, &jr, q, args...); err != nil {
			return interpretError(err)
		}
		requeued, err = jobsOf(jr)
		return err
	})
	return requeued, failed, n, err
}

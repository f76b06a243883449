package dbcontrollers

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

// The webhook outbox.
//
// A job's final state and the row that says "tell its webhook" are written in
// one transaction (JobUpdate and JobRescue call webhookEnqueue inside theirs),
// so neither exists without the other: a crash right after the commit loses
// no delivery, and a rolled-back final state sends none. The row is keyed by
// (job_id, event) and inserted only if absent, so writing it twice is
// harmless.
//
// A deliverer claims due rows (state pending, next_attempt_at passed) by
// moving next_attempt_at to the end of a lease and naming itself in
// lease_owner; a deliverer that dies mid-attempt leaves the row to come due
// again when the lease ends. The result of an attempt is written only by the
// lease's owner, and only while the row is still pending.

// maxStoredWebhookAttempts bounds the attempts kept per delivery (the newest
// are kept; attempt_count counts them all).
const maxStoredWebhookAttempts = 50

const webhookColumns = "id, job_id, frontend, event, url, state, attempts, attempt_count, next_attempt_at, " +
	"lease_owner, created_at, updated_at"

type webhookRow struct {
	ID            string         `db:"id"`
	JobID         string         `db:"job_id"`
	Frontend      string         `db:"frontend"`
	Event         string         `db:"event"`
	URL           string         `db:"url"`
	State         string         `db:"state"`
	Attempts      sql.NullString `db:"attempts"`
	AttemptCount  int            `db:"attempt_count"`
	NextAttemptAt dbTime         `db:"next_attempt_at"`
	LeaseOwner    sql.NullString `db:"lease_owner"`
	CreatedAt     dbTime         `db:"created_at"`
	UpdatedAt     dbTime         `db:"updated_at"`
}

func (r *webhookRow) delivery() (schema.WebhookDelivery, error) {
	d := schema.WebhookDelivery{
		ID: r.ID, JobID: r.JobID, Frontend: r.Frontend, Event: schema.JobState(r.Event), URL: r.URL,
		State: schema.WebhookState(r.State), Attempts: []schema.WebhookAttempt{},
		CreatedAt: r.CreatedAt.Time, UpdatedAt: r.UpdatedAt.Time,
	}
	if d.State == schema.WebhookPending {
		t := r.NextAttemptAt.Time
		d.NextAttemptAt = &t
	}
	if r.Attempts.Valid && r.Attempts.String != "" {
		if err := json.Unmarshal([]byte(r.Attempts.String), &d.Attempts); err != nil {
			return d, fmt.Errorf("webhook %s: decode attempts: %w", r.ID, err)
		}
	}
	return d, nil
}

func deliveriesOf(rows []webhookRow) ([]schema.WebhookDelivery, error) {
	out := make([]schema.WebhookDelivery, 0, len(rows))
	for i := range rows {
		d, err := rows[i].delivery()
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// webhookEnqueue adds the outbox row of a job that has just reached a final
// state, in the caller's transaction, when Store.WebhookURLFunc names an
// address for it. An existing row for the job and event is kept as it is.
func (s *Store) webhookEnqueue(ctx context.Context, tx sqlx.ExtContext, j *schema.Job) error {
	if s.WebhookURLFunc == nil || !j.State.Terminal() {
		return nil
	}
	url := s.WebhookURLFunc(j)
	if url == "" {
		return nil
	}
	now := s.now()
	q := "INSERT INTO webhooks (id, job_id, frontend, event, url, state, attempt_count, next_attempt_at, " +
		"created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)"
	if s.mysql() {
		q += " ON DUPLICATE KEY UPDATE id = id"
	} else {
		q += " ON CONFLICT DO NOTHING"
	}
	_, err := tx.ExecContext(ctx, q, schema.WebhookMessageID(j.ID, j.State), j.ID, j.Frontend, string(j.State),
		url, tval(now), tval(now), tval(now))
	if err != nil {
		return fmt.Errorf("enqueue webhook of job %s: %w", j.ID, interpretError(err))
	}
	return nil
}

// WebhookClaimParams claims due deliveries for one deliverer.
type WebhookClaimParams struct {
	Owner      string    // the deliverer holding the lease
	Limit      int       // at most this many
	LeaseUntil time.Time // the row comes due again then if no result is recorded
	// ExcludeFrontends are left out (the deliverer has as many of theirs
	// in flight as it allows).
	ExcludeFrontends []string
}

// WebhookClaim leases up to Limit due deliveries, oldest due first. Two
// deliverers never hold the same row at once; on MySQL rows another is
// claiming are skipped, not waited for.
func (s *Store) WebhookClaim(ctx context.Context, p WebhookClaimParams) ([]schema.WebhookDelivery, error) {
	switch {
	case p.Owner == "":
		return nil, schema.Invalid("owner", "required")
	case p.Limit < 1:
		return nil, schema.Invalid("limit", "must be at least 1")
	case p.LeaseUntil.IsZero():
		return nil, schema.Invalid("lease_until", "required")
	}
	now := s.now()
	due := "SELECT id FROM webhooks WHERE state = 'pending' AND next_attempt_at <= ?"
	dueArgs := []any{tval(now)}
	if len(p.ExcludeFrontends) > 0 {
		q, args, err := sqlx.In(due+" AND frontend NOT IN (?)", dueArgs[0], p.ExcludeFrontends)
		if err != nil {
			return nil, err
		}
		due, dueArgs = q, args
	}
	due += " ORDER BY next_attempt_at, id LIMIT ?"
	dueArgs = append(dueArgs, p.Limit)
	set := "UPDATE webhooks SET next_attempt_at = ?, lease_owner = ?, updated_at = ? WHERE "
	var rows []webhookRow
	if s.mysql() {
		// READ COMMITTED and SKIP LOCKED, as JobRescue: no gap locks, no
		// waiting on a row another deliverer is claiming.
		opts := &sql.TxOptions{Isolation: sql.LevelReadCommitted}
		err := inTxRetryOpts(ctx, s.db, opts, func(tx *sqlx.Tx) error {
			rows = nil
			var ids []string
			if err := tx.SelectContext(ctx, &ids, due+" FOR UPDATE SKIP LOCKED", dueArgs...); err != nil {
				return interpretError(err)
			}
			if len(ids) == 0 {
				return nil
			}
			q, args, err := sqlx.In(set+"id IN (?)", tval(p.LeaseUntil), p.Owner, tval(now), ids)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, q, args...); err != nil {
				return interpretError(err)
			}
			q, args, err = sqlx.In("SELECT "+webhookColumns+" FROM webhooks WHERE id IN (?) ORDER BY created_at, id", ids)
			if err != nil {
				return err
			}
			return interpretError(tx.SelectContext(ctx, &rows, q, args...))
		})
		if err != nil {
			return nil, fmt.Errorf("claim webhooks: %w", err)
		}
	} else {
		args := append([]any{tval(p.LeaseUntil), p.Owner, tval(now)}, dueArgs...)
		err := sqlx.SelectContext(ctx, s.db, &rows, set+"id IN ("+due+") RETURNING "+webhookColumns, args...)
		if err != nil {
			return nil, fmt.Errorf("claim webhooks: %w", interpretError(err))
		}
	}
	return deliveriesOf(rows)
}

// WebhookRelease gives claimed deliveries back unattempted: due at once,
// for any deliverer. Rows the owner no longer holds are left alone.
func (s *Store) WebhookRelease(ctx context.Context, owner string, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	now := s.now()
	q, args, err := sqlx.In("UPDATE webhooks SET next_attempt_at = ?, lease_owner = NULL, updated_at = ? "+
		"WHERE id IN (?) AND lease_owner = ? AND state = 'pending'", tval(now), tval(now), ids, owner)
	if err != nil {
		return err
	}
	if _, err := s.db.ExecContext(ctx, q, args...); err != nil {
		return fmt.Errorf("release webhooks: %w", interpretError(err))
	}
	return nil
}

// WebhookResult is the outcome of one attempt at a claimed delivery.
type WebhookResult struct {
	ID      string
	Owner   string // must still hold the lease
	Attempt schema.WebhookAttempt
	// State is pending (try again at NextAttemptAt), delivered or failed.
	State         schema.WebhookState
	NextAttemptAt time.Time
}

// WebhookRecord appends an attempt to a delivery and moves it on.
// schema.ErrConflict when the lease is no longer the owner's (it ran out and
// another deliverer claimed the row) or the delivery is no longer pending.
func (s *Store) WebhookRecord(ctx context.Context, r WebhookResult) error {
	switch r.State {
	case schema.WebhookPending, schema.WebhookDelivered, schema.WebhookFailed:
	default:
		return schema.Invalid("state", "unknown webhook state %q", r.State)
	}
	next := r.NextAttemptAt
	if r.State != schema.WebhookPending || next.IsZero() {
		next = s.now()
	}
	lock := ""
	if s.mysql() {
		lock = " FOR UPDATE"
	}
	err := inTxRetry(ctx, s.db, func(tx *sqlx.Tx) error {
		var cur struct {
			State      string         `db:"state"`
			LeaseOwner sql.NullString `db:"lease_owner"`
			Attempts   sql.NullString `db:"attempts"`
		}
		if err := tx.GetContext(ctx, &cur, "SELECT state, lease_owner, attempts FROM webhooks WHERE id = ?"+lock, r.ID); err != nil {
			return interpretError(err)
		}
		if cur.State != string(schema.WebhookPending) || cur.LeaseOwner.String != r.Owner {
			return fmt.Errorf("%w: webhook %s is %s, lease held by %q", schema.ErrConflict, r.ID, cur.State, cur.LeaseOwner.String)
		}
		var attempts []schema.WebhookAttempt
		if cur.Attempts.Valid && cur.Attempts.String != "" {
			if err := json.Unmarshal([]byte(cur.Attempts.String), &attempts); err != nil {
				return fmt.Errorf("decode attempts: %w", err)
			}
		}
		a := r.Attempt
		a.At = dbTimeOf(a.At)
		attempts = append(attempts, a)
		if len(attempts) > maxStoredWebhookAttempts {
			attempts = attempts[len(attempts)-maxStoredWebhookAttempts:]
		}
		text, err := marshalText(attempts)
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, "UPDATE webhooks SET state = ?, attempts = ?, attempt_count = attempt_count + 1, "+
			"next_attempt_at = ?, lease_owner = NULL, updated_at = ? WHERE id = ?",
			string(r.State), text, tval(next), tval(s.now()), r.ID)
		return interpretError(err)
	})
	if err != nil {
		return fmt.Errorf("record webhook attempt %s: %w", r.ID, err)
	}
	return nil
}

// WebhookList returns the deliveries of one job, oldest first.
func (s *Store) WebhookList(ctx context.Context, jobID string) ([]schema.WebhookDelivery, error) {
	var rows []webhookRow
	if err := sqlx.SelectContext(ctx, s.db, &rows,
		"SELECT "+webhookColumns+" FROM webhooks WHERE job_id = ? ORDER BY created_at, id", jobID); err != nil {
		return nil, fmt.Errorf("list webhooks of job %s: %w", jobID, interpretError(err))
	}
	return deliveriesOf(rows)
}

// WebhookPending counts the pending deliveries by frontend.
func (s *Store) WebhookPending(ctx context.Context) (map[string]int, error) {
	var rows []struct {
		Frontend string `db:"frontend"`
		N        int    `db:"n"`
	}
	if err := sqlx.SelectContext(ctx, s.db, &rows,
		"SELECT frontend, COUNT(*) AS n FROM webhooks WHERE state = 'pending' GROUP BY frontend"); err != nil {
		return nil, fmt.Errorf("count pending webhooks: %w", interpretError(err))
	}
	out := make(map[string]int, len(rows))
	for _, r := range rows {
		out[r.Frontend] = r.N
	}
	return out, nil
}

package dbcontrollers

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

// LeaderScheduler names the lease of the replica that schedules jobs and
// drives the nodes.
const LeaderScheduler = "scheduler"

// ErrFenced is the answer to a job write made under an epoch of the
// scheduler's lease that is no longer current: another replica took the
// lease over, and what this one believed is stale. It wraps
// schema.ErrConflict, so callers that stop on a conflict stop here too.
var ErrFenced = fmt.Errorf("%w: this instance no longer holds the scheduler lease (fenced)", schema.ErrConflict)

// Leadership is the state of a lease as one call left it.
type Leadership struct {
	Holder    string    // the instance holding it; "" when nobody ever did
	Epoch     int64     // grows at each change of holder
	ExpiresAt time.Time // on the database's clock
	Held      bool      // held by the caller, at Epoch
}

// leaderSelect reads a lease row by name.
const leaderSelect = "SELECT holder, epoch, expires_ms FROM leader_lease WHERE name = ?"

// leaderRow is a leader_lease row.
type leaderRow struct {
	Holder    string `db:"holder"`
	Epoch     int64  `db:"epoch"`
	ExpiresMS int64  `db:"expires_ms"`
}

// dbNowMS reads the database's clock in milliseconds: every replica's lease
// arithmetic uses the one clock they share.
func (s *Store) dbNowMS(ctx context.Context, q sqlx.QueryerContext) (int64, error) {
	expr := "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
	if s.mysql() {
		expr = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000 AS SIGNED)"
	}
	var ms int64
	err := sqlx.GetContext(ctx, q, &ms, "SELECT "+expr)
	return ms, interpretError(err)
}

// LeaderAcquire takes or renews the lease name for holder, for ttl.
//
// With epoch 0 (the caller does not lead), the lease is taken when nobody
// holds it or it has expired, and also when holder's own earlier term still
// holds it (a restarted process under the same instance id): every take
// gives a new epoch, so whatever an earlier term still has in flight is
// fenced. With the caller's epoch, the lease is renewed only when that term
// still holds it. The answer says who holds the lease either way.
func (s *Store) LeaderAcquire(ctx context.Context, name, holder string, ttl time.Duration, epoch int64) (Leadership, error) {
	if name == "" || holder == "" || ttl <= 0 {
		return Leadership{}, schema.Invalid("lease", "name, holder and a positive ttl are required")
	}
	if _, known := s.seeded.Load(name); epoch == 0 && !known {
		// Seed the row, free, before locking it: on MySQL a locking read of a
		// missing row takes a gap lock, and replicas racing to insert under
		// theirs deadlock. An existing row is left as it is, and rows are
		// never deleted: once per store is enough.
		seed := "INSERT IGNORE INTO leader_lease (name, holder, epoch, expires_ms) VALUES (?, '', 0, 0)"
		if !s.mysql() {
			seed = "INSERT INTO leader_lease (name, holder, epoch, expires_ms) VALUES (?, '', 0, 0) ON CONFLICT (name) DO NOTHING"
		}
		if _, err := s.db.ExecContext(ctx, seed, name); err != nil {
			return Leadership{}, fmt.Errorf("leader lease %s: %w", name, interpretError(err))
		}
		s.seeded.Store(name, true)
	}
	var out Leadership
	err := inTxRetry(ctx, s.db, func(tx *sqlx.Tx) error {
		now, err := s.dbNowMS(ctx, tx)
		if err != nil {
			return err
		}
		until := now + ttl.Milliseconds()
		lock := ""
		if s.mysql() {
			lock = " FOR UPDATE"
		}
		var row leaderRow
		err = tx.GetContext(ctx, &row, leaderSelect+lock, name)
		if errors.Is(err, sql.ErrNoRows) {
			// Never seeded: only a renewal gets here, of a term that cannot hold it.
			return nil
		}
		if err != nil {
			return interpretError(err)
		}
		out = Leadership{Holder: row.Holder, Epoch: row.Epoch, ExpiresAt: time.UnixMilli(row.ExpiresMS).UTC()}
		switch {
		case epoch != 0 && row.Holder == holder && row.Epoch == epoch && row.ExpiresMS > now:
			// Renew this term.
			if _, err := tx.ExecContext(ctx, "UPDATE leader_lease SET expires_ms = ? WHERE name = ? AND epoch = ?", until, name, epoch); err != nil {
				return interpretError(err)
			}
			out.ExpiresAt, out.Held = time.UnixMilli(until).UTC(), true
		case epoch == 0 && (row.ExpiresMS <= now || row.Holder == holder):
			// Take it: free, expired, or an earlier term of ours.
			if _, err := tx.ExecContext(ctx, "UPDATE leader_lease SET holder = ?, epoch = epoch + 1, expires_ms = ? WHERE name = ? AND epoch = ?",
				holder, until, name, row.Epoch); err != nil {
				return interpretError(err)
			}
			out = Leadership{Holder: holder, Epoch: row.Epoch + 1, ExpiresAt: time.UnixMilli(until).UTC(), Held: true}
		}
		return nil
	})
	if err != nil {
		return Leadership{}, fmt.Errorf("leader lease %s: %w", name, err)
	}
	return out, nil
}

// LeaderResign gives up holder's term epoch of the lease at once (a clean
// shutdown), so that another replica takes over without waiting it out.
func (s *Store) LeaderResign(ctx context.Context, name, holder string, epoch int64) error {
	_, err := s.db.ExecContext(ctx, "UPDATE leader_lease SET expires_ms = 0 WHERE name = ? AND holder = ? AND epoch = ?", name, holder, epoch)
	if err != nil {
		return fmt.Errorf("resign leader lease %s: %w", name, interpretError(err))
	}
	return nil
}

// LeaderGet reads the lease name; Holder is "" when nobody ever held it.
func (s *Store) LeaderGet(ctx context.Context, name string) (Leadership, error) {
	var row leaderRow
	err := s.db.GetContext(ctx, &row, leaderSelect, name)
	if errors.Is(err, sql.ErrNoRows) {
		return Leadership{}, nil
	}
	if err != nil {
		return Leadership{}, fmt.Errorf("read leader lease %s: %w", name, interpretError(err))
	}
	return Leadership{Holder: row.Holder, Epoch: row.Epoch, ExpiresAt: time.UnixMilli(row.ExpiresMS).UTC()}, nil
}

// Fenced returns a view of the store whose job writes (claims, updates,
// lease extensions, rescues) apply only while the scheduler's lease is at
// epoch; otherwise they fail with ErrFenced. Epoch 0 is the unfenced store
// (one process, no lease).
func (s *Store) Fenced(epoch int64) *Store {
	c := *s
	c.fence = epoch
	return &c
}

// checkFence fails with ErrFenced when the scheduler's lease has moved on
// from the store's epoch. On MySQL it reads the lease row with a shared
// lock held to the end of the caller's transaction: a takeover (which
// updates that row) waits for the write in progress, and every write after
// the takeover sees the new epoch.
func (s *Store) checkFence(ctx context.Context, q sqlx.QueryerContext) error {
	if s.fence == 0 {
		return nil
	}
	lock := ""
	if s.mysql() {
		lock = " LOCK IN SHARE MODE"
	}
	var epoch int64
	err := sqlx.GetContext(ctx, q, &epoch, "SELECT epoch FROM leader_lease WHERE name = ?"+lock, LeaderScheduler)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && epoch != s.fence) {
		return ErrFenced
	}
	return interpretError(err)
}

package dbcontrollers

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"mime"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Base is the SQL every frontend shares (users, credit_ledger, photos),
// built once per database and dialect. Controllers embed it and override
// what differs. A Base method never calls an override: each stands alone.
type Base struct {
	name           string
	db             *DB
	initialCredits int64
	costPerJob     int64
	keepTemp       bool
	accept         []string // media types, or "type/*" prefixes

	// Dialect-specific clauses. lockRow and shareRow are appended to a
	// single-table SELECT to read the newest committed row and lock it
	// (MySQL); SQLite transactions hold the write lock from BEGIN.
	lockRow  string
	shareRow string

	// NowFunc is the clock; time.Now when nil.
	NowFunc func() time.Time
}

// defaultAccept are the media types a frontend keeps unless configured.
var defaultAccept = []string{"image/*", "video/*", "audio/*"}

// NewBase builds the common SQL of one frontend over its open database.
func NewBase(db *DB, fc FrontendConfig) (*Base, error) {
	if !schema.ValidFrontendName(fc.Name) {
		return nil, schema.Invalid("frontend", "%q is not a valid frontend name", fc.Name)
	}
	if fc.InitialCredits < 0 {
		return nil, fmt.Errorf("frontend %s: initial credits must not be negative", fc.Name)
	}
	if fc.CostPerJob < 0 {
		return nil, fmt.Errorf("frontend %s: cost per job must not be negative", fc.Name)
	}
	b := &Base{
		name:           fc.Name,
		db:             db,
		initialCredits: fc.InitialCredits,
		costPerJob:     fc.CostPerJob,
		keepTemp:       fc.KeepTempOutputs,
		accept:         defaultAccept,
	}
	if v, ok := fc.Options["accept"]; ok {
		acc, err := parseAccept(v)
		if err != nil {
			return nil, fmt.Errorf("frontend %s: option accept: %w", fc.Name, err)
		}
		b.accept = acc
	}
	if db.Dialect == DialectMySQL {
		b.lockRow = " FOR UPDATE"
		b.shareRow = " LOCK IN SHARE MODE"
	}
	return b, nil
}

func parseAccept(v string) ([]string, error) {
	var out []string
	for _, part := range strings.Split(v, ",") {
		part = strings.ToLower(strings.TrimSpace(part))
		if part == "" {
			continue
		}
		typ, sub, ok := strings.Cut(part, "/")
		if !ok || typ == "" || sub == "" || typ == "*" || strings.ContainsAny(part, " ;") {
			return nil, fmt.Errorf("%q is not a media type or type/* pattern", part)
		}
		out = append(out, part)
	}
	if len(out) == 0 {
		return nil, errors.New("empty")
	}
	return out, nil
}

func (b *Base) now() time.Time {
	if b.NowFunc != nil {
		return dbTimeOf(b.NowFunc())
	}
	return dbTimeOf(time.Now())
}

// Name is the frontend's name.
func (b *Base) Name() string { return b.name }

// DB is the frontend's database.
func (b *Base) DB() *DB { return b.db }

// InitialCredits are granted to a user seen for the first time.
func (b *Base) InitialCredits() int64 { return b.initialCredits }

// CostPerJob is charged per job; 0 when the frontend does not charge.
func (b *Base) CostPerJob() int64 { return b.costPerJob }

// KeepTempOutputs reports whether temp (preview) files become photos too.
func (b *Base) KeepTempOutputs() bool { return b.keepTemp }

// AcceptOutput accepts the configured media types (by default any image,
// video or audio).
func (b *Base) AcceptOutput(contentType string) error {
	mt, err := mediaType(contentType)
	if err != nil {
		return err
	}
	for _, a := range b.accept {
		if a == mt || (strings.HasSuffix(a, "/*") && strings.HasPrefix(mt, a[:len(a)-1])) {
			return nil
		}
	}
	return fmt.Errorf("%w: frontend %s does not keep %s", schema.ErrUnsupportedMedia, b.name, mt)
}

// mediaType returns the lower-case type/subtype of a Content-Type value.
func mediaType(contentType string) (string, error) {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil || !strings.Contains(mt, "/") {
		return "", fmt.Errorf("%w: %q is not a media type", schema.ErrUnsupportedMedia, contentType)
	}
	return mt, nil
}

// ---- users ----

const userColumns = "id, external_id, nickname, email, avatar_url, credits, created_at, updated_at"

type userRow struct {
	ID         int64  `db:"id"`
	ExternalID string `db:"external_id"`
	Nickname   string `db:"nickname"`
	Email      string `db:"email"`
	AvatarURL  string `db:"avatar_url"`
	Credits    int64  `db:"credits"`
	PhotoCount int64  `db:"photo_count"`
	CreatedAt  dbTime `db:"created_at"`
	UpdatedAt  dbTime `db:"updated_at"`
}

func (r *userRow) user() *schema.User {
	return &schema.User{
		ID: r.ID, ExternalID: r.ExternalID, Nickname: r.Nickname, Email: r.Email, AvatarURL: r.AvatarURL,
		Credits: r.Credits, PhotoCount: r.PhotoCount, CreatedAt: r.CreatedAt.Time, UpdatedAt: r.UpdatedAt.Time,
	}
}

// validExternalID refuses a user id that is not a well-formed identifier
// (schema.CheckIdent): "bob " is refused rather than stored beside "bob".
func validExternalID(id string) error {
	return schema.CheckIdent("user_id", id, schema.MaxUserIDBytes)
}

// ensureUser returns the user's row id, creating the user with the initial
// credits (and their ledger entry) when it is new. Run it in a transaction.
//
// read is the clause to read the user's row with afterwards. It is empty
// unless another transaction created the user meanwhile (MySQL): then the
// row may be newer than this transaction's snapshot, and it is read with
// FOR UPDATE, a lock this transaction already holds. Reading with a shared
// lock in the other cases would let two transactions that both go on to
// update the user deadlock upgrading it.
func (b *Base) ensureUser(ctx context.Context, tx sqlx.ExtContext, externalID string) (id int64, read string, err error) {
	err = sqlx.GetContext(ctx, tx, &id, "SELECT id FROM users WHERE external_id = ?", externalID)
	if err == nil {
		return id, "", nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return 0, "", interpretError(err)
	}
	now := b.now()
	q := "INSERT INTO users (external_id, credits, created_at, updated_at) VALUES (?, ?, ?, ?)"
	if b.db.Dialect == DialectMySQL {
		// On a duplicate this takes an exclusive lock at once, where a plain
		// INSERT would take a shared one to be upgraded later.
		q += " ON DUPLICATE KEY UPDATE id = id"
	}
	res, err := tx.ExecContext(ctx, q, externalID, b.initialCredits, tval(now), tval(now))
	var n int64
	if err == nil {
		n, err = res.RowsAffected()
	}
	if err = interpretError(err); err != nil && !errors.Is(err, schema.ErrConflict) {
		return 0, "", err
	}
	if err != nil || n == 0 {
		// Created meanwhile by another transaction: read the committed row.
		err = sqlx.GetContext(ctx, tx, &id, "SELECT id FROM users WHERE external_id = ?"+b.lockRow, externalID)
		return id, b.lockRow, interpretError(err)
	}
	if id, err = res.LastInsertId(); err != nil {
		return 0, "", err
	}
	if b.initialCredits > 0 {
		if _, err := tx.ExecContext(ctx,
			"INSERT INTO credit_ledger (user_id, delta, reason, idempotency_key, balance, created_at) VALUES (?, ?, ?, NULL, ?, ?)",
			id, b.initialCredits, "initial", b.initialCredits, tval(now)); err != nil {
			return 0, "", interpretError(err)
		}
	}
	return id, "", nil
}

// userByID reads a user and its photo count, with the read clause from
// ensureUser.
func (b *Base) userByID(ctx context.Context, tx sqlx.QueryerContext, id int64, read string) (*schema.User, error) {
	var r userRow
	if err := sqlx.GetContext(ctx, tx, &r, "SELECT "+userColumns+" FROM users WHERE id = ?"+read, id); err != nil {
		return nil, interpretError(err)
	}
	if err := sqlx.GetContext(ctx, tx, &r.PhotoCount, "SELECT COUNT(*) FROM photos WHERE user_id = ?", id); err != nil {
		return nil, interpretError(err)
	}
	return r.user(), nil
}

// UserUpsert creates the user or replaces its profile fields.
func (b *Base) UserUpsert(ctx context.Context, db sqlx.ExtContext, u *schema.User) (*schema.User, error) {
	if err := validExternalID(u.ExternalID); err != nil {
		return nil, err
	}
	switch {
	case !utf8.ValidString(u.Nickname) || utf8.RuneCountInString(u.Nickname) > schema.MaxNicknameRunes:
		return nil, schema.Invalid("nickname", "at most %d characters of UTF-8", schema.MaxNicknameRunes)
	case len(u.Email) > 320:
		return nil, schema.Invalid("email", "must be at most 320 bytes")
	case len(u.AvatarURL) > 2048:
		return nil, schema.Invalid("avatar_url", "must be at most 2048 bytes")
	}
	var out *schema.User
	err := withTx(ctx, db, func(tx sqlx.ExtContext) error {
		id, read, err := b.ensureUser(ctx, tx, u.ExternalID)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx,
			"UPDATE users SET nickname = ?, email = ?, avatar_url = ?, updated_at = ? WHERE id = ?",
			u.Nickname, u.Email, u.AvatarURL, tval(b.now()), id); err != nil {
			return interpretError(err)
		}
		out, err = b.userByID(ctx, tx, id, read)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: upsert user: %w", b.name, err)
	}
	return out, nil
}

// UserEnsure returns the user, created with the initial credits when new.
func (b *Base) UserEnsure(ctx context.Context, db sqlx.ExtContext, externalID string) (*schema.User, error) {
	if err := validExternalID(externalID); err != nil {
		return nil, err
	}
	var out *schema.User
	err := withTx(ctx, db, func(tx sqlx.ExtContext) error {
		id, read, err := b.ensureUser(ctx, tx, externalID)
		if err != nil {
			return err
		}
		out, err = b.userByID(ctx, tx, id, read)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: ensure user: %w", b.name, err)
	}
	return out, nil
}

// UserGet returns the user with its photo count.
func (b *Base) UserGet(ctx context.Context, db sqlx.QueryerContext, externalID string) (*schema.User, error) {
	if err := validExternalID(externalID); err != nil {
		return nil, err
	}
	var r userRow
	err := sqlx.GetContext(ctx, db, &r, "SELECT "+userColumns+
		", (SELECT COUNT(*) FROM photos p WHERE p.user_id = users.id) AS photo_count FROM users WHERE external_id = ?",
		externalID)
	if err != nil {
		return nil, fmt.Errorf("%s: get user: %w", b.name, interpretError(err))
	}
	return r.user(), nil
}

// ---- credits ----

const ledgerColumns = "id, delta, reason, idempotency_key, balance, created_at"

type ledgerRow struct {
	ID             int64          `db:"id"`
	Delta          int64          `db:"delta"`
	Reason         string         `db:"reason"`
	IdempotencyKey sql.NullString `db:"idempotency_key"`
	Balance        int64          `db:"balance"`
	CreatedAt      dbTime         `db:"created_at"`
}

func (r *ledgerRow) entry(userID string) *schema.CreditEntry {
	return &schema.CreditEntry{
		ID: r.ID, UserID: userID, Delta: r.Delta, Reason: r.Reason, IdempotencyKey: r.IdempotencyKey.String,
		Balance: r.Balance, CreatedAt: r.CreatedAt.Time,
	}
}

// ledgerByKey finds the entry a key recorded; lock reads the newest
// committed row (MySQL), for after a duplicate-key error.
func (b *Base) ledgerByKey(ctx context.Context, tx sqlx.QueryerContext, uid int64, key string, lock bool) (*ledgerRow, error) {
	q := "SELECT " + ledgerColumns + " FROM credit_ledger WHERE user_id = ? AND idempotency_key = ?"
	if lock {
		q += b.shareRow
	}
	var r ledgerRow
	if err := sqlx.GetContext(ctx, tx, &r, q, uid, key); err != nil {
		return nil, interpretError(err)
	}
	return &r, nil
}

// replay answers a repeated idempotency key.
func replay(r *ledgerRow, p CreditParams) (*schema.CreditEntry, error) {
	if r.Delta != p.Delta {
		return nil, fmt.Errorf("%w: idempotency key %q was used with delta %d", schema.ErrConflict, p.IdempotencyKey, r.Delta)
	}
	return r.entry(p.UserID), nil
}

// CreditsApply changes a user's credits (creating the user when new) and
// records the change in the ledger. Run it in the caller's transaction to tie
// it to other writes; on its own it runs in a transaction of its own.
//
// Concurrent changes of one user are serialised on the user's row (MySQL:
// SELECT ... FOR UPDATE; SQLite: the write lock), so the balance check and the
// update cannot interleave. The ledger's unique (user_id, idempotency_key)
// catches a replay that a transaction's older snapshot could not see.
func (b *Base) CreditsApply(ctx context.Context, db sqlx.ExtContext, p CreditParams) (*schema.CreditEntry, error) {
	if err := validExternalID(p.UserID); err != nil {
		return nil, err
	}
	switch {
	case p.Delta == 0:
		return nil, schema.Invalid("delta", "must not be 0")
	case len(p.Reason) > 255:
		return nil, schema.Invalid("reason", "must be at most 255 bytes")
	case p.IdempotencyKey != "":
		if err := schema.CheckIdent("idempotency_key", p.IdempotencyKey, schema.MaxIdempotencyKeyBytes); err != nil {
			return nil, err
		}
	}
	var out *schema.CreditEntry
	err := withTx(ctx, db, func(tx sqlx.ExtContext) error {
		uid, _, err := b.ensureUser(ctx, tx, p.UserID)
		if err != nil {
			return err
		}
		var balance int64
		if err := sqlx.GetContext(ctx, tx, &balance, "SELECT credits FROM users WHERE id = ?"+b.lockRow, uid); err != nil {
			return interpretError(err)
		}
		if p.IdempotencyKey != "" {
			r, err := b.ledgerByKey(ctx, tx, uid, p.IdempotencyKey, false)
			if err == nil {
				out, err = replay(r, p)
				return err
			}
			if !errors.Is(err, schema.ErrNotFound) {
				return err
			}
		}
		if (p.Delta > 0 && balance > math.MaxInt64-p.Delta) || (p.Delta < 0 && balance < math.MinInt64-p.Delta) {
			return schema.Invalid("delta", "balance would overflow")
		}
		next := balance + p.Delta
		if next < 0 {
			return &schema.InsufficientCreditsError{Balance: balance, Change: p.Delta}
		}
		now := b.now()
		res, err := tx.ExecContext(ctx,
			"INSERT INTO credit_ledger (user_id, delta, reason, idempotency_key, balance, created_at) VALUES (?, ?, ?, ?, ?, ?)",
			uid, p.Delta, p.Reason, strOrNil(p.IdempotencyKey), next, tval(now))
		if err != nil {
			err = interpretError(err)
			if p.IdempotencyKey != "" && errors.Is(err, schema.ErrConflict) {
				r, err := b.ledgerByKey(ctx, tx, uid, p.IdempotencyKey, true)
				if err != nil {
					return err
				}
				out, err = replay(r, p)
				return err
			}
			return err
		}
		id, err := res.LastInsertId()
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "UPDATE users SET credits = ?, updated_at = ? WHERE id = ?",
			next, tval(now), uid); err != nil {
			return interpretError(err)
		}
		out = &schema.CreditEntry{
			ID: id, UserID: p.UserID, Delta: p.Delta, Reason: p.Reason, IdempotencyKey: p.IdempotencyKey,
			Balance: next, CreatedAt: now,
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s: credits of %s: %w", b.name, p.UserID, err)
	}
	return out, nil
}

// CreditHistory returns a user's ledger, newest first (at most limit entries,
// 100 when limit <= 0).
func (b *Base) CreditHistory(ctx context.Context, db sqlx.QueryerContext, externalID string, limit int) ([]schema.CreditEntry, error) {
	if err := validExternalID(externalID); err != nil {
		return nil, err
	}
	if limit <= 0 || limit > 1000 {
		limit = 100
	}
	var rows []ledgerRow
	err := sqlx.SelectContext(ctx, db, &rows, "SELECT l.id, l.delta, l.reason, l.idempotency_key, l.balance, l.created_at "+
		"FROM credit_ledger l JOIN users u ON u.id = l.user_id WHERE u.external_id = ? ORDER BY l.id DESC LIMIT ?",
		externalID, limit)
	if err != nil {
		return nil, fmt.Errorf("%s: credit history: %w", b.name, interpretError(err))
	}
	out := make([]schema.CreditEntry, len(rows))
	for i := range rows {
		out[i] = *rows[i].entry(externalID)
	}
	return out, nil
}

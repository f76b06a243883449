package dbcontrollers

import (
	"context"
	"encoding/json"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Controller is what the service needs from one frontend's database: its
// users, their credits and their photos. Methods taking a db accept the
// frontend's *DB or a transaction of it (see InTx), so a caller can make
// several calls atomic.
type Controller interface {
	Name() string // the frontend's name
	DB() *DB
	InitialCredits() int64 // granted to a user seen for the first time
	CostPerJob() int64     // credits charged per job; 0: the frontend does not charge
	// AcceptOutput refuses (schema.ErrUnsupportedMedia) an output media type
	// the frontend does not keep.
	AcceptOutput(contentType string) error
	// KeepTempOutputs reports whether the frontend keeps a workflow's
	// temporary files (ComfyUI's "temp" outputs: PreviewImage and the like)
	// as photos too. By default only "output" files become photos.
	KeepTempOutputs() bool

	// UserUpsert creates the user (with the initial credits) or updates its
	// profile (nickname, email, avatar_url), by ExternalID.
	UserUpsert(ctx context.Context, db sqlx.ExtContext, u *schema.User) (*schema.User, error)
	// UserEnsure returns the user, creating it with the initial credits.
	UserEnsure(ctx context.Context, db sqlx.ExtContext, externalID string) (*schema.User, error)
	// UserGet returns the user with its photo count; schema.ErrNotFound.
	UserGet(ctx context.Context, db sqlx.QueryerContext, externalID string) (*schema.User, error)
	// CreditsApply changes a user's credits atomically and records it in the
	// ledger. The balance never goes below 0 (schema.ErrInsufficientCredits).
	// A repeated IdempotencyKey returns the original entry and changes
	// nothing; the same key with another delta is schema.ErrConflict.
	CreditsApply(ctx context.Context, db sqlx.ExtContext, p CreditParams) (*schema.CreditEntry, error)

	// PhotoInsert records one output. Idempotent on (JobID, OutputIndex):
	// a repeat sets p.ID (and CreatedAt) of the existing row.
	PhotoInsert(ctx context.Context, db sqlx.ExtContext, p *schema.Photo) error
	PhotoGet(ctx context.Context, db sqlx.QueryerContext, id int64) (*schema.Photo, error)
	// PhotoList returns one page of photos, newest first, and the total.
	PhotoList(ctx context.Context, db sqlx.QueryerContext, f PhotoFilter) ([]schema.Photo, int, error)
	// PhotoDelete deletes a photo and returns it (for its object key).
	PhotoDelete(ctx context.Context, db sqlx.ExtContext, id int64) (*schema.Photo, error)
	// PhotosByJob returns a job's photos by output index.
	PhotosByJob(ctx context.Context, db sqlx.QueryerContext, jobID string) ([]schema.Photo, error)
}

// MetadataValidator is implemented by a controller that reads fields of a
// job's metadata; the service calls it at submit so a bad field is refused
// up front (a *schema.ValidationError) instead of being ignored later.
type MetadataValidator interface {
	ValidateMetadata(metadata json.RawMessage) error
}

// CreditParams is one change of a user's credits.
type CreditParams struct {
	UserID         string // the frontend's user id
	Delta          int64  // not 0; negative spends
	Reason         string
	IdempotencyKey string // optional; unique per user
}

// Photo list bounds.
const (
	DefaultPhotoLimit = 20
	MaxPhotoLimit     = 100
	MaxPhotoPage      = 1_000_000
)

// PhotoFilter selects a page of photos, newest first.
type PhotoFilter struct {
	UserID string // the frontend's user id; empty: every user
	// Style selects photos whose metadata "style" equals it; only frontends
	// whose controller indexes styles (controller "style") accept it.
	Style string
	Page  int // from 1
	Limit int
}

// Normalized returns f with Page and Limit clamped to their bounds and
// defaults, as PhotoList applies them.
func (f PhotoFilter) Normalized() PhotoFilter {
	if f.Page < 1 {
		f.Page = 1
	}
	f.Page = min(f.Page, MaxPhotoPage)
	if f.Limit <= 0 {
		f.Limit = DefaultPhotoLimit
	}
	f.Limit = min(f.Limit, MaxPhotoLimit)
	return f
}

// FrontendConfig configures one frontend's controller.
type FrontendConfig struct {
	Name       string // frontend name (schema.ValidFrontendName)
	Controller string // "generic" (default), "style" or "logo"
	// Database overrides the database name (see Config.FrontendDatabase).
	Database       string
	InitialCredits int64
	CostPerJob     int64
	// KeepTempOutputs: temp (preview) files become photos too.
	KeepTempOutputs bool
	// Options are controller specific. Every controller but logo takes
	// "accept": comma-separated media types or "type/*" patterns the
	// frontend keeps (default "image/*,video/*,audio/*").
	Options map[string]string
}

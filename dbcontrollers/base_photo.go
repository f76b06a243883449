package dbcontrollers

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

// photoColumns reads photos joined with users (alias p and u).
const photoColumns = "p.id, u.external_id AS user_id, p.job_id, p.output_index, p.object_key, p.url, " +
	"p.content_type, p.width, p.height, p.bytes, p.sha256, p.node, p.metadata, p.created_at"

const photoFrom = " FROM photos p JOIN users u ON u.id = p.user_id"

type photoRow struct {
	ID          int64          `db:"id"`
	UserID      string         `db:"user_id"`
	JobID       string         `db:"job_id"`
	OutputIndex int            `db:"output_index"`
	ObjectKey   string         `db:"object_key"`
	URL         string         `db:"url"`
	ContentType string         `db:"content_type"`
	Width       int            `db:"width"`
	Height      int            `db:"height"`
	Bytes       int64          `db:"bytes"`
	SHA256      string         `db:"sha256"`
	Node        string         `db:"node"`
	Metadata    sql.NullString `db:"metadata"`
	CreatedAt   dbTime         `db:"created_at"`
}

func (r *photoRow) photo() schema.Photo {
	p := schema.Photo{
		ID: r.ID, UserID: r.UserID, JobID: r.JobID, OutputIndex: r.OutputIndex, ObjectKey: r.ObjectKey,
		URL: r.URL, ContentType: r.ContentType, Width: r.Width, Height: r.Height, Bytes: r.Bytes,
		SHA256: r.SHA256, Node: r.Node, CreatedAt: r.CreatedAt.Time,
	}
	if r.Metadata.Valid && r.Metadata.String != "" {
		p.Metadata = json.RawMessage(r.Metadata.String)
	}
	return p
}

func photosOf(rows []photoRow) []schema.Photo {
	out := make([]schema.Photo, len(rows))
	for i := range rows {
		out[i] = rows[i].photo()
	}
	return out
}

// validatePhoto checks a photo before it is stored. The identifier columns
// are byte strings on MySQL, which no longer refuse malformed UTF-8: the
// checks here do.
func validatePhoto(p *schema.Photo) error {
	if err := validExternalID(p.UserID); err != nil {
		return err
	}
	if err := schema.CheckIdent("job_id", p.JobID, schema.MaxJobIDBytes); err != nil {
		return err
	}
	switch {
	case p.OutputIndex < 0:
		return schema.Invalid("output_index", "must not be negative")
	case p.ObjectKey == "" || len(p.ObjectKey) > 1024 || !utf8.ValidString(p.ObjectKey):
		return schema.Invalid("object_key", "must be 1 to 1024 bytes of UTF-8")
	case p.ContentType == "" || len(p.ContentType) > 255:
		return schema.Invalid("content_type", "must be 1 to 255 bytes")
	case len(p.URL) > 2048:
		return schema.Invalid("url", "must be at most 2048 bytes")
	case len(p.SHA256) > 64:
		return schema.Invalid("sha256", "must be at most 64 bytes")
	case len(p.Node) > schema.MaxNodeNameBytes || !utf8.ValidString(p.Node):
		return schema.Invalid("node", "must be at most %d bytes of UTF-8", schema.MaxNodeNameBytes)
	case len(p.Metadata) > 0 && !json.Valid(p.Metadata):
		return schema.Invalid("metadata", "must be JSON")
	}
	return nil
}

// PhotoInsert records one output of a job for its user (created when new).
func (b *Base) PhotoInsert(ctx context.Context, db sqlx.ExtContext, p *schema.Photo) error {
	return b.photoInsert(ctx, db, p, nil)
}

// photoInsert is PhotoInsert with the indexed style column (nil: NULL).
func (b *Base) photoInsert(ctx context.Context, db sqlx.ExtContext, p *schema.Photo, style *string) error {
	if err := validatePhoto(p); err != nil {
		return err
	}
	err := withTx(ctx, db, func(tx sqlx.ExtContext) error {
		uid, _, err := b.ensureUser(ctx, tx, p.UserID)
		if err != nil {
			return err
		}
		created := p.CreatedAt
		if created.IsZero() {
			created = b.now()
		}
		created = dbTimeOf(created)
		var styleArg any
		if style != nil {
			styleArg = *style
		}
		res, err := tx.ExecContext(ctx, "INSERT INTO photos (user_id, job_id, output_index, object_key, url, "+
			"content_type, width, height, bytes, sha256, node, metadata, style, created_at) "+
			"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
			uid, p.JobID, p.OutputIndex, p.ObjectKey, p.URL, p.ContentType, p.Width, p.Height, p.Bytes,
			p.SHA256, p.Node, jsonOrNil(p.Metadata), styleArg, tval(created))
		if err == nil {
			p.ID, err = res.LastInsertId()
			p.CreatedAt = created
			return err
		}
		if err = interpretError(err); !errors.Is(err, schema.ErrConflict) {
			return err
		}
		// Already recorded (a retried completion): report the existing row.
		var existing struct {
			ID        int64  `db:"id"`
			CreatedAt dbTime `db:"created_at"`
		}
		if err := sqlx.GetContext(ctx, tx, &existing,
			"SELECT id, created_at FROM photos WHERE job_id = ? AND output_index = ?"+b.shareRow,
			p.JobID, p.OutputIndex); err != nil {
			return interpretError(err)
		}
		p.ID, p.CreatedAt = existing.ID, existing.CreatedAt.Time
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s: insert photo of job %s #%d: %w", b.name, p.JobID, p.OutputIndex, err)
	}
	return nil
}

// PhotoGet returns one photo.
func (b *Base) PhotoGet(ctx context.Context, db sqlx.QueryerContext, id int64) (*schema.Photo, error) {
	var r photoRow
	if err := sqlx.GetContext(ctx, db, &r, "SELECT "+photoColumns+photoFrom+" WHERE p.id = ?", id); err != nil {
		return nil, fmt.Errorf("%s: get photo %d: %w", b.name, id, interpretError(err))
	}
	p := r.photo()
	return &p, nil
}

// PhotoList returns a page of photos, newest first, and the total. A Style
// filter is refused: this frontend does not index styles.
func (b *Base) PhotoList(ctx context.Context, db sqlx.QueryerContext, f PhotoFilter) ([]schema.Photo, int, error) {
	if f.Style != "" {
		return nil, 0, schema.Invalid("style", "frontend %s does not filter by style", b.name)
	}
	return b.photoList(ctx, db, f)
}

// photoList pages photos; f.Style filters on the indexed style column.
func (b *Base) photoList(ctx context.Context, db sqlx.QueryerContext, f PhotoFilter) ([]schema.Photo, int, error) {
	f = f.Normalized()
	var where []string
	var args []any
	if f.UserID != "" {
		if err := validExternalID(f.UserID); err != nil {
			return nil, 0, err
		}
		where, args = append(where, "u.external_id = ?"), append(args, f.UserID)
	}
	if f.Style != "" {
		where, args = append(where, "p.style = ?"), append(args, f.Style)
	}
	cond := ""
	if len(where) > 0 {
		cond = " WHERE " + strings.Join(where, " AND ")
	}
	var total int
	if err := sqlx.GetContext(ctx, db, &total, "SELECT COUNT(*)"+photoFrom+cond, args...); err != nil {
		return nil, 0, fmt.Errorf("%s: count photos: %w", b.name, interpretError(err))
	}
	var rows []photoRow
	if total > 0 {
		err := sqlx.SelectContext(ctx, db, &rows, "SELECT "+photoColumns+photoFrom+cond+" ORDER BY p.id DESC LIMIT ? OFFSET ?",
			append(args, f.Limit, (f.Page-1)*f.Limit)...)
		if err != nil {
			return nil, 0, fmt.Errorf("%s: list photos: %w", b.name, interpretError(err))
		}
	}
	return photosOf(rows), total, nil
}

// PhotoDelete deletes a photo and returns the row it deleted.
func (b *Base) PhotoDelete(ctx context.Context, db sqlx.ExtContext, id int64) (*schema.Photo, error) {
	var out *schema.Photo
	err := withTx(ctx, db, func(tx sqlx.ExtContext) error {
		var r photoRow
		if err := sqlx.GetContext(ctx, tx, &r, "SELECT "+photoColumns+photoFrom+" WHERE p.id = ?", id); err != nil {
			return interpretError(err)
		}
		res, err := tx.ExecContext(ctx, "DELETE FROM photos WHERE id = ?", id)
		if err != nil {
			return interpretError(err)
		}
		if err := oneRow(res, fmt.Sprintf("photo %d", id)); err != nil {
			return err
		}
		p := r.photo()
		out = &p
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s: delete photo %d: %w", b.name, id, err)
	}
	return out, nil
}

// PhotosByJob returns a job's photos by output index.
func (b *Base) PhotosByJob(ctx context.Context, db sqlx.QueryerContext, jobID string) ([]schema.Photo, error) {
	var rows []photoRow
	if err := sqlx.SelectContext(ctx, db, &rows, "SELECT "+photoColumns+photoFrom+
		" WHERE p.job_id = ? ORDER BY p.output_index", jobID); err != nil {
		return nil, fmt.Errorf("%s: photos of job %s: %w", b.name, jobID, interpretError(err))
	}
	return photosOf(rows), nil
}

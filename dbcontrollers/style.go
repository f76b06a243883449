package dbcontrollers

import (
	"context"
	"encoding/json"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

// MaxStyleBytes bounds a style name (the indexed photos.style column).
const MaxStyleBytes = 64

// Style is the controller of a style-transfer app: each photo's metadata
// "style" (a string) is copied into the indexed photos.style column at insert,
// and PhotoList filters on it.
type Style struct{ *Base }

var (
	_ Controller        = Style{}
	_ MetadataValidator = Style{}
)

func newStyle(b *Base, fc FrontendConfig) (Controller, error) {
	if err := checkOptions(fc, "accept"); err != nil {
		return nil, err
	}
	return Style{b}, nil
}

// styleOf reads the "style" field of a job's metadata. ok is false when
// there is none; err when it is present but not a usable style.
func styleOf(metadata json.RawMessage) (style string, ok bool, err error) {
	if len(metadata) == 0 {
		return "", false, nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(metadata, &m) != nil {
		return "", false, nil // not an object: no style field
	}
	raw, present := m["style"]
	if !present || string(raw) == "null" {
		return "", false, nil
	}
	if err := json.Unmarshal(raw, &style); err != nil {
		return "", false, schema.Invalid("metadata.style", "must be a string")
	}
	if err := validStyle(style); err != nil {
		return "", false, err
	}
	return style, true, nil
}

func validStyle(s string) error {
	if s == "" || len(s) > MaxStyleBytes || !utf8.ValidString(s) {
		return schema.Invalid("style", "must be 1 to %d bytes of UTF-8", MaxStyleBytes)
	}
	return nil
}

// ValidateMetadata refuses a metadata "style" that is not a usable style.
func (s Style) ValidateMetadata(metadata json.RawMessage) error {
	_, _, err := styleOf(metadata)
	return err
}

// PhotoInsert records the photo with its metadata style indexed. A style
// that is not a usable string is not indexed (the photo is still kept):
// refusing output of a finished job would lose it.
func (s Style) PhotoInsert(ctx context.Context, db sqlx.ExtContext, p *schema.Photo) error {
	var style *string
	if v, ok, err := styleOf(p.Metadata); err == nil && ok {
		style = &v
	}
	return s.photoInsert(ctx, db, p, style)
}

// PhotoList honours the Style filter.
func (s Style) PhotoList(ctx context.Context, db sqlx.QueryerContext, f PhotoFilter) ([]schema.Photo, int, error) {
	if f.Style != "" {
		if err := validStyle(f.Style); err != nil {
			return nil, 0, err
		}
	}
	return s.photoList(ctx, db, f)
}

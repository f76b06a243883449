package dbcontrollers

import (
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/comfyfarm/comfyfarm/schema"
)

// FuzzStyleOf feeds client metadata (free JSON from a submit) to the style
// reader.
func FuzzStyleOf(f *testing.F) {
	for _, s := range []string{`{"style":"ink"}`, `{"style":7}`, `{"style":null}`, `[]`, `"x"`, ``, `{"style":"\u00e9"}`,
		`{"style":"a","style":"b"}`, `{"style":""}`, `{"style":"` + strings.Repeat("y", 70) + `"}`, `{`, `{"style":"\ud800"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, meta []byte) {
		style, ok, err := styleOf(meta)
		if ok {
			if err != nil || style == "" || len(style) > MaxStyleBytes || !utf8.ValidString(style) {
				t.Fatalf("styleOf(%q) = %q, %v, %v", meta, style, ok, err)
			}
		}
		var ve *schema.ValidationError
		if err != nil && !errors.As(err, &ve) {
			t.Fatalf("styleOf(%q) error %v is not a ValidationError", meta, err)
		}
		if v := (Style{}).ValidateMetadata(meta); (v == nil) != (err == nil) {
			t.Fatalf("ValidateMetadata disagrees with styleOf on %q", meta)
		}
	})
}

// FuzzAcceptOutput feeds content types (sniffed or reported by a node) to
// the media checks.
func FuzzAcceptOutput(f *testing.F) {
	for _, s := range []string{"image/png", "IMAGE/PNG; q=1", "image/jpeg", "video/mp4", "text/html", "", "/", "image/",
		"image/png;", "image/png; charset=\"x", "a/b/c", "image/*"} {
		f.Add(s)
	}
	base := &Base{name: "f", accept: defaultAccept}
	logo := Logo{base}
	f.Fuzz(func(t *testing.T, ct string) {
		errBase, errLogo := base.AcceptOutput(ct), logo.AcceptOutput(ct)
		for _, err := range []error{errBase, errLogo} {
			if err != nil && !errors.Is(err, schema.ErrUnsupportedMedia) {
				t.Fatalf("AcceptOutput(%q) = %v, not ErrUnsupportedMedia", ct, err)
			}
		}
		if errLogo == nil {
			if mt, _ := mediaType(ct); mt != "image/png" {
				t.Fatalf("logo accepted %q (%s)", ct, mt)
			}
			if errBase != nil {
				t.Fatalf("logo accepts %q but base refuses it", ct)
			}
		}
		if errBase == nil {
			mt, _ := mediaType(ct)
			if !strings.HasPrefix(mt, "image/") && !strings.HasPrefix(mt, "video/") && !strings.HasPrefix(mt, "audio/") {
				t.Fatalf("base accepted %q (%s)", ct, mt)
			}
		}
	})
}

// FuzzParseAccept feeds the accept option of a frontend's configuration.
func FuzzParseAccept(f *testing.F) {
	for _, s := range []string{"image/*", "image/png, video/*", "", ",", "*/*", "image", "image/png;q=1", " a/b ,c/d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		acc, err := parseAccept(v)
		if err != nil {
			return
		}
		if len(acc) == 0 {
			t.Fatalf("parseAccept(%q) accepted nothing without an error", v)
		}
		for _, a := range acc {
			typ, sub, ok := strings.Cut(a, "/")
			if !ok || typ == "" || sub == "" || typ == "*" || a != strings.ToLower(a) || strings.ContainsAny(a, " ;,") {
				t.Fatalf("parseAccept(%q) kept %q", v, a)
			}
		}
	})
}

// FuzzParseDBTime feeds times read back as text.
func FuzzParseDBTime(f *testing.F) {
	for _, s := range []string{"2024-01-02 03:04:05.123456", "2024-01-02 03:04:05", "2024-01-02T03:04:05Z",
		"2024-01-02 03:04:05.999999999+02:00", "", "0000-00-00 00:00:00", "9999-12-31 23:59:59.999999", "garbage"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tm, err := parseDBTime(s)
		if err != nil {
			return
		}
		if tm.Location() != time.UTC {
			t.Fatalf("parseDBTime(%q) not in UTC", s)
		}
		if y := tm.Year(); y < 0 || y > 9999 {
			return
		}
		v, _ := tval(tm).Value()
		back, err := parseDBTime(v.(string))
		if err != nil || !back.Equal(dbTimeOf(tm)) {
			t.Fatalf("round trip of %q: %v -> %v -> %v, %v", s, tm, v, back, err)
		}
	})
}

// rowFromArgs scans jobArgs as the database would return them.
func rowFromArgs(t *testing.T, args []any) *jobRow {
	t.Helper()
	var r jobRow
	dest := []any{&r.ID, &r.Frontend, &r.UserID, &r.State, &r.Priority, &r.Workflow, &r.Metadata, &r.Inputs, &r.Node,
		&r.PromptID, &r.Attempts, &r.LeaseOwner, &r.LeaseExpiresAt, &r.Progress, &r.Outputs, &r.Error,
		&r.IdempotencyKey, &r.Charged, &r.CancelRequested, &r.CreatedAt, &r.DispatchedAt, &r.StartedAt,
		&r.FinishedAt, &r.UpdatedAt, &r.Requirements}
	if len(dest) != len(args) {
		t.Fatalf("%d args for %d columns", len(args), len(dest))
	}
	for i, a := range args {
		if v, ok := a.(driver.Valuer); ok {
			var err error
			if a, err = v.Value(); err != nil {
				t.Fatal(err)
			}
		}
		if s, ok := dest[i].(sql.Scanner); ok {
			if err := s.Scan(a); err != nil {
				t.Fatalf("column %d: %v", i, err)
			}
			continue
		}
		rv := reflect.ValueOf(dest[i]).Elem()
		rv.Set(reflect.ValueOf(a).Convert(rv.Type()))
	}
	return &r
}

// FuzzJobRowDecode feeds the JSON columns of a job row (written by this
// package, but read back from a database that others can write) to the
// decoder, and checks that what decodes survives a write and a read.
func FuzzJobRowDecode(f *testing.F) {
	f.Add(`[{"filename":"a.png","key":"in/a"}]`, `[{"key":"out/1","width":2}]`, `{"node_id":"3","value":1,"max":2,"percent":50}`,
		`{"code":"x","message":"m","details":{"a":[1,2]}}`, `{"style":"ink"}`)
	f.Add(`null`, `[]`, `{}`, `{}`, ``)
	f.Add(`{`, `[1]`, `"x"`, `[]`, `null`)
	f.Fuzz(func(t *testing.T, inputs, outputs, progress, jerr, meta string) {
		r := jobRow{
			ID: "01J", Frontend: "style", UserID: "u", State: "queued", Workflow: `{}`,
			Inputs:   sql.NullString{String: inputs, Valid: true},
			Outputs:  sql.NullString{String: outputs, Valid: true},
			Progress: sql.NullString{String: progress, Valid: true},
			Error:    sql.NullString{String: jerr, Valid: true},
			Metadata: sql.NullString{String: meta, Valid: meta != ""},
		}
		r.CreatedAt.Time = time.Date(2024, 5, 6, 7, 8, 9, 123456000, time.UTC)
		r.UpdatedAt = r.CreatedAt
		j, err := r.job()
		if err != nil {
			return
		}
		if len(j.Metadata) > 0 && !json.Valid(j.Metadata) {
			return // metadata is passed through; only valid JSON is ever written
		}
		args, err := jobArgs(j)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", j, err)
		}
		j2, err := rowFromArgs(t, args).job()
		if err != nil {
			t.Fatalf("decode of re-encoded job: %v", err)
		}
		// JSON null decodes to an absent value; compare what was decoded.
		if !reflect.DeepEqual(normalizeJob(j), normalizeJob(j2)) {
			t.Fatalf("round trip changed the job:\n%+v\n%+v", j, j2)
		}
	})
}

func normalizeJob(j *schema.Job) *schema.Job {
	c := *j
	if len(c.Inputs) == 0 {
		c.Inputs = nil
	}
	if len(c.Outputs) == 0 {
		c.Outputs = nil
	}
	b, _ := json.Marshal(c.Error)
	c.Error = nil
	var e schema.JobError
	if json.Unmarshal(b, &e) == nil && string(b) != "null" {
		c.Error = &e
	}
	return &c
}

// FuzzValidDatabaseName checks that every accepted name is a plain
// identifier, so quoting never has to escape anything.
func FuzzValidDatabaseName(f *testing.F) {
	for _, s := range []string{"comfyfarm", "comfyfarm_style", "a`b", "A", "_x", strings.Repeat("a", 65), "x-y", "x\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if !ValidDatabaseName(name) {
			return
		}
		if quoteIdent(name) != "`"+name+"`" || strings.ContainsAny(name, "`'\"\\/. -\x00") || len(name) > 64 {
			t.Fatalf("accepted %q", name)
		}
	})
}

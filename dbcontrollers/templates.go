package dbcontrollers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

const templateColumns = "frontend, name, version, workflow, inputs, created_at"

type templateRow struct {
	Frontend  string `db:"frontend"`
	Name      string `db:"name"`
	Version   int    `db:"version"`
	Workflow  string `db:"workflow"`
	Inputs    string `db:"inputs"`
	CreatedAt dbTime `db:"created_at"`
}

func (r *templateRow) template() (*schema.Template, error) {
	t := &schema.Template{
		Frontend: r.Frontend, Name: r.Name, Version: r.Version,
		Workflow: json.RawMessage(r.Workflow), CreatedAt: r.CreatedAt.Time,
	}
	if err := json.Unmarshal([]byte(r.Inputs), &t.Inputs); err != nil {
		return nil, fmt.Errorf("template %s/%s: decode inputs: %w", r.Frontend, r.Ref(), err)
	}
	if t.Inputs == nil {
		t.Inputs = []schema.TemplateInput{}
	}
	return t, nil
}

func (r *templateRow) Ref() string { return fmt.Sprintf("%s@%d", r.Name, r.Version) }

func checkTemplateKey(frontend, name string) error {
	if !schema.ValidFrontendName(frontend) {
		return schema.Invalid("frontend", "%q is not a valid frontend name", frontend)
	}
	if !schema.ValidTemplateName(name) {
		return schema.Invalid("name", "%q is not a valid template name", name)
	}
	return nil
}

// templateInsertTries bounds the retries of TemplateInsert when another
// writer took the same version number meanwhile.
const templateInsertTries = 5

// TemplateInsert stores t as the next version of its template (one more than
// any version it ever had, deleted ones included) and fills in Version and
// CreatedAt. The template must have been checked; this checks only what the
// table needs.
func (s *Store) TemplateInsert(ctx context.Context, t *schema.Template) error {
	if err := checkTemplateKey(t.Frontend, t.Name); err != nil {
		return err
	}
	if len(t.Workflow) == 0 || !json.Valid(t.Workflow) {
		return schema.Invalid("workflow", "must be a JSON object")
	}
	inputs := t.Inputs
	if inputs == nil {
		inputs = []schema.TemplateInput{}
	}
	in, err := json.Marshal(inputs)
	if err != nil {
		return fmt.Errorf("encode template inputs: %w", err)
	}
	for try := 1; ; try++ {
		now := s.now()
		var version int
		err := InTx(ctx, s.db, func(tx *sqlx.Tx) error {
			var max int
			if err := sqlx.GetContext(ctx, tx, &max,
				"SELECT COALESCE(MAX(version), 0) FROM templates WHERE frontend = ? AND name = ?", t.Frontend, t.Name); err != nil {
				return interpretError(err)
			}
			version = max + 1
			_, err := tx.ExecContext(ctx, "INSERT INTO templates ("+templateColumns+") VALUES (?, ?, ?, ?, ?, ?)",
				t.Frontend, t.Name, version, string(t.Workflow), string(in), tval(now))
			return interpretError(err)
		})
		if errors.Is(err, schema.ErrConflict) && try < templateInsertTries {
			continue // a concurrent insert took this version
		}
		if err != nil {
			return fmt.Errorf("insert template %s/%s: %w", t.Frontend, t.Name, err)
		}
		t.Version, t.CreatedAt, t.Inputs = version, now, inputs
		return nil
	}
}

// TemplateGet returns one version of a template (version 0: the latest) that
// is not deleted; schema.ErrNotFound when there is none.
func (s *Store) TemplateGet(ctx context.Context, frontend, name string, version int) (*schema.Template, error) {
	if err := checkTemplateKey(frontend, name); err != nil {
		return nil, err
	}
	q := "SELECT " + templateColumns + " FROM templates WHERE frontend = ? AND name = ? AND deleted_at IS NULL"
	args := []any{frontend, name}
	if version > 0 {
		q += " AND version = ?"
		args = append(args, version)
	} else {
		q += " ORDER BY version DESC LIMIT 1"
	}
	var r templateRow
	if err := sqlx.GetContext(ctx, s.db, &r, q, args...); err != nil {
		return nil, fmt.Errorf("get template %s/%s: %w", frontend, name, interpretError(err))
	}
	return r.template()
}

// TemplateList returns the latest version of each template of a frontend
// that is not deleted, by name.
func (s *Store) TemplateList(ctx context.Context, frontend string) ([]schema.Template, error) {
	if !schema.ValidFrontendName(frontend) {
		return nil, schema.Invalid("frontend", "%q is not a valid frontend name", frontend)
	}
	var rows []templateRow
	err := sqlx.SelectContext(ctx, s.db, &rows, "SELECT "+templateColumns+" FROM templates t "+
		"WHERE frontend = ? AND deleted_at IS NULL AND version = "+
		"(SELECT MAX(version) FROM templates l WHERE l.frontend = t.frontend AND l.name = t.name AND l.deleted_at IS NULL) "+
		"ORDER BY name", frontend)
	if err != nil {
		return nil, fmt.Errorf("list templates of %s: %w", frontend, interpretError(err))
	}
	out := make([]schema.Template, 0, len(rows))
	for i := range rows {
		t, err := rows[i].template()
		if err != nil {
			return nil, err
		}
		out = append(out, *t)
	}
	return out, nil
}

// TemplateDelete deletes every version of a template; schema.ErrNotFound
// when it has none left. The rows stay, marked deleted, so the template's
// version numbers are not given again.
func (s *Store) TemplateDelete(ctx context.Context, frontend, name string) error {
	if err := checkTemplateKey(frontend, name); err != nil {
		return err
	}
	res, err := s.db.ExecContext(ctx, "UPDATE templates SET deleted_at = ? WHERE frontend = ? AND name = ? AND deleted_at IS NULL",
		tval(s.now()), frontend, name)
	if err != nil {
		return fmt.Errorf("delete template %s/%s: %w", frontend, name, interpretError(err))
	}
	if n, err := res.RowsAffected(); err == nil && n == 0 {
		return fmt.Errorf("delete template %s/%s: %w", frontend, name, schema.ErrNotFound)
	}
	return nil
}

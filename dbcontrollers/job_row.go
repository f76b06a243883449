package dbcontrollers

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/comfyfarm/comfyfarm/schema"
)

// jobColumns lists the jobs table in the order jobArgs writes it.
const jobColumns = "id, frontend, user_id, state, priority, workflow, metadata, inputs, node, prompt_id, " +
	"attempts, lease_owner, lease_expires_at, progress, outputs, error, idempotency_key, charged, " +
	"cancel_requested, created_at, dispatched_at, started_at, finished_at, updated_at, template, webhook_url, requirements"

// jobPlaceholders has one "?" per column of jobColumns.
var jobPlaceholders = strings.TrimSuffix(strings.Repeat("?, ", strings.Count(jobColumns, ",")+1), ", ")

// jobRow is one row of jobs as stored.
type jobRow struct {
	ID              string         `db:"id"`
	Frontend        string         `db:"frontend"`
	UserID          string         `db:"user_id"`
	State           string         `db:"state"`
	Priority        int            `db:"priority"`
	Workflow        string         `db:"workflow"`
	Metadata        sql.NullString `db:"metadata"`
	Inputs          sql.NullString `db:"inputs"`
	Node            sql.NullString `db:"node"`
	PromptID        sql.NullString `db:"prompt_id"`
	Attempts        int            `db:"attempts"`
	LeaseOwner      sql.NullString `db:"lease_owner"`
	LeaseExpiresAt  nullTime       `db:"lease_expires_at"`
	Progress        sql.NullString `db:"progress"`
	Outputs         sql.NullString `db:"outputs"`
	Error           sql.NullString `db:"error"`
	IdempotencyKey  sql.NullString `db:"idempotency_key"`
	Charged         int64          `db:"charged"`
	CancelRequested bool           `db:"cancel_requested"`
	CreatedAt       dbTime         `db:"created_at"`
	DispatchedAt    nullTime       `db:"dispatched_at"`
	StartedAt       nullTime       `db:"started_at"`
	FinishedAt      nullTime       `db:"finished_at"`
	UpdatedAt       dbTime         `db:"updated_at"`
	Template        sql.NullString `db:"template"`
	WebhookURL      sql.NullString `db:"webhook_url"`
	Requirements    sql.NullString `db:"requirements"`
}

// storedInput and storedOutput are the JSON forms kept in the jobs table.
// They are this package's own, so the API's JSON tags can change without
// changing what is stored (the object key in particular).
type storedInput struct {
	Field       string `json:"field,omitempty"`
	Filename    string `json:"filename"`
	Key         string `json:"key"`
	ContentType string `json:"content_type,omitempty"`
	Bytes       int64  `json:"bytes,omitempty"`
	Width       int    `json:"width,omitempty"`
	Height      int    `json:"height,omitempty"`
	SHA256      string `json:"sha256,omitempty"`
}

type storedOutput struct {
	PhotoID     int64  `json:"photo_id,omitempty"`
	URL         string `json:"url,omitempty"`
	Key         string `json:"key"`
	ContentType string `json:"content_type,omitempty"`
	Width       int    `json:"width,omitempty"`
	Height      int    `json:"height,omitempty"`
	Bytes       int64  `json:"bytes,omitempty"`
	SHA256      string `json:"sha256,omitempty"`
	Filename    string `json:"filename,omitempty"`
	NodeID      string `json:"node_id,omitempty"`
	Preview     bool   `json:"preview,omitempty"`
}

func encodeInputs(in []schema.JobInput) (any, error) {
	if in == nil {
		return nil, nil
	}
	s := make([]storedInput, len(in))
	for i, x := range in {
		s[i] = storedInput(x)
	}
	return marshalText(s)
}

func encodeOutputs(out []schema.Output) (any, error) {
	if out == nil {
		return nil, nil
	}
	s := make([]storedOutput, len(out))
	for i, x := range out {
		s[i] = storedOutput(x)
	}
	return marshalText(s)
}

func marshalText(v any) (any, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return string(b), nil
}

// jsonOrNil keeps raw JSON as text, NULL when empty.
func jsonOrNil(raw json.RawMessage) any {
	if len(raw) == 0 {
		return nil
	}
	return string(raw)
}

func strOrNil(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// jobArgs is j in jobColumns order.
func jobArgs(j *schema.Job) ([]any, error) {
	inputs, err := encodeInputs(j.Inputs)
	if err != nil {
		return nil, fmt.Errorf("encode inputs: %w", err)
	}
	outputs, err := encodeOutputs(j.Outputs)
	if err != nil {
		return nil, fmt.Errorf("encode outputs: %w", err)
	}
	var progress, jerr, req any
	if !j.Requirements.IsZero() {
		if req, err = marshalText(j.Requirements); err != nil {
			return nil, fmt.Errorf("encode requirements: %w", err)
		}
	}
	if j.Progress != nil {
		if progress, err = marshalText(j.Progress); err != nil {
			return nil, fmt.Errorf("encode progress: %w", err)
		}
	}
	if j.Error != nil {
		if jerr, err = marshalText(j.Error); err != nil {
			return nil, fmt.Errorf("encode error: %w", err)
		}
	}
	return []any{
		j.ID, j.Frontend, j.UserID, string(j.State), j.Priority, string(j.Workflow), jsonOrNil(j.Metadata),
		inputs, strOrNil(j.Node), strOrNil(j.PromptID), j.Attempts, strOrNil(j.LeaseOwner),
		ntval(j.LeaseExpiresAt), progress, outputs, jerr, strOrNil(j.IdempotencyKey), j.Charged,
		j.CancelRequested, tval(j.CreatedAt), ntval(j.DispatchedAt), ntval(j.StartedAt),
		ntval(j.FinishedAt), tval(j.UpdatedAt), strOrNil(j.Template), strOrNil(j.WebhookURL), req,
	}, nil
}

// job turns a stored row into the vocabulary's Job.
func (r *jobRow) job() (*schema.Job, error) {
	j := &schema.Job{
		ID:              r.ID,
		Frontend:        r.Frontend,
		UserID:          r.UserID,
		State:           schema.JobState(r.State),
		Priority:        r.Priority,
		Workflow:        json.RawMessage(r.Workflow),
		Node:            r.Node.String,
		PromptID:        r.PromptID.String,
		Attempts:        r.Attempts,
		LeaseOwner:      r.LeaseOwner.String,
		LeaseExpiresAt:  r.LeaseExpiresAt.Ptr(),
		IdempotencyKey:  r.IdempotencyKey.String,
		Charged:         r.Charged,
		CancelRequested: r.CancelRequested,
		CreatedAt:       r.CreatedAt.Time,
		DispatchedAt:    r.DispatchedAt.Ptr(),
		StartedAt:       r.StartedAt.Ptr(),
		FinishedAt:      r.FinishedAt.Ptr(),
		UpdatedAt:       r.UpdatedAt.Time,
		Template:        r.Template.String,
		WebhookURL:      r.WebhookURL.String,
	}
	if r.Metadata.Valid && r.Metadata.String != "" {
		j.Metadata = json.RawMessage(r.Metadata.String)
	}
	if r.Inputs.Valid {
		var in []storedInput
		if err := json.Unmarshal([]byte(r.Inputs.String), &in); err != nil {
			return nil, fmt.Errorf("job %s: decode inputs: %w", r.ID, err)
		}
		j.Inputs = make([]schema.JobInput, len(in))
		for i, x := range in {
			j.Inputs[i] = schema.JobInput(x)
		}
	}
	if r.Outputs.Valid {
		var out []storedOutput
		if err := json.Unmarshal([]byte(r.Outputs.String), &out); err != nil {
			return nil, fmt.Errorf("job %s: decode outputs: %w", r.ID, err)
		}
		j.Outputs = make([]schema.Output, len(out))
		for i, x := range out {
			j.Outputs[i] = schema.Output(x)
		}
	}
	if r.Requirements.Valid && r.Requirements.String != "" {
		var req schema.Requirements
		if err := json.Unmarshal([]byte(r.Requirements.String), &req); err != nil {
			return nil, fmt.Errorf("job %s: decode requirements: %w", r.ID, err)
		}
		j.Requirements = &req
	}
	if r.Progress.Valid {
		var p schema.Progress
		if err := json.Unmarshal([]byte(r.Progress.String), &p); err != nil {
			return nil, fmt.Errorf("job %s: decode progress: %w", r.ID, err)
		}
		j.Progress = &p
	}
	if r.Error.Valid {
		var e schema.JobError
		if err := json.Unmarshal([]byte(r.Error.String), &e); err != nil {
			return nil, fmt.Errorf("job %s: decode error: %w", r.ID, err)
		}
		j.Error = &e
	}
	return j, nil
}

func jobsOf(rows []jobRow) ([]schema.Job, error) {
	out := make([]schema.Job, 0, len(rows))
	for i := range rows {
		j, err := rows[i].job()
		if err != nil {
			return nil, err
		}
		out = append(out, *j)
	}
	return out, nil
}

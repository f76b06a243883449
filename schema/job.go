package schema

import (
	"encoding/json"
	"math"
	"time"
)

// JobState is where a job is in its life. See comfy/dispatch/doc.go for the
// transitions.
type JobState string

const (
	JobQueued     JobState = "queued"     // in comfyfarm's queue, no node yet
	JobDispatched JobState = "dispatched" // posted to a node, in the node's own queue
	JobRunning    JobState = "running"    // the node is executing it
	JobStoring    JobState = "storing"    // outputs are being copied into storage
	JobSucceeded  JobState = "succeeded"
	JobFailed     JobState = "failed"
	JobCancelled  JobState = "cancelled"
)

// JobStates lists every state in life order.
var JobStates = []JobState{JobQueued, JobDispatched, JobRunning, JobStoring, JobSucceeded, JobFailed, JobCancelled}

// Valid reports whether s is one of the known states.
func (s JobState) Valid() bool {
	for _, v := range JobStates {
		if s == v {
			return true
		}
	}
	return false
}

// Terminal reports whether no further transition can happen.
func (s JobState) Terminal() bool {
	return s == JobSucceeded || s == JobFailed || s == JobCancelled
}

// Active reports whether the job holds (or is about to hold) a node.
func (s JobState) Active() bool {
	return s == JobDispatched || s == JobRunning || s == JobStoring
}

// Priority bounds for a submitted job.
const (
	MinPriority = -100
	MaxPriority = 100
)

// Job is one workflow run asked for by a frontend on behalf of one of its users.
type Job struct {
	ID              string          `json:"id"`
	Frontend        string          `json:"frontend"`
	UserID          string          `json:"user_id"`
	State           JobState        `json:"state"`
	Priority        int             `json:"priority"`
	Workflow        json.RawMessage `json:"-"`
	Template        string          `json:"template,omitempty"` // "name@version"; empty for a raw workflow
	Metadata        json.RawMessage `json:"metadata,omitempty"`
	Inputs          []JobInput      `json:"-"`
	Requirements    *Requirements   `json:"requirements,omitempty"`
	Node            string          `json:"node"` // "" until dispatched
	PromptID        string          `json:"-"`
	Attempts        int             `json:"attempts"`
	LeaseOwner      string          `json:"-"`
	LeaseExpiresAt  *time.Time      `json:"-"`
	Progress        *Progress       `json:"progress"`
	Outputs         []Output        `json:"outputs"`
	Error           *JobError       `json:"error"`
	IdempotencyKey  string          `json:"-"`
	Charged         int64           `json:"-"` // credits charged at submit, refunded on failure or cancel
	CancelRequested bool            `json:"-"`
	CreatedAt       time.Time       `json:"created_at"`
	DispatchedAt    *time.Time      `json:"dispatched_at"`
	StartedAt       *time.Time      `json:"started_at"`
	FinishedAt      *time.Time      `json:"finished_at"`
	UpdatedAt       time.Time       `json:"-"`

	// Position is computed, never stored: jobs that will start before this one
	// (0 when it is next or already running).
	Position int `json:"position"`

	// WebhookURL is the job's own webhook address (submit field
	// webhook_url), used instead of its frontend's webhook.url.
	WebhookURL string `json:"webhook_url,omitempty"`
}

// JobInput is one image uploaded with a job: kept in storage under Key until
// dispatch uploads it to the chosen node.
type JobInput struct {
	Field       string `json:"field"`        // form field, always "images"
	Filename    string `json:"filename"`     // the name the client gave (what LoadImage refers to)
	Key         string `json:"key"`          // object key in storage
	ContentType string `json:"content_type"` // from magic bytes
	Bytes       int64  `json:"bytes"`
	Width       int    `json:"width"`
	Height      int    `json:"height"`
	SHA256      string `json:"sha256"`
}

// Progress is the live progress of the node executing now.
type Progress struct {
	NodeID  string  `json:"node_id"`
	Value   float64 `json:"value"`
	Max     float64 `json:"max"`
	Percent float64 `json:"percent"`
}

// NewProgress fills Percent from value and max.
func NewProgress(nodeID string, value, max float64) Progress {
	p := Progress{NodeID: nodeID, Value: value, Max: max}
	if max > 0 {
		p.Percent = value / max * 100
		if p.Percent > 100 {
			p.Percent = 100
		}
		if p.Percent < 0 {
			p.Percent = 0
		}
		p.Percent = math.Round(p.Percent*100) / 100
	}
	return p
}

// Output is one file a job produced.
type Output struct {
	PhotoID     int64  `json:"photo_id"`
	URL         string `json:"url"`
	Key         string `json:"-"` // the database keeps it; the URL is built from it when read
	ContentType string `json:"content_type"`
	Width       int    `json:"width"`
	Height      int    `json:"height"`
	Bytes       int64  `json:"bytes"`
	SHA256      string `json:"sha256,omitempty"`
	Filename    string `json:"filename"`
	NodeID      string `json:"node_id"`
	// Preview marks a temporary file of the workflow (ComfyUI's "temp"
	// type, e.g. PreviewImage), kept only when the frontend asks for them.
	Preview bool `json:"preview,omitempty"`
}

// JobError says why a job failed.
type JobError struct {
	Code     string         `json:"code"`
	Message  string         `json:"message"`
	NodeID   string         `json:"node_id"`
	NodeType string         `json:"node_type"`
	Details  map[string]any `json:"details"`
}

func (e *JobError) Error() string {
	if e.NodeID != "" {
		return e.Code + ": " + e.Message + " (node " + e.NodeID + " " + e.NodeType + ")"
	}
	return e.Code + ": " + e.Message
}

// Job error codes.
const (
	CodeExecutionError   = "execution_error"   // the workflow raised on the node: deterministic, no retry
	CodeValidationFailed = "validation_failed" // the node refused the prompt
	CodeNodeLost         = "node_lost"         // attempts exhausted after node failures
	CodeTimeout          = "timeout"
	CodeStorageFailed    = "storage_failed"
	CodeNoOutputs        = "no_outputs"
	CodeNoNode           = "no_node" // waited longer than stall_timeout for a node offering its classes
)

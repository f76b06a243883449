package schema

import (
	"encoding/json"
	"io"
)

// SubmitParams is a job submission after authentication and decoding.
type SubmitParams struct {
	Frontend       string
	UserID         string
	Workflow       json.RawMessage // API-format graph
	Priority       int
	Metadata       json.RawMessage // free JSON, <= MaxMetadataBytes
	IdempotencyKey string
	Inputs         []InputFile
	// Template is the "name@version" the workflow was expanded from; empty
	// for a raw workflow.
	Template     string
	WebhookURL   string        // checked against webhooks.allow by the server
	Requirements *Requirements // nodes the job may run on; nil: any
}

// MaxMetadataBytes caps a job's metadata (contract: 16 KiB).
const MaxMetadataBytes = 16 << 10

// InputFile is one image uploaded with a job, not yet checked.
type InputFile struct {
	Filename string // as the client named it
	Size     int64
	Open     func() (io.ReadCloser, error)
}

// JobFilter selects jobs of one frontend, newest first.
type JobFilter struct {
	Frontend string
	UserID   string
	State    JobState
	Node     string // the node it was last dispatched to
	Limit    int
	Before   string // job id (ULIDs sort by creation)
}

// QueueStatus answers "is my job running now, and if not, how many are ahead".
type QueueStatus struct {
	JobID    string    `json:"job_id"`
	State    JobState  `json:"state"`
	Running  bool      `json:"running"`
	Ahead    int       `json:"ahead"`
	Progress *Progress `json:"progress"`
}

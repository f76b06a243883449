package schema

import "time"

// WebhookState is where one webhook delivery is.
type WebhookState string

const (
	WebhookPending   WebhookState = "pending"   // due now or at next_attempt_at
	WebhookDelivered WebhookState = "delivered" // a 2xx answer
	WebhookFailed    WebhookState = "failed"    // given up: 410 Gone, or the retry window ran out
)

// WebhookEvents are the events a webhook can be sent for: a job's final
// states.
var WebhookEvents = []JobState{JobSucceeded, JobFailed, JobCancelled}

// WebhookMessageID is the webhook-id of a job's event: the same on every
// attempt, so a receiver can drop repeats.
func WebhookMessageID(jobID string, event JobState) string {
	return "msg_" + jobID + "_" + string(event)
}

// WebhookDelivery is one job event sent (or to be sent) to one address.
type WebhookDelivery struct {
	ID            string           `json:"id"` // the webhook-id header
	JobID         string           `json:"job_id"`
	Frontend      string           `json:"frontend"`
	Event         JobState         `json:"event"`
	URL           string           `json:"url"`
	State         WebhookState     `json:"state"`
	Attempts      []WebhookAttempt `json:"attempts"`
	NextAttemptAt *time.Time       `json:"next_attempt_at"` // pending only
	CreatedAt     time.Time        `json:"created_at"`      // when the job reached its final state
	UpdatedAt     time.Time        `json:"updated_at"`
}

// WebhookAttempt is one try at a delivery.
type WebhookAttempt struct {
	At         time.Time `json:"at"`
	StatusCode int       `json:"status_code,omitempty"` // the receiver's answer, 0 when there was none
	Error      string    `json:"error,omitempty"`       // why it did not count as delivered
	DurationMS float64   `json:"duration_ms"`
}

package schema

import "time"

// EventType names a job event on the WebSocket/SSE stream (contract, DESIGN §4).
type EventType string

const (
	EventSnapshot   EventType = "snapshot"
	EventQueued     EventType = "queued"
	EventDispatched EventType = "dispatched"
	EventRunning    EventType = "running"
	EventProgress   EventType = "progress"
	EventExecuted   EventType = "executed"
	EventPreview    EventType = "preview"
	EventStoring    EventType = "storing"
	EventSucceeded  EventType = "succeeded"
	EventFailed     EventType = "failed"
	EventCancelled  EventType = "cancelled"
	EventKeepAlive  EventType = "keepalive"
)

// Terminal reports whether the stream closes after this event.
func (t EventType) Terminal() bool {
	return t == EventSucceeded || t == EventFailed || t == EventCancelled
}

// Droppable reports whether a slow subscriber may miss this event.
func (t EventType) Droppable() bool {
	return t == EventProgress || t == EventPreview || t == EventKeepAlive || t == EventExecuted
}

// Event is one message about one job. Fields not used by a type are omitted.
type Event struct {
	Seq      int64     `json:"seq"`
	Type     EventType `json:"type"`
	JobID    string    `json:"job_id"`
	Time     time.Time `json:"time"`
	Job      *Job      `json:"job,omitempty"`      // snapshot
	Position *int      `json:"position,omitempty"` // queued
	Node     string    `json:"node,omitempty"`     // dispatched, running
	NodeID   string    `json:"node_id,omitempty"`  // progress, executed, preview
	Value    *float64  `json:"value,omitempty"`    // progress
	Max      *float64  `json:"max,omitempty"`      // progress
	Percent  *float64  `json:"percent,omitempty"`  // progress
	Image    string    `json:"image,omitempty"`    // preview, base64
	Format   string    `json:"format,omitempty"`   // preview content type
	Outputs  []Output  `json:"outputs,omitempty"`  // succeeded
	Error    *JobError `json:"error,omitempty"`    // failed
}

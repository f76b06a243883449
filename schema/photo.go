package schema

import (
	"encoding/json"
	"time"
)

// Photo is one stored output, a row in its frontend's own database.
type Photo struct {
	ID          int64           `json:"id"`
	UserID      string          `json:"user_id"` // the frontend's own user id (users.external_id)
	JobID       string          `json:"job_id"`
	OutputIndex int             `json:"output_index"`
	ObjectKey   string          `json:"-"`
	URL         string          `json:"url"` // built when read from ObjectKey
	ContentType string          `json:"content_type"`
	Width       int             `json:"width"`
	Height      int             `json:"height"`
	Bytes       int64           `json:"bytes"`
	SHA256      string          `json:"sha256"`
	Node        string          `json:"node"`
	Metadata    json.RawMessage `json:"metadata"`
	CreatedAt   time.Time       `json:"created_at"`
}

// User is an end user of one frontend.
type User struct {
	ID         int64     `json:"-"`  // internal row id
	ExternalID string    `json:"id"` // the frontend's own user id
	Nickname   string    `json:"nickname"`
	Email      string    `json:"email"`
	AvatarURL  string    `json:"avatar_url"`
	Credits    int64     `json:"credits"`
	PhotoCount int64     `json:"photo_count"`
	CreatedAt  time.Time `json:"created_at"`
	UpdatedAt  time.Time `json:"updated_at"`
}

// CreditEntry is one change of a user's credits, kept in the ledger.
type CreditEntry struct {
	ID             int64     `json:"id"`
	UserID         string    `json:"user_id"`
	Delta          int64     `json:"delta"`
	Reason         string    `json:"reason"`
	IdempotencyKey string    `json:"idempotency_key"`
	Balance        int64     `json:"balance"` // after the change
	CreatedAt      time.Time `json:"created_at"`
}

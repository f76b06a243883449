package schema

// NodeUpdate changes a registered node's settings (PATCH /api/v1/nodes/{name}).
// A nil field stays as it is; Tags set to an empty list clears the tags.
type NodeUpdate struct {
	MaxInflight *int     `json:"max_inflight,omitempty"`
	Tags        []string `json:"tags,omitempty"`
}

package comfy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/gorilla/websocket"
)

// Sentinel errors. Match them with errors.Is.
var (
	// ErrTooLarge reports a body over a size limit: the server's 413 (every body, JSON prompts
	// included, is capped by --max-upload-size) or a /view download past the caller's cap.
	ErrTooLarge = errors.New("comfy: body too large")
	// ErrForbidden reports the bare 403 of ComfyUI's origin check (Host and Origin disagree, or a
	// cross-site Sec-Fetch-Site). It usually means a proxy forwards browser headers.
	ErrForbidden = errors.New("comfy: forbidden by the server's origin check")
	// ErrNotInHistory is returned by History when the server has no entry for the prompt
	// (still queued or running, deleted, evicted, or lost in a restart).
	ErrNotInHistory = errors.New("comfy: prompt not in history")
)

// APIError is a non-2xx answer from ComfyUI.
type APIError struct {
	Method string
	Path   string
	Status int
	// Type, Message and Details come from a JSON {"error": ...} body when there is one.
	Type       string
	Message    string
	Details    string
	NodeErrors map[string]NodeError
	// Body holds the start of the raw response body (at most maxErrorBody bytes).
	Body []byte
}

// Error implements error.
func (e *APIError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "comfy: %s %s: HTTP %d", e.Method, e.Path, e.Status)
	if e.Type != "" {
		b.WriteString(" " + e.Type)
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	if e.Details != "" && e.Details != e.Message {
		b.WriteString(" (" + e.Details + ")")
	}
	if e.Type == "" && e.Message == "" && len(e.Body) > 0 {
		b.WriteString(": " + truncate(string(e.Body), 200))
	}
	return b.String()
}

// Is makes errors.Is(err, ErrTooLarge) true for a 413 and errors.Is(err, ErrForbidden) true for
// a 403.
func (e *APIError) Is(target error) bool {
	switch target {
	case ErrTooLarge:
		return e.Status == 413
	case ErrForbidden:
		return e.Status == 403
	}
	return false
}

// NodeError is one entry of a /prompt response's node_errors.
type NodeError struct {
	ClassType        string          `json:"class_type"`
	DependentOutputs []string        `json:"dependent_outputs"`
	Errors           []NodeErrorItem `json:"errors"`
}

// NodeErrorItem is one validation failure of a node input (type e.g. value_not_in_list,
// required_input_missing; an open set).
type NodeErrorItem struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Details   string         `json:"details"`
	ExtraInfo map[string]any `json:"extra_info"`
}

// ValidationError is a prompt that ComfyUI refused (400 with an "error" body, in every shape
// the server has used) or accepted only in part (200 with node_errors: the outputs that depend
// on a broken node are silently dropped). It wraps the *APIError.
type ValidationError struct {
	*APIError
	// Response is set for the 200 case: the prompt was queued under Response.PromptID and its
	// valid outputs will run.
	Response *SubmitResponse
}

// Error implements error.
func (e *ValidationError) Error() string {
	var b strings.Builder
	if e.Response != nil {
		fmt.Fprintf(&b, "comfy: prompt %s queued with invalid outputs dropped", e.Response.PromptID)
	} else {
		b.WriteString("comfy: prompt rejected")
		if e.Type != "" {
			b.WriteString(": " + e.Type)
		}
		if e.Message != "" {
			b.WriteString(": " + e.Message)
		}
		if e.Details != "" && e.Details != e.Message {
			b.WriteString(" (" + e.Details + ")")
		}
	}
	for _, id := range sortedKeys(e.NodeErrors) {
		ne := e.NodeErrors[id]
		for _, it := range ne.Errors {
			fmt.Fprintf(&b, "; node %s (%s): %s", id, ne.ClassType, it.Message)
			if it.Details != "" {
				b.WriteString(": " + it.Details)
			}
		}
	}
	return b.String()
}

// Unwrap returns the underlying *APIError.
func (e *ValidationError) Unwrap() error { return e.APIError }

// IsTransient reports whether err is worth retrying on the same or another server: connection
// refused or reset, timeouts, truncated bodies, dropped WebSockets, 5xx and 429 answers.
// Validation errors, other 4xx, ErrTooLarge, ErrForbidden and a cancelled context are not.
func IsTransient(err error) bool {
	if err == nil {
		return false
	}
	var ve *ValidationError
	if errors.As(err, &ve) {
		return false
	}
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Status >= 500 || ae.Status == 429 || ae.Status == 408
	}
	if errors.Is(err, ErrTooLarge) || errors.Is(err, ErrForbidden) || errors.Is(err, ErrNotInHistory) {
		return false
	}
	if errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return true
	}
	for _, e := range []error{syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED,
		syscall.EPIPE, syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.ETIMEDOUT} {
		if errors.Is(err, e) {
			return true
		}
	}
	var ce *websocket.CloseError
	if errors.As(err, &ce) {
		return true // the socket dropped; dial again
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		return true
	}
	var de *net.DNSError
	return errors.As(err, &de) && (de.IsTimeout || de.IsTemporary)
}

// errorBody is the JSON error body of ComfyUI in all its recorded shapes: "error" is an object
// (current) or a plain string ("no prompt", before 0.3.28; {"error": "Job not found"} on
// /api/jobs), node_errors an object, an empty array or absent.
type errorBody struct {
	Error      json.RawMessage `json:"error"`
	NodeErrors json.RawMessage `json:"node_errors"`
}

type errorObject struct {
	Type    string `json:"type"`
	Message string `json:"message"`
	Details string `json:"details"`
}

// parseErrorBody fills e from a JSON error body. It reports whether the body had an "error".
func parseErrorBody(e *APIError, body []byte) (bool, error) {
	var eb errorBody
	if err := json.Unmarshal(body, &eb); err != nil {
		return false, err
	}
	if len(eb.Error) == 0 || string(eb.Error) == "null" {
		return false, nil
	}
	switch eb.Error[0] {
	case '"':
		var s string
		if err := json.Unmarshal(eb.Error, &s); err != nil {
			return false, err
		}
		e.Message = s
	case '{':
		var o errorObject
		if err := json.Unmarshal(eb.Error, &o); err != nil {
			return false, err
		}
		e.Type, e.Message, e.Details = o.Type, o.Message, o.Details
	default:
		return false, fmt.Errorf("comfy: unexpected error value %.40s", eb.Error)
	}
	ne, err := decodeNodeErrors(eb.NodeErrors)
	if err != nil {
		return false, err
	}
	e.NodeErrors = ne
	return true, nil
}

// decodeNodeErrors accepts an object, an empty array (old servers), null or nothing.
func decodeNodeErrors(raw json.RawMessage) (map[string]NodeError, error) {
	s := strings.TrimSpace(string(raw))
	if s == "" || s == "null" {
		return nil, nil
	}
	if s[0] == '[' {
		var arr []json.RawMessage
		if err := json.Unmarshal(raw, &arr); err != nil {
			return nil, fmt.Errorf("comfy: decode node_errors: %w", err)
		}
		if len(arr) != 0 {
			return nil, fmt.Errorf("comfy: node_errors is a non-empty array")
		}
		return nil, nil
	}
	var m map[string]NodeError
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("comfy: decode node_errors: %w", err)
	}
	if len(m) == 0 {
		return nil, nil
	}
	return m, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

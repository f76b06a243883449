package comfy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
)

// Event is one message from ComfyUI's WebSocket (or a synthetic Stream event). Decoded events
// are pointers: *Status, *ExecutionStart, *Executing, ... Unknown types come back as *Unknown
// and unknown binary kinds as *UnknownBinary; unknown fields are ignored.
type Event interface {
	// EventType is the wire type ("executing", "progress", ...; "preview" and "text" for
	// binary frames).
	EventType() string
	// EventPromptID is the prompt the event belongs to, "" when the wire does not say.
	EventPromptID() string
}

// Status is the queue broadcast; the first frame of a socket also carries its SID.
type Status struct {
	QueueRemaining int
	SID            string
}

// ExecutionStart: the worker took the prompt.
type ExecutionStart struct {
	PromptID  string
	Timestamp int64 // ms since the epoch; 0 before 2024-07
}

// ExecutionCached lists the nodes served from cache.
type ExecutionCached struct {
	PromptID  string
	Nodes     []string
	Timestamp int64
}

// Executing announces a node start. Node null on the wire (Done) means the prompt finished;
// it is the last frame of every prompt and the only completion signal of 2023-era servers.
// Right after a reconnect the server may send it without a PromptID.
type Executing struct {
	PromptID    string
	Node        string
	DisplayNode string
	Done        bool
}

// Progress is a step of a node with a progress bar.
type Progress struct {
	PromptID string
	Node     string
	Value    float64
	Max      float64
}

// ProgressState (>= 0.3.45) holds the state of every node started so far in the prompt.
type ProgressState struct {
	PromptID string
	Nodes    map[string]NodeProgress
}

// NodeProgress is one node in a ProgressState.
type NodeProgress struct {
	Value         float64
	Max           float64
	State         string // running or finished
	NodeID        string
	PromptID      string
	DisplayNodeID string
	ParentNodeID  string
	RealNodeID    string
}

// Executed carries a node's UI output (nil when the wire has null). It is also re-sent for
// cached output nodes (2024-08+).
type Executed struct {
	PromptID    string
	Node        string
	DisplayNode string
	Output      NodeOutput
}

// Files lists the files of the output (see HistoryEntry.Files for the order).
func (e *Executed) Files() []FileRef { return e.Output.Files(e.Node) }

// ExecutionSuccess (2024-07+) ends a successful prompt; history is written just after it.
type ExecutionSuccess struct {
	PromptID  string
	Timestamp int64
}

// ExecutionError ends a failed prompt, except when Blocked. It is also an error value.
type ExecutionError struct {
	PromptID         string
	NodeID           string
	NodeType         string
	ExceptionMessage string
	ExceptionType    string
	Traceback        []string
	Executed         []string
	CurrentInputs    json.RawMessage
	CurrentOutputs   json.RawMessage
	Timestamp        int64
}

// Blocked reports an ExecutionBlocked notice: an output was blocked, the prompt continues.
func (e *ExecutionError) Blocked() bool { return e.ExceptionType == "ExecutionBlocked" }

// Error implements error.
func (e *ExecutionError) Error() string {
	return fmt.Sprintf("node %s (%s): %s: %s", e.NodeID, e.NodeType, e.ExceptionType, e.ExceptionMessage)
}

// ExecutionInterrupted ends an interrupted prompt. It is broadcast to every socket.
type ExecutionInterrupted struct {
	PromptID  string
	NodeID    string
	NodeType  string
	Executed  []string
	Timestamp int64
}

// FeatureFlags is the server's answer to the feature_flags handshake (an open map).
type FeatureFlags struct {
	Flags map[string]any
}

// Preview is a binary preview image: Kind 1 (PREVIEW_IMAGE, format word 1 JPEG or 2 PNG) or
// Kind 4 (PREVIEW_IMAGE_WITH_METADATA, sent to sockets that negotiated preview metadata).
type Preview struct {
	Kind        uint32
	Format      uint32 // the format word of kind 1; 0 for kind 4
	ContentType string
	// Image aliases the decoded frame.
	Image []byte
	Meta  *PreviewMeta
}

// PreviewMeta is the metadata of a kind-4 preview.
type PreviewMeta struct {
	NodeID        string
	PromptID      string
	DisplayNodeID string
	ParentNodeID  string
	RealNodeID    string
	ImageType     string
}

// Text is binary kind 3: progress text shown on a node (no prompt id on the wire).
type Text struct {
	NodeID string
	Text   string
}

// Unknown is a text frame of a type this package does not know ("logs", custom nodes...).
type Unknown struct {
	Type string
	Data json.RawMessage
}

// UnknownBinary is a binary frame of an unknown kind; Data follows the 4-byte kind.
type UnknownBinary struct {
	Kind uint32
	Data []byte
}

// Malformed is a frame that failed to decode; Conn.Next and Stream deliver it instead of
// failing the connection.
type Malformed struct {
	Type  string // the wire type when it could be read
	Frame []byte
	Err   error
}

func (*Status) EventType() string               { return "status" }
func (*ExecutionStart) EventType() string       { return "execution_start" }
func (*ExecutionCached) EventType() string      { return "execution_cached" }
func (*Executing) EventType() string            { return "executing" }
func (*Progress) EventType() string             { return "progress" }
func (*ProgressState) EventType() string        { return "progress_state" }
func (*Executed) EventType() string             { return "executed" }
func (*ExecutionSuccess) EventType() string     { return "execution_success" }
func (*ExecutionError) EventType() string       { return "execution_error" }
func (*ExecutionInterrupted) EventType() string { return "execution_interrupted" }
func (*FeatureFlags) EventType() string         { return "feature_flags" }
func (*Preview) EventType() string              { return "preview" }
func (*Text) EventType() string                 { return "text" }
func (e *Unknown) EventType() string            { return e.Type }
func (*UnknownBinary) EventType() string        { return "binary" }
func (*Malformed) EventType() string            { return "malformed" }

func (*Status) EventPromptID() string                 { return "" }
func (e *ExecutionStart) EventPromptID() string       { return e.PromptID }
func (e *ExecutionCached) EventPromptID() string      { return e.PromptID }
func (e *Executing) EventPromptID() string            { return e.PromptID }
func (e *Progress) EventPromptID() string             { return e.PromptID }
func (e *ProgressState) EventPromptID() string        { return e.PromptID }
func (e *Executed) EventPromptID() string             { return e.PromptID }
func (e *ExecutionSuccess) EventPromptID() string     { return e.PromptID }
func (e *ExecutionError) EventPromptID() string       { return e.PromptID }
func (e *ExecutionInterrupted) EventPromptID() string { return e.PromptID }
func (*FeatureFlags) EventPromptID() string           { return "" }
func (*Text) EventPromptID() string                   { return "" }
func (*UnknownBinary) EventPromptID() string          { return "" }
func (*Malformed) EventPromptID() string              { return "" }

// EventPromptID returns the metadata's prompt id (kind 4), else "".
func (e *Preview) EventPromptID() string {
	if e.Meta != nil {
		return e.Meta.PromptID
	}
	return ""
}

// EventPromptID returns data.prompt_id when the unknown frame has one.
func (e *Unknown) EventPromptID() string {
	var w struct {
		PromptID lenientString `json:"prompt_id"`
	}
	if json.Unmarshal(e.Data, &w) != nil {
		return ""
	}
	return string(w.PromptID)
}

// IsTerminal reports whether ev ends its prompt: execution_success, execution_error (unless
// Blocked), execution_interrupted, or executing with node null (the last frame of every prompt,
// and the first moment the history entry is sure to exist).
func IsTerminal(ev Event) bool {
	switch x := ev.(type) {
	case *ExecutionSuccess, *ExecutionInterrupted:
		return true
	case *ExecutionError:
		return !x.Blocked()
	case *Executing:
		return x.Done
	}
	return false
}

// DecodeText decodes one JSON text frame {"type": T, "data": {...}}.
func DecodeText(b []byte) (Event, error) {
	var env struct {
		Type *string         `json:"type"`
		Data json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, fmt.Errorf("comfy: text frame: %w", err)
	}
	if env.Type == nil {
		return nil, errors.New("comfy: text frame has no type")
	}
	return decodeData(*env.Type, env.Data)
}

// decodeData decodes the data of a message of type t (frames and history messages).
func decodeData(t string, data json.RawMessage) (Event, error) {
	d := bytes.TrimSpace(data)
	if len(d) == 0 || bytes.Equal(d, []byte("null")) {
		d = []byte("{}")
	}
	ev, err := decodeKnown(t, d)
	if err != nil {
		return nil, fmt.Errorf("comfy: %s: %w", t, err)
	}
	return ev, nil
}

func decodeKnown(t string, d []byte) (Event, error) {
	switch t {
	case "status":
		var w struct {
			Status *struct {
				ExecInfo *struct {
					QueueRemaining lenientFloat `json:"queue_remaining"`
				} `json:"exec_info"`
			} `json:"status"`
			SID lenientString `json:"sid"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		ev := &Status{SID: string(w.SID)}
		if w.Status != nil && w.Status.ExecInfo != nil {
			ev.QueueRemaining = int(w.Status.ExecInfo.QueueRemaining)
		}
		return ev, nil
	case "execution_start", "execution_success":
		var w struct {
			PromptID  lenientString `json:"prompt_id"`
			Timestamp lenientFloat  `json:"timestamp"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		if t == "execution_start" {
			return &ExecutionStart{PromptID: string(w.PromptID), Timestamp: int64(w.Timestamp)}, nil
		}
		return &ExecutionSuccess{PromptID: string(w.PromptID), Timestamp: int64(w.Timestamp)}, nil
	case "execution_cached":
		var w struct {
			PromptID  lenientString   `json:"prompt_id"`
			Nodes     []lenientString `json:"nodes"`
			Timestamp lenientFloat    `json:"timestamp"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		return &ExecutionCached{PromptID: string(w.PromptID), Nodes: stringsOf(w.Nodes), Timestamp: int64(w.Timestamp)}, nil
	case "executing":
		var w struct {
			PromptID    lenientString    `json:"prompt_id"`
			Node        *json.RawMessage `json:"node"`
			DisplayNode lenientString    `json:"display_node"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		ev := &Executing{PromptID: string(w.PromptID), DisplayNode: string(w.DisplayNode)}
		if w.Node == nil || string(*w.Node) == "null" {
			ev.Done = true
		} else {
			var n lenientString
			if err := json.Unmarshal(*w.Node, &n); err != nil {
				return nil, err
			}
			ev.Node = string(n)
		}
		return ev, nil
	case "progress":
		var w struct {
			PromptID lenientString `json:"prompt_id"`
			Node     lenientString `json:"node"`
			Value    lenientFloat  `json:"value"`
			Max      lenientFloat  `json:"max"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		return &Progress{PromptID: string(w.PromptID), Node: string(w.Node), Value: float64(w.Value), Max: float64(w.Max)}, nil
	case "progress_state":
		var w struct {
			PromptID lenientString `json:"prompt_id"`
			Nodes    map[string]struct {
				Value         lenientFloat  `json:"value"`
				Max           lenientFloat  `json:"max"`
				State         lenientString `json:"state"`
				NodeID        lenientString `json:"node_id"`
				PromptID      lenientString `json:"prompt_id"`
				DisplayNodeID lenientString `json:"display_node_id"`
				ParentNodeID  lenientString `json:"parent_node_id"`
				RealNodeID    lenientString `json:"real_node_id"`
			} `json:"nodes"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		ev := &ProgressState{PromptID: string(w.PromptID), Nodes: make(map[string]NodeProgress, len(w.Nodes))}
		for id, n := range w.Nodes {
			ev.Nodes[id] = NodeProgress{
				Value: float64(n.Value), Max: float64(n.Max), State: string(n.State),
				NodeID: string(n.NodeID), PromptID: string(n.PromptID), DisplayNodeID: string(n.DisplayNodeID),
				ParentNodeID: string(n.ParentNodeID), RealNodeID: string(n.RealNodeID),
			}
		}
		return ev, nil
	case "executed":
		var w struct {
			PromptID    lenientString `json:"prompt_id"`
			Node        lenientString `json:"node"`
			DisplayNode lenientString `json:"display_node"`
			Output      NodeOutput    `json:"output"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		return &Executed{PromptID: string(w.PromptID), Node: string(w.Node), DisplayNode: string(w.DisplayNode), Output: w.Output}, nil
	case "execution_error":
		var w struct {
			PromptID         lenientString   `json:"prompt_id"`
			NodeID           lenientString   `json:"node_id"`
			NodeType         lenientString   `json:"node_type"`
			ExceptionMessage lenientString   `json:"exception_message"`
			ExceptionType    lenientString   `json:"exception_type"`
			Traceback        []lenientString `json:"traceback"`
			Executed         []lenientString `json:"executed"`
			CurrentInputs    json.RawMessage `json:"current_inputs"`
			CurrentOutputs   json.RawMessage `json:"current_outputs"`
			Timestamp        lenientFloat    `json:"timestamp"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		return &ExecutionError{
			PromptID: string(w.PromptID), NodeID: string(w.NodeID), NodeType: string(w.NodeType),
			ExceptionMessage: string(w.ExceptionMessage), ExceptionType: string(w.ExceptionType),
			Traceback: stringsOf(w.Traceback), Executed: stringsOf(w.Executed),
			CurrentInputs: w.CurrentInputs, CurrentOutputs: w.CurrentOutputs, Timestamp: int64(w.Timestamp),
		}, nil
	case "execution_interrupted":
		var w struct {
			PromptID  lenientString   `json:"prompt_id"`
			NodeID    lenientString   `json:"node_id"`
			NodeType  lenientString   `json:"node_type"`
			Executed  []lenientString `json:"executed"`
			Timestamp lenientFloat    `json:"timestamp"`
		}
		if err := json.Unmarshal(d, &w); err != nil {
			return nil, err
		}
		return &ExecutionInterrupted{PromptID: string(w.PromptID), NodeID: string(w.NodeID), NodeType: string(w.NodeType),
			Executed: stringsOf(w.Executed), Timestamp: int64(w.Timestamp)}, nil
	case "feature_flags":
		var flags map[string]any
		if err := json.Unmarshal(d, &flags); err != nil {
			return nil, err
		}
		return &FeatureFlags{Flags: flags}, nil
	}
	return &Unknown{Type: t, Data: append(json.RawMessage(nil), d...)}, nil
}

// lenientString decodes a JSON string, a number (as its text) or null ("").
type lenientString string

func (s *lenientString) UnmarshalJSON(b []byte) error {
	switch {
	case len(b) > 0 && b[0] == '"':
		var v string
		if err := json.Unmarshal(b, &v); err != nil {
			return err
		}
		*s = lenientString(v)
	case string(b) == "null":
		*s = ""
	default:
		var n json.Number
		if err := json.Unmarshal(b, &n); err != nil {
			return fmt.Errorf("want a string, got %.20s", b)
		}
		*s = lenientString(n.String())
	}
	return nil
}

// lenientFloat decodes a JSON number, a numeric string or null (0).
type lenientFloat float64

func (f *lenientFloat) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*f = 0
		return nil
	}
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return fmt.Errorf("want a number, got %q", s)
		}
		*f = lenientFloat(v)
		return nil
	}
	var v float64
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*f = lenientFloat(v)
	return nil
}

func stringsOf(in []lenientString) []string {
	if in == nil {
		return nil
	}
	out := make([]string, len(in))
	for i, s := range in {
		out[i] = string(s)
	}
	return out
}

package comfy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"sort"
	"strings"
)

// NodeOutput is the UI output of one node, keyed by media kind ("images", "gifs", "video",
// "audio", "text", "animated", ...). Shapes vary by node, so values stay raw.
type NodeOutput map[string]json.RawMessage

// HistoryEntry is one prompt's record in GET /history/{id}, written once when the prompt ends.
type HistoryEntry struct {
	PromptID string
	// Number, ClientID, Prompt and OutputsToExecute come from the entry's "prompt" tuple.
	Number           float64
	ClientID         string
	Prompt           json.RawMessage
	OutputsToExecute []string
	Outputs          map[string]NodeOutput
	// Status is nil on 2023-era servers.
	Status *HistoryStatus
	// Meta maps output node ids to their display/parent/real ids (2024-08+).
	Meta map[string]NodeMeta
}

// HistoryStatus is the status block of a history entry (2024-01+).
type HistoryStatus struct {
	StatusStr string
	Completed bool
	Messages  []HistoryMessage
}

// HistoryMessage is one recorded execution message: [type, data] on the wire.
type HistoryMessage struct {
	Type string
	Data json.RawMessage
}

// Event decodes the message like the WebSocket frame of the same type.
func (m HistoryMessage) Event() (Event, error) { return decodeData(m.Type, m.Data) }

// NodeMeta maps an output node to the node the user sees.
type NodeMeta struct {
	NodeID      string `json:"node_id"`
	DisplayNode string `json:"display_node"`
	ParentNode  string `json:"parent_node"`
	RealNodeID  string `json:"real_node_id"`
}

// Outcome is how a finished prompt ended.
type Outcome int

// Outcomes.
const (
	OutcomeUnknown Outcome = iota
	OutcomeSuccess
	OutcomeError
	OutcomeInterrupted
)

func (o Outcome) String() string {
	switch o {
	case OutcomeSuccess:
		return "success"
	case OutcomeError:
		return "error"
	case OutcomeInterrupted:
		return "interrupted"
	}
	return "unknown"
}

// Outcome reads the entry's status. Interrupts are recorded as status "error" too; the last
// execution message tells them apart. Entries without status (2023-era servers) are a success
// when they have outputs and OutcomeUnknown otherwise (an error there looks like missing outputs).
func (h *HistoryEntry) Outcome() Outcome {
	if h.Status == nil {
		if len(h.Outputs) > 0 {
			return OutcomeSuccess
		}
		return OutcomeUnknown
	}
	switch h.lastTerminal() {
	case "execution_interrupted":
		return OutcomeInterrupted
	case "execution_error":
		return OutcomeError
	case "execution_success":
		if h.Status.StatusStr != "error" {
			return OutcomeSuccess
		}
	}
	switch h.Status.StatusStr {
	case "success":
		return OutcomeSuccess
	case "error":
		return OutcomeError
	}
	return OutcomeUnknown
}

func (h *HistoryEntry) lastTerminal() string {
	if h.Status == nil {
		return ""
	}
	for i := len(h.Status.Messages) - 1; i >= 0; i-- {
		switch t := h.Status.Messages[i].Type; t {
		case "execution_error", "execution_interrupted", "execution_success":
			return t
		}
	}
	return ""
}

// ExecError returns the error that ended the prompt (the last execution_error message), or nil
// when it did not end in an error.
func (h *HistoryEntry) ExecError() *ExecutionError {
	if h.Status == nil {
		return nil
	}
	for i := len(h.Status.Messages) - 1; i >= 0; i-- {
		m := h.Status.Messages[i]
		switch m.Type {
		case "execution_error":
			ev, err := m.Event()
			if err != nil {
				return &ExecutionError{ExceptionMessage: "undecodable execution_error: " + err.Error()}
			}
			ee := ev.(*ExecutionError)
			if ee.Blocked() {
				continue // not terminal
			}
			return ee
		case "execution_success", "execution_interrupted":
			return nil
		}
	}
	return nil
}

// Interruption returns the execution_interrupted message that ended the prompt, or nil.
func (h *HistoryEntry) Interruption() *ExecutionInterrupted {
	if h.lastTerminal() != "execution_interrupted" {
		return nil
	}
	for i := len(h.Status.Messages) - 1; i >= 0; i-- {
		if m := h.Status.Messages[i]; m.Type == "execution_interrupted" {
			if ev, err := m.Event(); err == nil {
				return ev.(*ExecutionInterrupted)
			}
			return &ExecutionInterrupted{}
		}
	}
	return nil
}

// FileRef names one output file ({filename, subfolder, type} in a node output).
type FileRef struct {
	NodeID    string
	Kind      string // the output key: images, gifs, video, audio, ...
	Filename  string
	Subfolder string
	Type      string // output, temp or input
}

// Validate rejects names that could escape a folder when used as storage keys or local paths:
// empty names, separators or ".." in the filename, absolute or ".." subfolders, unknown types.
func (f FileRef) Validate() error {
	bad := func(reason string) error {
		return fmt.Errorf("comfy: file %q (subfolder %q): %s", f.Filename, f.Subfolder, reason)
	}
	switch {
	case f.Filename == "" || f.Filename == "." || f.Filename == "..":
		return bad("empty or dot filename")
	case strings.ContainsAny(f.Filename, "/\\\x00"):
		return bad("filename contains a path separator or NUL")
	case strings.ContainsAny(f.Subfolder, "\\\x00"), strings.HasPrefix(f.Subfolder, "/"):
		return bad("bad subfolder")
	}
	for _, seg := range strings.Split(f.Subfolder, "/") {
		if seg == ".." {
			return bad("subfolder escapes its folder")
		}
	}
	switch f.Type {
	case "", "output", "temp", "input":
	default:
		return bad("unknown type " + f.Type)
	}
	return nil
}

// Path returns subfolder/filename (cleaned), for display and storage keys.
func (f FileRef) Path() string {
	if f.Subfolder == "" {
		return f.Filename
	}
	return path.Join(f.Subfolder, f.Filename)
}

// Files lists every file of every output: any list of {filename, subfolder, type} objects
// under any kind. Order: node id (numeric-aware), then kind, then list index.
func (h *HistoryEntry) Files() []FileRef { return outputFiles(h.Outputs) }

// Files lists the files of one node output, as HistoryEntry.Files does.
func (o NodeOutput) Files(nodeID string) []FileRef {
	var out []FileRef
	kinds := make([]string, 0, len(o))
	for k := range o {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, kind := range kinds {
		var items []json.RawMessage
		if json.Unmarshal(o[kind], &items) != nil {
			continue // not a list (e.g. a bool flag)
		}
		for _, it := range items {
			var f struct {
				Filename  *string `json:"filename"`
				Subfolder string  `json:"subfolder"`
				Type      string  `json:"type"`
			}
			if len(it) == 0 || it[0] != '{' || json.Unmarshal(it, &f) != nil || f.Filename == nil {
				continue
			}
			out = append(out, FileRef{NodeID: nodeID, Kind: kind, Filename: *f.Filename, Subfolder: f.Subfolder, Type: f.Type})
		}
	}
	return out
}

func outputFiles(outputs map[string]NodeOutput) []FileRef {
	var out []FileRef
	for _, id := range sortedKeys(outputs) {
		out = append(out, outputs[id].Files(id)...)
	}
	return out
}

// History fetches GET /history/{promptID}. It returns ErrNotInHistory when the server answers
// {} (unknown, still queued or running, deleted or evicted).
func (c *Client) History(ctx context.Context, promptID string) (*HistoryEntry, error) {
	if promptID == "" {
		return nil, errors.New("comfy: history: empty prompt id")
	}
	var m map[string]json.RawMessage
	err := c.doJSON(ctx, request{method: http.MethodGet, path: "/history/" + url.PathEscape(promptID)}, &m)
	if err != nil {
		return nil, err
	}
	raw, ok := m[promptID]
	if !ok {
		if len(m) == 0 {
			return nil, ErrNotInHistory
		}
		return nil, fmt.Errorf("comfy: history of %s: answer is for other prompts", promptID)
	}
	return DecodeHistoryEntry(promptID, raw)
}

// DecodeHistory decodes a GET /history body ({id: entry, ...}) into entries keyed by id.
func DecodeHistory(body []byte) (map[string]*HistoryEntry, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, fmt.Errorf("comfy: decode history: %w", err)
	}
	out := make(map[string]*HistoryEntry, len(m))
	for id, raw := range m {
		e, err := DecodeHistoryEntry(id, raw)
		if err != nil {
			return nil, err
		}
		out[id] = e
	}
	return out, nil
}

// DecodeHistoryEntry decodes one history entry.
func DecodeHistoryEntry(promptID string, raw []byte) (*HistoryEntry, error) {
	var w struct {
		Prompt  []json.RawMessage     `json:"prompt"`
		Outputs map[string]NodeOutput `json:"outputs"`
		Status  *struct {
			StatusStr string            `json:"status_str"`
			Completed bool              `json:"completed"`
			Messages  []json.RawMessage `json:"messages"`
		} `json:"status"`
		Meta map[string]json.RawMessage `json:"meta"`
	}
	if err := json.Unmarshal(raw, &w); err != nil {
		return nil, fmt.Errorf("comfy: decode history of %s: %w", promptID, err)
	}
	h := &HistoryEntry{PromptID: promptID, Outputs: w.Outputs}
	if len(w.Prompt) >= 2 {
		if it, err := decodeQueueTuple(w.Prompt); err == nil {
			h.Number, h.ClientID, h.OutputsToExecute = it.Number, it.ClientID, it.OutputNodes
		}
		if len(w.Prompt) > 2 {
			h.Prompt = w.Prompt[2]
		}
	}
	if w.Status != nil {
		h.Status = &HistoryStatus{StatusStr: w.Status.StatusStr, Completed: w.Status.Completed}
		for i, rm := range w.Status.Messages {
			var pair []json.RawMessage
			if err := json.Unmarshal(rm, &pair); err != nil || len(pair) < 1 {
				return nil, fmt.Errorf("comfy: history of %s: message %d is not [type, data]", promptID, i)
			}
			var m HistoryMessage
			if err := json.Unmarshal(pair[0], &m.Type); err != nil {
				return nil, fmt.Errorf("comfy: history of %s: message %d type: %w", promptID, i, err)
			}
			if len(pair) > 1 {
				m.Data = pair[1]
			}
			h.Status.Messages = append(h.Status.Messages, m)
		}
	}
	if len(w.Meta) > 0 {
		h.Meta = make(map[string]NodeMeta, len(w.Meta))
		for id, rm := range w.Meta {
			var nm struct {
				NodeID      lenientString `json:"node_id"`
				DisplayNode lenientString `json:"display_node"`
				ParentNode  lenientString `json:"parent_node"`
				RealNodeID  lenientString `json:"real_node_id"`
			}
			if json.Unmarshal(rm, &nm) == nil {
				h.Meta[id] = NodeMeta{string(nm.NodeID), string(nm.DisplayNode), string(nm.ParentNode), string(nm.RealNodeID)}
			}
		}
	}
	return h, nil
}

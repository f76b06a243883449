package server

import (
	"bytes"
	"encoding/json"
	"sort"

	"github.com/comfyfarm/comfyfarm/schema"
)

// comfyPrompt is a decoded POST /comfy/prompt body. ComfyUI's number, front,
// extra_data and partial_execution_targets are accepted and not used: the
// farm orders jobs by its own fair queue.
type comfyPrompt struct {
	Prompt   json.RawMessage `json:"prompt"`
	ClientID string          `json:"client_id"`
	PromptID string          `json:"prompt_id"`

	classes map[string]string // node id -> class_type
	images  map[string]bool   // values of the nodes' "image" inputs
}

// comfyError is ComfyUI's error object; comfyErrorBody its 400 body.
type comfyError struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Details   string         `json:"details"`
	ExtraInfo map[string]any `json:"extra_info"`
}

type comfyNodeError struct {
	Errors           []comfyError `json:"errors"`
	DependentOutputs []string     `json:"dependent_outputs"`
	ClassType        string       `json:"class_type"`
}

type comfyErrorBody struct {
	Error      comfyError                `json:"error"`
	NodeErrors map[string]comfyNodeError `json:"node_errors"`
}

func comfyInvalidPrompt(message, details string) comfyErrorBody {
	return comfyErrorBody{
		Error:      comfyError{Type: "invalid_prompt", Message: message, Details: details, ExtraInfo: map[string]any{}},
		NodeErrors: map[string]comfyNodeError{},
	}
}

// decodeComfyPrompt reads a POST /prompt body. It checks what ComfyUI checks
// before validating inputs — a prompt object, every node an object with a
// class_type — plus the form of client_id and prompt_id; the graph itself is
// the farm's to validate. A refusal comes in ComfyUI's 400 shape.
func decodeComfyPrompt(body []byte) (*comfyPrompt, *comfyErrorBody) {
	// Keys are matched exactly, as Python reads them: encoding/json would
	// also take "Prompt" or "CLASS_TYPE".
	var top map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&top); err != nil {
		b := comfyInvalidPrompt("Invalid JSON body", err.Error())
		return nil, &b
	}
	if dec.More() {
		b := comfyInvalidPrompt("Invalid JSON body", "data after the JSON object")
		return nil, &b
	}
	p := comfyPrompt{Prompt: top["prompt"]}
	if len(p.Prompt) == 0 || string(p.Prompt) == "null" {
		b := comfyInvalidPrompt("No prompt provided", "No prompt provided")
		b.Error.Type = "no_prompt"
		return nil, &b
	}
	for _, f := range []struct {
		name string
		dst  *string
		max  int
	}{{"client_id", &p.ClientID, maxClientIDBytes}, {"prompt_id", &p.PromptID, maxPromptIDBytes}} {
		raw, ok := top[f.name]
		if !ok || string(raw) == "null" {
			continue
		}
		if json.Unmarshal(raw, f.dst) != nil {
			b := comfyInvalidPrompt("Invalid "+f.name, f.name+" must be a string")
			return nil, &b
		}
		if *f.dst == "" {
			continue
		}
		if err := schema.CheckIdent(f.name, *f.dst, f.max); err != nil {
			b := comfyInvalidPrompt("Invalid "+f.name, err.Error())
			return nil, &b
		}
	}
	var nodes map[string]json.RawMessage
	if !jsonObject(p.Prompt) || json.Unmarshal(p.Prompt, &nodes) != nil {
		b := comfyInvalidPrompt("Prompt is not an API-format graph", "prompt must be an object of node id -> {class_type, inputs}")
		return nil, &b
	}
	ids := make([]string, 0, len(nodes))
	for id := range nodes {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	p.classes = make(map[string]string, len(nodes))
	for _, id := range ids {
		var n map[string]json.RawMessage
		var class string
		if !jsonObject(nodes[id]) || json.Unmarshal(nodes[id], &n) != nil ||
			json.Unmarshal(n["class_type"], &class) != nil || class == "" {
			b := comfyInvalidPrompt("Cannot execute because a node is missing the class_type property.", "Node ID '#"+id+"'")
			return nil, &b
		}
		p.classes[id] = class
		var inputs map[string]json.RawMessage
		var image string
		if json.Unmarshal(n["inputs"], &inputs) == nil && json.Unmarshal(inputs["image"], &image) == nil && image != "" {
			if p.images == nil {
				p.images = map[string]bool{}
			}
			p.images[image] = true
		}
	}
	return &p, nil
}

// classOf is a node's class_type.
func (p *comfyPrompt) classOf(node string) string { return p.classes[node] }

// nodeOf is the first node id (in order) of a class.
func (p *comfyPrompt) nodeOf(class string) string {
	ids := make([]string, 0, len(p.classes))
	for id, c := range p.classes {
		if c == class {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	if len(ids) == 0 {
		return ""
	}
	return ids[0]
}

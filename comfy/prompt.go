package comfy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// SubmitRequest is the body of POST /prompt.
type SubmitRequest struct {
	// Prompt is the API-format graph ({"<id>": {"class_type": ..., "inputs": {...}}}).
	Prompt json.RawMessage
	// PromptID is the id to run the prompt under. Servers >= 0.3.45 honour it (any string,
	// not checked for uniqueness: reusing a finished id replaces its history); older servers
	// ignore it, so SubmitResponse.PromptID is always the truth.
	PromptID string
	// Front queues the prompt before every positive number (ignored when Number is set).
	Front bool
	// Number is an explicit priority: lower runs sooner. It does not advance the server counter.
	Number *float64
	// ExtraData is sent as extra_data (extra_pnginfo, preview_method, ...). client_id is set
	// from the client.
	ExtraData map[string]any
}

// SubmitResponse is ComfyUI's answer to an accepted prompt.
type SubmitResponse struct {
	PromptID string
	Number   float64
	// NodeErrors lists outputs dropped because a node they depend on failed validation.
	// Submit returns a *ValidationError when it is not empty.
	NodeErrors map[string]NodeError
}

type submitBody struct {
	Prompt    json.RawMessage `json:"prompt"`
	ClientID  string          `json:"client_id,omitempty"`
	PromptID  string          `json:"prompt_id,omitempty"`
	Front     bool            `json:"front,omitempty"`
	Number    *float64        `json:"number,omitempty"`
	ExtraData map[string]any  `json:"extra_data,omitempty"`
}

type submitReply struct {
	PromptID   string          `json:"prompt_id"`
	Number     json.Number     `json:"number"`
	NodeErrors json.RawMessage `json:"node_errors"`
}

// Submit posts a prompt. A refused prompt (400 with an error body) and a prompt accepted with
// node_errors (200; its broken outputs will not run) both return a *ValidationError; in the
// second case the response is returned too. A 413 matches ErrTooLarge.
func (c *Client) Submit(ctx context.Context, sr SubmitRequest) (*SubmitResponse, error) {
	if len(bytes.TrimSpace(sr.Prompt)) == 0 {
		return nil, errors.New("comfy: submit: empty prompt")
	}
	body, err := json.Marshal(submitBody{
		Prompt: sr.Prompt, ClientID: c.clientID, PromptID: sr.PromptID,
		Front: sr.Front && sr.Number == nil, Number: sr.Number, ExtraData: sr.ExtraData,
	})
	if err != nil {
		return nil, fmt.Errorf("comfy: submit: encode: %w", err)
	}
	var reply submitReply
	err = c.doJSON(ctx, request{
		method: http.MethodPost, path: "/prompt", body: bytes.NewReader(body),
		contentType: "application/json", timeout: c.longTimeout,
	}, &reply)
	if err != nil {
		if ae, ok := errorsAsAPI(err); ok && ae.Status == 400 && looksJSON(ae.Body) {
			if has, _ := parseErrorBody(ae, ae.Body); has {
				return nil, &ValidationError{APIError: ae}
			}
		}
		return nil, err
	}
	return decodeSubmitReply(reply)
}

// DecodeSubmitResponse decodes a 200 body of POST /prompt the way Submit does.
func DecodeSubmitResponse(body []byte) (*SubmitResponse, error) {
	var reply submitReply
	if err := json.Unmarshal(body, &reply); err != nil {
		return nil, fmt.Errorf("comfy: decode submit response: %w", err)
	}
	return decodeSubmitReply(reply)
}

func decodeSubmitReply(reply submitReply) (*SubmitResponse, error) {
	if reply.PromptID == "" {
		return nil, errors.New("comfy: submit: response has no prompt_id")
	}
	resp := &SubmitResponse{PromptID: reply.PromptID}
	if reply.Number != "" {
		n, err := reply.Number.Float64()
		if err != nil {
			return nil, fmt.Errorf("comfy: submit: number %q: %w", reply.Number, err)
		}
		resp.Number = n
	}
	ne, err := decodeNodeErrors(reply.NodeErrors)
	if err != nil {
		return nil, err
	}
	resp.NodeErrors = ne
	if len(ne) > 0 {
		return resp, &ValidationError{
			APIError: &APIError{Method: http.MethodPost, Path: "/prompt", Status: 200,
				Message: "outputs with invalid inputs were dropped", NodeErrors: ne},
			Response: resp,
		}
	}
	return resp, nil
}

// DecodeValidationError decodes a 400 body of POST /prompt (every recorded shape) into a
// *ValidationError. It fails when the body is not a JSON error body.
func DecodeValidationError(body []byte) (*ValidationError, error) {
	ae := &APIError{Method: http.MethodPost, Path: "/prompt", Status: 400, Body: body}
	has, err := parseErrorBody(ae, body)
	if err != nil {
		return nil, err
	}
	if !has {
		return nil, errors.New("comfy: body has no error")
	}
	return &ValidationError{APIError: ae}, nil
}

// Interrupt stops the running prompt. With a promptID the body is {"prompt_id": id}: servers
// >= 0.3.57 then interrupt only if that prompt is the one running (otherwise a no-op), but
// older servers ignore the body and interrupt WHATEVER runs, which may already be the next
// prompt; check Queue first (Features.TargetedInterrupt tells which kind of server this is).
// An empty promptID is a global interrupt. Pending prompts are never touched: use
// DeletePending.
func (c *Client) Interrupt(ctx context.Context, promptID string) error {
	if promptID == "" {
		return c.postJSON(ctx, "/interrupt", nil)
	}
	return c.postJSON(ctx, "/interrupt", map[string]string{"prompt_id": promptID})
}

// DeletePending removes prompts from the pending queue. Unknown ids are ignored by the server;
// the running prompt is never touched.
func (c *Client) DeletePending(ctx context.Context, ids ...string) error {
	if len(ids) == 0 {
		return nil
	}
	return c.postJSON(ctx, "/queue", map[string][]string{"delete": ids})
}

// ClearPending removes every pending prompt (of every client of this server).
func (c *Client) ClearPending(ctx context.Context) error {
	return c.postJSON(ctx, "/queue", map[string]bool{"clear": true})
}

// DeleteHistory removes history entries.
func (c *Client) DeleteHistory(ctx context.Context, ids ...string) error {
	if len(ids) == 0 {
		return nil
	}
	return c.postJSON(ctx, "/history", map[string][]string{"delete": ids})
}

// Free asks the server to unload models and/or free memory (free_memory also clears the node
// output cache). It is applied when the server is idle or after the running prompt.
func (c *Client) Free(ctx context.Context, unloadModels, freeMemory bool) error {
	return c.postJSON(ctx, "/free", map[string]bool{"unload_models": unloadModels, "free_memory": freeMemory})
}

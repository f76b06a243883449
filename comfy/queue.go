package comfy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
)

// Queue is GET /queue: the running prompt (0 or 1 item) and the pending ones, in the server's
// raw heap order (not sorted; use Position).
type Queue struct {
	Running []QueueItem
	Pending []QueueItem
}

// QueueItem is one queued prompt. The wire form is [number, prompt_id, prompt, extra_data,
// outputs_to_execute]; the graph itself is not kept.
type QueueItem struct {
	// Number is the priority (lower runs sooner); an int on the wire unless client-supplied.
	Number   float64
	PromptID string
	// ClientID is extra_data.client_id (empty when the prompt was posted without one).
	ClientID string
	// CreateTime is extra_data.create_time in ms (servers >= 0.3.69), or 0.
	CreateTime int64
	// OutputNodes are the output node ids the server will execute.
	OutputNodes []string
}

// UnmarshalJSON decodes the 5-element wire array; extra elements are ignored.
func (it *QueueItem) UnmarshalJSON(b []byte) error {
	var arr []json.RawMessage
	if err := json.Unmarshal(b, &arr); err != nil {
		return fmt.Errorf("queue item: %w", err)
	}
	v, err := decodeQueueTuple(arr)
	if err != nil {
		return err
	}
	*it = v
	return nil
}

// decodeQueueTuple decodes [number, prompt_id, prompt, extra_data, outputs_to_execute].
func decodeQueueTuple(arr []json.RawMessage) (QueueItem, error) {
	var it QueueItem
	if len(arr) < 2 {
		return it, fmt.Errorf("queue item: %d elements, want at least 2", len(arr))
	}
	var num json.Number
	if err := json.Unmarshal(arr[0], &num); err != nil {
		return it, fmt.Errorf("queue item number: %w", err)
	}
	n, err := num.Float64()
	if err != nil {
		return it, fmt.Errorf("queue item number: %w", err)
	}
	it.Number = n
	if err := json.Unmarshal(arr[1], &it.PromptID); err != nil {
		return it, fmt.Errorf("queue item prompt_id: %w", err)
	}
	if len(arr) > 3 {
		var extra struct {
			ClientID   *string     `json:"client_id"`
			CreateTime json.Number `json:"create_time"`
		}
		if json.Unmarshal(arr[3], &extra) == nil {
			if extra.ClientID != nil {
				it.ClientID = *extra.ClientID
			}
			if f, err := extra.CreateTime.Float64(); err == nil {
				it.CreateTime = int64(f)
			}
		}
	}
	if len(arr) > 4 {
		_ = json.Unmarshal(arr[4], &it.OutputNodes) // informative only
	}
	return it, nil
}

// UnmarshalJSON decodes {"queue_running": [...], "queue_pending": [...]}.
func (q *Queue) UnmarshalJSON(b []byte) error {
	var w struct {
		Running []QueueItem `json:"queue_running"`
		Pending []QueueItem `json:"queue_pending"`
	}
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	q.Running, q.Pending = w.Running, w.Pending
	return nil
}

// QueueCounts fetches GET /queue and returns only how many prompts run and wait. It reads
// the items as raw JSON (each must be an array) and decodes none of them: the graphs they
// carry are scanned once, not decoded into maps. For a poller (the node prober).
func (c *Client) QueueCounts(ctx context.Context) (running, pending int, err error) {
	var raw json.RawMessage
	if err := c.doJSON(ctx, request{method: http.MethodGet, path: "/queue"}, &raw); err != nil {
		return 0, 0, err
	}
	running, pending, err = DecodeQueueCounts(raw)
	if err != nil {
		return 0, 0, fmt.Errorf("comfy: GET /queue: decode: %w", err)
	}
	return running, pending, nil
}

// DecodeQueueCounts reads the counts of a GET /queue body as QueueCounts does: the body
// must be valid JSON, an object whose queue_running and queue_pending (when present) are
// arrays of arrays. The body is validated in one pass and its top level walked in another:
// the graphs inside the items are skipped, never decoded (a prober reads this every few
// seconds from every node).
func DecodeQueueCounts(body []byte) (running, pending int, err error) {
	if !json.Valid(body) {
		return 0, 0, errors.New("not valid JSON")
	}
	i := skipJSONSpace(body, 0)
	if body[i] != '{' {
		return 0, 0, errors.New("queue answer is not an object")
	}
	i = skipJSONSpace(body, i+1)
	// As the decoder does: keys match case-insensitively, the last of
	// repeated keys wins.
	var runRaw, pendRaw []byte
	for body[i] != '}' {
		keyEnd := jsonValueEnd(body, i)
		key := body[i+1 : keyEnd-1]
		if bytes.IndexByte(key, '\\') >= 0 { // an escaped key: read it as the decoder would
			var k string
			if err := json.Unmarshal(body[i:keyEnd], &k); err != nil {
				return 0, 0, err
			}
			key = []byte(k)
		}
		i = skipJSONSpace(body, keyEnd) // at ':'
		i = skipJSONSpace(body, i+1)    // at the value
		end := jsonValueEnd(body, i)
		switch {
		case bytes.EqualFold(key, []byte("queue_running")):
			runRaw = body[i:end]
		case bytes.EqualFold(key, []byte("queue_pending")):
			pendRaw = body[i:end]
		}
		i = skipJSONSpace(body, end)
		if body[i] == ',' {
			i = skipJSONSpace(body, i+1)
		}
	}
	if running, err = countItems(runRaw); err != nil {
		return 0, 0, err
	}
	if pending, err = countItems(pendRaw); err != nil {
		return 0, 0, err
	}
	return running, pending, nil
}

// skipJSONSpace returns the index of the first byte at or after i that is
// not JSON white space.
func skipJSONSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// jsonValueEnd returns the index just after the value starting at i of
// valid JSON b.
func jsonValueEnd(b []byte, i int) int {
	switch b[i] {
	case '"':
		for j := i + 1; j < len(b); j++ {
			switch b[j] {
			case '\\':
				j++
			case '"':
				return j + 1
			}
		}
		return len(b)
	case '[', '{':
		depth, inString := 0, false
		for j := i; j < len(b); j++ {
			c := b[j]
			switch {
			case inString:
				if c == '\\' {
					j++
				} else if c == '"' {
					inString = false
				}
			case c == '"':
				inString = true
			case c == '[' || c == '{':
				depth++
			case c == ']' || c == '}':
				if depth--; depth == 0 {
					return j + 1
				}
			}
		}
		return len(b)
	}
	j := i
	for j < len(b) && b[j] != ',' && b[j] != '}' && b[j] != ']' && b[j] != ' ' && b[j] != '\t' && b[j] != '\n' && b[j] != '\r' {
		j++
	}
	return j
}

// countItems counts the elements of a valid JSON array whose elements are arrays; a
// missing list (nil or null) counts 0.
func countItems(list json.RawMessage) (int, error) {
	list = bytes.TrimSpace(list)
	if len(list) == 0 || string(list) == "null" {
		return 0, nil
	}
	if list[0] != '[' {
		return 0, errors.New("queue list is not an array")
	}
	n, depth, inString, escaped := 0, 0, false, false
	for _, c := range list {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			if depth == 1 {
				return 0, errors.New("queue item is not an array")
			}
			inString = true
		case c == '[' || c == '{':
			if depth == 1 {
				if c != '[' {
					return 0, errors.New("queue item is not an array")
				}
				n++
			}
			depth++
		case c == ']' || c == '}':
			depth--
		case depth == 1 && c != ',' && c != ' ' && c != '\t' && c != '\n' && c != '\r':
			return 0, errors.New("queue item is not an array")
		}
	}
	return n, nil
}

// Queue fetches GET /queue. Items carry full graphs on the wire: poll sparingly.
func (c *Client) Queue(ctx context.Context) (*Queue, error) {
	var q Queue
	if err := c.doJSON(ctx, request{method: http.MethodGet, path: "/queue"}, &q); err != nil {
		return nil, err
	}
	return &q, nil
}

// Position reports where promptID is: running (ahead 0), or pending with ahead = the number of
// prompts that run before it. The server's pending list is a raw heap; the run order is
// (number, prompt_id) ascending, and a running prompt counts as one more ahead.
func (q *Queue) Position(promptID string) (ahead int, running bool, found bool) {
	for _, it := range q.Running {
		if it.PromptID == promptID {
			return 0, true, true
		}
	}
	idx := -1
	for i, it := range q.Pending {
		if it.PromptID == promptID {
			idx = i
			break
		}
	}
	if idx < 0 {
		return 0, false, false
	}
	me := q.Pending[idx]
	for i, it := range q.Pending {
		if i != idx && itemBefore(it, me) {
			ahead++
		}
	}
	return ahead + len(q.Running), false, true
}

// Ordered returns the pending items in run order.
func (q *Queue) Ordered() []QueueItem {
	out := append([]QueueItem(nil), q.Pending...)
	sort.SliceStable(out, func(i, j int) bool { return itemBefore(out[i], out[j]) })
	return out
}

// Has reports whether promptID is running or pending.
func (q *Queue) Has(promptID string) bool {
	_, _, found := q.Position(promptID)
	return found
}

func itemBefore(a, b QueueItem) bool {
	if a.Number != b.Number {
		return a.Number < b.Number
	}
	return a.PromptID < b.PromptID
}

package comfy

import (
	"encoding/json"
	"testing"
)

// DecodeQueueCounts counts what a full decode counts, skipping brackets and
// quotes inside strings, and refuses what a full decode refuses.
func TestDecodeQueueCounts(t *testing.T) {
	for _, c := range []struct {
		in      string
		r, p    int
		invalid bool
	}{
		{`{"queue_running": [], "queue_pending": []}`, 0, 0, false},
		{`{"queue_running": [[1, "a", {"x": "]["}, {}, ["9"]]], "queue_pending": [[2,"b"],[3,"c\"]\\"]]}`, 1, 2, false},
		{`{"queue_running": null}`, 0, 0, false},
		{`{}`, 0, 0, false},
		{`{"queue_running": [1], "queue_pending": []}`, 0, 0, true},
		{`{"queue_running": [{}], "queue_pending": []}`, 0, 0, true},
		{`{"queue_running": ["x"], "queue_pending": []}`, 0, 0, true},
		{`{"queue_running": {}, "queue_pending": []}`, 0, 0, true},
		{`{"queue_running": [[1]`, 0, 0, true},
		{`[]`, 0, 0, true},
	} {
		r, p, err := DecodeQueueCounts([]byte(c.in))
		if (err != nil) != c.invalid || r != c.r || p != c.p {
			t.Errorf("%s: running %d pending %d, %v", c.in, r, p, err)
		}
		// A full decode agrees on what is readable and on the counts.
		var q Queue
		ferr := json.Unmarshal([]byte(c.in), &q)
		if (ferr != nil) != c.invalid || (ferr == nil && (len(q.Running) != r || len(q.Pending) != p)) {
			t.Errorf("%s: full decode %d %d, %v", c.in, len(q.Running), len(q.Pending), ferr)
		}
	}
}

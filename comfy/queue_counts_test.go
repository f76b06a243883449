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

// decodeQueueCountsRef is the reference: a reflective decode of the two
// lists, counted by countItems.
func decodeQueueCountsRef(body []byte) (running, pending int, err error) {
	var top struct {
		Running json.RawMessage `json:"queue_running"`
		Pending json.RawMessage `json:"queue_pending"`
	}
	if err := json.Unmarshal(body, &top); err != nil {
		return 0, 0, err
	}
	if running, err = countItems(top.Running); err != nil {
		return 0, 0, err
	}
	if pending, err = countItems(top.Pending); err != nil {
		return 0, 0, err
	}
	return running, pending, nil
}

// The one-pass walk answers as the reflective decode does, for any body a
// node may send.
func FuzzDecodeQueueCounts(f *testing.F) {
	for _, s := range []string{
		`{"queue_running": [], "queue_pending": []}`,
		`{"queue_running": [[1, "a", {"x": "]["}, {}, ["9"]]], "queue_pending": [[2,"b"],[3,"c\"]\\"]]}`,
		`{"queue_running": null}`, `{}`, `[]`, `{"queue_running": [1]}`, `{"queue_running": {}}`,
		`{"queue\u005frunning": [[1]], "x": {"queue_pending": [[1]]}, "queue_pending": [[2], [3]]}`,
		` { "queue_pending" : [ [ ] , [ ] ] , "queue_running" : [ ] } `, `{"queue_running": [[1]], "queue_running": []}`,
		`{"queue_running": [1], "Queue_Running": [[1], [2]]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r, p, err := DecodeQueueCounts(body)
		rr, rp, rerr := decodeQueueCountsRef(body)
		if (err != nil) != (rerr != nil) || r != rr || p != rp {
			t.Fatalf("%q: walk %d %d %v; decode %d %d %v", body, r, p, err, rr, rp, rerr)
		}
	})
}

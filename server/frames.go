package server

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"

	"github.com/comfyfarm/comfyfarm/schema"
)

// frameCache encodes an event once for all of its subscribers. A progress
// event of a job followed by a thousand streams was marshalled a thousand
// times; now the first stream to send it encodes it (as an SSE frame and as
// the JSON of a WebSocket message) and the others reuse the bytes.
//
// Only events that read the same for every subscriber are shared: a
// snapshot (ev.Job) and an event with outputs get their URLs built per
// stream (signed URLs carry their own expiry), so they are encoded per
// stream as before. The cache holds the last frameCacheSize events of all
// jobs, oldest out first; a stream that falls further behind encodes its own.
type frameCache struct {
	mu    sync.Mutex
	byKey map[frameKey]*frame
	order []frameKey // ring of keys in byKey, oldest at next
	next  int
}

const frameCacheSize = 4096

type frameKey struct {
	job string
	seq int64
}

// frame is one event's encodings, made once.
type frame struct {
	once sync.Once
	data []byte // the event's JSON
	sse  []byte // id:, event:, data: lines and the blank line
	err  error
}

func newFrameCache() *frameCache {
	return &frameCache{byKey: make(map[frameKey]*frame, frameCacheSize), order: make([]frameKey, 0, frameCacheSize)}
}

// shared reports whether ev encodes the same for every subscriber and is
// named by its job and number alone. Previews are not: with several
// replicas the bus gives a preview the number of the event before it (a
// preview is relayed, never kept), so previews and that event would share
// a key.
func shared(ev schema.Event) bool {
	return ev.Job == nil && len(ev.Outputs) == 0 && ev.Type != schema.EventKeepAlive && ev.Type != schema.EventPreview
}

// get returns ev's frame, encoding it on first use.
func (fc *frameCache) get(ev schema.Event) *frame {
	k := frameKey{ev.JobID, ev.Seq}
	fc.mu.Lock()
	f := fc.byKey[k]
	if f == nil {
		f = &frame{}
		if len(fc.order) < frameCacheSize {
			fc.order = append(fc.order, k)
		} else {
			delete(fc.byKey, fc.order[fc.next])
			fc.order[fc.next] = k
			fc.next = (fc.next + 1) % frameCacheSize
		}
		fc.byKey[k] = f
	}
	fc.mu.Unlock()
	f.once.Do(func() { f.data, f.sse, f.err = encodeEvent(ev) })
	return f
}

// encodeEvent is an event's JSON and its SSE frame.
func encodeEvent(ev schema.Event) (data, sse []byte, err error) {
	data, err = json.Marshal(ev)
	if err != nil {
		return nil, nil, err
	}
	sse = make([]byte, 0, len(data)+len(ev.Type)+40)
	sse = append(sse, "id: "...)
	sse = strconv.AppendInt(sse, ev.Seq, 10)
	sse = append(sse, "\nevent: "...)
	sse = append(sse, ev.Type...)
	sse = append(sse, "\ndata: "...)
	off := len(sse)
	sse = append(sse, data...)
	sse = append(sse, "\n\n"...)
	// The JSON handed out is the frame's own copy: a cached event keeps one.
	return sse[off : off+len(data) : off+len(data)], sse, nil
}

// encodedJSON is encoded's JSON alone (a WebSocket message): an event not
// shared is not also framed for SSE.
func (s *Server) encodedJSON(ctx context.Context, ev schema.Event) ([]byte, error) {
	if shared(ev) {
		f := s.frames.get(ev)
		return f.data, f.err
	}
	return json.Marshal(s.prepare(ctx, ev))
}

// encoded returns ev's JSON and SSE frame for one stream: shared when the
// event reads the same for all, else with the stream's output URLs.
func (s *Server) encoded(ctx context.Context, ev schema.Event) (data, sse []byte, err error) {
	if shared(ev) {
		f := s.frames.get(ev)
		return f.data, f.sse, f.err
	}
	return encodeEvent(s.prepare(ctx, ev))
}

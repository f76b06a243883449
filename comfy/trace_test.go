package comfy

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// Recorded traffic of real ComfyUI servers (see the README in each folder).
var traceDirs = []string{"testdata/comfy-traces", "testdata/comfy-traces-current"}

type trace struct {
	Dir      string
	File     string
	Scenario string       `json:"scenario"`
	ClientID string       `json:"client_id"`
	Events   []traceEvent `json:"events"`
}

type traceEvent struct {
	TMs            float64         `json:"t_ms"`
	Kind           string          `json:"kind"`
	Method         string          `json:"method"`
	Path           string          `json:"path"`
	Status         int             `json:"status"`
	ContentType    string          `json:"content_type"`
	Body           json.RawMessage `json:"body"`
	BodyText       *string         `json:"body_text"`
	BodyExcerpt    json.RawMessage `json:"body_excerpt"`
	Length         int             `json:"length"`
	Data           json.RawMessage `json:"data"`
	Raw            string          `json:"raw"`
	First8Hex      string          `json:"first8_hex"`
	Metadata       json.RawMessage `json:"metadata"`
	ImageFirst8Hex string          `json:"image_first8_hex"`
	Text           string          `json:"text"`
	Note           string          `json:"note"`
}

var (
	tracesOnce   sync.Once
	tracesCached []*trace
	tracesErr    error
)

// loadTraces reads every scenario file of both trace folders (once; callers must not modify
// the result).
func loadTraces(t testing.TB) []*trace {
	t.Helper()
	tracesOnce.Do(func() { tracesCached, tracesErr = readTraces() })
	if tracesErr != nil {
		t.Fatal(tracesErr)
	}
	if len(tracesCached) < 30 {
		t.Fatalf("found only %d trace files", len(tracesCached))
	}
	return tracesCached
}

func readTraces() ([]*trace, error) {
	var out []*trace
	for _, dir := range traceDirs {
		files, err := filepath.Glob(filepath.Join(dir, "*.json"))
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return nil, err
			}
			var tr trace
			if err := json.Unmarshal(b, &tr); err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			if tr.Scenario == "" {
				continue // object_info_used_nodes.json, system_stats.json: plain bodies
			}
			tr.Dir, tr.File = dir, filepath.Base(f)
			out = append(out, &tr)
		}
	}
	return out, nil
}

// loadTrace reads one scenario file.
func loadTrace(t testing.TB, dir, name string) *trace {
	t.Helper()
	for _, tr := range loadTraces(t) {
		if tr.Dir == dir && tr.File == name {
			return tr
		}
	}
	t.Fatalf("no trace %s/%s", dir, name)
	return nil
}

// responses returns the http_response events for method and path (path matched with its query).
func (tr *trace) responses(method, path string) []traceEvent {
	var out []traceEvent
	for _, e := range tr.Events {
		if e.Kind == "http_response" && e.Method == method && e.Path == path {
			out = append(out, e)
		}
	}
	return out
}

// requests returns the http_request events for method and path prefix.
func (tr *trace) requests(method, prefix string) []traceEvent {
	var out []traceEvent
	for _, e := range tr.Events {
		if e.Kind == "http_request" && e.Method == method && strings.HasPrefix(e.Path, prefix) {
			out = append(out, e)
		}
	}
	return out
}

// frame rebuilds the bytes of a ws_binary event: the recorded first 8 bytes, the metadata
// JSON as Python's json.dumps writes it (kind 4), the recorded image start, zero padding.
func (e traceEvent) frame(t testing.TB) []byte {
	t.Helper()
	head, err := hex.DecodeString(e.First8Hex)
	if err != nil || len(head) != 8 {
		t.Fatalf("bad first8_hex %q", e.First8Hex)
	}
	out := append([]byte(nil), head...)
	if len(e.Metadata) > 0 {
		meta := pythonJSON(t, e.Metadata)
		out = append(out, meta...)
		img, err := hex.DecodeString(e.ImageFirst8Hex)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, img...)
	}
	if len(out) > e.Length {
		t.Fatalf("reconstructed frame %d bytes > recorded length %d", len(out), e.Length)
	}
	return append(out, make([]byte, e.Length-len(out))...)
}

// pythonJSON re-encodes JSON with Python's default separators (", " and ": "), keeping order.
func pythonJSON(t testing.TB, raw []byte) []byte {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var b bytes.Buffer
	type level struct {
		obj   bool
		count int
	}
	var stack []level
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if d, ok := tok.(json.Delim); ok && (d == '}' || d == ']') {
			stack = stack[:len(stack)-1]
			b.WriteRune(rune(d))
			continue
		}
		if n := len(stack); n > 0 {
			top := &stack[n-1]
			switch {
			case top.obj && top.count%2 == 0 && top.count > 0:
				b.WriteString(", ")
			case top.obj && top.count%2 == 1:
				b.WriteString(": ")
			case !top.obj && top.count > 0:
				b.WriteString(", ")
			}
			top.count++
		}
		switch v := tok.(type) {
		case json.Delim:
			b.WriteRune(rune(v))
			stack = append(stack, level{obj: v == '{'})
		case string:
			s, _ := json.Marshal(v)
			b.Write(s)
		case json.Number:
			b.WriteString(v.String())
		case bool:
			b.WriteString(strconv.FormatBool(v))
		case nil:
			b.WriteString("null")
		}
	}
	return b.Bytes()
}

// norm makes JSON-comparable values out of anything (numbers become float64).
func norm(t testing.TB, v any) any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func jsonEqual(t testing.TB, a, b any) bool {
	return reflect.DeepEqual(norm(t, a), norm(t, b))
}

// replay serves a trace's recorded HTTP responses, in order per method+path (falling back to
// the path without its query; a GET past the last recording repeats it). Unrecorded routes get
// aiohttp's plain 404. Every request is
// kept for inspection.
type replay struct {
	t   testing.TB
	tr  *trace
	mu  sync.Mutex
	pos map[string]int
	// extra overrides routes ("METHOD /path").
	extra map[string]http.HandlerFunc
	reqs  []recordedRequest
	// baseURL is the server's URL.
	baseURL string
}

type recordedRequest struct {
	Method, Path, RawQuery string
	Header                 http.Header
	Body                   []byte
}

func newReplay(t testing.TB, tr *trace) (*replay, *httptest.Server) {
	r := &replay{t: t, tr: tr, pos: map[string]int{}, extra: map[string]http.HandlerFunc{}}
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	r.baseURL = srv.URL
	return r, srv
}

func (r *replay) requests() []recordedRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]recordedRequest(nil), r.reqs...)
}

func (r *replay) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	r.reqs = append(r.reqs, recordedRequest{req.Method, req.URL.Path, req.URL.RawQuery, req.Header.Clone(), body})
	h := r.extra[req.Method+" "+req.URL.Path]
	r.mu.Unlock()
	if h != nil {
		req.Body = io.NopCloser(bytes.NewReader(body))
		h(w, req)
		return
	}
	full := req.URL.Path
	if req.URL.RawQuery != "" {
		full += "?" + req.URL.RawQuery
	}
	ev, ok := r.next(req.Method, full)
	if !ok {
		ev, ok = r.next(req.Method, req.URL.Path)
	}
	if !ok {
		ev, ok = r.nextByPath(req.Method, req.URL.Path)
	}
	if !ok {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		_, _ = io.WriteString(w, "404: Not Found")
		return
	}
	writeRecorded(w, ev)
}

func (r *replay) next(method, path string) (traceEvent, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := method + " " + path
	list := r.tr.responses(method, path)
	i := r.pos[key]
	if i >= len(list) && method == http.MethodGet && len(list) > 0 {
		i = len(list) - 1
	}
	if i >= len(list) {
		return traceEvent{}, false
	}
	r.pos[key] = i + 1
	return list[i], true
}

// nextByPath matches a recorded response whose path, without its query, equals path.
func (r *replay) nextByPath(method, path string) (traceEvent, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := method + " ~" + path
	var list []traceEvent
	for _, e := range r.tr.Events {
		if e.Kind == "http_response" && e.Method == method && strings.SplitN(e.Path, "?", 2)[0] == path {
			list = append(list, e)
		}
	}
	i := r.pos[key]
	if i >= len(list) && method == http.MethodGet && len(list) > 0 {
		i = len(list) - 1
	}
	if i >= len(list) {
		return traceEvent{}, false
	}
	r.pos[key] = i + 1
	return list[i], true
}

func writeRecorded(w http.ResponseWriter, ev traceEvent) {
	if ev.ContentType != "" {
		w.Header().Set("Content-Type", ev.ContentType)
	}
	switch {
	case len(ev.Body) > 0:
		var buf bytes.Buffer
		_ = json.Compact(&buf, ev.Body)
		w.WriteHeader(ev.Status)
		_, _ = w.Write(buf.Bytes())
	case len(ev.BodyExcerpt) > 0:
		var buf bytes.Buffer
		_ = json.Compact(&buf, ev.BodyExcerpt)
		w.WriteHeader(ev.Status)
		_, _ = w.Write(buf.Bytes())
	case ev.BodyText != nil:
		w.WriteHeader(ev.Status)
		_, _ = io.WriteString(w, *ev.BodyText)
	default:
		w.Header().Set("Content-Length", strconv.Itoa(ev.Length))
		w.WriteHeader(ev.Status)
		_, _ = w.Write(fileBytes(ev.Length))
	}
}

// fileBytes is deterministic stand-in content for a /view body.
func fileBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	return b
}

func mustJSONMap(t testing.TB, raw []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("decode %s: %v", truncate(string(raw), 80), err)
	}
	return m
}

func newTestClient(t testing.TB, url string, opts ...Option) *Client {
	t.Helper()
	c, err := NewClient(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func traceName(tr *trace) string { return fmt.Sprintf("%s/%s", filepath.Base(tr.Dir), tr.File) }

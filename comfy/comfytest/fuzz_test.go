package comfytest

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// promptSeeds are request bodies from the recorded traces plus hand-made
// oddities.
func promptSeeds(f *testing.F) {
	f.Add([]byte(promptBody("seed", "c")))
	f.Add([]byte(`{"prompt": ` + sdPrompt(1, 2, "x") + `, "front": true, "extra_data": {"extra_pnginfo": {"workflow": {"id": "w"}}}}`))
	f.Add([]byte(`{"prompt": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}}`))
	f.Add([]byte(`{"number": "1e400", "prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": 5}}, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", true]}}}}`))
	f.Add([]byte(`{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": {"__value__": "7"}, "height": null, "batch_size": [], "color": -1}}, "2": {"class_type": "SaveImage", "inputs": "images"}}}`))
	f.Add([]byte(`["prompt"]`))
	f.Add([]byte(`{not json`))
	for _, dir := range []string{"comfy-traces", "comfy-traces-current"} {
		data, err := os.ReadFile(filepath.Join("..", "testdata", dir, "c_validation_errors.json"))
		if err != nil {
			f.Fatal(err)
		}
		var tf traceFile
		if err := json.Unmarshal(data, &tf); err != nil {
			f.Fatal(err)
		}
		for _, ev := range tf.Events {
			if ev.Kind == "http_request" && len(ev.Body) > 0 {
				f.Add([]byte(ev.Body))
			}
		}
	}
}

// FuzzPromptBody feeds POST /prompt bodies through decoding, priority,
// validation and enqueueing for every generation. It must never panic, and
// every answer must be well-formed: 200 with prompt_id, 400 with error and
// node_errors, or an exception (the 500 of ComfyUI).
func FuzzPromptBody(f *testing.F) {
	promptSeeds(f)
	var servers []*Server
	for _, g := range []Generation{GenCurrent, GenClassic, GenLegacy} {
		s := NewServer(Options{Generation: g})
		s.Hold()
		f.Cleanup(s.Close)
		servers = append(servers, s)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, s := range servers {
			in := s.current()
			data, err := decodeJSON(body)
			if err != nil {
				continue // 500, like json.loads raising
			}
			in.promptMu.Lock()
			status, resp, exc := in.submit(data)
			in.promptMu.Unlock()
			in.mu.Lock()
			in.pending = nil
			in.mu.Unlock()
			if exc != nil {
				if exc.Type == "" {
					t.Fatalf("exception without a type for %q", body)
				}
				continue
			}
			out := pyJSON(resp)
			back, err := decodeJSON(out)
			if err != nil {
				t.Fatalf("%s answer is not JSON: %s", s.opts.Generation, out)
			}
			switch status {
			case 200:
				if _, ok := field(back, "prompt_id").(string); !ok {
					t.Fatalf("200 without prompt_id: %s", out)
				}
			case 400:
				o, ok := back.(*obj)
				if !ok || !o.has("error") || !o.has("node_errors") {
					t.Fatalf("400 body %s", out)
				}
			default:
				t.Fatalf("status %d", status)
			}
		}
	})
}

// FuzzJSONRoundTrip checks that what the fake writes, it reads back the same,
// and that its output is JSON as the standard library understands it.
func FuzzJSONRoundTrip(f *testing.F) {
	f.Add([]byte(`{"a": [1, 2.5, "x\u00e9\ud83d\ude00", null, true], "b": {"c": 1e-7, "d": 123456789012345678901234567890}}`))
	f.Add([]byte(`{"k": 1, "k": 2, "": -0.0}`))
	f.Add([]byte(`"\u0000\u007f"`))
	f.Fuzz(func(t *testing.T, data []byte) {
		v, err := decodeJSON(data)
		if err != nil {
			return
		}
		out := pyJSON(v)
		if hasNonFinite(v) {
			return // Infinity/NaN are Python extensions to JSON
		}
		if !json.Valid(out) {
			t.Fatalf("invalid JSON written: %s", out)
		}
		back, err := decodeJSON(out)
		if err != nil {
			t.Fatalf("cannot read back %s: %v", out, err)
		}
		if !pyEqual(v, back) || !bytes.Equal(pyJSON(back), out) {
			t.Fatalf("round trip changed %s into %s", out, pyJSON(back))
		}
	})
}

func hasNonFinite(v any) bool {
	switch t := v.(type) {
	case float64:
		return math.IsInf(t, 0) || math.IsNaN(t)
	case []any:
		for _, e := range t {
			if hasNonFinite(e) {
				return true
			}
		}
	case *obj:
		for _, k := range t.keys {
			if hasNonFinite(t.vals[k]) {
				return true
			}
		}
	}
	return false
}

// FuzzFilePaths sends untrusted names to /view and /upload/image and checks
// that no file lands, or is read, outside the three folders.
func FuzzFilePaths(f *testing.F) {
	f.Add("cat.png", "", "input")
	f.Add("../../etc/passwd", "a/../..", "output")
	f.Add("x [temp]", "/abs", "temp")
	f.Add("a/b.png", "sub/dir", "input")
	f.Add("..", ".", "models")
	s := NewServer(Options{})
	f.Cleanup(s.Close)
	in := s.current()
	_ = s.WriteInput("cat.png", solidPNG(2, 2, [3]uint8{}, nil))
	f.Fuzz(func(t *testing.T, filename, subfolder, typ string) {
		q := url.Values{"filename": {filename}, "subfolder": {subfolder}, "type": {typ}}
		rec := httptest.NewRecorder()
		in.ServeHTTP(rec, httptest.NewRequest("GET", "/view?"+q.Encode(), nil))
		switch rec.Code {
		case 200, 400, 403, 404, 500:
		default:
			t.Fatalf("/view answered %d", rec.Code)
		}
		fields := map[string]formPart{
			"image":     {isFile: true, filename: filename, data: []byte("x")},
			"subfolder": {data: []byte(subfolder)},
			"type":      {data: []byte(typ)},
		}
		rec = httptest.NewRecorder()
		in.upload(rec, fields, nil)
		if rec.Code != http.StatusOK {
			return
		}
		s.files.mu.Lock()
		defer s.files.mu.Unlock()
		for kind, files := range s.files.files {
			for rel := range files {
				if strings.HasPrefix(rel, "/") || rel == ".." || strings.HasPrefix(rel, "../") || strings.Contains(rel, "/../") {
					t.Fatalf("stored %s/%s", kind, rel)
				}
			}
		}
	})
}

package comfy

import (
	"encoding/json"
	"testing"
)

func FuzzDecodeText(f *testing.F) {
	for _, tr := range loadTraces(f) {
		for _, e := range tr.Events {
			if e.Kind == "ws_text" || e.Kind == "ws_send" {
				f.Add([]byte(e.Raw))
			}
		}
	}
	for _, s := range []string{`{}`, `{"type": null}`, `{"type": "executing", "data": {"node": 5}}`,
		`{"type": "progress", "data": {"value": "3", "max": null}}`, `{"type": "status", "data": null}`,
		`{"type": "executed", "data": {"output": null}}`, `{"type": "x", "data": [1]}`, `[]`, `null`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := DecodeText(b)
		if err != nil {
			if ev != nil {
				t.Fatal("event with error")
			}
			return
		}
		var env struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(b, &env) != nil || ev.EventType() != env.Type {
			t.Fatalf("EventType %q for %q", ev.EventType(), b)
		}
		_ = ev.EventPromptID()
		_ = IsTerminal(ev)
		switch x := ev.(type) {
		case *Executed:
			_ = x.Files()
		case *ExecutionError:
			_ = x.Error()
			_ = x.Blocked()
		}
	})
}

func FuzzDecodeBinary(f *testing.F) {
	for _, tr := range loadTraces(f) {
		for _, e := range tr.Events {
			if e.Kind == "ws_binary" {
				f.Add(e.frame(f))
			}
		}
	}
	f.Add(EncodeText("12", "step 3/20"))
	f.Add(EncodePreview(PreviewFormatJPEG, []byte{0xff, 0xd8}))
	f.Add(EncodePreviewWithMetadata([]byte(`{"node_id": 3}`), nil))
	f.Add([]byte{0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, 'a'})
	f.Add([]byte{0, 0, 0, 4, 0, 0, 0, 2, '{', '}'})
	f.Add([]byte{0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := DecodeBinary(b)
		if err != nil {
			return
		}
		switch x := ev.(type) {
		case *Preview:
			if len(x.Image) > len(b) {
				t.Fatal("image longer than frame")
			}
			_ = x.EventPromptID()
		case *Text:
			if len(x.NodeID)+len(x.Text)+8 != len(b) {
				t.Fatalf("text frame of %d bytes split into %d+%d", len(b), len(x.NodeID), len(x.Text))
			}
		case *UnknownBinary:
			if len(x.Data) != len(b)-4 {
				t.Fatal("unknown frame data length")
			}
		default:
			t.Fatalf("unexpected %T", ev)
		}
	})
}

func FuzzParseGraph(f *testing.F) {
	for _, tr := range loadTraces(f) {
		for _, e := range tr.Events {
			if e.Kind == "http_request" && e.Method == "POST" && e.Path == "/prompt" {
				var body struct {
					Prompt json.RawMessage `json:"prompt"`
				}
				if json.Unmarshal(e.Body, &body) == nil && len(body.Prompt) > 0 {
					f.Add([]byte(body.Prompt))
				}
			}
		}
	}
	f.Add([]byte(sdxlWorkflow))
	f.Add([]byte(`{"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}`))
	f.Add([]byte(`{"nodes": [], "links": []}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := ParseGraph(b, GraphLimits{MaxNodes: 200, MaxBytes: 1 << 16})
		if err != nil {
			if _, ok := err.(*GraphError); !ok {
				t.Fatalf("error %T, want *GraphError", err)
			}
			return
		}
		_ = g.Models()
		_ = g.OutputNodes(nil)
		refs := g.LoadImageRefs()
		rename := map[string]string{}
		for _, r := range refs {
			rename[r] = "up/" + r
		}
		if n := g.RewriteImages(rename); n < len(refs) {
			t.Fatalf("rewrote %d of %d refs", n, len(refs))
		}
		g.SetFilenamePrefix("job")
		out, err := g.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseGraph(out, GraphLimits{MaxNodes: 200, MaxBytes: 1 << 20})
		if err != nil {
			t.Fatalf("re-parse of marshalled graph: %v\n%s", err, out)
		}
		if again.Len() != g.Len() || !equalStrings(again.ClassTypes(), g.ClassTypes()) {
			t.Fatal("round trip changed the graph")
		}
	})
}

// FuzzDecodeResponse runs every HTTP body decoder on the same input.
func FuzzDecodeResponse(f *testing.F) {
	for _, tr := range loadTraces(f) {
		for _, e := range tr.Events {
			if e.Kind == "http_response" && len(e.Body) > 0 && len(e.Body) < 64<<10 {
				f.Add([]byte(e.Body))
			}
		}
	}
	f.Add([]byte(`{"error": "no prompt", "node_errors": []}`))
	f.Add([]byte(`{"queue_running": [[1.5, "a"]], "queue_pending": [[1, 2]]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := DecodeSubmitResponse(b); r == nil && err == nil {
			t.Fatal("nil response without error")
		}
		if ve, err := DecodeValidationError(b); err == nil {
			_ = ve.Error()
		}
		var q Queue
		if json.Unmarshal(b, &q) == nil {
			for _, it := range q.Pending {
				q.Position(it.PromptID)
			}
			_ = q.Ordered()
		}
		if hs, err := DecodeHistory(b); err == nil {
			for _, h := range hs {
				_ = h.Outcome()
				_ = h.ExecError()
				_ = h.Interruption()
				for _, fr := range h.Files() {
					_ = fr.Validate()
				}
			}
		}
		if info, err := DecodeObjectInfo(b); err == nil {
			for _, ci := range info {
				_ = ci.InputNames()
				for _, name := range ci.InputNames() {
					_ = ci.ComboOptions(name)
				}
			}
		}
		var s SystemStats
		_ = json.Unmarshal(b, &s)
	})
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// FuzzComboInputs feeds node input specs (what a node's /object_info says,
// custom nodes included) to ComboInputs: it never panics, and every input it
// returns is one ComboOptions agrees on.
func FuzzComboInputs(f *testing.F) {
	f.Add([]byte(`{"required":{"ckpt_name":[["a.safetensors","b.safetensors"],{}],"seed":["INT",{"min":0}]}}`))
	f.Add([]byte(`{"required":{"s":["COMBO",{"options":["x","y",3]}]},"optional":{"e":[[]]}}`))
	f.Add([]byte(`{"required":{"x":[]},"optional":[],"hidden":{"h":[["a"]]}}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, input []byte) {
		ci := ClassInfo{Input: input}
		for name, opts := range ci.ComboInputs() {
			if got := ci.ComboOptions(name); len(got) != len(opts) {
				t.Fatalf("input %q: ComboInputs %v, ComboOptions %v", name, opts, got)
			}
		}
	})
}

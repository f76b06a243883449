package comfy

import (
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
)

func TestParseGraphRejects(t *testing.T) {
	cases := []struct {
		name, in     string
		node, field  string
		reasonSubstr string
	}{
		{"array", `[1, 2]`, "", "", "JSON object"},
		{"string", `"x"`, "", "", "JSON object"},
		{"empty input", ``, "", "", "JSON object"},
		{"bad json", `{"1": {`, "", "", "invalid JSON"},
		{"no nodes", `{}`, "", "", "no nodes"},
		{"ui format", `{"last_node_id": 9, "nodes": [{"id": 1, "type": "KSampler"}], "links": [[1, 1, 0, 2, 0, "MODEL"]]}`, "", "", "UI workflow"},
		{"ui format links only", `{"links": [], "3": {"class_type": "X", "inputs": {}}}`, "", "", "UI workflow"},
		{"node not object", `{"1": 5}`, "1", "", "must be an object"},
		{"node array", `{"1": ["class_type"]}`, "1", "", "must be an object"},
		{"missing class_type", `{"1": {"inputs": {"width": 8}}}`, "1", "class_type", "missing"},
		{"empty class_type", `{"1": {"class_type": " ", "inputs": {}}}`, "1", "class_type", "empty"},
		{"class_type number", `{"1": {"class_type": 7, "inputs": {}}}`, "1", "class_type", "string"},
		{"inputs array", `{"1": {"class_type": "X", "inputs": []}}`, "1", "inputs", "object"},
		{"inputs string", `{"1": {"class_type": "X", "inputs": "a"}}`, "1", "inputs", "object"},
		{"inputs null", `{"1": {"class_type": "X", "inputs": null}}`, "1", "inputs", "object"},
		{"dangling", `{"2": {"class_type": "ImageInvert", "inputs": {"image": ["42", 0]}}}`, "2", "inputs.image", `"42"`},
		{"negative index", `{"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "B", "inputs": {"x": ["1", -1]}}}`, "2", "inputs.x", "non-negative"},
		{"fractional index", `{"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0.5]}}}`, "2", "inputs.x", "integer"},
		{"string index", `{"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "B", "inputs": {"x": ["1", "0"]}}}`, "2", "inputs.x", "number"},
		{"self loop", `{"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}`, "1", "", "cycle"},
		{"cycle", `{"1": {"class_type": "A", "inputs": {"x": ["3", 0]}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0]}},
			"3": {"class_type": "C", "inputs": {"x": ["2", 0]}}, "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}}`, "1", "", "cycle"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseGraph([]byte(tc.in), GraphLimits{})
			var ge *GraphError
			if !errors.As(err, &ge) {
				t.Fatalf("error %v, want *GraphError", err)
			}
			if ge.NodeID != tc.node || ge.Field != tc.field || !strings.Contains(ge.Reason, tc.reasonSubstr) {
				t.Fatalf("got node %q field %q reason %q; want %q %q ~%q", ge.NodeID, ge.Field, ge.Reason, tc.node, tc.field, tc.reasonSubstr)
			}
			if tc.node != "" && !strings.Contains(ge.Error(), `"`+tc.node+`"`) {
				t.Errorf("message %q does not name the node", ge.Error())
			}
		})
	}
}

func TestParseGraphLimits(t *testing.T) {
	var b strings.Builder
	b.WriteString("{")
	for i := 0; i < 11; i++ {
		if i > 0 {
			b.WriteString(",")
		}
		b.WriteString(`"` + itoa(i) + `": {"class_type": "A", "inputs": {}}`)
	}
	b.WriteString("}")
	if _, err := ParseGraph([]byte(b.String()), GraphLimits{MaxNodes: 11}); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseGraph([]byte(b.String()), GraphLimits{MaxNodes: 10}); err == nil || !strings.Contains(err.Error(), "11 nodes") {
		t.Fatalf("node limit: %v", err)
	}
	if _, err := ParseGraph([]byte(b.String()), GraphLimits{MaxBytes: 100}); err == nil || !strings.Contains(err.Error(), "bytes") {
		t.Fatalf("byte limit: %v", err)
	}
	// A long chain is checked without recursion.
	b.Reset()
	b.WriteString(`{"0": {"class_type": "A", "inputs": {}}`)
	for i := 1; i < 4000; i++ {
		b.WriteString(`,"` + itoa(i) + `": {"class_type": "A", "inputs": {"x": ["` + itoa(i-1) + `", 0]}}`)
	}
	b.WriteString("}")
	if g, err := ParseGraph([]byte(b.String()), GraphLimits{}); err != nil || g.Len() != 4000 {
		t.Fatalf("chain: %v", err)
	}
}

// Every prompt the traces posted parses, except the two ComfyUI rejected for being
// structurally broken: a node without class_type and a link to a missing node.
func TestParseGraphTracePrompts(t *testing.T) {
	n := 0
	for _, tr := range loadTraces(t) {
		note := ""
		for _, e := range tr.Events {
			if e.Kind == "note" {
				note = e.Text
			}
			if e.Kind != "http_request" || e.Method != "POST" || e.Path != "/prompt" {
				continue
			}
			var body struct {
				Prompt json.RawMessage `json:"prompt"`
			}
			if json.Unmarshal(e.Body, &body) != nil || len(body.Prompt) == 0 {
				continue
			}
			n++
			g, err := ParseGraph(body.Prompt, GraphLimits{})
			wantErr := strings.Contains(note, "node without class_type") || strings.Contains(note, "link to a node that does not exist")
			if (err != nil) != wantErr {
				t.Fatalf("%s (%s): err %v, want error %v", traceName(tr), note, err, wantErr)
			}
			if err != nil {
				continue
			}
			out, err := g.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			if !jsonEqual(t, mustJSONMap(t, out), mustJSONMap(t, body.Prompt)) {
				t.Fatalf("%s: round trip changed the graph:\n%s\n%s", traceName(tr), out, body.Prompt)
			}
		}
	}
	if n < 60 {
		t.Fatalf("only %d prompts", n)
	}
}

const sdxlWorkflow = `{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}, "_meta": {"title": "Load Checkpoint"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a <cat> & a dog", "clip": ["10", 1]}},
 "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
 "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors", "strength_model": 0.8, "strength_clip": 1, "model": ["4", 0], "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": 18446744073709551615, "steps": 20, "cfg": 7.5, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["11", 0]}},
 "11": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
 "12": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl.gguf", "type": "flux"}},
 "13": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}},
 "14": {"class_type": "LoadImage", "inputs": {"image": "input.png", "upload": "image"}},
 "15": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "alpha"}},
 "16": {"class_type": "LoadImage", "inputs": {"image": ["14", 0]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
 "20": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
 "21": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["22", 0], "images": ["8", 0]}},
 "22": {"class_type": "PrimitiveString", "inputs": {"value": "x"}}
}`

func TestGraphQueries(t *testing.T) {
	g, err := ParseGraph([]byte(sdxlWorkflow), GraphLimits{})
	if err != nil {
		t.Fatal(err)
	}
	if g.Len() != 17 || g.ClassType("3") != "KSampler" || g.ClassType("99") != "" {
		t.Fatalf("len %d", g.Len())
	}
	if ids := g.NodeIDs(); ids[0] != "3" || ids[len(ids)-1] != "22" {
		t.Errorf("ids %v", ids)
	}
	wantClasses := []string{"CLIPTextEncode", "CheckpointLoaderSimple", "DualCLIPLoader", "EmptyLatentImage", "KSampler",
		"LoadImage", "LoadImageMask", "LoraLoader", "PreviewImage", "PrimitiveString", "SaveImage", "UpscaleModelLoader", "VAEDecode", "VAELoader"}
	if got := g.ClassTypes(); !jsonEqual(t, got, wantClasses) {
		t.Errorf("classes %v", got)
	}
	wantModels := []string{"4x-UltraSharp.pth", "clip_l.safetensors", "sd_xl_base_1.0.safetensors", "sdxl_vae.safetensors", "style.safetensors", "t5xxl.gguf"}
	if got := g.Models(); !jsonEqual(t, got, wantModels) {
		t.Errorf("models %v", got)
	}
	if got := g.OutputNodes(nil); !jsonEqual(t, got, []string{"9", "20", "21"}) {
		t.Errorf("outputs %v", got)
	}
	if got := g.OutputNodes(func(ct string) bool { return ct == "PreviewImage" }); !jsonEqual(t, got, []string{"20"}) {
		t.Errorf("custom outputs %v", got)
	}
	if got := g.LoadImageRefs(); !jsonEqual(t, got, []string{"input.png", "mask.png"}) {
		t.Errorf("refs %v", got)
	}
	if n := g.RewriteImages(map[string]string{"input.png": "jobs/input (1).png", "other.png": "x"}); n != 1 {
		t.Errorf("rewrote %d", n)
	}
	if n := g.SetFilenamePrefix("job-42/out"); n != 1 { // node 21 takes its prefix from a link
		t.Errorf("prefix set on %d nodes", n)
	}
	out, err := g.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]map[string]json.RawMessage
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	in := func(id, name string) string {
		var inputs map[string]json.RawMessage
		_ = json.Unmarshal(m[id]["inputs"], &inputs)
		return string(inputs[name])
	}
	checks := map[string]string{
		in("14", "image"):           `"jobs/input (1).png"`,
		in("15", "image"):           `"mask.png"`,
		in("9", "filename_prefix"):  `"job-42/out"`,
		in("20", "filename_prefix"): ``,
		in("21", "filename_prefix"): `["22",0]`,
		in("3", "seed"):             `18446744073709551615`,
		in("3", "denoise"):          `1.0`,
		string(m["4"]["_meta"]):     `{"title":"Load Checkpoint"}`,
	}
	for got, want := range checks {
		if got != want {
			t.Errorf("got %s, want %s", got, want)
		}
	}
	if !strings.Contains(in("6", "text"), `a \u003ccat\u003e \u0026 a dog`) && !strings.Contains(in("6", "text"), "a <cat> & a dog") {
		t.Errorf("text %s", in("6", "text"))
	}
	again, err := ParseGraph(out, GraphLimits{})
	if err != nil || again.Len() != g.Len() {
		t.Fatalf("re-parse: %v", err)
	}
}

// The built-in output classes are real classes of v0.8.0, and the trace's object_info marks
// the ones it has as output nodes.
func TestDefaultOutputClasses(t *testing.T) {
	var all []string
	// all_class_names sits next to the body in the recording.
	var file struct {
		Events []struct {
			Path string   `json:"path"`
			All  []string `json:"all_class_names"`
		} `json:"events"`
	}
	readJSONFile(t, curDir+"/info_system_stats_object_info.json", &file)
	for _, e := range file.Events {
		if e.Path == "/object_info" {
			all = e.All
		}
	}
	if len(all) != 562 {
		t.Fatalf("%d class names", len(all))
	}
	known := map[string]bool{}
	for _, n := range all {
		known[n] = true
	}
	for ct := range DefaultOutputClasses {
		if !known[ct] {
			t.Errorf("%s is not a v0.8.0 class", ct)
		}
	}
	var info map[string]ClassInfo
	readJSONFile(t, curDir+"/object_info_used_nodes.json", &info)
	for name, ci := range info {
		if ci.OutputNode != DefaultOutputClasses[name] {
			t.Errorf("%s: output_node %v, default set says %v", name, ci.OutputNode, DefaultOutputClasses[name])
		}
	}
}

func readJSONFile(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

// Literals are the string inputs set in the graph itself: links and
// numbers are left out; LoadImage's image is the input uploads rewrite.
func TestGraphLiterals(t *testing.T) {
	g, err := ParseGraph([]byte(`{
 "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux.safetensors"}},
 "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "x.safetensors", "strength_model": 1}},
 "3": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
 "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "out"}}}`), GraphLimits{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Literal{
		{"1", "CheckpointLoaderSimple", "ckpt_name", "flux.safetensors"},
		{"2", "LoraLoader", "lora_name", "x.safetensors"},
		{"3", "LoadImage", "image", "cat.png"},
		{"4", "SaveImage", "filename_prefix", "out"},
	}
	if got := g.Literals(); !reflect.DeepEqual(got, want) {
		t.Errorf("literals %v, want %v", got, want)
	}
	if !IsLoadImageInput("LoadImage", "image") || IsLoadImageInput("LoadImage", "upload") || IsLoadImageInput("SaveImage", "image") {
		t.Error("IsLoadImageInput")
	}
	ci := ClassInfo{Input: []byte(`{"required":{"ckpt_name":[["a","b"],{}],"steps":["INT",{}]},"optional":{"s":["COMBO",{"options":["x"]}],"none":[[]]}}`)}
	if got := ci.ComboInputs(); !reflect.DeepEqual(got, map[string][]string{"ckpt_name": {"a", "b"}, "s": {"x"}, "none": {}}) {
		t.Errorf("combo inputs %v", got)
	}
}

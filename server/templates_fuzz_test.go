package server

import (
	"encoding/json"
	"testing"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/schema"
)

// FuzzTemplateInputs feeds a template's input declarations and a job's
// inputs through the checks: whatever they accept must expand into a valid
// graph whose set values pass the declarations again.
func FuzzTemplateInputs(f *testing.F) {
	var tb templateBody
	if err := json.Unmarshal([]byte(testTemplate), &tb); err != nil {
		f.Fatal(err)
	}
	decl, _ := json.Marshal(tb.Inputs)
	f.Add(decl, []byte(`{"prompt": "a cat", "seed": 18446744073709551615, "cfg": 4.5, "keep": true, "init_image": "a.png"}`))
	f.Add(decl, []byte(`{"prompt": "x", "seed": -0, "cfg": 1e1, "sampler": "dpmpp_2m"}`))
	f.Add(decl, []byte(`{"prompt": "\u0000", "seed": 1.0, "cfg": "NaN"}`))
	f.Add([]byte(`[{"name": "n", "node": "4", "input": "seed", "type": "float", "min": -1e308, "max": 1e308, "default": 5e-324}]`), []byte(`{"n": 1e309}`))
	f.Add([]byte(`[{"name": "e", "node": "4", "input": "sampler_name", "type": "enum", "choices": ["a", "b"]}]`), []byte(`{"e": "b", "x": 1}`))
	f.Add([]byte(`[{"name": "s", "node": "3", "input": "text", "type": "string", "min": 2, "max": 3}]`), []byte(`{"s": "héé"}`))
	f.Fuzz(func(t *testing.T, declJSON, inputsJSON []byte) {
		b := templateBody{Workflow: tb.Workflow}
		if err := json.Unmarshal(declJSON, &b.Inputs); err != nil {
			return
		}
		wf, err := checkTemplate(&b, 0)
		if err != nil {
			return
		}
		tp := &schema.Template{Name: "f", Version: 1, Workflow: wf, Inputs: b.Inputs}
		given, err := decodeInputs(inputsJSON)
		if err != nil {
			return
		}
		out, err := resolveInputs(tp, given, map[string]bool{"a.png": true})
		if err != nil {
			return
		}
		if _, err := comfy.ParseGraph(out, comfy.GraphLimits{}); err != nil {
			t.Fatalf("expanded workflow is not a graph: %v\n%s", err, out)
		}
		nodes := map[string]templateNode{}
		if err := json.Unmarshal(out, &nodes); err != nil {
			t.Fatal(err)
		}
		for i := range tp.Inputs {
			in := &tp.Inputs[i]
			if _, ok := given[in.Name]; !ok {
				continue
			}
			v := nodes[in.Node].Inputs[in.Input]
			if _, err := inputValue(in, v, map[string]bool{"a.png": true}); err != nil {
				t.Fatalf("input %s set to %s, which its own check refuses: %v", in.Name, v, err)
			}
		}
	})
}

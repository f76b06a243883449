package server

import (
	"bytes"
	"context"
	"encoding/json"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

const testTemplate = `{
 "workflow": {
  "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
  "2": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0}},
  "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "placeholder", "clip": ["9", 1]}},
  "4": {"class_type": "KSampler", "inputs": {"seed": 0, "cfg": 7.0, "sampler_name": "euler", "denoise": 1.0, "model": ["9", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["2", 0]}},
  "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "t", "_keep": false}, "_meta": {"title": "Save"}},
  "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}}
 },
 "inputs": [
  {"name": "prompt", "node": "3", "input": "text", "type": "string", "required": true, "max": 20},
  {"name": "seed", "node": "4", "input": "seed", "type": "int", "default": 7, "min": 0, "max": 18446744073709551615},
  {"name": "cfg", "node": "4", "input": "cfg", "type": "float", "min": 1, "max": 20},
  {"name": "sampler", "node": "4", "input": "sampler_name", "type": "enum", "choices": ["euler", "dpmpp_2m"], "default": "euler"},
  {"name": "keep", "node": "5", "input": "_keep", "type": "bool"},
  {"name": "init_image", "node": "1", "input": "image", "type": "image"}
 ]
}`

// setupTemplates is setup with the control database's template store.
func setupTemplates(t *testing.T, dbcfg dbcontrollers.Config, opts ...option) *bundle {
	t.Helper()
	db, err := dbcontrollers.OpenControl(context.Background(), dbcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	store := dbcontrollers.NewStore(db)
	return setup(t, dbcfg, append([]option{func(_ *Config, d *Deps) { d.Templates = store }}, opts...)...)
}

func putTemplate(t *testing.T, b *bundle, frontend, name, body string) resp {
	t.Helper()
	return b.do(req{method: "PUT", path: "/api/v1/templates/" + name + "?frontend=" + frontend, key: adminKey, body: body})
}

// detail returns error.details[key] of an error body.
func detail(r resp, key string) any {
	var e struct {
		Error struct {
			Details map[string]any `json:"details"`
		} `json:"error"`
	}
	_ = json.Unmarshal(r.body, &e)
	return e.Error.Details[key]
}

func TestTemplateAdminAPI(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		b := setupTemplates(t, cfg)
		r := putTemplate(t, b, "style", "portrait", testTemplate)
		expect(t, r, http.StatusCreated)
		var tp schema.Template
		b.decode(r, &tp)
		if tp.Version != 1 || tp.Name != "portrait" || tp.Frontend != "style" || len(tp.Inputs) != 6 || len(tp.Workflow) == 0 {
			t.Fatalf("first put: %s", r.body)
		}
		r = putTemplate(t, b, "style", "portrait", strings.Replace(testTemplate, `"max": 20}`, `"max": 30}`, 1))
		expect(t, r, http.StatusOK)
		b.decode(r, &tp)
		if tp.Version != 2 {
			t.Fatalf("second put: %s", r.body)
		}
		// Only the admin writes; a frontend key reads its own.
		expect(t, b.do(req{method: "PUT", path: "/api/v1/templates/portrait", key: styleKey, body: testTemplate}), http.StatusForbidden, "forbidden")
		expect(t, b.do(req{method: "GET", path: "/api/v1/templates/portrait?frontend=style", key: logoKey}), http.StatusForbidden, "forbidden")
		r = b.do(req{method: "GET", path: "/api/v1/templates/portrait", key: styleKey})
		expect(t, r, http.StatusOK)
		b.decode(r, &tp)
		if tp.Version != 2 || *tp.Inputs[0].Max != 30 {
			t.Fatalf("get latest: %s", r.body)
		}
		r = b.do(req{method: "GET", path: "/api/v1/templates/portrait?frontend=style&version=1", key: adminKey})
		expect(t, r, http.StatusOK)
		b.decode(r, &tp)
		if tp.Version != 1 || *tp.Inputs[0].Max != 20 {
			t.Fatalf("get version 1: %s", r.body)
		}
		expect(t, b.do(req{method: "GET", path: "/api/v1/templates/portrait?frontend=logo", key: adminKey}), http.StatusNotFound, "not_found")

		r = b.do(req{method: "GET", path: "/api/v1/templates", key: styleKey})
		expect(t, r, http.StatusOK)
		var list []schema.Template
		b.decode(r, &list)
		if len(list) != 1 || list[0].Version != 2 || list[0].Workflow != nil {
			t.Fatalf("list: %s", r.body)
		}
		expect(t, b.do(req{method: "GET", path: "/api/v1/templates", key: adminKey}), http.StatusBadRequest, "invalid_frontend")
		r = b.do(req{method: "GET", path: "/api/v1/templates?frontend=logo", key: adminKey})
		expect(t, r, http.StatusOK)
		if strings.TrimSpace(string(r.body)) != "[]" {
			t.Fatalf("logo list: %s", r.body)
		}

		expect(t, b.do(req{method: "DELETE", path: "/api/v1/templates/portrait?frontend=style", key: adminKey}), http.StatusNoContent)
		expect(t, b.do(req{method: "DELETE", path: "/api/v1/templates/portrait?frontend=style", key: adminKey}), http.StatusNotFound)
		r = putTemplate(t, b, "style", "portrait", testTemplate)
		b.decode(r, &tp)
		if tp.Version != 3 {
			t.Fatalf("put after delete: %s", r.body)
		}
	})
}

// A template is checked before it is stored; the error names the field.
func TestTemplatePutRefused(t *testing.T) {
	b := setupTemplates(t, dbtest.SQLite(t))
	good := map[string]any{}
	if err := json.Unmarshal([]byte(testTemplate), &good); err != nil {
		t.Fatal(err)
	}
	withInput := func(in string) string {
		return `{"workflow": {"1": {"class_type": "KSampler", "inputs": {"seed": 1, "sampler_name": "euler", "model": ["2", 0]}}, "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m"}}, "3": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}, "inputs": [` + in + `]}`
	}
	for _, c := range []struct{ name, body, field string }{
		{"no workflow", `{"inputs": []}`, "workflow"},
		{"dangling link", `{"workflow": {"1": {"class_type": "SaveImage", "inputs": {"images": ["7", 0]}}}}`, "workflow.1.inputs.images"},
		{"ui format", `{"workflow": {"nodes": [], "links": []}}`, "workflow"},
		{"unknown node", withInput(`{"name": "s", "node": "8", "input": "seed", "type": "int"}`), "inputs.s.node"},
		{"unknown input key", withInput(`{"name": "s", "node": "1", "input": "steps", "type": "int"}`), "inputs.s.input"},
		{"link input", withInput(`{"name": "s", "node": "1", "input": "model", "type": "string"}`), "inputs.s.input"},
		{"bad type", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "integer"}`), "inputs.s.type"},
		{"bad name", withInput(`{"name": "9s", "node": "1", "input": "seed", "type": "int"}`), "inputs[0].name"},
		{"twice", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int"}, {"name": "s", "node": "1", "input": "sampler_name", "type": "string"}`), "inputs.s"},
		{"same target", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int"}, {"name": "t", "node": "1", "input": "seed", "type": "int"}`), "inputs.t.input"},
		{"min over max", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int", "min": 5, "max": 1}`), "inputs.s.min"},
		{"fractional int bound", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int", "max": 1.5}`), "inputs.s.max"},
		{"range on bool", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "bool", "min": 0}`), "inputs.s.min"},
		{"default out of range", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int", "default": 9, "max": 5}`), "inputs.s.default"},
		{"default wrong type", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int", "default": "9"}`), "inputs.s.default"},
		{"required with default", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int", "default": 1, "required": true}`), "inputs.s.default"},
		{"enum without choices", withInput(`{"name": "s", "node": "1", "input": "sampler_name", "type": "enum"}`), "inputs.s.choices"},
		{"enum default not a choice", withInput(`{"name": "s", "node": "1", "input": "sampler_name", "type": "enum", "choices": ["a"], "default": "b"}`), "inputs.s.default"},
		{"choices on string", withInput(`{"name": "s", "node": "1", "input": "sampler_name", "type": "string", "choices": ["a"]}`), "inputs.s.choices"},
		{"image not on LoadImage", withInput(`{"name": "s", "node": "1", "input": "sampler_name", "type": "image"}`), "inputs.s.input"},
		{"image default", withInput(`{"name": "s", "node": "3", "input": "image", "type": "image", "default": "a.png"}`), "inputs.s.default"},
		{"unknown field", withInput(`{"name": "s", "node": "1", "input": "seed", "type": "int", "step": 1}`), "step"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := putTemplate(t, b.with(t), "style", "x", c.body)
			expect(t, r, http.StatusBadRequest, "invalid_request")
			if got := detail(r, "field"); got != c.field {
				t.Fatalf("field %v, want %q: %s", got, c.field, r.body)
			}
		})
	}
	expect(t, putTemplate(t, b, "style", "Bad%20Name", testTemplate), http.StatusBadRequest, "invalid_request")
	expect(t, putTemplate(t, b, "nope", "x", testTemplate), http.StatusNotFound, "unknown_frontend")
	if r := b.do(req{method: "GET", path: "/api/v1/templates", key: styleKey}); strings.TrimSpace(string(r.body)) != "[]" {
		t.Fatalf("a refused template was stored: %s", r.body)
	}
}

// nodeInputs decodes a workflow's node inputs.
func nodeInputs(t *testing.T, wf json.RawMessage) map[string]map[string]any {
	t.Helper()
	var nodes map[string]struct {
		Inputs map[string]any `json:"inputs"`
	}
	dec := json.NewDecoder(bytes.NewReader(wf))
	dec.UseNumber()
	if err := dec.Decode(&nodes); err != nil {
		t.Fatalf("workflow %s: %v", wf, err)
	}
	out := map[string]map[string]any{}
	for id, n := range nodes {
		out[id] = n.Inputs
	}
	return out
}

func TestTemplateSubmit(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		b := setupTemplates(t, cfg)
		expect(t, putTemplate(t, b, "style", "portrait", testTemplate), http.StatusCreated)

		r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id": "u1", "template": "portrait",
			"inputs": {"prompt": "a cat", "seed": 18446744073709551615, "cfg": 4.5, "keep": true}}`})
		expect(t, r, http.StatusAccepted)
		calls := b.jobs.calls()
		p := calls[len(calls)-1].params
		if p.Template != "portrait@1" {
			t.Fatalf("template %q", p.Template)
		}
		in := nodeInputs(t, p.Workflow)
		if in["3"]["text"] != "a cat" || in["4"]["seed"] != json.Number("18446744073709551615") || in["4"]["cfg"] != json.Number("4.5") ||
			in["4"]["sampler_name"] != "euler" || in["5"]["_keep"] != true || in["1"]["image"] != "in.png" {
			t.Fatalf("expanded inputs %v", in)
		}
		if _, ok := in["4"]["model"].([]any); !ok {
			t.Fatalf("links lost: %v", in["4"])
		}
		if !strings.Contains(string(p.Workflow), `"_meta":{"title":"Save"}`) {
			t.Fatalf("node fields lost: %s", p.Workflow)
		}

		// Defaults apply: seed 7 when not given.
		expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id": "u1", "template": "portrait@1", "inputs": {"prompt": "x"}}`}), http.StatusAccepted)
		calls = b.jobs.calls()
		if in := nodeInputs(t, calls[len(calls)-1].params.Workflow); in["4"]["seed"] != json.Number("7") {
			t.Fatalf("default seed: %v", in["4"])
		}

		for _, c := range []struct{ name, inputs, input string }{
			{"wrong type", `{"prompt": "x", "seed": "42"}`, "seed"},
			{"fraction for int", `{"prompt": "x", "seed": 4.2}`, "seed"},
			{"below min", `{"prompt": "x", "seed": -1}`, "seed"},
			{"above max", `{"prompt": "x", "cfg": 20.5}`, "cfg"},
			{"too long", `{"prompt": "` + strings.Repeat("é", 21) + `"}`, "prompt"},
			{"unknown", `{"prompt": "x", "steps": 20}`, "steps"},
			{"missing required", `{"seed": 1}`, "prompt"},
			{"bad choice", `{"prompt": "x", "sampler": "ddim"}`, "sampler"},
			{"bool as string", `{"prompt": "x", "keep": "true"}`, "keep"},
			{"null", `{"prompt": null}`, "prompt"},
			{"image not uploaded", `{"prompt": "x", "init_image": "in.png"}`, "init_image"},
		} {
			t.Run(c.name, func(t *testing.T) {
				r := b.with(t).do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
					body: `{"user_id": "u1", "template": "portrait", "inputs": ` + c.inputs + `}`})
				expect(t, r, http.StatusBadRequest, "invalid_request")
				if detail(r, "input") != c.input || detail(r, "field") != "inputs."+c.input {
					t.Fatalf("details do not name %q: %s", c.input, r.body)
				}
			})
		}
		n := len(b.jobs.calls())
		for _, c := range []struct {
			body   string
			status int
			code   string
		}{
			{`{"user_id": "u1", "template": "nope", "inputs": {}}`, 404, "template_not_found"},
			{`{"user_id": "u1", "template": "portrait@9", "inputs": {"prompt": "x"}}`, 404, "template_not_found"},
			{`{"user_id": "u1", "template": "portrait@x"}`, 400, "invalid_request"},
			{`{"user_id": "u1", "template": "portrait", "inputs": [1]}`, 400, "invalid_request"},
			{`{"user_id": "u1", "template": "portrait", "workflow": {"1": {}}}`, 400, "invalid_request"},
			{`{"user_id": "u1", "workflow": {"1": {}}, "inputs": {"a": 1}}`, 400, "invalid_request"},
		} {
			expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: c.body}), c.status, c.code)
		}
		// Another frontend's template is not found.
		expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: logoKey, body: `{"user_id": "u1", "template": "portrait", "inputs": {"prompt": "x"}}`}), 404, "template_not_found")
		if len(b.jobs.calls()) != n {
			t.Fatal("a refused submit reached the job service")
		}

		// An image input names a file uploaded with the job.
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		_ = mw.WriteField("user_id", "u2")
		_ = mw.WriteField("template", "portrait")
		_ = mw.WriteField("inputs", `{"prompt": "p", "init_image": "me.png"}`)
		fw, _ := mw.CreateFormFile("images", "me.png")
		_, _ = fw.Write(pngBytes())
		_ = mw.Close()
		r = b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: body.Bytes(),
			header: map[string]string{"Content-Type": mw.FormDataContentType()}})
		expect(t, r, http.StatusAccepted)
		calls = b.jobs.calls()
		last := calls[len(calls)-1]
		if in := nodeInputs(t, last.params.Workflow); in["1"]["image"] != "me.png" || len(last.files["me.png"]) == 0 {
			t.Fatalf("image input: %v, files %v", in["1"], len(last.files))
		}
	})
}

// A frontend with raw workflows off submits templates only; the admin key
// may still submit a raw workflow for it.
func TestRawWorkflowsDisabled(t *testing.T) {
	b := setupTemplates(t, dbtest.SQLite(t), func(c *Config, _ *Deps) {
		c.RawWorkflows = map[string]bool{"style": false, "logo": true}
	})
	expect(t, putTemplate(t, b, "style", "portrait", testTemplate), http.StatusCreated)
	raw := `{"user_id": "u1", "workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}}`
	r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: raw})
	expect(t, r, http.StatusForbidden, "raw_workflows_disabled")
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
		body: `{"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}}`}), http.StatusForbidden, "raw_workflows_disabled")
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
		body: `{"user_id": "u1", "template": "portrait", "inputs": {"prompt": "x"}}`}), http.StatusAccepted)
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs?frontend=style", key: adminKey, body: raw}), http.StatusAccepted)
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: logoKey, body: raw}), http.StatusAccepted)
}

// ComfyUI's own /prompt body is a workflow too, in JSON and multipart; its
// jobs belong to user "comfy" unless the body names one.
func TestSubmitPromptBody(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	graph := `{"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}`
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
		body: `{"prompt": ` + graph + `, "client_id": "c-1", "extra_data": {"extra_pnginfo": {}}}`}), http.StatusAccepted)
	calls := b.jobs.calls()
	if p := calls[0].params; p.UserID != "comfy" || !strings.Contains(string(p.Workflow), "EmptyImage") {
		t.Fatalf("prompt submit: %+v", p)
	}
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("prompt", graph)
	_ = mw.WriteField("client_id", "c-2")
	_ = mw.WriteField("user_id", "u-9")
	_ = mw.Close()
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: body.Bytes(),
		header: map[string]string{"Content-Type": mw.FormDataContentType()}}), http.StatusAccepted)
	if p := b.jobs.calls()[1].params; p.UserID != "u-9" || !strings.Contains(string(p.Workflow), "EmptyImage") {
		t.Fatalf("multipart prompt submit: %+v", p)
	}
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
		body: `{"prompt": ` + graph + `, "workflow": ` + graph + `}`}), http.StatusBadRequest, "invalid_request")
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"prompt": [1]}`}), http.StatusBadRequest, "invalid_request")
}

// With a public URL, events_url is absolute; without, a path.
func TestEventsURLAbsolute(t *testing.T) {
	graph := `{"user_id": "u1", "workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}}`
	b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) { c.PublicURL = "https://farm.example.com/gpu/" })
	var sub submitResponse
	r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: graph})
	expect(t, r, http.StatusAccepted)
	b.decode(r, &sub)
	if !strings.HasPrefix(sub.EventsURL, "https://farm.example.com/gpu/api/v1/jobs/"+sub.ID+"/events?token=") {
		t.Fatalf("events_url %q", sub.EventsURL)
	}
	b = setup(t, dbtest.SQLite(t))
	r = b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: graph})
	b.decode(r, &sub)
	if !strings.HasPrefix(sub.EventsURL, "/api/v1/jobs/") {
		t.Fatalf("events_url %q", sub.EventsURL)
	}
}

// Template files: loaded at start, a changed file is a new version, an
// unchanged one nothing, a bad one an error naming it.
func TestLoadTemplateFiles(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		db, err := dbcontrollers.OpenControl(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		store := dbcontrollers.NewStore(db)
		dir := t.TempDir()
		write := func(rel, body string) {
			p := filepath.Join(dir, rel)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		write("style/portrait.json", testTemplate)
		write("style/README.txt", "not a template")
		write("ghost/x.json", "{}") // no such frontend: skipped
		fc := TemplateFilesConfig{Dir: dir, Frontends: []string{"style", "logo"}}
		ctx := context.Background()
		load := func(want int) {
			t.Helper()
			n, err := LoadTemplateFiles(ctx, store, fc)
			if err != nil || n != want {
				t.Fatalf("load: %d new, %v; want %d", n, err, want)
			}
		}
		load(1)
		load(0)
		// The same template written differently is the same template.
		var v any
		_ = json.Unmarshal([]byte(testTemplate), &v)
		compact, _ := json.Marshal(v)
		write("style/portrait.json", string(compact))
		load(0)
		write("style/portrait.json", strings.Replace(testTemplate, `"default": 7`, `"default": 8`, 1))
		load(1)
		if tp, err := store.TemplateGet(ctx, "style", "portrait", 0); err != nil || tp.Version != 2 || string(tp.Inputs[1].Default) != "8" {
			t.Fatalf("latest: %+v, %v", tp, err)
		}
		write("logo/bad.json", `{"workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}, "inputs": [{"name": "x", "node": "2", "input": "a", "type": "int"}]}`)
		if _, err := LoadTemplateFiles(ctx, store, fc); err == nil || !strings.Contains(err.Error(), filepath.Join("logo", "bad.json")) || !strings.Contains(err.Error(), "inputs.x.node") {
			t.Fatalf("bad file: %v", err)
		}
		if n, err := LoadTemplateFiles(ctx, store, TemplateFilesConfig{Dir: filepath.Join(dir, "none")}); n != 0 || err != nil {
			t.Fatalf("missing dir: %d, %v", n, err)
		}
	})
}

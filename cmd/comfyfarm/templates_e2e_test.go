package main

import (
	"bytes"
	"encoding/json"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// e2eJob is a job view as a waited submit answers it.
type e2eJob struct {
	schema.Job
	EventsURL string `json:"events_url"`
}

func (s *stack) postJSON(path, key, body string) (*http.Response, []byte) {
	s.t.Helper()
	return s.do("POST", path, key, strings.NewReader(body), "application/json")
}

func (s *stack) decodeJob(b []byte) e2eJob {
	s.t.Helper()
	var j e2eJob
	if err := json.Unmarshal(b, &j); err != nil {
		s.t.Fatalf("job view %s: %v", b, err)
	}
	return j
}

// multipartSubmit builds a multipart submit body with one PNG upload.
func multipartSubmit(t *testing.T, fields map[string]string, upload string) (*bytes.Buffer, string) {
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	for k, v := range fields {
		_ = mw.WriteField(k, v)
	}
	fw, _ := mw.CreateFormFile("images", upload)
	_, _ = fw.Write(pngBytes(t, 40, 30))
	_ = mw.Close()
	return &body, mw.FormDataContentType()
}

func errorDetail(b []byte, key string) any {
	var e struct {
		Error struct {
			Code    string         `json:"code"`
			Details map[string]any `json:"details"`
		} `json:"error"`
	}
	_ = json.Unmarshal(b, &e)
	if key == "code" {
		return e.Error.Code
	}
	return e.Error.Details[key]
}

// The example templates, installed and loaded at the first start, run on
// the farm with typed inputs; bad inputs are refused naming the input; a
// frontend with raw_workflows false may submit templates only; ?wait=
// answers with the finished job or, when it runs out, the current one.
func TestTemplatesFullStack(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, db dbcontrollers.Config) {
		s := startStack(t, db, "COMFYFARM_FRONTENDS_LOGO_RAW_WORKFLOWS=false", "COMFYFARM_PUBLIC_URL=http://farm.test:8443/gpu")

		var list []schema.Template
		s.getJSON("/api/v1/templates", "style-key", &list)
		if len(list) != 1 || list[0].Ref() != "portrait@1" || len(list[0].Inputs) != 5 {
			t.Fatalf("style templates %+v", list)
		}
		s.getJSON("/api/v1/templates", "logo-key", &list)
		if len(list) != 1 || list[0].Ref() != "badge@1" {
			t.Fatalf("logo templates %+v", list)
		}

		// A template job with typed inputs, waited for.
		res, b := s.postJSON("/api/v1/jobs?wait=60s", "style-key",
			`{"user_id": "u-t1", "template": "portrait", "inputs": {"width": 96, "height": 80, "color": 16711680, "sigma": 2.5}}`)
		if res.StatusCode != http.StatusOK {
			t.Fatalf("waited template submit: %d %s", res.StatusCode, b)
		}
		job := s.decodeJob(b)
		if job.State != schema.JobSucceeded || job.Template != "portrait@1" || len(job.Outputs) != 1 || job.Outputs[0].URL == "" ||
			job.Outputs[0].Width != 96 || job.Outputs[0].Height != 80 {
			t.Fatalf("template job %s", b)
		}
		if !strings.HasPrefix(job.EventsURL, "http://farm.test:8443/gpu/api/v1/jobs/"+job.ID+"/events?token=") {
			t.Fatalf("events_url %q", job.EventsURL)
		}
		var again schema.Job
		s.getJSON("/api/v1/jobs/"+job.ID, "style-key", &again)
		if again.Template != "portrait@1" {
			t.Fatalf("stored job view %+v", again)
		}

		// Bad inputs: 400 naming the input, no job.
		for _, c := range []struct{ key, body, input string }{
			{"style-key", `{"user_id": "u-t2", "template": "portrait", "inputs": {"width": "big"}}`, "width"},
			{"style-key", `{"user_id": "u-t2", "template": "portrait", "inputs": {"width": 10}}`, "width"},
			{"style-key", `{"user_id": "u-t2", "template": "portrait", "inputs": {"sigma": 11.5}}`, "sigma"},
			{"style-key", `{"user_id": "u-t2", "template": "portrait", "inputs": {"steps": 20}}`, "steps"},
			{"logo-key", `{"user_id": "u-t2", "template": "badge", "inputs": {"width": 64}}`, "logo"},
		} {
			res, b := s.postJSON("/api/v1/jobs", c.key, c.body)
			if res.StatusCode != http.StatusBadRequest || errorDetail(b, "code") != "invalid_request" || errorDetail(b, "input") != c.input {
				t.Fatalf("%s: %d %s, want 400 naming %s", c.body, res.StatusCode, b, c.input)
			}
		}
		body, ct := multipartSubmit(t, map[string]string{"user_id": "u-t2", "template": "badge",
			"inputs": `{"logo": "mark.png", "method": "cubic"}`}, "mark.png")
		res, b = s.do("POST", "/api/v1/jobs", "logo-key", body, ct)
		if res.StatusCode != http.StatusBadRequest || errorDetail(b, "input") != "method" {
			t.Fatalf("bad choice: %d %s", res.StatusCode, b)
		}
		var jobs []schema.Job
		s.getJSON("/api/v1/jobs?user_id=u-t2", "style-key", &jobs)
		if len(jobs) != 0 {
			t.Fatalf("refused submits made jobs: %+v", jobs)
		}

		// logo has raw_workflows false: its key submits templates only.
		raw := `{"user_id": "u-t3", "workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "r"}}}}`
		res, b = s.postJSON("/api/v1/jobs", "logo-key", raw)
		if res.StatusCode != http.StatusForbidden || errorDetail(b, "code") != "raw_workflows_disabled" {
			t.Fatalf("raw on logo: %d %s", res.StatusCode, b)
		}
		if res, b = s.postJSON("/api/v1/jobs?frontend=logo", testAdminKey, raw); res.StatusCode != http.StatusAccepted {
			t.Fatalf("raw on logo with the admin key: %d %s", res.StatusCode, b)
		}
		body, ct = multipartSubmit(t, map[string]string{"user_id": "u-t3", "template": "badge",
			"inputs": `{"logo": "mark.png", "method": "bicubic", "width": 64}`}, "mark.png")
		res, b = s.do("POST", "/api/v1/jobs?wait=60s", "logo-key", body, ct)
		if job = s.decodeJob(b); res.StatusCode != http.StatusOK || job.State != schema.JobSucceeded || job.Template != "badge@1" ||
			len(job.Outputs) != 1 || job.Outputs[0].Width != 64 {
			t.Fatalf("badge job: %d %s", res.StatusCode, b)
		}

		// A new version: the next job records it.
		tmpl, err := exampleTemplates.ReadFile("templates/style/portrait.json")
		if err != nil {
			t.Fatal(err)
		}
		res, b = s.do("PUT", "/api/v1/templates/portrait?frontend=style", testAdminKey,
			bytes.NewReader(bytes.Replace(tmpl, []byte(`"max": 31`), []byte(`"max": 8`), 1)), "application/json")
		var tp schema.Template
		if err := json.Unmarshal(b, &tp); res.StatusCode != http.StatusOK || err != nil || tp.Version != 2 {
			t.Fatalf("put version 2: %d %s", res.StatusCode, b)
		}
		res, b = s.postJSON("/api/v1/jobs", "style-key", `{"user_id": "u-t4", "template": "portrait", "inputs": {"blur": 9}}`)
		if res.StatusCode != http.StatusBadRequest || errorDetail(b, "input") != "blur" {
			t.Fatalf("version 2's range: %d %s", res.StatusCode, b)
		}

		// A wait that runs out answers with the current state.
		for _, f := range s.fakes {
			f.Hold()
		}
		res, b = s.postJSON("/api/v1/jobs?wait=1s", "style-key", `{"user_id": "u-t4", "template": "portrait", "inputs": {"blur": 2}}`)
		held := s.decodeJob(b)
		if res.StatusCode != http.StatusAccepted || held.State.Terminal() || held.Template != "portrait@2" || held.EventsURL == "" {
			t.Fatalf("wait ran out: %d %s", res.StatusCode, b)
		}
		res, b = s.do("GET", "/api/v1/jobs/"+held.ID+"?wait=1s", "style-key", nil, "")
		if job = s.decodeJob(b); res.StatusCode != http.StatusOK || job.State.Terminal() {
			t.Fatalf("GET wait ran out: %d %s", res.StatusCode, b)
		}
		for _, f := range s.fakes {
			f.Release()
		}
		res, b = s.do("GET", "/api/v1/jobs/"+held.ID+"?wait=60s", "style-key", nil, "")
		if job = s.decodeJob(b); res.StatusCode != http.StatusOK || job.State != schema.JobSucceeded || len(job.Outputs) != 1 || job.Outputs[0].URL == "" {
			t.Fatalf("GET wait: %d %s", res.StatusCode, b)
		}

		// ComfyUI's own body shape.
		res, b = s.postJSON("/api/v1/jobs?wait=60s", "style-key",
			`{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}}, "client_id": "cli-1"}`)
		if job = s.decodeJob(b); res.StatusCode != http.StatusOK || job.State != schema.JobSucceeded || job.UserID != "comfy" || job.Template != "" {
			t.Fatalf("prompt body: %d %s", res.StatusCode, b)
		}
	})
}

package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// FuzzDecodeSubmit: any body is either refused with a 4xx-class error or
// decodes to a submission whose workflow is a JSON object and whose
// priority and metadata are within bounds.
func FuzzDecodeSubmit(f *testing.F) {
	for _, seed := range []string{
		`{"frontend":"style","user_id":"u","workflow":{"1":{"class_type":"X","inputs":{}}},"priority":3,"metadata":{"a":1}}`,
		`{"user_id":"u","workflow":{}}`,
		`{"user_id":"u","workflow":[1]}`,
		`{"user_id":"u","workflow":{"1":{}},"priority":1e400}`,
		`{"user_id":"\u0000","workflow":{"1":{}}}`,
		`{"user_id":"u","workflow":{"1":{}}} trailing`,
		`{"user_id":"u","workflow":{"1":{}},"metadata":null}`,
		`{"user_id":"u","unknown":1}`,
		`[]`, `null`, ``, `{`, `"x"`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var b submitBody
		err := decodeJSONBytes(body, &b)
		if err == nil {
			err = b.validate()
		}
		if err != nil {
			if ae := classify(err); ae.Status < 400 || ae.Status >= 500 {
				t.Fatalf("status %d for %q: %v", ae.Status, body, err)
			}
			return
		}
		if !jsonObject(b.Workflow) {
			t.Fatalf("accepted workflow %q", b.Workflow)
		}
		if b.Priority < schema.MinPriority || b.Priority > schema.MaxPriority {
			t.Fatalf("accepted priority %d", b.Priority)
		}
		if len(b.Metadata) > schema.MaxMetadataBytes || (len(b.Metadata) > 0 && !jsonObject(b.Metadata)) {
			t.Fatalf("accepted metadata %q", b.Metadata)
		}
		if checkUserID("user_id", b.UserID) != nil {
			t.Fatalf("accepted user id %q", b.UserID)
		}
	})
}

// FuzzTokenCheck: no input panics or passes for a job it was not minted for,
// and a minted token passes for its own job.
func FuzzTokenCheck(f *testing.F) {
	clk := newClock()
	ts := &tokenSigner{key: []byte("0123456789abcdef"), ttl: time.Hour, now: clk.Now}
	f.Add(ts.mint("01JOB", "style"), "01JOB")
	f.Add("", "")
	f.Add("djF8MDFKT0J8c3R5bGV8OTk5OTk5OTk5OQ.AAAA", "01JOB")
	f.Add("a.b.c", "x|y")
	f.Fuzz(func(t *testing.T, token, jobID string) {
		fe, err := ts.check(token, jobID)
		if err == nil && !schema.ValidFrontendName(fe) && fe != "" {
			// Only minted tokens verify; mint is only given valid names here.
			t.Fatalf("token %q verified with frontend %q", token, fe)
		}
		if checkJobID("id", jobID, false) != nil {
			return // the route refuses such ids before any token is checked
		}
		minted := ts.mint(jobID, "style")
		if fe, err := ts.check(minted, jobID); err != nil || fe != "style" {
			t.Fatalf("minted token for %q: %q %v", jobID, fe, err)
		}
	})
}

// stubFrontends resolves any valid name without a database (the submit route
// needs the name only).
type stubFrontends struct{}

func (stubFrontends) Get(name string) (dbcontrollers.Controller, error) {
	if name == "style" || name == "logo" {
		return nil, nil
	}
	return nil, schema.ErrUnknownFrontend
}
func (stubFrontends) Names() []string                { return []string{"logo", "style"} }
func (stubFrontends) Ping(ctx context.Context) error { return nil }

// FuzzMultipartSubmit posts arbitrary multipart bodies: never a 5xx, and an
// accepted one reached the service with files it can read.
func FuzzMultipartSubmit(f *testing.F) {
	const boundary = "FUZZBOUNDARY"
	part := func(name, filename, body string) string {
		cd := `form-data; name="` + name + `"`
		if filename != "" {
			cd += `; filename="` + filename + `"`
		}
		return "--" + boundary + "\r\nContent-Disposition: " + cd + "\r\n\r\n" + body + "\r\n"
	}
	good := part("user_id", "", "u") + part("workflow", "", `{"1":{}}`) + part("images", "a.png", "PNGDATA") + "--" + boundary + "--\r\n"
	f.Add([]byte(good))
	f.Add([]byte(part("workflow", "", `{`) + "--" + boundary + "--\r\n"))
	f.Add([]byte(part("images", "../../etc/passwd", "x") + "--" + boundary + "--\r\n"))
	f.Add([]byte(part("priority", "", "99999999999999999999") + "--" + boundary + "--\r\n"))
	f.Add([]byte("--" + boundary + "\r\nno header\r\n"))
	f.Add([]byte{})

	jobs := newFakeJobs()
	srv, err := New(Config{
		AdminKey: adminKey, FrontendKeys: map[string][]string{"style": {styleKey}},
		MaxBodyBytes: 1 << 20, MaxUploadBytes: 1 << 10, TokenSecret: []byte("events-secret-0123456789"),
	}, Deps{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Frontends: stubFrontends{}, Jobs: jobs})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		hr, err := http.NewRequest("POST", "/api/v1/jobs", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		hr.Header.Set("Content-Type", "multipart/form-data; boundary="+boundary)
		hr.Header.Set("Authorization", "Bearer "+styleKey)
		before := len(jobs.calls())
		res, err := srv.App().Test(hr, -1)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode >= 500 {
			t.Fatalf("status %d for %q: %s", res.StatusCode, body, data)
		}
		accepted := res.StatusCode == http.StatusAccepted
		calls := jobs.calls()
		if accepted != (len(calls) == before+1) {
			t.Fatalf("status %d but %d new submissions", res.StatusCode, len(calls)-before)
		}
		if accepted {
			p := calls[len(calls)-1].params
			for _, in := range p.Inputs {
				if checkFilename(in.Filename) != nil || in.Size > 1<<10 {
					t.Fatalf("accepted input %q (%d bytes)", in.Filename, in.Size)
				}
			}
			if !json.Valid(p.Workflow) {
				t.Fatalf("accepted workflow %q", p.Workflow)
			}
		} else if !json.Valid(data) {
			t.Fatalf("error body not JSON: %q", data)
		}
	})
}

// FuzzDecodeComfyPrompt: any POST /comfy/prompt body is refused in
// ComfyUI's error shape or decodes to a prompt object whose every node has a
// class_type, with client and prompt ids within bounds.
func FuzzDecodeComfyPrompt(f *testing.F) {
	for _, seed := range []string{
		`{"prompt":{"1":{"class_type":"EmptyImage","inputs":{}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}},"client_id":"c"}`,
		`{"prompt":{"1":{"inputs":{}}}}`,
		`{"prompt":{"1":{"class_type":""}}}`,
		`{"prompt":{"1":[]}}`,
		`{"prompt":[],"client_id":"c"}`,
		`{"prompt":{},"prompt_id":"5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50","number":1.5,"front":true,"extra_data":{}}`,
		`{"prompt":{},"client_id":"\u200b"}`,
		`{"prompt":null}`, `{}`, `[]`, `null`, ``, `{`, `{"prompt":{}} x`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		p, perr := decodeComfyPrompt(body)
		if perr != nil {
			if p != nil || perr.Error.Type == "" || perr.NodeErrors == nil || perr.Error.ExtraInfo == nil {
				t.Fatalf("refusal %+v with prompt %v", perr, p)
			}
			if _, err := json.Marshal(perr); err != nil {
				t.Fatal(err)
			}
			return
		}
		if !jsonObject(p.Prompt) || len(p.ClientID) > maxClientIDBytes || len(p.PromptID) > maxPromptIDBytes {
			t.Fatalf("accepted %q", body)
		}
		var nodes map[string]map[string]json.RawMessage
		if err := json.Unmarshal(p.Prompt, &nodes); err != nil {
			t.Fatalf("accepted prompt is no object of objects: %v", err)
		}
		for id, n := range nodes {
			var class string
			if json.Unmarshal(n["class_type"], &class) != nil || class == "" || p.classOf(id) != class {
				t.Fatalf("node %s accepted without class_type: %s", id, body)
			}
		}
	})
}

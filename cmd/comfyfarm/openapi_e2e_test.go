package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
)

// oaWorkflow is e2eWorkflow without the uploaded input image: one output.
const oaWorkflow = `{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 4, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "oa", "images": ["8", 0]}}
}`

// specChecker sends requests to a running stack and checks each request
// and answer against the served OpenAPI document.
type specChecker struct {
	t      *testing.T
	s      *stack
	router routers.Router
	seen   map[string]bool // operation ids checked
}

func newSpecChecker(t *testing.T, s *stack) *specChecker {
	res, body := s.do("GET", "/openapi.json", "", nil, "")
	if res.StatusCode != http.StatusOK {
		t.Fatalf("GET /openapi.json: %d %s", res.StatusCode, body)
	}
	doc, err := openapi3.NewLoader().LoadFromData(body)
	if err != nil {
		t.Fatalf("load served openapi.json: %v", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("served openapi.json: %v", err)
	}
	doc.Servers = openapi3.Servers{{URL: s.base}}
	r, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	return &specChecker{t: t, s: s, router: r, seen: map[string]bool{}}
}

// call sends one request, fails the test unless it answers want, and
// validates the request and the answer against the document.
func (c *specChecker) call(method, path, key string, body any, header map[string]string, want int) []byte {
	c.t.Helper()
	var data []byte
	switch b := body.(type) {
	case nil:
	case string:
		data = []byte(b)
	default:
		var err error
		if data, err = json.Marshal(b); err != nil {
			c.t.Fatal(err)
		}
	}
	newReq := func() *http.Request {
		req, err := http.NewRequest(method, c.s.base+path, bytes.NewReader(data))
		if err != nil {
			c.t.Fatal(err)
		}
		if data != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		for k, v := range header {
			req.Header.Set(k, v)
		}
		return req
	}
	res, err := c.s.http.Do(newReq())
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	got, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != want {
		c.t.Fatalf("%s %s: %d, want %d: %s", method, path, res.StatusCode, want, got)
	}

	req := newReq()
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		c.t.Fatalf("%s %s: not in the document: %v", method, path, err)
	}
	c.seen[route.Operation.OperationID] = true
	in := &openapi3filter.RequestValidationInput{
		Request: req, PathParams: params, Route: route,
		Options: &openapi3filter.Options{
			AuthenticationFunc:    openapi3filter.NoopAuthenticationFunc,
			IncludeResponseStatus: true,
			MultiError:            true,
		},
	}
	if want < 400 { // refused requests are meant not to match the document
		if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
			c.t.Errorf("%s %s: request does not match the document: %v", method, path, err)
		}
	}
	out := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in,
		Status:                 res.StatusCode,
		Header:                 res.Header,
		Body:                   io.NopCloser(bytes.NewReader(got)),
		Options:                in.Options,
	}
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		c.t.Errorf("%s %s: answer %d does not match the document: %v\n%s", method, path, res.StatusCode, err, got)
	}
	return got
}

// TestOpenAPIResponses runs the real server on both databases and checks
// the answers of the main calls, errors included, against openapi.json.
func TestOpenAPIResponses(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, db dbcontrollers.Config) {
		s := startStack(t, db)
		c := newSpecChecker(t, s)
		const key, user = "style-key", "u-oa"

		c.call("PUT", "/api/v1/users/"+user, key, map[string]any{"nickname": "Ann", "email": "ann@example.com"}, nil, 200)
		c.call("POST", "/api/v1/users/"+user+"/credits", key, map[string]any{"delta": 10, "reason": "payment"},
			map[string]string{"Idempotency-Key": "pay-1"}, 200)
		c.call("GET", "/api/v1/users/"+user, key, nil, nil, 200)

		var sub struct {
			ID string `json:"id"`
		}
		b := c.call("POST", "/api/v1/jobs", key, map[string]any{
			"user_id": user, "workflow": json.RawMessage(oaWorkflow), "metadata": map[string]any{"k": "v"},
		}, nil, 202)
		if err := json.Unmarshal(b, &sub); err != nil || sub.ID == "" {
			t.Fatalf("submit answer %s", b)
		}
		c.call("GET", "/api/v1/queue?job_id="+sub.ID, key, nil, nil, 200)
		var job struct {
			State   string `json:"state"`
			Outputs []struct {
				PhotoID int64 `json:"photo_id"`
			} `json:"outputs"`
		}
		b = c.call("GET", "/api/v1/jobs/"+sub.ID+"?wait=60s", key, nil, nil, 200)
		if err := json.Unmarshal(b, &job); err != nil || job.State != "succeeded" || len(job.Outputs) != 1 {
			t.Fatalf("job after wait: %s", b)
		}
		c.call("GET", "/api/v1/jobs/"+sub.ID, key, nil, nil, 200)
		c.call("GET", "/api/v1/jobs?user_id="+user+"&limit=10", key, nil, nil, 200)
		c.call("GET", "/api/v1/jobs/"+sub.ID+"/webhooks", key, nil, nil, 200)
		c.call("DELETE", "/api/v1/jobs/"+sub.ID, key, nil, nil, 409)

		// A submit that waits answers the finished job view.
		b = c.call("POST", "/api/v1/jobs?wait=60s", key, map[string]any{
			"user_id": user, "workflow": json.RawMessage(oaWorkflow), "priority": 5,
		}, nil, 200)
		if !strings.Contains(string(b), `"events_url"`) || !strings.Contains(string(b), `"succeeded"`) {
			t.Fatalf("waited submit: %s", b)
		}

		// A wait that runs out answers 202 with the view as it is then; a
		// job still waiting can be cancelled.
		for _, f := range s.fakes {
			f.Hold()
		}
		b = c.call("POST", "/api/v1/jobs?wait=1s", key, map[string]any{"user_id": user, "workflow": json.RawMessage(oaWorkflow)}, nil, 202)
		var held struct {
			ID        string `json:"id"`
			State     string `json:"state"`
			EventsURL string `json:"events_url"`
		}
		if err := json.Unmarshal(b, &held); err != nil || held.EventsURL == "" || (held.State != "queued" && held.State != "dispatched") {
			t.Fatalf("submit whose wait ran out: %s", b)
		}
		c.call("GET", "/api/v1/jobs/"+held.ID+"?wait=1", key, nil, nil, 200)
		c.call("DELETE", "/api/v1/jobs/"+held.ID, key, nil, nil, 200)
		for _, f := range s.fakes {
			f.Release()
		}

		photo := "/api/v1/photos/" + jsonInt(job.Outputs[0].PhotoID)
		c.call("GET", "/api/v1/photos?user_id="+user+"&limit=5", key, nil, nil, 200)
		c.call("GET", photo, key, nil, nil, 200)
		c.call("DELETE", photo, key, nil, nil, 204)
		c.call("GET", photo, key, nil, nil, 404)

		c.call("GET", "/api/v1/templates", key, nil, nil, 200)
		c.call("GET", "/api/v1/templates/no-such", key, nil, nil, 404)
		c.call("POST", "/api/v1/comfy/tokens", key, map[string]any{"user_id": user, "ttl": "1h"}, nil, 201)

		c.call("GET", "/api/v1/nodes", testAdminKey, nil, nil, 200)
		c.call("POST", "/api/v1/nodes/gpu-1/probe", testAdminKey, nil, nil, 200)
		c.call("PATCH", "/api/v1/nodes/gpu-2", testAdminKey, map[string]any{"max_inflight": 2}, nil, 200)
		c.call("GET", "/api/v1/models", testAdminKey, nil, nil, 200)
		c.call("GET", "/api/v1/dashboard", testAdminKey, nil, nil, 200)
		c.call("GET", "/api/v1/dashboard/jobs?limit=5", testAdminKey, nil, nil, 200)
		c.call("GET", "/api/v1/dashboard/samples", testAdminKey, nil, nil, 200)

		// Errors come in the one shape.
		c.call("POST", "/api/v1/jobs", key, `{"workflow":`, nil, 400)
		c.call("GET", "/api/v1/jobs", "", nil, nil, 401)
		c.call("GET", "/api/v1/jobs", "wrong-key", nil, nil, 401)
		c.call("GET", "/api/v1/nodes", key, nil, nil, 403)
		c.call("GET", "/api/v1/jobs/0123456789abcdef0123456789abcdef", key, nil, nil, 404)
		c.call("GET", "/api/v1/users/nobody", key, nil, nil, 404)
		c.call("POST", "/api/v1/users/"+user+"/credits", key, map[string]any{"delta": 1}, nil, 400)

		if len(c.seen) < 20 {
			t.Errorf("only %d operations checked", len(c.seen))
		}
	})
}

func jsonInt(n int64) string { b, _ := json.Marshal(n); return string(b) }

package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

const workflow = `{"3":{"class_type":"KSampler","inputs":{"seed":1,"model":["4",0]}},"4":{"class_type":"CheckpointLoaderSimple","inputs":{"ckpt_name":"x.safetensors"}}}`

func TestSubmitJSON(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
			body:   `{"frontend":"style","user_id":"u-42","workflow":` + workflow + `,"priority":7,"metadata":{"style":"ink"}}`,
			header: map[string]string{"Idempotency-Key": "order-1"}})
		expect(t, r, 202)
		var sub submitResponse
		b.decode(r, &sub)
		if sub.ID == "" || sub.State != schema.JobQueued {
			t.Fatalf("submit response: %s", r.body)
		}
		for _, field := range []string{`"id"`, `"state":"queued"`, `"position"`, `"events_url"`} {
			if !strings.Contains(string(r.body), field) {
				t.Fatalf("response lacks %s: %s", field, r.body)
			}
		}
		u, err := url.Parse(sub.EventsURL)
		if err != nil || u.Path != "/api/v1/jobs/"+sub.ID+"/events" || u.Query().Get("token") == "" {
			t.Fatalf("events_url %q", sub.EventsURL)
		}
		if fe, err := b.srv.tokens.check(u.Query().Get("token"), sub.ID); err != nil || fe != "style" {
			t.Fatalf("token: %q %v", fe, err)
		}
		calls := b.jobs.calls()
		if len(calls) != 1 {
			t.Fatalf("%d submits", len(calls))
		}
		p := calls[0].params
		if p.Frontend != "style" || p.UserID != "u-42" || p.Priority != 7 || p.IdempotencyKey != "order-1" ||
			string(p.Metadata) != `{"style":"ink"}` || len(p.Inputs) != 0 {
			t.Fatalf("params: %+v", p)
		}
		var g1, g2 any
		if json.Unmarshal(p.Workflow, &g1) != nil || json.Unmarshal([]byte(workflow), &g2) != nil || fmt.Sprint(g1) != fmt.Sprint(g2) {
			t.Fatalf("workflow: %s", p.Workflow)
		}

		// The frontend key may leave the frontend out; the query works too.
		expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":{"1":{}}}`}), 202)
		expect(t, b.do(req{method: "POST", path: "/api/v1/jobs?frontend=logo", key: adminKey, body: `{"user_id":"u","workflow":{"1":{}}}`}), 202)
		if got := b.jobs.calls()[2].params.Frontend; got != "logo" {
			t.Fatalf("admin submit went to %q", got)
		}
	})
}

func TestSubmitRefused(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		cases := []struct {
			name, body string
			header     map[string]string
			want       int
			code       string
		}{
			{"malformed json", `{"user_id":"u","workflow":{`, nil, 400, "invalid_json"},
			{"no workflow", `{"user_id":"u"}`, nil, 400, "invalid_request"},
			{"null workflow", `{"user_id":"u","workflow":null}`, nil, 400, "invalid_request"},
			{"array workflow", `{"user_id":"u","workflow":[1,2]}`, nil, 400, "invalid_request"},
			{"string workflow", `{"user_id":"u","workflow":"{}"}`, nil, 400, "invalid_request"},
			{"no user", `{"workflow":{"1":{}}}`, nil, 400, "invalid_request"},
			{"priority too high", `{"user_id":"u","workflow":{"1":{}},"priority":101}`, nil, 400, "invalid_request"},
			{"priority too low", `{"user_id":"u","workflow":{"1":{}},"priority":-101}`, nil, 400, "invalid_request"},
			{"priority not int", `{"user_id":"u","workflow":{"1":{}},"priority":1.5}`, nil, 400, "invalid_request"},
			{"metadata array", `{"user_id":"u","workflow":{"1":{}},"metadata":[1]}`, nil, 400, "invalid_request"},
			{"metadata too big", `{"user_id":"u","workflow":{"1":{}},"metadata":{"x":"` + strings.Repeat("a", schema.MaxMetadataBytes) + `"}}`, nil, 400, "invalid_request"},
			{"unknown field", `{"user_id":"u","workflow":{"1":{}},"node":"gpu-1"}`, nil, 400, "invalid_request"},
			{"bad frontend", `{"frontend":"NO","user_id":"u","workflow":{"1":{}}}`, nil, 400, "invalid_frontend"},
			{"unknown frontend", `{"frontend":"nosuch","user_id":"u","workflow":{"1":{}}}`, nil, 404, "unknown_frontend"},
			{"frontend mismatch", `{"frontend":"style","user_id":"u","workflow":{"1":{}}}`, map[string]string{}, 400, "invalid_frontend"},
			{"bad idempotency key", `{"user_id":"u","workflow":{"1":{}}}`, map[string]string{"Idempotency-Key": "a b"}, 400, "invalid_request"},
			{"xml", `<job/>`, map[string]string{"Content-Type": "application/xml"}, 415, "unsupported_media_type"},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				path := "/api/v1/jobs"
				if c.name == "frontend mismatch" {
					path += "?frontend=logo"
				}
				expect(t, b.do(req{method: "POST", path: path, key: adminKey + "", body: c.body, header: c.header}), c.want, c.code)
			})
		}
		if n := len(b.jobs.calls()); n != 0 {
			t.Fatalf("%d refused submissions reached the service", n)
		}
	})
}

func TestSubmitServiceErrors(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		cases := []struct {
			err  error
			want int
			code string
		}{
			{schema.Invalid("workflow", "node 3 links to missing node 9"), 400, "invalid_request"},
			{fmt.Errorf("charge: %w", schema.ErrInsufficientCredits), 402, "insufficient_credits"},
			{fmt.Errorf("class_type Foo: %w", schema.ErrNoNode), 503, "no_node"},
			{fmt.Errorf("%w: image too big", schema.ErrTooLarge), 413, "too_large"},
			{fmt.Errorf("%w: not an image", schema.ErrUnsupportedMedia), 415, "unsupported_media_type"},
			{fmt.Errorf("idempotency: %w", schema.ErrConflict), 409, "conflict"},
			{fmt.Errorf("database is on fire: password=hunter2"), 500, "internal"},
		}
		for _, c := range cases {
			b.jobs.SubmitFunc = func(context.Context, schema.SubmitParams) (*schema.Job, error) { return nil, c.err }
			r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":{"1":{}}}`})
			expect(t, r, c.want, c.code)
			if c.want == 500 {
				if strings.Contains(string(r.body), "hunter2") || !strings.Contains(string(r.body), `"internal error"`) {
					t.Fatalf("500 body leaks: %s", r.body)
				}
				if !strings.Contains(b.logs.String(), "hunter2") {
					t.Fatal("500 not logged")
				}
			}
			if c.err != nil && c.want == 400 && !strings.Contains(string(r.body), `"field":"workflow"`) {
				t.Fatalf("validation details missing: %s", r.body)
			}
		}
		b.jobs.SubmitFunc = func(context.Context, schema.SubmitParams) (*schema.Job, error) { panic("boom secret") }
		r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":{"1":{}}}`})
		expect(t, r, 500, "internal")
		if strings.Contains(string(r.body), "boom") || strings.Contains(string(r.body), "goroutine") {
			t.Fatalf("panic leaks: %s", r.body)
		}
	})
}

// multipartBody builds a submit form. files maps a field to name->content.
func multipartBody(t *testing.T, fields map[string]string, field string, files map[string][]byte) (string, []byte) {
	t.Helper()
	var buf bytes.Buffer
	w := multipart.NewWriter(&buf)
	for k, v := range fields {
		if err := w.WriteField(k, v); err != nil {
			t.Fatal(err)
		}
	}
	for name, data := range files {
		fw, err := w.CreateFormFile(field, name)
		if err != nil {
			t.Fatal(err)
		}
		fw.Write(data)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return w.FormDataContentType(), buf.Bytes()
}

func TestSubmitMultipart(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		send := func(ct string, body []byte) resp {
			return b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: body, header: map[string]string{"Content-Type": ct}})
		}
		fields := map[string]string{
			"frontend": "style", "user_id": "u-7", "priority": "-3",
			"workflow": `{"1":{"class_type":"LoadImage","inputs":{"image":"cat.png"}}}`,
			"metadata": `{"order":9}`,
		}
		cat, dog := pngBytes(), append(pngBytes(), 'x')
		ct, body := multipartBody(t, fields, "images", map[string][]byte{"cat.png": cat, "dog.png": dog})
		r := send(ct, body)
		expect(t, r, 202)
		calls := b.jobs.calls()
		if len(calls) != 1 {
			t.Fatalf("%d submits", len(calls))
		}
		p := calls[0]
		if p.params.Frontend != "style" || p.params.UserID != "u-7" || p.params.Priority != -3 ||
			string(p.params.Metadata) != `{"order":9}` || len(p.params.Inputs) != 2 {
			t.Fatalf("params: %+v", p.params)
		}
		if !bytes.Equal(p.files["cat.png"], cat) || !bytes.Equal(p.files["dog.png"], dog) {
			t.Fatalf("files: %v", p.files)
		}
		for _, in := range p.params.Inputs {
			if in.Size != int64(len(p.files[in.Filename])) {
				t.Fatalf("size of %s: %d", in.Filename, in.Size)
			}
		}

		big := bytes.Repeat([]byte{1}, 64<<10+1)
		refused := []struct {
			name   string
			fields map[string]string
			field  string
			files  map[string][]byte
			want   int
			code   string
		}{
			{"file over the upload limit", fields, "images", map[string][]byte{"big.png": big}, 413, "too_large"},
			{"workflow not json", map[string]string{"user_id": "u", "workflow": "{"}, "images", nil, 400, "invalid_json"},
			{"metadata not json", map[string]string{"user_id": "u", "workflow": "{}", "metadata": "x"}, "images", nil, 400, "invalid_json"},
			{"priority not a number", map[string]string{"user_id": "u", "workflow": `{"1":{}}`, "priority": "high"}, "images", nil, 400, "invalid_request"},
			{"unknown field", map[string]string{"user_id": "u", "workflow": `{"1":{}}`, "node": "x"}, "images", nil, 400, "invalid_request"},
			{"file in another field", map[string]string{"user_id": "u", "workflow": `{"1":{}}`}, "attachment", map[string][]byte{"a.png": cat}, 400, "invalid_request"},
			{"empty file", map[string]string{"user_id": "u", "workflow": `{"1":{}}`}, "images", map[string][]byte{"a.png": {}}, 400, "invalid_request"},
			{"other frontend", map[string]string{"frontend": "logo", "user_id": "u", "workflow": `{"1":{}}`}, "images", nil, 403, "forbidden"},
		}
		for _, c := range refused {
			t.Run(c.name, func(t *testing.T) {
				ct, body := multipartBody(t, c.fields, c.field, c.files)
				expect(t, send(ct, body), c.want, c.code)
			})
		}
		expect(t, send("multipart/form-data; boundary=xyz", []byte("--xyz\r\nnot a part")), 400, "invalid_multipart")
		if n := len(b.jobs.calls()); n != 1 {
			t.Fatalf("%d submissions, want only the good one", n)
		}
	})
}

// rawPost sends a request head over a raw connection, then (in the
// background, ignoring write errors) body, and returns the response: a
// server refusing a body may close before reading it all.
func rawPost(t *testing.T, base, path, head string, body []byte) *http.Response {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.WriteString(conn, "POST "+path+" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+styleKey+
		"\r\nContent-Type: application/json\r\n"+head+"\r\n"); err != nil {
		t.Fatal(err)
	}
	go conn.Write(body)
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

func TestBodyLimit(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		huge := []byte(`{"user_id":"u","workflow":{"1":{"inputs":{"x":"` + strings.Repeat("a", 1<<20) + `"}}}}`)
		for _, c := range []struct {
			name, path, head string
			body             []byte
		}{
			{"declared length", "/api/v1/jobs", fmt.Sprintf("Content-Length: %d\r\n", len(huge)), huge},
			{"user put", "/api/v1/users/big", fmt.Sprintf("Content-Length: %d\r\n", len(huge)), huge},
			{"chunked", "/api/v1/jobs", "Transfer-Encoding: chunked\r\n", append(append([]byte(fmt.Sprintf("%x\r\n", len(huge))), huge...), "\r\n0\r\n\r\n"...)},
		} {
			t.Run(c.name, func(t *testing.T) {
				res := rawPost(t, b.base, c.path, c.head, c.body)
				data, _ := io.ReadAll(res.Body)
				expect(t, resp{status: res.StatusCode, body: data}, http.StatusRequestEntityTooLarge, "too_large")
			})
		}
		if len(b.jobs.calls()) != 0 {
			t.Fatal("an oversized body reached the service")
		}
		c := b.controller("style")
		if _, err := c.UserGet(context.Background(), c.DB(), "big"); err == nil {
			t.Fatal("an oversized body created a user")
		}
	})
}

func TestJobRoutes(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		j := b.jobs.add("style", "u1", schema.JobQueued)
		done := b.jobs.add("style", "u1", schema.JobSucceeded)
		b.jobs.add("style", "u2", schema.JobQueued)
		b.jobs.add("logo", "u1", schema.JobQueued)

		r := b.do(req{method: "GET", path: "/api/v1/jobs/" + j.ID, key: styleKey})
		expect(t, r, 200)
		for _, field := range []string{`"id":"` + j.ID + `"`, `"frontend":"style"`, `"user_id":"u1"`, `"state":"queued"`, `"position"`, `"attempts"`, `"progress":null`, `"outputs"`, `"error":null`, `"created_at"`, `"dispatched_at"`, `"started_at"`, `"finished_at"`} {
			if !strings.Contains(string(r.body), field) {
				t.Fatalf("job view lacks %s: %s", field, r.body)
			}
		}
		expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/nosuch", key: styleKey}), 404, "not_found")
		expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/bad%21id", key: styleKey}), 400, "invalid_request")

		var list []schema.Job
		r = b.do(req{method: "GET", path: "/api/v1/jobs?user_id=u1", key: styleKey})
		expect(t, r, 200)
		b.decode(r, &list)
		if len(list) != 2 {
			t.Fatalf("u1 has %d jobs of style, want 2: %s", len(list), r.body)
		}
		r = b.do(req{method: "GET", path: "/api/v1/jobs?state=succeeded", key: styleKey})
		expect(t, r, 200)
		b.decode(r, &list)
		if len(list) != 1 || list[0].ID != done.ID {
			t.Fatalf("succeeded: %s", r.body)
		}
		var seen schema.JobFilter
		b.jobs.JobsFunc = func(_ context.Context, f schema.JobFilter) ([]schema.Job, error) { seen = f; return nil, nil }
		r = b.do(req{method: "GET", path: "/api/v1/jobs?user_id=u1&state=running&limit=5&before=01ABC", key: styleKey})
		expect(t, r, 200)
		if string(bytes.TrimSpace(r.body)) != "[]" {
			t.Fatalf("empty list: %s", r.body)
		}
		if seen != (schema.JobFilter{Frontend: "style", UserID: "u1", State: schema.JobRunning, Limit: 5, Before: "01ABC"}) {
			t.Fatalf("filter: %+v", seen)
		}
		for _, q := range []string{"state=done", "limit=0", "limit=1000", "before=a%2Fb"} {
			expect(t, b.do(req{method: "GET", path: "/api/v1/jobs?" + q, key: styleKey}), 400, "invalid_request")
		}

		r = b.do(req{method: "GET", path: "/api/v1/queue?job_id=" + j.ID, key: styleKey})
		expect(t, r, 200)
		var qs schema.QueueStatus
		b.decode(r, &qs)
		if qs.JobID != j.ID || qs.State != schema.JobQueued || qs.Running {
			t.Fatalf("queue: %s", r.body)
		}
		for _, field := range []string{`"job_id"`, `"state"`, `"running"`, `"ahead"`, `"progress"`} {
			if !strings.Contains(string(r.body), field) {
				t.Fatalf("queue lacks %s: %s", field, r.body)
			}
		}
		expect(t, b.do(req{method: "GET", path: "/api/v1/queue", key: styleKey}), 400, "invalid_request")

		r = b.do(req{method: "DELETE", path: "/api/v1/jobs/" + j.ID, key: styleKey})
		expect(t, r, 200)
		var cancelled schema.Job
		b.decode(r, &cancelled)
		if cancelled.State != schema.JobCancelled {
			t.Fatalf("cancel: %s", r.body)
		}
		expect(t, b.do(req{method: "DELETE", path: "/api/v1/jobs/" + done.ID, key: styleKey}), 409, "job_terminal")
	})
}

func TestOutputURLs(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		j := b.jobs.add("style", "u1", schema.JobSucceeded)
		b.jobs.JobFunc = func(ctx context.Context, fe, id string) (*schema.Job, error) {
			job, err := b.jobs.get(fe, id)
			if err != nil {
				return nil, err
			}
			job.Outputs = []schema.Output{{PhotoID: 1, Key: "style/x/0.png", ContentType: "image/png", Filename: "0.png"}}
			return job, nil
		}
		r := b.do(req{method: "GET", path: "/api/v1/jobs/" + j.ID, key: styleKey})
		expect(t, r, 200)
		var got schema.Job
		b.decode(r, &got)
		if len(got.Outputs) != 1 || !strings.HasPrefix(got.Outputs[0].URL, "http://127.0.0.1/files/style/x/0.png?") ||
			!strings.Contains(got.Outputs[0].URL, "signature=") {
			t.Fatalf("outputs: %s", r.body)
		}
	})
}

func TestNodes(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		admin := func(method, path, body string) resp {
			return b.do(req{method: method, path: path, key: adminKey, body: body})
		}
		r := admin("GET", "/api/v1/nodes", "")
		expect(t, r, 200)
		var nodes []schema.NodeView
		b.decode(r, &nodes)
		if len(nodes) != 1 || nodes[0].Name != "gpu-1" {
			t.Fatalf("nodes: %s", r.body)
		}
		r = admin("POST", "/api/v1/nodes", `{"name":"gpu-2","url":"http://10.0.0.5:8188","tags":["sdxl"],"max_inflight":2}`)
		expect(t, r, 201)
		var v schema.NodeView
		b.decode(r, &v)
		if v.Name != "gpu-2" || v.MaxInflight != 2 || len(v.Tags) != 1 {
			t.Fatalf("added: %s", r.body)
		}
		expect(t, admin("POST", "/api/v1/nodes", `{"name":"gpu-2","url":"http://10.0.0.5:8188"}`), 409, "conflict")
		for _, body := range []string{
			`{"name":"gpu 3","url":"http://10.0.0.5:8188"}`,
			`{"name":"gpu-3","url":"ftp://10.0.0.5"}`,
			`{"name":"gpu-3","url":"http://10.0.0.5:8188/api?x=1"}`,
			`{"name":"gpu-3","url":"http://user:pw@10.0.0.5:8188"}`,
			`{"name":"gpu-3","url":"http://10.0.0.5:99999"}`,
			`{"name":"gpu-3","url":"http://10.0.0.5:8188","max_inflight":0}`,
			`{"name":"gpu-3","url":"http://10.0.0.5:8188","tags":["a b"]}`,
			`{"name":"gpu-3"}`,
		} {
			expect(t, admin("POST", "/api/v1/nodes", body), 400, "invalid_request")
		}
		r = admin("POST", "/api/v1/nodes/gpu-2/drain", `{"drain":true}`)
		expect(t, r, 200)
		b.decode(r, &v)
		if v.State != schema.NodeDraining {
			t.Fatalf("drain: %s", r.body)
		}
		expect(t, admin("POST", "/api/v1/nodes/gpu-2/drain", `{}`), 400, "invalid_request")
		expect(t, admin("POST", "/api/v1/nodes/gpu-9/drain", `{"drain":false}`), 404, "not_found")
		expect(t, admin("POST", "/api/v1/nodes/gpu-2/probe", ""), 200)
		expect(t, admin("DELETE", "/api/v1/nodes/gpu-2", ""), 204)
		expect(t, admin("DELETE", "/api/v1/nodes/gpu-2", ""), 404, "not_found")

		var probed string
		b.nodes.ProbeURLFunc = func(_ context.Context, raw string) (*schema.ProbeResult, error) {
			probed = raw
			if strings.Contains(raw, "8.8.8.8") {
				return nil, fmt.Errorf("host 8.8.8.8: %w", schema.ErrForbidden)
			}
			return &schema.ProbeResult{URL: raw, PortOpen: true}, nil
		}
		r = admin("POST", "/api/v1/probe", `{"url":"http://127.0.0.1:8188"}`)
		expect(t, r, 200)
		if probed != "http://127.0.0.1:8188" || !strings.Contains(string(r.body), `"port_open":true`) {
			t.Fatalf("probe: %q %s", probed, r.body)
		}
		expect(t, admin("POST", "/api/v1/probe", `{"url":"http://8.8.8.8:80"}`), 403, "forbidden")
		expect(t, admin("POST", "/api/v1/probe", `{"url":"file:///etc/passwd"}`), 400, "invalid_request")
		expect(t, admin("POST", "/api/v1/probe", `{"url":`), 400, "invalid_json")
	})
}

func TestErrorShape(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		r := b.do(req{method: "GET", path: "/api/v1/nope", key: styleKey})
		expect(t, r, 404)
		var e struct {
			Error struct {
				Code    string         `json:"code"`
				Message string         `json:"message"`
				Details map[string]any `json:"details"`
			} `json:"error"`
		}
		b.decode(r, &e)
		if e.Error.Code != "not_found" || e.Error.Message == "" {
			t.Fatalf("error body: %s", r.body)
		}
		if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
			t.Fatalf("content type %q", ct)
		}
		r = b.do(req{method: "PATCH", path: "/api/v1/jobs", key: styleKey})
		if r.status != 405 && r.status != 404 {
			t.Fatalf("PATCH /jobs: %s", r)
		}
		if !json.Valid(r.body) {
			t.Fatalf("not JSON: %s", r.body)
		}
		io.Discard.Write(r.body)
	})
}

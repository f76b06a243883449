package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime/multipart"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// mintComfy asks for a ComfyUI API token for user with key.
func (b *bundle) mintComfy(key, body string) (tok string, r resp) {
	b.t.Helper()
	r = b.do(req{method: "POST", path: "/api/v1/comfy/tokens", key: key, body: body})
	var out struct {
		Token string `json:"token"`
	}
	_ = json.Unmarshal(r.body, &out)
	return out.Token, r
}

// Tokens: minted by a frontend key for one of its users, they open
// /comfy/u/{token}/; a changed, foreign or expired token is refused, and the
// admin key has no ComfyUI user.
func TestComfyTokenAuth(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-1","ttl":"2h"}`)
	expect(t, r, 201)
	var minted tokenResponse
	b.decode(r, &minted)
	if minted.BaseURL != b.base+"/comfy/u/"+tok || !minted.ExpiresAt.Equal(b.clock.Now().Add(2*time.Hour).Truncate(time.Second)) {
		t.Fatalf("minted %+v", minted)
	}
	expect(t, b.do(req{method: "GET", path: "/comfy/u/" + tok + "/queue"}), 200)
	expect(t, b.do(req{method: "GET", path: "/comfy/u/" + tok + "/api/queue"}), 200)
	// The token is a credential: the access log leaves it out.
	if logs := b.logs.String(); strings.Contains(logs, tok) || !strings.Contains(logs, "/comfy/u/-/api/queue") {
		t.Fatalf("access log:\n%s", logs)
	}

	// A changed signature, a changed payload, garbage, an events token.
	p64, m64, _ := strings.Cut(tok, ".")
	flipped := p64 + "." + strings.Map(func(r rune) rune {
		if r == 'A' {
			return 'B'
		}
		return 'A'
	}, m64)
	eventsTok := b.srv.tokens.mint("01JOB0001", "style")
	otherUser := b.srv.tokens.mintComfy("style", "u-2", b.clock.Now().Add(time.Hour))
	op64, _, _ := strings.Cut(otherUser, ".")
	for name, bad := range map[string]string{
		"signature": flipped, "payload": op64 + "." + m64, "garbage": "not-a-token", "events token": eventsTok,
	} {
		r := b.do(req{method: "GET", path: "/comfy/u/" + url.PathEscape(bad) + "/queue"})
		if r.status != 401 && r.status != 403 {
			t.Errorf("%s: %s", name, r)
		}
	}

	// Expired.
	short, r := b.mintComfy(styleKey, `{"user_id":"u-1","ttl":5}`)
	expect(t, r, 201)
	expect(t, b.do(req{method: "GET", path: "/comfy/u/" + short + "/queue"}), 200)
	b.clock.Advance(5 * time.Second)
	expect(t, b.do(req{method: "GET", path: "/comfy/u/" + short + "/queue"}), 401, "token_expired")

	// Keys: none, unknown, admin.
	expect(t, b.do(req{method: "GET", path: "/comfy/queue"}), 401, "unauthorized")
	expect(t, b.do(req{method: "GET", path: "/comfy/queue", key: "nope"}), 401, "unauthorized")
	expect(t, b.do(req{method: "GET", path: "/comfy/queue", key: adminKey}), 403, "forbidden")

	// Minting: user and ttl checked; a key mints for its own frontend only.
	_, r = b.mintComfy(styleKey, `{"user_id":"","ttl":"1h"}`)
	expect(t, r, 400)
	_, r = b.mintComfy(styleKey, `{"user_id":"u","ttl":"90000h"}`)
	expect(t, r, 400)
	_, r = b.mintComfy(styleKey, `{"user_id":"u","ttl":"soon"}`)
	expect(t, r, 400)
	_, r = b.mintComfy(styleKey, `{"user_id":"u","frontend":"logo"}`)
	expect(t, r, 403)
	_, r = b.mintComfy("", `{"user_id":"u"}`)
	expect(t, r, 401)
	adminTok, r := b.mintComfy(adminKey, `{"user_id":"u","frontend":"logo"}`)
	expect(t, r, 201)
	expect(t, b.do(req{method: "GET", path: "/comfy/u/" + adminTok + "/queue"}), 200)
}

// A bare frontend key posts prompts as user "comfy"; a token as its user.
// The job keeps the client id and the client-chosen prompt id, which
// /history and /queue answer to.
func TestComfyPromptUsers(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	graph := `{"1":{"class_type":"EmptyImage","inputs":{}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}`
	r := b.do(req{method: "POST", path: "/comfy/prompt", key: styleKey,
		body: `{"prompt":` + graph + `,"client_id":"c-1","extra_data":{"x":1},"number":3}`})
	expect(t, r, 200)
	var ans map[string]any
	b.decode(r, &ans)
	if _, ok := ans["number"]; !ok || !reflect.DeepEqual(ans["node_errors"], map[string]any{}) || ans["prompt_id"] == "" {
		t.Fatalf("answer %s", r.body)
	}
	firstPID := ans["prompt_id"]
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-9"}`)
	expect(t, r, 201)
	r = b.do(req{method: "POST", path: "/comfy/u/" + tok + "/prompt",
		body:   `{"prompt":` + graph + `,"client_id":"c-2","prompt_id":"5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50"}`,
		header: map[string]string{"Content-Type": "application/x-www-form-urlencoded"}})
	expect(t, r, 200)
	b.decode(r, &ans)
	if ans["prompt_id"] != "5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50" {
		t.Fatalf("client-chosen prompt id not answered: %s", r.body)
	}
	calls := b.jobs.calls()
	if len(calls) != 2 || calls[0].params.UserID != "comfy" || calls[1].params.UserID != "u-9" ||
		calls[0].params.Frontend != "style" || calls[1].params.IdempotencyKey == "" {
		t.Fatalf("submits %+v", calls)
	}
	var meta comfyMeta
	if err := json.Unmarshal(calls[1].params.Metadata, &meta); err != nil || meta.Comfy.ClientID != "c-2" ||
		meta.Comfy.PromptID != "5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50" {
		t.Fatalf("metadata %s", calls[1].params.Metadata)
	}
	// The fake keeps no metadata: give the job what Submit was given.
	for _, j := range b.jobs.jobs {
		if j.UserID == "u-9" {
			j.Metadata, j.Workflow = calls[1].params.Metadata, calls[1].params.Workflow
		}
	}
	var q struct {
		Running [][]json.RawMessage `json:"queue_running"`
		Pending [][]json.RawMessage `json:"queue_pending"`
	}
	r = b.do(req{method: "GET", path: "/comfy/u/" + tok + "/queue"})
	expect(t, r, 200)
	b.decode(r, &q)
	if len(q.Running) != 0 || len(q.Pending) != 1 || len(q.Pending[0]) != 5 ||
		string(q.Pending[0][1]) != `"5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50"` || string(q.Pending[0][4]) != `["2"]` {
		t.Fatalf("queue %s", r.body)
	}
	// Not finished: history of it is {}, as ComfyUI answers.
	r = b.do(req{method: "GET", path: "/comfy/u/" + tok + "/history/5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50"})
	expect(t, r, 200)
	if string(r.body) != "{}" {
		t.Fatalf("history of a queued prompt: %s", r.body)
	}
	// The other user's prompt is not this user's to delete.
	r = b.do(req{method: "POST", path: "/comfy/u/" + tok + "/queue", body: fmt.Sprintf(`{"delete":[%q]}`, firstPID)})
	expect(t, r, 200)
	r = b.do(req{method: "POST", path: "/comfy/queue", key: styleKey, body: `{"delete":["5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50"]}`})
	expect(t, r, 200)
	for _, j := range b.jobs.jobs {
		if j.State != schema.JobQueued {
			t.Fatalf("job %s of %s was %s by another user", j.ID, j.UserID, j.State)
		}
	}
	r = b.do(req{method: "POST", path: "/comfy/u/" + tok + "/queue", body: `{"delete":["5f0c2b9e-6a47-4a3e-9a9e-1c1f2d3e4f50"]}`})
	expect(t, r, 200)
	for _, j := range b.jobs.jobs {
		if want := map[string]schema.JobState{"u-9": schema.JobCancelled, "comfy": schema.JobQueued}[j.UserID]; j.State != want {
			t.Fatalf("job of %s is %s, want %s", j.UserID, j.State, want)
		}
	}
}

// Refused prompts are answered in ComfyUI's 400 shape (the recorded
// traces' error.type values), the farm's reasons mapped onto it.
func TestComfyPromptErrors(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	graph := `{"1":{"class_type":"NoSuchNode","inputs":{}},"3":{"class_type":"KSampler","inputs":{"steps":0}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}`
	b.jobs.SubmitFunc = func(ctx context.Context, p schema.SubmitParams) (*schema.Job, error) {
		var m comfyMeta
		_ = json.Unmarshal(p.Metadata, &m)
		switch m.Comfy.ClientID {
		case "nonode":
			return nil, fmt.Errorf("%w: no node offers all of its node classes; the closest lacks NoSuchNode", schema.ErrNoNode)
		case "range":
			return nil, schema.Invalid("workflow.3.steps", "must be at least 1")
		case "nooutput":
			return nil, schema.Invalid("workflow", "has no output node (SaveImage or similar)")
		case "credits":
			return nil, &schema.InsufficientCreditsError{Balance: 0, Change: -1}
		}
		return nil, errors.New("unexpected")
	}
	for _, tc := range []struct {
		body, errType, message string
		status                 int
		nodeErrors             []string
	}{
		{`{"client_id":"x"}`, "no_prompt", "No prompt provided", 400, nil},
		{`{"prompt":[1]}`, "invalid_prompt", "", 400, nil},
		{`{"prompt":{"1":{"inputs":{"width":8}}}}`, "invalid_prompt", "Cannot execute because a node is missing the class_type property.", 400, nil},
		{`{"prompt":` + graph + `,"client_id":"nonode"}`, "invalid_prompt", "Cannot execute because node NoSuchNode does not exist.", 400, nil},
		{`{"prompt":` + graph + `,"client_id":"range"}`, "prompt_outputs_failed_validation", "Prompt outputs failed validation", 400, []string{"3"}},
		{`{"prompt":` + graph + `,"client_id":"nooutput"}`, "prompt_no_outputs", "Prompt has no outputs", 400, nil},
		{`{"prompt":` + graph + `,"client_id":"credits"}`, "insufficient_credits", "not enough credits", 402, nil},
		{`{"prompt":` + graph + `,"client_id":" padded"}`, "invalid_prompt", "Invalid client_id", 400, nil},
		{`{"prompt":{}} {}`, "invalid_prompt", "Invalid JSON body", 400, nil},
	} {
		r := b.do(req{method: "POST", path: "/comfy/prompt", key: styleKey, body: tc.body})
		var got struct {
			Error      map[string]json.RawMessage `json:"error"`
			NodeErrors map[string]comfyNodeError  `json:"node_errors"`
		}
		if r.status != tc.status || json.Unmarshal(r.body, &got) != nil {
			t.Errorf("%s: %s", tc.body, r)
			continue
		}
		var typ, msg string
		_ = json.Unmarshal(got.Error["type"], &typ)
		_ = json.Unmarshal(got.Error["message"], &msg)
		if typ != tc.errType || tc.message != "" && msg != tc.message || got.Error["details"] == nil ||
			got.Error["extra_info"] == nil || got.NodeErrors == nil {
			t.Errorf("%s: %s", tc.body, r.body)
		}
		var ids []string
		for id, ne := range got.NodeErrors {
			ids = append(ids, id)
			if ne.ClassType != "KSampler" || len(ne.Errors) != 1 || ne.Errors[0].ExtraInfo["input_name"] != "steps" {
				t.Errorf("%s: node error %+v", tc.body, ne)
			}
		}
		if len(ids) != len(tc.nodeErrors) {
			t.Errorf("%s: node_errors %v, want %v", tc.body, ids, tc.nodeErrors)
		}
	}
}

// finishedJob records a succeeded job of user with one stored output per
// name, all of workflow node "9".
func (b *bundle) finishedJob(frontend, user string, names ...string) *schema.Job {
	b.t.Helper()
	j := b.jobs.add(frontend, user, schema.JobSucceeded)
	now := b.clock.Now()
	b.jobs.mu.Lock()
	defer b.jobs.mu.Unlock()
	stored := b.jobs.jobs[j.ID]
	stored.CreatedAt, stored.StartedAt, stored.FinishedAt = now, &now, &now
	stored.Workflow = json.RawMessage(`{"9":{"class_type":"SaveImage","inputs":{}}}`)
	for i, n := range names {
		key := fmt.Sprintf("%s/%s/%d.png", frontend, j.ID, i)
		data := []byte("png of " + j.ID + " " + n)
		if err := b.store.Put(context.Background(), key, bytes.NewReader(data), int64(len(data)), "image/png"); err != nil {
			b.t.Fatal(err)
		}
		stored.Outputs = append(stored.Outputs, schema.Output{Key: key, Filename: n, NodeID: "9", ContentType: "image/png", Bytes: int64(len(data))})
	}
	c := *stored
	return &c
}

// /view serves only outputs of the caller's own jobs, by the names history
// gives; nothing it is sent reaches the file system.
func TestComfyViewOnlyOwnOutputs(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-1"}`)
	expect(t, r, 201)
	mine := b.finishedJob("style", "u-1", "ComfyUI_00001_.png", "ComfyUI_00001_.png")
	other := b.finishedJob("style", "u-2", "ComfyUI_00002_.png")
	logo := b.finishedJob("logo", "u-1", "ComfyUI_00003_.png")

	// History names the outputs; two of one name are told apart.
	r = b.do(req{method: "GET", path: "/comfy/u/" + tok + "/history/" + mine.ID})
	expect(t, r, 200)
	var h map[string]struct {
		Outputs map[string]map[string][]outputRef `json:"outputs"`
		Status  struct {
			StatusStr string            `json:"status_str"`
			Completed bool              `json:"completed"`
			Messages  []json.RawMessage `json:"messages"`
		} `json:"status"`
		Prompt []json.RawMessage `json:"prompt"`
	}
	b.decode(r, &h)
	entry := h[mine.ID]
	refs := entry.Outputs["9"]["images"]
	if len(refs) != 2 || refs[0].Filename == refs[1].Filename || refs[0].Subfolder != mine.ID || refs[0].Type != "output" ||
		entry.Status.StatusStr != "success" || !entry.Status.Completed || len(entry.Status.Messages) != 3 || len(entry.Prompt) != 5 {
		t.Fatalf("history %s", r.body)
	}
	view := func(base string, q url.Values) resp {
		return b.do(req{method: "GET", path: base + "/view?" + q.Encode()})
	}
	base := "/comfy/u/" + tok
	for i, ref := range refs {
		r := view(base, url.Values{"filename": {ref.Filename}, "subfolder": {ref.Subfolder}, "type": {ref.Type}})
		expect(t, r, 200)
		if want := "png of " + mine.ID + " ComfyUI_00001_.png"; string(r.body) != want || r.header.Get("Content-Type") != "image/png" {
			t.Fatalf("output %d: %q %v", i, r.body, r.header)
		}
	}
	// ComfyUI's " [output]" suffix names the type.
	expect(t, view(base, url.Values{"filename": {refs[0].Filename + " [output]"}, "subfolder": {mine.ID}}), 200)

	for name, tc := range map[string]struct {
		q      url.Values
		status int
	}{
		"another user's job":     {url.Values{"filename": {"ComfyUI_00002_.png"}, "subfolder": {other.ID}}, 404},
		"another frontend's job": {url.Values{"filename": {"ComfyUI_00003_.png"}, "subfolder": {logo.ID}}, 404},
		"no such name":           {url.Values{"filename": {"ComfyUI_00009_.png"}, "subfolder": {mine.ID}}, 404},
		"no subfolder":           {url.Values{"filename": {refs[0].Filename}}, 404},
		"input type":             {url.Values{"filename": {refs[0].Filename}, "subfolder": {mine.ID}, "type": {"input"}}, 404},
		"temp type":              {url.Values{"filename": {refs[0].Filename}, "subfolder": {mine.ID}, "type": {"temp"}}, 404},
		"other type":             {url.Values{"filename": {refs[0].Filename}, "subfolder": {mine.ID}, "type": {"models"}}, 400},
		"no filename":            {url.Values{"subfolder": {mine.ID}}, 404},
		"dot dot filename":       {url.Values{"filename": {"../../comfyfarm.db"}, "subfolder": {mine.ID}}, 400},
		"absolute filename":      {url.Values{"filename": {"/etc/passwd"}}, 400},
		"backslash filename":     {url.Values{"filename": {`..\x.png`}, "subfolder": {mine.ID}}, 400},
		"dot dot subfolder":      {url.Values{"filename": {"x.png"}, "subfolder": {"../style"}}, 403},
		"absolute subfolder":     {url.Values{"filename": {"x.png"}, "subfolder": {"/tmp"}}, 403},
		"object key as name":     {url.Values{"filename": {mine.Outputs[0].Key}, "subfolder": {mine.ID}}, 404},
	} {
		if r := view(base, tc.q); r.status != tc.status {
			t.Errorf("%s: %s", name, r)
		}
	}
	// The bare key is user "comfy": u-1's outputs are not its.
	r = b.do(req{method: "GET", path: "/comfy/view?" + url.Values{"filename": {refs[0].Filename}, "subfolder": {mine.ID}}.Encode(), key: styleKey})
	expect(t, r, 404)
}

// fakeCatalogue is a ComfyCatalogue for server tests.
type fakeCatalogue struct {
	*fakeNodes
	classes map[string]json.RawMessage
	calls   int
}

func (f *fakeCatalogue) ObjectInfo(context.Context) (map[string]json.RawMessage, error) {
	f.calls++
	return f.classes, nil
}

func (f *fakeCatalogue) SystemStats(context.Context) (json.RawMessage, error) {
	return json.RawMessage(`{"system":{"os":"linux","comfyui_version":"0.8.0"},"devices":[{"name":"cuda:0"}]}`), nil
}

// object_info passes the farm's catalogue on (one class or all, {} for an
// unknown one, read again after the cache time); system_stats carries the
// farm's version.
func TestComfyObjectInfoAndSystemStats(t *testing.T) {
	cat := &fakeCatalogue{classes: map[string]json.RawMessage{
		"SaveImage": json.RawMessage(`{"name":"SaveImage","output_node":true}`),
		"OnlyOnB":   json.RawMessage(`{"name":"OnlyOnB"}`),
	}}
	b := setup(t, dbtest.SQLite(t), func(_ *Config, d *Deps) {
		cat.fakeNodes = d.Nodes.(*fakeNodes)
		d.Nodes = cat
	})
	var all map[string]json.RawMessage
	r := b.do(req{method: "GET", path: "/comfy/object_info", key: styleKey})
	expect(t, r, 200)
	b.decode(r, &all)
	if len(all) != 2 || string(all["OnlyOnB"]) != `{"name":"OnlyOnB"}` {
		t.Fatalf("object_info %s", r.body)
	}
	r = b.do(req{method: "GET", path: "/comfy/object_info/SaveImage", key: styleKey})
	expect(t, r, 200)
	if string(r.body) != `{"SaveImage":{"name":"SaveImage","output_node":true}}` {
		t.Fatalf("one class: %s", r.body)
	}
	r = b.do(req{method: "GET", path: "/comfy/object_info/Nope", key: styleKey})
	if expect(t, r, 200); string(r.body) != "{}" {
		t.Fatalf("unknown class: %s", r.body)
	}
	if cat.calls != 1 {
		t.Fatalf("catalogue read %d times within the cache time", cat.calls)
	}
	b.clock.Advance(comfyCatalogueTTL + time.Second)
	expect(t, b.do(req{method: "GET", path: "/comfy/object_info", key: styleKey}), 200)
	if cat.calls != 2 {
		t.Fatalf("catalogue read %d times after the cache time", cat.calls)
	}
	var stats struct {
		System  map[string]any `json:"system"`
		Devices []any          `json:"devices"`
	}
	r = b.do(req{method: "GET", path: "/comfy/system_stats", key: styleKey})
	expect(t, r, 200)
	b.decode(r, &stats)
	if stats.System["comfyfarm_version"] != "test" || stats.System["comfyui_version"] != "0.8.0" || len(stats.Devices) != 1 {
		t.Fatalf("system_stats %s", r.body)
	}
	// Without a catalogue: 503.
	b2 := setup(t, dbtest.SQLite(t))
	expect(t, b2.do(req{method: "GET", path: "/comfy/object_info", key: styleKey}), 503)
}

// The socket relays a prompt's farm events as ComfyUI's messages, in
// ComfyUI's order, ending with executing null; its executed output names a
// file /view serves.
func TestComfyWebSocketMessages(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	events := make(chan schema.Event, 16)
	var jobID string
	b.jobs.SubscribeFunc = func(ctx context.Context, id string, after int64, previews bool) (<-chan schema.Event, func(), error) {
		j, err := b.jobs.get("style", id)
		if err != nil {
			return nil, nil, err
		}
		jobID = id
		events <- schema.Event{Seq: 1, Type: schema.EventSnapshot, JobID: id, Job: j}
		return events, func() {}, nil
	}
	b.jobs.SubmitFunc = func(ctx context.Context, p schema.SubmitParams) (*schema.Job, error) {
		j := b.jobs.add(p.Frontend, p.UserID, schema.JobQueued)
		b.jobs.mu.Lock()
		b.jobs.jobs[j.ID].Metadata = p.Metadata
		b.jobs.mu.Unlock()
		return j, nil
	}
	wsURL := strings.Replace(b.base, "http://", "ws://", 1) + "/comfy/ws?clientId=cid-1"
	hdr := map[string][]string{"Authorization": {"Bearer " + styleKey}}
	conn, _, err := websocket.DefaultDialer.Dial(wsURL, hdr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	type msg struct {
		Type string         `json:"type"`
		Data map[string]any `json:"data"`
	}
	read := func() msg {
		t.Helper()
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		var m msg
		if err := conn.ReadJSON(&m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	first := read()
	if first.Type != "status" || first.Data["sid"] != "cid-1" {
		t.Fatalf("first frame %+v", first)
	}
	r := b.do(req{method: "POST", path: "/comfy/prompt", key: styleKey,
		body: `{"prompt":{"9":{"class_type":"SaveImage","inputs":{}}},"client_id":"cid-1","prompt_id":"p-1"}`})
	expect(t, r, 200)
	if m := read(); m.Type != "status" {
		t.Fatalf("after the prompt: %+v", m)
	}
	one, four := 1.0, 4.0
	events <- schema.Event{Seq: 2, Type: schema.EventRunning, JobID: jobID}
	events <- schema.Event{Seq: 3, Type: schema.EventProgress, JobID: jobID, NodeID: "3", Value: &one, Max: &four}
	events <- schema.Event{Seq: 4, Type: schema.EventExecuted, JobID: jobID, NodeID: "9"}
	finished := b.finishedJob("style", "comfy", "ComfyUI_00001_.png")
	b.jobs.mu.Lock()
	done := b.jobs.jobs[jobID]
	done.State, done.Outputs = schema.JobSucceeded, finished.Outputs
	b.jobs.mu.Unlock()
	events <- schema.Event{Seq: 5, Type: schema.EventSucceeded, JobID: jobID}
	close(events)

	var types []string
	var executed, progress msg
	for {
		m := read()
		types = append(types, m.Type)
		if m.Data["prompt_id"] != nil && m.Data["prompt_id"] != "p-1" {
			t.Fatalf("prompt id %v in %+v", m.Data["prompt_id"], m)
		}
		switch m.Type {
		case "executed":
			executed = m
		case "progress":
			progress = m
		}
		if m.Type == "executing" && m.Data["node"] == nil {
			break
		}
	}
	want := []string{"execution_start", "execution_cached", "executing", "progress", "executing",
		"executed", "execution_success", "status", "executing"}
	if !reflect.DeepEqual(types, want) {
		t.Fatalf("messages %v, want %v", types, want)
	}
	if progress.Data["node"] != "3" || progress.Data["value"] != 1.0 || progress.Data["max"] != 4.0 {
		t.Fatalf("progress %+v", progress)
	}
	if want := traceShapes(t, "h_progress_and_binary.json")["progress"]; !reflect.DeepEqual(keysOf(progress.Data), want) {
		t.Fatalf("progress keys %v, ComfyUI sends %v", keysOf(progress.Data), want)
	}
	out, _ := json.Marshal(executed.Data["output"])
	var refs map[string][]outputRef
	if err := json.Unmarshal(out, &refs); err != nil || len(refs["images"]) != 1 || executed.Data["node"] != "9" {
		t.Fatalf("executed %+v", executed)
	}
	ref := refs["images"][0]
	q := url.Values{"filename": {ref.Filename}, "subfolder": {ref.Subfolder}, "type": {ref.Type}}
	r = b.do(req{method: "GET", path: "/comfy/view?" + q.Encode(), key: styleKey})
	expect(t, r, 200)
}

// A prompt posted through another comfyfarm process (so this one is never
// told) reaches the client's socket too: the session finds it among the
// user's jobs, here only once it has already finished. A job of another
// client id, or one that ended before the socket opened, is not relayed.
func TestComfyWebSocketFindsPromptsPostedElsewhere(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-5"}`)
	expect(t, r, 201)
	addJob := func(client, pid string) *schema.Job {
		j := b.finishedJob("style", "u-5", "ComfyUI_00001_.png")
		b.jobs.mu.Lock()
		b.jobs.jobs[j.ID].Metadata = json.RawMessage(fmt.Sprintf(`{"comfy":{"client_id":%q,"prompt_id":%q}}`, client, pid))
		b.jobs.mu.Unlock()
		return j
	}
	addJob("cid-7", "before") // ended before the socket opened
	b.clock.Advance(time.Minute)
	wsURL := strings.Replace(b.base, "http://", "ws://", 1) + "/comfy/u/" + tok + "/ws?clientId=cid-7"
	conn, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	b.clock.Advance(time.Second)
	addJob("cid-other", "other")
	addJob("cid-7", "elsewhere")
	var got []string
	for {
		_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		var m struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		}
		if err := conn.ReadJSON(&m); err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		if pid, ok := m.Data["prompt_id"].(string); ok && pid != "elsewhere" {
			t.Fatalf("relayed prompt %q: %+v", pid, m)
		}
		got = append(got, m.Type)
		if m.Type == "executing" && m.Data["node"] == nil {
			break
		}
	}
	if !contains(got, "executed") || !contains(got, "execution_success") || got[0] != "status" {
		t.Fatalf("messages %v", got)
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// POST /interrupt cancels the caller's running job, not a pending one nor
// another user's; with a prompt_id, only that one.
func TestComfyInterrupt(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-3"}`)
	expect(t, r, 201)
	run1 := b.jobs.add("style", "u-3", schema.JobRunning)
	pending := b.jobs.add("style", "u-3", schema.JobDispatched)
	others := b.jobs.add("style", "comfy", schema.JobRunning)
	run2 := b.jobs.add("style", "u-3", schema.JobRunning)
	state := func(id string) schema.JobState {
		j, err := b.jobs.get("style", id)
		if err != nil {
			t.Fatal(err)
		}
		return j.State
	}
	expect(t, b.do(req{method: "POST", path: "/comfy/u/" + tok + "/interrupt", body: `{"prompt_id":"` + run2.ID + `"}`}), 200)
	if state(run2.ID) != schema.JobCancelled || state(run1.ID) != schema.JobRunning {
		t.Fatalf("targeted interrupt: %s %s", state(run1.ID), state(run2.ID))
	}
	expect(t, b.do(req{method: "POST", path: "/comfy/u/" + tok + "/interrupt"}), 200)
	if state(run1.ID) != schema.JobCancelled || state(pending.ID) != schema.JobDispatched || state(others.ID) != schema.JobRunning {
		t.Fatalf("interrupt: %s %s %s", state(run1.ID), state(pending.ID), state(others.ID))
	}
}

// traceShapes reads, from a recorded ComfyUI v0.8.0 trace, the keys of the
// data of each WebSocket message type (the closing executing, node null,
// as "executing_end") and of the history entry.
func traceShapes(t *testing.T, file string) map[string][]string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "comfy", "testdata", "comfy-traces-current", file))
	if err != nil {
		t.Fatal(err)
	}
	var trace struct {
		Events []struct {
			Kind   string          `json:"kind"`
			Method string          `json:"method"`
			Path   string          `json:"path"`
			Data   json.RawMessage `json:"data"`
			Body   json.RawMessage `json:"body"`
		} `json:"events"`
	}
	if err := json.Unmarshal(raw, &trace); err != nil {
		t.Fatal(err)
	}
	shapes := map[string][]string{}
	for _, e := range trace.Events {
		switch {
		case e.Kind == "ws_text":
			var m struct {
				Type string         `json:"type"`
				Data map[string]any `json:"data"`
			}
			if json.Unmarshal(e.Data, &m) == nil {
				shapes[messageShapeName(m.Type, m.Data)] = keysOf(m.Data)
			}
		case e.Kind == "http_response" && strings.HasPrefix(e.Path, "/history/"):
			var h map[string]map[string]any
			if json.Unmarshal(e.Body, &h) == nil {
				for _, entry := range h {
					shapes["history"] = keysOf(entry)
					shapes["history.status"] = keysOf(entry["status"].(map[string]any))
				}
			}
		}
	}
	return shapes
}

func messageShapeName(typ string, data map[string]any) string {
	if _, ok := data["sid"]; ok && typ == "status" {
		return "status_first"
	}
	if n, ok := data["node"]; ok && n == nil && typ == "executing" {
		return "executing_end"
	}
	return typ
}

func keysOf(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// The messages and history entries have the keys ComfyUI v0.8.0 sends
// (recorded traces: a success with progress, a runtime error, an interrupt).
func TestComfyShapesMatchTraces(t *testing.T) {
	want := traceShapes(t, "a_success_3node.json")
	for _, f := range []string{"d_runtime_error.json", "f2_interrupt.json"} {
		for k, v := range traceShapes(t, f) {
			if k == "execution_error" || k == "execution_interrupted" {
				want[k] = v
			}
		}
	}
	b := setup(t, dbtest.SQLite(t))
	got := map[string][]string{}
	for _, outcome := range []schema.JobState{schema.JobSucceeded, schema.JobFailed, schema.JobCancelled} {
		j := b.finishedJob("style", "comfy", "ComfyUI_00001_.png")
		b.jobs.mu.Lock()
		stored := b.jobs.jobs[j.ID]
		stored.State = outcome
		stored.Metadata = json.RawMessage(`{"comfy":{"client_id":"cid"}}`)
		if outcome == schema.JobFailed {
			stored.Error = &schema.JobError{Code: schema.CodeExecutionError, Message: "boom", NodeID: "2", NodeType: "ImageBlur"}
		}
		b.jobs.mu.Unlock()
		relayed := b.relayOnce(t, j.ID)
		for typ, data := range relayed {
			got[typ] = keysOf(data)
		}
		r := b.do(req{method: "GET", path: "/comfy/history/" + j.ID, key: styleKey})
		expect(t, r, 200)
		var h map[string]map[string]any
		b.decode(r, &h)
		if outcome == schema.JobSucceeded {
			got["history"] = keysOf(h[j.ID])
			got["history.status"] = keysOf(h[j.ID]["status"].(map[string]any))
		}
	}
	for _, typ := range []string{"status_first", "status", "execution_start", "execution_cached", "executing",
		"executed", "execution_success", "executing_end", "execution_error", "execution_interrupted", "history", "history.status"} {
		if !reflect.DeepEqual(got[typ], want[typ]) {
			t.Errorf("%s: keys %v, ComfyUI sends %v", typ, got[typ], want[typ])
		}
	}
}

// relayOnce opens a socket, has it follow a finished job and returns the
// data of each message type it sent (names as messageShapeName gives).
func (b *bundle) relayOnce(t *testing.T, jobID string) map[string]map[string]any {
	t.Helper()
	wsURL := strings.Replace(b.base, "http://", "ws://", 1) + "/comfy/ws?clientId=cid"
	conn, _, err := websocket.DefaultDialer.Dial(wsURL, map[string][]string{"Authorization": {"Bearer " + styleKey}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	out := map[string]map[string]any{}
	for {
		_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		var m struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		}
		if err := conn.ReadJSON(&m); err != nil {
			t.Fatalf("after %v: %v", out, err)
		}
		name := messageShapeName(m.Type, m.Data)
		out[name] = m.Data
		if name == "executing_end" && m.Data["prompt_id"] == jobID {
			return out
		}
		if name == "status_first" {
			// The session is registered before its first frame: post the
			// prompt, which Submit answers with the finished job.
			b.jobs.SubmitFunc = func(ctx context.Context, p schema.SubmitParams) (*schema.Job, error) {
				return b.jobs.get("style", jobID)
			}
			r := b.do(req{method: "POST", path: "/comfy/prompt", key: styleKey,
				body: `{"prompt":{"9":{"class_type":"SaveImage","inputs":{}}},"client_id":"cid"}`})
			expect(t, r, 200)
		}
	}
}

// An image uploaded with POST /upload/image goes with the caller's prompts
// that name it in an image input, as the job's input file; another user's
// prompt naming the same file gets nothing of it.
func TestComfyUploadImage(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-4"}`)
	expect(t, r, 201)
	upload := func(path, field, name string, data []byte) resp {
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		fw, _ := mw.CreateFormFile(field, name)
		_, _ = fw.Write(data)
		_ = mw.WriteField("overwrite", "true")
		_ = mw.Close()
		return b.do(req{method: "POST", path: path, body: body.Bytes(),
			header: map[string]string{"Content-Type": mw.FormDataContentType()}})
	}
	img := pngBytes()
	r = upload("/comfy/u/"+tok+"/upload/image", "image", "cat.png", img)
	expect(t, r, 200)
	if string(r.body) != `{"name":"cat.png","subfolder":"","type":"input"}` {
		t.Fatalf("upload answer %s", r.body)
	}
	expect(t, upload("/comfy/u/"+tok+"/upload/image", "image", "c\x01t.png", img), 400)
	expect(t, upload("/comfy/u/"+tok+"/upload/image", "file", "cat.png", img), 400)
	expect(t, upload("/comfy/u/"+tok+"/upload/image", "image", "big.png", make([]byte, 65<<10)), 413)

	graph := `{"1":{"class_type":"LoadImage","inputs":{"image":"cat.png"}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}`
	expect(t, b.do(req{method: "POST", path: "/comfy/u/" + tok + "/prompt", body: `{"prompt":` + graph + `}`}), 200)
	expect(t, b.do(req{method: "POST", path: "/comfy/prompt", key: styleKey, body: `{"prompt":` + graph + `}`}), 200)
	calls := b.jobs.calls()
	if len(calls) != 2 || !bytes.Equal(calls[0].files["cat.png"], img) || len(calls[0].files) != 1 {
		t.Fatalf("the uploader's prompt: %+v", calls)
	}
	if calls[1].params.UserID != "comfy" || len(calls[1].files) != 0 {
		t.Fatalf("another user's prompt got files: %+v", calls[1])
	}
}

// A prompt counts against the key's submit limit, whether sent with the key
// or with a token of its frontend.
func TestComfyPromptSubmitLimit(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) { c.SubmitPerMinute = 1 })
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-6"}`)
	expect(t, r, 201)
	body := `{"prompt":{"9":{"class_type":"SaveImage","inputs":{}}}}`
	expect(t, b.do(req{method: "POST", path: "/comfy/prompt", key: styleKey, body: body}), 200)
	expect(t, b.do(req{method: "POST", path: "/comfy/u/" + tok + "/prompt", body: body}), 429, "rate_limited")
	expect(t, b.do(req{method: "GET", path: "/comfy/u/" + tok + "/queue"}), 200)
}

// A frontend that submits templates only cannot send a raw graph through the
// ComfyUI-compatible API either, with its key or with a token.
func TestComfyPromptRespectsRawWorkflows(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) {
		c.RawWorkflows = map[string]bool{"style": false}
	})
	graph := `{"1":{"class_type":"EmptyImage","inputs":{}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}`
	r := b.do(req{method: "POST", path: "/comfy/prompt", key: styleKey, body: `{"prompt":` + graph + `}`})
	expect(t, r, 403, "raw_workflows_disabled")
	tok, r := b.mintComfy(styleKey, `{"user_id":"u-9"}`)
	expect(t, r, 201)
	r = b.do(req{method: "POST", path: "/comfy/u/" + tok + "/prompt", body: `{"prompt":` + graph + `}`})
	expect(t, r, 403, "raw_workflows_disabled")
	if calls := b.jobs.calls(); len(calls) != 0 {
		t.Fatalf("submitted %+v", calls)
	}
	// Another frontend is not affected.
	r = b.do(req{method: "POST", path: "/comfy/prompt", key: logoKey, body: `{"prompt":` + graph + `}`})
	expect(t, r, 200)
}

package server

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
	"github.com/comfyfarm/comfyfarm/webhook"
)

// fakeWebhooks checks URLs with real Targets and lists what it holds.
type fakeWebhooks struct {
	*webhook.Targets
	mu         sync.Mutex
	deliveries map[string][]schema.WebhookDelivery
}

func (f *fakeWebhooks) Deliveries(_ context.Context, jobID string) ([]schema.WebhookDelivery, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.deliveries[jobID], nil
}

func withWebhooks(t testing.TB) (option, *fakeWebhooks) {
	allow, err := webhook.ParseAllowList([]string{"127.0.0.1", "*.hooks.example.com"})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := webhook.DecodeSecret("style-webhook-secret-0123")
	tg, err := webhook.NewTargets(map[string]webhook.Endpoint{"style": {URL: "https://style.example.com/hook", Key: key}}, allow)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeWebhooks{Targets: tg, deliveries: map[string][]schema.WebhookDelivery{}}
	return func(_ *Config, d *Deps) { d.Webhooks = f }, f
}

func wantField(t *testing.T, r resp, field string) {
	t.Helper()
	expect(t, r, 400, "invalid_request")
	var e struct {
		Error struct {
			Details map[string]any `json:"details"`
		} `json:"error"`
	}
	if err := json.Unmarshal(r.body, &e); err != nil || e.Error.Details["field"] != field {
		t.Fatalf("error does not name %s: %s", field, r.body)
	}
}

// A job's own webhook_url is taken when its host is allowed (JSON and
// multipart), and refused with 400 naming webhook_url otherwise.
func TestSubmitWebhookURL(t *testing.T) {
	t.Parallel()
	opt, _ := withWebhooks(t)
	b := setup(t, dbtest.SQLite(t), opt)
	submit := func(frontend, key, u string) resp {
		body := fmt.Sprintf(`{"frontend":%q,"user_id":"u","workflow":{"1":{}},"webhook_url":%q}`, frontend, u)
		return b.do(req{method: "POST", path: "/api/v1/jobs", key: key, body: body})
	}
	for _, u := range []string{"http://127.0.0.1:8080/cb?t=1", "https://a.hooks.example.com/x"} {
		expect(t, submit("style", styleKey, u), 202)
		calls := b.jobs.calls()
		if got := calls[len(calls)-1].params.WebhookURL; got != u {
			t.Fatalf("webhook_url passed as %q, want %q", got, u)
		}
	}
	ct, body := multipartBody(t, map[string]string{"user_id": "u", "workflow": `{"1":{}}`, "webhook_url": "http://127.0.0.1:1/m"}, "images", nil)
	expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: body, header: map[string]string{"Content-Type": ct}}), 202)
	calls := b.jobs.calls()
	if got := calls[len(calls)-1].params.WebhookURL; got != "http://127.0.0.1:1/m" {
		t.Fatalf("multipart webhook_url passed as %q", got)
	}
	n := len(calls)
	for _, c := range []struct{ frontend, key, url string }{
		{"style", styleKey, "http://10.0.0.1/cb"},            // not allowed
		{"style", styleKey, "https://hooks.example.com/x"},   // the wildcard is for names under it
		{"style", styleKey, "ftp://127.0.0.1/x"},             // not http
		{"style", styleKey, "/relative"},                     // no host
		{"logo", logoKey, "http://127.0.0.1:8080/cb"},        // logo has no webhook secret
		{"style", styleKey, "http://127.0.0.1:8080/cb#frag"}, // fragment
	} {
		wantField(t, submit(c.frontend, c.key, c.url), "webhook_url")
	}
	if len(b.jobs.calls()) != n {
		t.Fatal("a refused webhook_url reached the job service")
	}
	// without webhooks configured every webhook_url is refused
	plain := setup(t, dbtest.SQLite(t))
	wantField(t, plain.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
		body: `{"user_id":"u","workflow":{"1":{}},"webhook_url":"http://127.0.0.1/x"}`}), "webhook_url")
}

// GET /jobs/{id}/webhooks lists a job's deliveries to its own frontend's key
// and to the admin naming the frontend; another frontend does not find it.
func TestJobWebhooksRoute(t *testing.T) {
	t.Parallel()
	opt, fw := withWebhooks(t)
	b := setup(t, dbtest.SQLite(t), opt)
	r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":{"1":{}}}`})
	expect(t, r, 202)
	var sub submitResponse
	b.decode(r, &sub)
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	fw.mu.Lock()
	fw.deliveries[sub.ID] = []schema.WebhookDelivery{{
		ID: schema.WebhookMessageID(sub.ID, schema.JobSucceeded), JobID: sub.ID, Frontend: "style", Event: schema.JobSucceeded,
		URL: "https://style.example.com/hook", State: schema.WebhookDelivered, CreatedAt: at, UpdatedAt: at,
		Attempts: []schema.WebhookAttempt{{At: at, StatusCode: 500, Error: "answered 500", DurationMS: 3}, {At: at, StatusCode: 200, DurationMS: 2}},
	}}
	fw.mu.Unlock()
	for _, path := range []string{"/api/v1/jobs/" + sub.ID + "/webhooks"} {
		r := b.do(req{method: "GET", path: path, key: styleKey})
		expect(t, r, 200)
		var list []schema.WebhookDelivery
		b.decode(r, &list)
		if len(list) != 1 || list[0].ID != "msg_"+sub.ID+"_succeeded" || len(list[0].Attempts) != 2 || list[0].Attempts[0].StatusCode != 500 {
			t.Fatalf("list: %s", r.body)
		}
	}
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/webhooks", key: logoKey}), 404)
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/webhooks", key: adminKey}), 400, "invalid_frontend")
	r = b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/webhooks?frontend=style", key: adminKey})
	expect(t, r, 200)
	// a job without deliveries: an empty list, not null
	r = b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":{"1":{}}}`})
	b.decode(r, &sub)
	r = b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/webhooks", key: styleKey})
	expect(t, r, 200)
	if string(r.body) != "[]" {
		t.Fatalf("no deliveries: %s", r.body)
	}
	expect(t, b.do(req{method: "GET", path: "/api/v1/jobs/" + sub.ID + "/webhooks"}), 401)
}

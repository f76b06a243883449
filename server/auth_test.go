package server

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

// route is one keyed route of the auth matrix. make builds a fresh request
// (creating what the route needs) each time it is called.
type route struct {
	name  string
	admin bool // admin only
	ok    int  // status with a key that may use the route
	make  func(b *bundle) req
}

var seq atomic.Int64

func uniq(prefix string) string { return fmt.Sprintf("%s-%d", prefix, seq.Add(1)) }

func keyedRoutes() []route {
	sse := map[string]string{"Accept": "text/event-stream"}
	return []route{
		{name: "submit", ok: 202, make: func(b *bundle) req {
			return req{method: "POST", path: "/api/v1/jobs?frontend=style",
				body: `{"user_id":"u1","workflow":{"1":{"class_type":"X","inputs":{}}}}`}
		}},
		{name: "job list", ok: 200, make: func(b *bundle) req {
			return req{method: "GET", path: "/api/v1/jobs?frontend=style"}
		}},
		{name: "job get", ok: 200, make: func(b *bundle) req {
			return req{method: "GET", path: "/api/v1/jobs/" + b.jobs.add("style", "u1", schema.JobQueued).ID + "?frontend=style"}
		}},
		{name: "job cancel", ok: 200, make: func(b *bundle) req {
			return req{method: "DELETE", path: "/api/v1/jobs/" + b.jobs.add("style", "u1", schema.JobQueued).ID + "?frontend=style"}
		}},
		{name: "job events", ok: 200, make: func(b *bundle) req {
			return req{method: "GET", path: "/api/v1/jobs/" + b.jobs.add("style", "u1", schema.JobQueued).ID + "/events?frontend=style", header: sse}
		}},
		{name: "queue", ok: 200, make: func(b *bundle) req {
			return req{method: "GET", path: "/api/v1/queue?frontend=style&job_id=" + b.jobs.add("style", "u1", schema.JobQueued).ID}
		}},
		{name: "photo list", ok: 200, make: func(b *bundle) req {
			return req{method: "GET", path: "/api/v1/photos?frontend=style&user_id=u1"}
		}},
		{name: "photo get", ok: 200, make: func(b *bundle) req {
			p := b.addPhoto("style", "u1", uniq("job"), 0)
			return req{method: "GET", path: fmt.Sprintf("/api/v1/photos/%d?frontend=style", p.ID)}
		}},
		{name: "photo delete", ok: 204, make: func(b *bundle) req {
			p := b.addPhoto("style", "u1", uniq("job"), 0)
			return req{method: "DELETE", path: fmt.Sprintf("/api/v1/photos/%d?frontend=style", p.ID)}
		}},
		{name: "user put", ok: 200, make: func(b *bundle) req {
			return req{method: "PUT", path: "/api/v1/users/" + uniq("u") + "?frontend=style", body: `{"nickname":"n"}`}
		}},
		{name: "user get", ok: 200, make: func(b *bundle) req {
			id := uniq("u")
			c := b.controller("style")
			if _, err := c.UserEnsure(context.Background(), c.DB(), id); err != nil {
				b.t.Fatal(err)
			}
			return req{method: "GET", path: "/api/v1/users/" + id + "?frontend=style"}
		}},
		{name: "user credits", ok: 200, make: func(b *bundle) req {
			return req{method: "POST", path: "/api/v1/users/" + uniq("u") + "/credits?frontend=style",
				body: `{"delta":5,"reason":"payment"}`, header: map[string]string{"Idempotency-Key": uniq("pay")}}
		}},
		{name: "node list", admin: true, ok: 200, make: func(b *bundle) req {
			return req{method: "GET", path: "/api/v1/nodes"}
		}},
		{name: "node add", admin: true, ok: 201, make: func(b *bundle) req {
			return req{method: "POST", path: "/api/v1/nodes", body: fmt.Sprintf(`{"name":%q,"url":"http://127.0.0.1:8189"}`, uniq("gpu"))}
		}},
		{name: "node remove", admin: true, ok: 204, make: func(b *bundle) req {
			name := uniq("gpu")
			if _, err := b.nodes.NodeAdd(context.Background(), schema.Node{Name: name, URL: "http://127.0.0.1:1"}); err != nil {
				b.t.Fatal(err)
			}
			return req{method: "DELETE", path: "/api/v1/nodes/" + name}
		}},
		{name: "node drain", admin: true, ok: 200, make: func(b *bundle) req {
			return req{method: "POST", path: "/api/v1/nodes/gpu-1/drain", body: `{"drain":true}`}
		}},
		{name: "node probe", admin: true, ok: 200, make: func(b *bundle) req {
			return req{method: "POST", path: "/api/v1/nodes/gpu-1/probe"}
		}},
		{name: "probe", admin: true, ok: 200, make: func(b *bundle) req {
			return req{method: "POST", path: "/api/v1/probe", body: `{"url":"http://127.0.0.1:8188"}`}
		}},
		{name: "dashboard data", admin: true, ok: 200, make: func(b *bundle) req {
			return req{method: "GET", path: "/api/v1/dashboard"}
		}},
	}
}

// TestAuthMatrix: every keyed route × {no key, unknown key, another
// frontend's key, the right key, the admin key}.
func TestAuthMatrix(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		for _, rt := range keyedRoutes() {
			t.Run(rt.name, func(t *testing.T) {
				b := b.with(t)
				cases := []struct {
					name, key string
					want      int
					code      string
				}{
					{"no key", "", 401, "unauthorized"},
					{"unknown key", "not-a-key", 401, "unauthorized"},
					{"other frontend key", logoKey, 403, "forbidden"},
					{"right key", styleKey, rt.ok, ""},
					{"admin key", adminKey, rt.ok, ""},
				}
				if rt.admin {
					cases[3] = struct {
						name, key string
						want      int
						code      string
					}{"frontend key", styleKey, 403, "forbidden"}
				}
				for _, c := range cases {
					r := rt.make(b)
					r.key = c.key
					got := b.do(r)
					if got.status != c.want {
						t.Fatalf("%s: status %d, want %d: %s", c.name, got.status, c.want, got.body)
					}
					if c.code != "" && got.errorCode() != c.code {
						t.Fatalf("%s: code %q, want %q", c.name, got.errorCode(), c.code)
					}
					if c.want == 401 && got.header.Get("WWW-Authenticate") == "" {
						t.Fatalf("%s: 401 without WWW-Authenticate", c.name)
					}
				}
			})
		}
	})
}

func TestAuthBearerForms(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		for _, h := range []string{"Basic " + styleKey, "Bearer", "Bearer ", styleKey, "Bearer " + styleKey + "x", "Bearer " + strings.ToUpper(styleKey)} {
			r := b.do(req{method: "GET", path: "/api/v1/photos", header: map[string]string{"Authorization": h}})
			expect(t, r, 401, "unauthorized")
		}
		r := b.do(req{method: "GET", path: "/api/v1/photos", header: map[string]string{"Authorization": "bearer " + styleKey}})
		expect(t, r, 200)
	})
}

func TestFrontendParam(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		cases := []struct {
			name, key, path string
			want            int
			code            string
		}{
			{"frontend key defaults to its frontend", styleKey, "/api/v1/photos", 200, ""},
			{"admin must name one", adminKey, "/api/v1/photos", 400, "invalid_frontend"},
			{"malformed name", adminKey, "/api/v1/photos?frontend=Style!", 400, "invalid_frontend"},
			{"malformed name, frontend key", styleKey, "/api/v1/photos?frontend=" + strings.Repeat("a", 40), 400, "invalid_frontend"},
			{"sql in name", adminKey, "/api/v1/photos?frontend=style%3Bdrop%20table%20users", 400, "invalid_frontend"},
			{"unknown frontend", adminKey, "/api/v1/photos?frontend=nosuch", 404, "unknown_frontend"},
			{"unknown frontend, frontend key", styleKey, "/api/v1/photos?frontend=nosuch", 404, "unknown_frontend"},
			{"admin for logo", adminKey, "/api/v1/photos?frontend=logo", 200, ""},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				b := b.with(t)
				expect(t, b.do(req{method: "GET", path: c.path, key: c.key}), c.want, c.code)
			})
		}
	})
}

// TestIsolation: the style frontend's key never reads or changes logo's users
// or photos, whatever it sends.
func TestIsolation(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		ctx := context.Background()
		logo := b.controller("logo")
		if _, err := logo.UserUpsert(ctx, logo.DB(), &schema.User{ExternalID: "lu", Nickname: "logo user"}); err != nil {
			t.Fatal(err)
		}
		var photos []*schema.Photo
		for i := range 3 {
			photos = append(photos, b.addPhoto("logo", "lu", "logojob", i))
		}
		logoJob := b.jobs.add("logo", "lu", schema.JobQueued)

		refused := []struct {
			name string
			r    req
			want int
		}{
			{"get user via query", req{method: "GET", path: "/api/v1/users/lu?frontend=logo"}, 403},
			{"get user in own frontend", req{method: "GET", path: "/api/v1/users/lu"}, 404},
			{"put user via query", req{method: "PUT", path: "/api/v1/users/lu?frontend=logo", body: `{"nickname":"pwned"}`}, 403},
			{"put user via body", req{method: "PUT", path: "/api/v1/users/lu", body: `{"frontend":"logo","nickname":"pwned"}`}, 403},
			{"put user query/body mismatch", req{method: "PUT", path: "/api/v1/users/lu?frontend=style", body: `{"frontend":"logo","nickname":"pwned"}`}, 400},
			{"credits via body", req{method: "POST", path: "/api/v1/users/lu/credits", body: `{"frontend":"logo","delta":-5}`, header: map[string]string{"Idempotency-Key": "k1"}}, 403},
			{"credits via query", req{method: "POST", path: "/api/v1/users/lu/credits?frontend=logo", body: `{"delta":100}`, header: map[string]string{"Idempotency-Key": "k2"}}, 403},
			{"list photos via query", req{method: "GET", path: "/api/v1/photos?frontend=logo"}, 403},
			{"get photo via query", req{method: "GET", path: fmt.Sprintf("/api/v1/photos/%d?frontend=logo", photos[0].ID)}, 403},
			{"get photo by its id", req{method: "GET", path: fmt.Sprintf("/api/v1/photos/%d", photos[0].ID)}, 404},
			{"delete photo by its id", req{method: "DELETE", path: fmt.Sprintf("/api/v1/photos/%d", photos[1].ID)}, 404},
			{"delete photo via query", req{method: "DELETE", path: fmt.Sprintf("/api/v1/photos/%d?frontend=logo", photos[2].ID)}, 403},
			{"get job", req{method: "GET", path: "/api/v1/jobs/" + logoJob.ID}, 404},
			{"get job via query", req{method: "GET", path: "/api/v1/jobs/" + logoJob.ID + "?frontend=logo"}, 403},
			{"cancel job", req{method: "DELETE", path: "/api/v1/jobs/" + logoJob.ID}, 404},
			{"submit for logo via body", req{method: "POST", path: "/api/v1/jobs", body: `{"frontend":"logo","user_id":"lu","workflow":{"1":{}}}`}, 403},
			{"events of logo job", req{method: "GET", path: "/api/v1/jobs/" + logoJob.ID + "/events", header: map[string]string{"Accept": "text/event-stream"}}, 404},
		}
		for _, c := range refused {
			t.Run(c.name, func(t *testing.T) {
				b := b.with(t)
				c.r.key = styleKey
				expect(t, b.do(c.r), c.want)
			})
		}

		// Nothing of logo's changed.
		u, err := logo.UserGet(ctx, logo.DB(), "lu")
		if err != nil {
			t.Fatal(err)
		}
		if u.Nickname != "logo user" || u.Credits != 5 || u.PhotoCount != 3 {
			t.Fatalf("logo user changed: %+v", u)
		}
		for _, p := range photos {
			if _, err := logo.PhotoGet(ctx, logo.DB(), p.ID); err != nil {
				t.Fatalf("logo photo %d: %v", p.ID, err)
			}
			if _, _, err := b.store.Open(p.ObjectKey); err != nil {
				t.Fatalf("logo object %s: %v", p.ObjectKey, err)
			}
		}
		if j, err := b.jobs.get("logo", logoJob.ID); err != nil || j.State != schema.JobQueued {
			t.Fatalf("logo job changed: %+v %v", j, err)
		}
		for _, s := range b.jobs.calls() {
			if s.params.Frontend == "logo" {
				t.Fatal("a job was submitted for logo")
			}
		}
		// style's own view of the same user id is empty.
		r := b.do(req{method: "GET", path: "/api/v1/photos?user_id=lu", key: styleKey})
		expect(t, r, 200)
		var page photoPage
		b.decode(r, &page)
		if page.Total != 0 || len(page.Photos) != 0 {
			t.Fatalf("style sees logo photos: %s", r.body)
		}
	})
}

func TestKeyring(t *testing.T) {
	k, err := newKeyring("admin-key-0123456789", map[string][]string{"style": {"s1-key-xx", "s2-key-xx"}, "logo": {"l1-key-xx"}})
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]principal{
		"admin-key-0123456789": {admin: true},
		"s1-key-xx":            {frontend: "style"},
		"s2-key-xx":            {frontend: "style"},
		"l1-key-xx":            {frontend: "logo"},
	} {
		got, ok := k.lookup(key)
		if !ok || got.admin != want.admin || got.frontend != want.frontend {
			t.Errorf("lookup(%q) = %+v, %v; want %+v", key, got, ok, want)
		}
	}
	// Each key has its own index (rate limits count per key).
	seen := map[int]bool{}
	for _, key := range []string{"admin-key-0123456789", "s1-key-xx", "s2-key-xx", "l1-key-xx"} {
		got, _ := k.lookup(key)
		if seen[got.key] {
			t.Errorf("lookup(%q): key index %d shared", key, got.key)
		}
		seen[got.key] = true
	}
	for _, key := range []string{"", "admin-key-012345678", "s1-key-x", "S1-KEY-XX"} {
		if _, ok := k.lookup(key); ok {
			t.Errorf("lookup(%q) found a principal", key)
		}
	}
	bad := []struct {
		admin string
		keys  map[string][]string
	}{
		{"", nil},
		{"a-key-0123456789", map[string][]string{"style": {"a-key-0123456789"}}},
		{"a-key-0123456789", map[string][]string{"style": {"x"}, "logo": {"x"}}},
		{"a-key-0123456789", map[string][]string{"style": {""}}},
		{"a-key-0123456789", map[string][]string{"Bad Name": {"k"}}},
	}
	for _, c := range bad {
		if _, err := newKeyring(c.admin, c.keys); err == nil {
			t.Errorf("newKeyring(%q, %v) accepted", c.admin, c.keys)
		}
	}
}

func TestNotReadyWithoutServices(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		b.srv.deps.Jobs, b.srv.deps.Nodes = nil, nil
		for _, r := range []req{
			{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":{"1":{}}}`},
			{method: "GET", path: "/api/v1/jobs/01ABC", key: styleKey},
			{method: "GET", path: "/api/v1/jobs", key: styleKey},
			{method: "GET", path: "/api/v1/queue?job_id=01ABC", key: styleKey},
			{method: "GET", path: "/api/v1/jobs/01ABC/events", key: styleKey},
			{method: "GET", path: "/api/v1/nodes", key: adminKey},
			{method: "POST", path: "/api/v1/probe", key: adminKey, body: `{"url":"http://127.0.0.1:1"}`},
		} {
			expect(t, b.do(r), http.StatusServiceUnavailable, "not_ready")
		}
		// Users and photos do not need the farm.
		expect(t, b.do(req{method: "GET", path: "/api/v1/photos", key: styleKey}), 200)
	})
}

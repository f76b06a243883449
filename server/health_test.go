package server

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

func TestHealth(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		r := b.do(req{method: "GET", path: "/healthz"})
		expect(t, r, 200)
		if !strings.Contains(string(r.body), `"status":"ok"`) {
			t.Fatalf("healthz: %s", r.body)
		}
		r = b.do(req{method: "GET", path: "/readyz"})
		expect(t, r, 200)
		for _, check := range []string{`"frontends":"ok"`, `"control_db":"ok"`, `"storage":"ok"`} {
			if !strings.Contains(string(r.body), check) {
				t.Fatalf("readyz lacks %s: %s", check, r.body)
			}
		}
	})
}

func TestReadyzFailing(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), func(_ *Config, d *Deps) {
		d.Control = PingFunc(func(context.Context) error { return errors.New("dial tcp 10.1.2.3:3306: secret detail") })
	})
	r := b.do(req{method: "GET", path: "/readyz"})
	expect(t, r, 503, "not_ready")
	if !strings.Contains(string(r.body), `"control_db":"failed"`) || strings.Contains(string(r.body), "secret detail") {
		t.Fatalf("readyz: %s", r.body)
	}
	if !strings.Contains(b.logs.String(), "secret detail") {
		t.Fatal("the reason is not logged")
	}

	// A frontend database that is gone.
	b2 := setup(t, dbtest.SQLite(t))
	if err := b2.controller("logo").DB().Close(); err != nil {
		t.Fatal(err)
	}
	r = b2.do(req{method: "GET", path: "/readyz"})
	expect(t, r, 503, "not_ready")
	if !strings.Contains(string(r.body), `"frontends":"failed"`) {
		t.Fatalf("readyz: %s", r.body)
	}
}

func TestMetrics(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	expect(t, b.do(req{method: "GET", path: "/api/v1/users/m1", key: styleKey}), 404)
	expect(t, b.do(req{method: "GET", path: "/api/v1/users/m2", key: styleKey}), 404)
	expect(t, b.do(req{method: "GET", path: "/no/such/route/123"}), 404)
	r := b.do(req{method: "GET", path: "/metrics"})
	expect(t, r, 200)
	body := string(r.body)
	for _, want := range []string{
		`comfyfarm_http_requests_total{method="GET",route="/api/v1/users/:id",status="404"} 2`,
		`comfyfarm_http_requests_total{method="GET",route="unmatched",status="404"} 1`,
		`comfyfarm_http_request_duration_seconds_bucket{method="GET",route="/api/v1/users/:id",status="404",le="+Inf"} 2`,
		`comfyfarm_event_streams`,
	} {
		if !strings.Contains(body, want) {
			t.Fatalf("metrics lack %s:\n%s", want, body)
		}
	}
	if strings.Contains(body, "m1") || strings.Contains(body, "/no/such") {
		t.Fatal("raw paths in metric labels")
	}
}

func TestMetricsKey(t *testing.T) {
	const metricsKey = "metrics-key-0123456789"
	b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) { c.MetricsKey = metricsKey })
	expect(t, b.do(req{method: "GET", path: "/metrics"}), 401, "unauthorized")
	expect(t, b.do(req{method: "GET", path: "/metrics", key: "metrics-key-wrong-0000"}), 401, "unauthorized")
	expect(t, b.do(req{method: "GET", path: "/metrics", key: styleKey}), 401, "unauthorized")
	for _, key := range []string{metricsKey, adminKey} {
		r := b.do(req{method: "GET", path: "/metrics", key: key})
		expect(t, r, 200)
		if !strings.Contains(string(r.body), "comfyfarm_http_requests_total") {
			t.Fatalf("metrics with %s: %s", key, r.body)
		}
	}
	// The metrics key is no API key.
	expect(t, b.do(req{method: "GET", path: "/api/v1/nodes", key: metricsKey}), 401, "unauthorized")
	expect(t, b.do(req{method: "GET", path: "/api/v1/users/u1?frontend=style", key: metricsKey}), 401, "unauthorized")
}

func TestDashboard(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	r := b.do(req{method: "GET", path: "/dashboard"})
	expect(t, r, 200)
	if !strings.HasPrefix(r.header.Get("Content-Type"), "text/html") || !strings.Contains(string(r.body), "/dashboard/assets/app.js") {
		t.Fatalf("dashboard page: %v", r.header)
	}
	script := b.do(req{method: "GET", path: "/dashboard/assets/app.js"})
	expect(t, script, 200)
	if !strings.Contains(string(script.body), "sessionStorage") || !strings.Contains(string(script.body), "/api/v1/dashboard") {
		t.Fatalf("dashboard script: %v", script.header)
	}
	if strings.Contains(string(r.body), adminKey) || strings.Contains(string(script.body), adminKey) {
		t.Fatal("the page holds the key")
	}
	b.jobs.add("style", "u", schema.JobQueued)
	b.jobs.add("style", "u", schema.JobRunning)
	b.jobs.add("logo", "u", schema.JobQueued)
	r = b.do(req{method: "GET", path: "/api/v1/dashboard", key: adminKey})
	expect(t, r, 200)
	var v dashboardView
	b.decode(r, &v)
	if len(v.Nodes) != 1 || v.Jobs["style"][schema.JobQueued] != 1 || v.Jobs["style"][schema.JobRunning] != 1 ||
		v.Jobs["logo"][schema.JobQueued] != 1 || v.Capped {
		t.Fatalf("dashboard data: %s", r.body)
	}
	expect(t, b.do(req{method: "GET", path: "/api/v1/dashboard", key: styleKey}), 403)

	// A JobService that counts is asked instead.
	counted := &countingJobs{fakeJobs: b.jobs}
	b2 := setup(t, dbtest.SQLite(t), func(_ *Config, d *Deps) { d.Jobs = counted })
	r = b2.do(req{method: "GET", path: "/api/v1/dashboard", key: adminKey})
	expect(t, r, 200)
	var v2 dashboardView
	b2.decode(r, &v2)
	if v2.Jobs["style"][schema.JobSucceeded] != 42 || v2.Jobs["retired"][schema.JobFailed] != 1 ||
		v2.Jobs["logo"] == nil || v2.Jobs["logo"][schema.JobQueued] != 0 || len(v2.Jobs["logo"]) != len(schema.JobStates) {
		t.Fatalf("counts: %s", r.body)
	}
}

type countingJobs struct{ *fakeJobs }

func (countingJobs) JobCounts(context.Context) (map[string]map[schema.JobState]int, error) {
	return map[string]map[schema.JobState]int{
		"style":   {schema.JobSucceeded: 42},
		"retired": {schema.JobFailed: 1}, // a frontend no longer configured
	}, nil
}

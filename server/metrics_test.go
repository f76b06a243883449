package server

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
)

// scrape reads /metrics and parses it; the scrape must answer 200.
func scrape(t *testing.T, b *bundle) map[string]*dto.MetricFamily {
	t.Helper()
	r := b.do(req{method: "GET", path: "/metrics"})
	expect(t, r, 200)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(r.body))
	if err != nil {
		t.Fatalf("parse metrics: %v\n%s", err, r.body)
	}
	return fams
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// The reproduction: a PUT, then a GET on the same connection, then a
// scrape. Method labels kept as views of fasthttp's request buffer read
// "GETT" and the scrape failed with duplicate series.
func TestMetricsAfterPutThenGet(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	expect(t, b.do(req{method: "PUT", path: "/api/v1/users/u-7", key: styleKey, body: map[string]any{"nickname": "seven"}}), 200)
	expect(t, b.do(req{method: "GET", path: "/api/v1/users/u-7", key: styleKey}), 200)
	fams := scrape(t, b)
	got := map[string]float64{}
	for _, m := range fams["comfyfarm_http_requests_total"].GetMetric() {
		got[label(m, "method")+" "+label(m, "route")+" "+label(m, "status")] += m.GetCounter().GetValue()
	}
	want := map[string]float64{"PUT /api/v1/users/:id 200": 1, "GET /api/v1/users/:id 200": 1}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
	if len(got) != len(want) {
		t.Errorf("series %v, want %v", got, want)
	}
}

// TestMetricsMixedTraffic sends 10,000 requests of every method to 20 routes
// (and unmatched paths) over keep-alive connections, then scrapes: 200, the
// request counter sums to exactly what was sent, and every label is a real
// method name and a real route pattern.
func TestMetricsMixedTraffic(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	job := b.jobs.add("style", "u-1", "running")
	photo := b.addPhoto("style", "u-1", job.ID, 0)
	fileURL := func() string {
		raw, err := b.store.URL(t.Context(), photo.ObjectKey)
		if err != nil {
			t.Fatal(err)
		}
		return raw[len("http://127.0.0.1"):]
	}()
	methods := []string{"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"}
	paths := []string{
		"/healthz",
		"/readyz",
		fileURL,
		"/dashboard",
		"/api/v1/jobs/" + job.ID + "/events",
		"/api/v1/jobs",
		"/api/v1/jobs/" + job.ID,
		"/api/v1/queue?job_id=" + job.ID,
		"/api/v1/photos?user_id=u-1",
		fmt.Sprintf("/api/v1/photos/%d", photo.ID),
		"/api/v1/users/u-7",
		"/api/v1/users/u-7/credits",
		"/api/v1/nodes",
		"/api/v1/nodes/gpu-9",
		"/api/v1/nodes/gpu-9/drain",
		"/api/v1/nodes/gpu-9/probe",
		"/api/v1/probe",
		"/api/v1/dashboard",
		"/no/such/route",
		"/api/v1/nothing/here/at/all",
	}
	keys := []string{styleKey, adminKey, logoKey, ""}
	bodies := []string{"", `{"nickname":"n"}`, `{"delta":1,"reason":"r"}`, `{`}

	const total, conns = 10000, 4
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for w := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.Dial("tcp", strings.TrimPrefix(b.base, "http://"))
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			br := bufio.NewReader(conn)
			for i := w; i < total; i += conns {
				method := methods[i%len(methods)]
				path := paths[(i/len(methods))%len(paths)]
				var buf bytes.Buffer
				fmt.Fprintf(&buf, "%s %s HTTP/1.1\r\nHost: test\r\n", method, path)
				if k := keys[i%len(keys)]; k != "" {
					fmt.Fprintf(&buf, "Authorization: Bearer %s\r\n", k)
				}
				if i%5 == 0 {
					fmt.Fprintf(&buf, "X-Request-Id: req-%d-%s\r\n", i, strings.Repeat("x", i%40))
				}
				body := bodies[i%len(bodies)]
				if method == "GET" || method == "HEAD" {
					body = ""
				}
				if body != "" {
					fmt.Fprintf(&buf, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
				}
				buf.WriteString("\r\n")
				buf.WriteString(body)
				if _, err := conn.Write(buf.Bytes()); err != nil {
					errs <- fmt.Errorf("request %d: %w", i, err)
					return
				}
				res, err := http.ReadResponse(br, &http.Request{Method: method})
				if err != nil {
					errs <- fmt.Errorf("request %d (%s %s): %w", i, method, path, err)
					return
				}
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if res.Close {
					errs <- fmt.Errorf("request %d (%s %s): the server closed the connection (%d)", i, method, path, res.StatusCode)
					return
				}
				if res.StatusCode >= 500 && res.StatusCode != 503 {
					errs <- fmt.Errorf("request %d (%s %s): %d", i, method, path, res.StatusCode)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	fams := scrape(t, b)
	realMethods := map[string]bool{}
	for _, m := range methods {
		realMethods[m] = true
	}
	patterns := map[string]bool{"unmatched": true}
	for _, r := range b.srv.App().GetRoutes() {
		patterns[r.Path] = true
	}
	var sum float64
	for _, m := range fams["comfyfarm_http_requests_total"].GetMetric() {
		if method := label(m, "method"); !realMethods[method] {
			t.Errorf("method label %q", method)
		}
		if route := label(m, "route"); !patterns[route] {
			t.Errorf("route label %q", route)
		}
		sum += m.GetCounter().GetValue()
	}
	if sum != total {
		t.Errorf("comfyfarm_http_requests_total sums to %v, want %d", sum, total)
	}
	var observed uint64
	for _, m := range fams["comfyfarm_http_request_duration_seconds"].GetMetric() {
		observed += m.GetHistogram().GetSampleCount()
	}
	if observed != total {
		t.Errorf("comfyfarm_http_request_duration_seconds counts %d, want %d", observed, total)
	}
}

package server

import (
	"context"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
)

// loadOpenAPI loads and validates the embedded document.
func loadOpenAPI(t *testing.T) *openapi3.T {
	t.Helper()
	doc, err := openapi3.NewLoader().LoadFromData(OpenAPI())
	if err != nil {
		t.Fatalf("load openapi.json: %v", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("openapi.json is not valid: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.1") {
		t.Fatalf("openapi %q, want 3.1.x", doc.OpenAPI)
	}
	return doc
}

var fiberParam = regexp.MustCompile(`:([A-Za-z_][A-Za-z0-9_]*)`)

// apiRoutes returns "METHOD /path" for every /api/v1 route of the router,
// with Fiber's :param written {param} as in OpenAPI.
func apiRoutes(s *Server) []string {
	seen := map[string]bool{}
	for _, r := range s.App().GetRoutes(true) {
		if !strings.HasPrefix(r.Path, "/api/v1/") {
			continue
		}
		if r.Method == http.MethodHead || r.Method == http.MethodOptions {
			continue // Fiber adds HEAD for every GET
		}
		seen[r.Method+" "+fiberParam.ReplaceAllString(r.Path, "{$1}")] = true
	}
	return sortedKeys(seen)
}

func specRoutes(doc *openapi3.T) []string {
	seen := map[string]bool{}
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			seen[method+" "+path] = true
		}
	}
	return sortedKeys(seen)
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// TestOpenAPIMatchesRouter fails when a route of the router is missing from
// openapi.json or the document names a route the router does not have.
func TestOpenAPIMatchesRouter(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	b := setup(t, dbtest.SQLite(t))
	inRouter, inSpec := apiRoutes(b.srv), specRoutes(doc)
	if len(inRouter) < 25 { // a guard against the walk finding nothing
		t.Fatalf("only %d /api/v1 routes in the router: %v", len(inRouter), inRouter)
	}
	spec := map[string]bool{}
	for _, r := range inSpec {
		spec[r] = true
	}
	router := map[string]bool{}
	for _, r := range inRouter {
		router[r] = true
		if !spec[r] {
			t.Errorf("route %s is in the router but not in openapi.json", r)
		}
	}
	for _, r := range inSpec {
		if !router[r] {
			t.Errorf("openapi.json names %s, which the router does not have", r)
		}
	}
	// Every operation answers errors in the one error shape.
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			if op.OperationID == "" {
				t.Errorf("%s %s: no operationId", method, path)
			}
			r := op.Responses.Value("401")
			if r == nil || r.Value.Content.Get("application/json") == nil ||
				r.Value.Content.Get("application/json").Schema.Ref != "#/components/schemas/Error" {
				t.Errorf("%s %s: no 401 answer with the Error schema", method, path)
			}
		}
	}
}

// TestOpenAPIServed: GET /openapi.json needs no key and answers the
// embedded document.
func TestOpenAPIServed(t *testing.T) {
	t.Parallel()
	b := setup(t, dbtest.SQLite(t))
	r := b.do(req{method: http.MethodGet, path: "/openapi.json"})
	expect(t, r, http.StatusOK)
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q", ct)
	}
	if string(r.body) != string(OpenAPI()) {
		t.Errorf("served document differs from the embedded one (%d vs %d bytes)", len(r.body), len(OpenAPI()))
	}
	if _, err := openapi3.NewLoader().LoadFromData(r.body); err != nil {
		t.Errorf("served document does not load: %v", err)
	}
}

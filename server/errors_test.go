package server

import (
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// TestSentinelMessagesClean: whatever a sentinel was wrapped in, the client
// reads the sentinel's own message; the chain is not in it.
func TestSentinelMessagesClean(t *testing.T) {
	for _, s := range sentinels {
		t.Run(s.code, func(t *testing.T) {
			err := fmt.Errorf("style: credits of cu2: %w", fmt.Errorf("%w: the closest lacks CustomA", s.err))
			ae := classify(err)
			if ae.Status != s.status || ae.Code != s.code {
				t.Fatalf("%d %s, want %d %s", ae.Status, ae.Code, s.status, s.code)
			}
			if ae.Message != s.message || strings.Contains(ae.Message, "style") || strings.Contains(ae.Message, ": ") {
				t.Fatalf("message %q, want %q", ae.Message, s.message)
			}
			for k, v := range ae.Details {
				if strings.Contains(fmt.Sprint(v), "style") || strings.Contains(fmt.Sprint(v), "cu2") {
					t.Fatalf("details.%s = %q carries the internal chain", k, v)
				}
			}
			if got, _ := ae.Details["reason"].(string); s.reason && got != "the closest lacks CustomA" {
				t.Fatalf("details.reason %q", got)
			}
		})
	}
	ae := classify(fmt.Errorf("style: charge job: %w", &schema.InsufficientCreditsError{Balance: 3, Change: -5}))
	if ae.Status != 402 || ae.Message != "not enough credits" || ae.Details["balance"] != int64(3) || ae.Details["cost"] != int64(5) {
		t.Fatalf("credits: %d %q %v", ae.Status, ae.Message, ae.Details)
	}
}

// TestErrorChainsStayInTheLog: real requests whose errors come wrapped from
// the controllers answer with a clean message and details; the chain is in
// the access log.
func TestErrorChainsStayInTheLog(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		b := setup(t, cfg)
		type body struct {
			Error struct {
				Code    string         `json:"code"`
				Message string         `json:"message"`
				Details map[string]any `json:"details"`
			} `json:"error"`
		}
		r := b.do(req{method: "POST", path: "/api/v1/users/cu2/credits", key: styleKey, body: `{"delta":-5,"reason":"style"}`, header: map[string]string{"Idempotency-Key": "spend-1"}})
		expect(t, r, 402, "insufficient_credits")
		var e body
		b.decode(r, &e)
		if e.Error.Message != "not enough credits" || e.Error.Details["balance"] != 3.0 || e.Error.Details["cost"] != 5.0 || len(e.Error.Details) != 2 {
			t.Fatalf("402 body: %s", r.body)
		}

		r = b.do(req{method: "GET", path: "/api/v1/users/nobody", key: logoKey})
		expect(t, r, 404, "not_found")
		e = body{}
		b.decode(r, &e)
		if e.Error.Message != "not found" {
			t.Fatalf("404 body: %s", r.body)
		}
		logs := b.logs.String()
		if !strings.Contains(logs, "balance 3, change -5") || !strings.Contains(logs, "get user") {
			t.Fatalf("the chains are not in the log:\n%s", logs)
		}
	})
}

// A submit no node can run is 503 no_node, and the details name what is
// missing: the values by input name, or the requirement nobody meets.
func TestClassifyNoNodeDetails(t *testing.T) {
	err := fmt.Errorf("submit: %w", &schema.NoNodeError{Reason: "no node offers ckpt_name flux-dev.safetensors",
		Missing: map[string][]string{"ckpt_name": {"flux-dev.safetensors"}}})
	e := classify(err)
	if e.Status != http.StatusServiceUnavailable || e.Code != "no_node" {
		t.Fatalf("%d %s", e.Status, e.Code)
	}
	if got := e.Details["missing"]; !reflect.DeepEqual(got, map[string][]string{"ckpt_name": {"flux-dev.safetensors"}}) {
		t.Errorf("details.missing = %v", got)
	}
	e = classify(&schema.NoNodeError{Reason: "no registered node meets the requirements", Requirements: &schema.Requirements{Tags: []string{"sdxl"}}})
	if e.Details["requirements"] == nil || e.Details["reason"] == nil {
		t.Errorf("details = %v", e.Details)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
)

// The browser example docs/examples/follow.html, served from another origin
// as a frontend would, follows a job with EventSource and the token of its
// events_url alone, and shows it finishing with its image.
func TestFollowExampleInBrowser(t *testing.T) {
	bin := chromium(t)
	examples, err := filepath.Abs(filepath.Join("..", "..", "docs", "examples"))
	if err != nil {
		t.Fatal(err)
	}
	s := startStack(t, dbtest.SQLite(t))
	page := httptest.NewServer(http.FileServer(http.Dir(examples)))
	t.Cleanup(page.Close)

	// The nodes wait until the page follows the job, so the page sees it
	// queued first and then every step to the end.
	for _, f := range s.fakes {
		f.Hold()
	}
	body, _ := json.Marshal(map[string]any{"user_id": "u-page", "workflow": json.RawMessage(oaWorkflow)})
	res, b := s.do("POST", "/api/v1/jobs", "style-key", bytes.NewReader(body), "application/json")
	if res.StatusCode != http.StatusAccepted {
		t.Fatalf("submit: %d %s", res.StatusCode, b)
	}
	var sub struct {
		ID        string `json:"id"`
		EventsURL string `json:"events_url"`
	}
	if err := json.Unmarshal(b, &sub); err != nil || !strings.Contains(sub.EventsURL, "token=") {
		t.Fatalf("submit answer %s", b)
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(bin), chromedp.NoSandbox)
	actx, acancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(acancel)
	bctx, bcancel := chromedp.NewContext(actx, chromedp.WithErrorf(t.Logf))
	t.Cleanup(bcancel)
	ctx, cancel := context.WithTimeout(bctx, 60*time.Second)
	defer cancel()

	q := url.Values{"base": {s.base}, "events": {sub.EventsURL}}
	if err := chromedp.Do(ctx,
		chromedp.Navigate(page.URL+"/follow.html?"+q.Encode()),
		chromedp.WaitVisible(chromedp.CSS(`body[data-state="queued"], body[data-state="dispatched"]`)),
	); err != nil {
		state, _ := chromedp.Run(bctx, chromedp.TextContent(chromedp.ID("state")))
		t.Fatalf("page never showed the job waiting: %v (state %q)", err, state)
	}
	for _, f := range s.fakes {
		f.Release()
	}
	if err := chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS(`body[data-state="succeeded"]`))); err != nil {
		t.Fatalf("page never showed the job finished: %v", err)
	}
	// The output image has loaded from its URL: its natural width is 64.
	width, err := chromedp.Run(ctx, chromedp.Poll[int](`(function () {
		var img = document.querySelector("#outputs img.output");
		return !!img && img.complete && img.naturalWidth;
	})()`, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(30*time.Second)))
	if err != nil || width != 64 {
		t.Fatalf("output image naturalWidth %d, %v; want 64", width, err)
	}
	jobID, err := chromedp.Run(ctx, chromedp.TextContent(chromedp.ID("job")))
	if err != nil || jobID != sub.ID {
		t.Errorf("page shows job %q (%v), want %q", jobID, err, sub.ID)
	}
	log, err := chromedp.Run(ctx, chromedp.TextContent(chromedp.ID("log")))
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{"snapshot", "running", "progress", "succeeded"} {
		if !strings.Contains(log, " "+typ+"\n") {
			t.Errorf("page saw no %s event:\n%s", typ, log)
		}
	}
}

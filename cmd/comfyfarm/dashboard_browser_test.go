package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// quickWorkflow makes one small image without sampling.
const quickWorkflow = `{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1, "color": 3368652}},
 "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "dash", "images": ["1", 0]}}
}`

// slowWorkflow samples for as long as the fake's KSampler takes.
const slowWorkflow = `{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 200, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "dash", "images": ["8", 0]}}
}`

// chromium finds a Chromium or Chrome binary: $COMFYFARM_CHROMIUM, then the
// usual names on PATH. Without one the test is skipped, unless CI is set:
// there it must be installed (.ci/run installs it).
func chromium(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("COMFYFARM_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no Chromium found (chromium, chromium-browser, google-chrome or $COMFYFARM_CHROMIUM) and CI is set")
	}
	t.Skip("no Chromium found (install chromium or set COMFYFARM_CHROMIUM); skipped outside CI")
	return ""
}

// freeAddr picks a loopback port for a server whose public URL must name it.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// browserStack runs `comfyfarm serve` on two fake nodes whose KSampler takes
// a minute (with previews) and whose EmptyImage takes 300 ms, with the
// charts sampled every 200 ms, and a headless browser.
type browserStack struct {
	*stack
	ctx   context.Context // the browser tab
	shots string          // where screenshots go; "" when not asked for
}

func startBrowserStack(t *testing.T) *browserStack {
	bin := chromium(t)
	shots := ""
	if os.Getenv("COMFYFARM_SCREENSHOTS") == "1" {
		dir, err := filepath.Abs(filepath.Join("..", "..", "docs", "screenshots"))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		shots = dir
	}
	t.Chdir(t.TempDir())
	s := &stack{t: t, http: &http.Client{Timeout: 30 * time.Second}}
	var nodes strings.Builder
	for i := 0; i < 2; i++ {
		f := comfytest.NewServer(comfytest.Options{
			ClassTime: map[string]time.Duration{"KSampler": time.Minute, "EmptyImage": 300 * time.Millisecond},
			Previews:  true,
			VRAM:      int64(24+i*24) << 30,
		})
		t.Cleanup(f.Close)
		s.fakes = append(s.fakes, f)
		fmt.Fprintf(&nodes, "  - {name: gpu-%d, url: %q, max_inflight: %d, tags: [sdxl]}\n", i+1, f.URL(), i+1)
	}
	conf := "nodes:\n" + nodes.String() + "scheduler: {probe_interval: 100ms}\ndashboard: {sample_interval: 200ms}\n"
	if err := os.WriteFile("comfyfarm.yaml", []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	s.base = runServe(t, false, []string{"COMFYFARM_LISTEN=" + addr, "COMFYFARM_PUBLIC_URL=http://" + addr,
		"COMFYFARM_ADMIN_KEY=" + testAdminKey, "COMFYFARM_LOG_LEVEL=warn"}, "serve", "--config", "comfyfarm.yaml")
	s.waitNodes(schema.NodeUp, "gpu-1", "gpu-2")

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.NoSandbox, // tests may run as root
		chromedp.WindowSize(1440, 1000),
	)
	actx, acancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(acancel)
	bctx, bcancel := chromedp.NewContext(actx, chromedp.WithErrorf(t.Logf))
	t.Cleanup(bcancel)
	if err := chromedp.Do(bctx); err != nil { // starts the browser
		t.Fatalf("start %s: %v", bin, err)
	}
	return &browserStack{stack: s, ctx: bctx, shots: shots}
}

// waitNodes waits until the named nodes have the state.
func (s *stack) waitNodes(want schema.NodeState, names ...string) {
	s.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var views []schema.NodeView
		s.getJSON("/api/v1/nodes", testAdminKey, &views)
		n := 0
		for _, v := range views {
			for _, name := range names {
				if v.Name == name && v.State == want {
					n++
				}
			}
		}
		if n == len(names) {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("nodes %v not %s: %+v", names, want, views)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// submit queues a workflow for frontend style and returns the job id.
func (s *stack) submit(workflow, user string) string {
	s.t.Helper()
	return s.submitTo("style", workflow, user)
}

// submitTo queues a workflow with the frontend's example key.
func (s *stack) submitTo(frontend, workflow, user string) string {
	s.t.Helper()
	body, _ := json.Marshal(map[string]any{"frontend": frontend, "user_id": user, "workflow": json.RawMessage(workflow)})
	res, b := s.do("POST", "/api/v1/jobs", frontend+"-key", bytes.NewReader(body), "application/json")
	if res.StatusCode != http.StatusAccepted {
		s.t.Fatalf("submit: %d %s", res.StatusCode, b)
	}
	var sub struct{ ID string }
	if err := json.Unmarshal(b, &sub); err != nil || sub.ID == "" {
		s.t.Fatalf("submit answer %s", b)
	}
	return sub.ID
}

func (s *stack) job(id string) schema.Job {
	s.t.Helper()
	var j schema.Job
	s.getJSON("/api/v1/jobs/"+id+"?frontend=style", "style-key", &j)
	return j
}

// jobOf reads a job with the admin key.
func (s *stack) jobOf(frontend, id string) schema.Job {
	s.t.Helper()
	var j schema.Job
	s.getJSON("/api/v1/jobs/"+id+"?frontend="+frontend, testAdminKey, &j)
	return j
}

// run runs browser steps with a bound, failing the test with what failed.
func (b *browserStack) run(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
}

// until waits for a JavaScript condition on the page.
func until(cond string) chromedp.Action[chromedp.Void] {
	return chromedp.Poll[chromedp.Void](cond, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(45*time.Second))
}

// screenshot saves the page as docs/screenshots/<name>.png when
// COMFYFARM_SCREENSHOTS=1.
func (b *browserStack) screenshot(name string) {
	b.t.Helper()
	if b.shots == "" {
		return
	}
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(b.shots, name+".png"), png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

func openHash(hash string) chromedp.Action[chromedp.Void] {
	return chromedp.Evaluate[chromedp.Void](fmt.Sprintf("location.hash = %q", hash))
}

// The dashboard in a real headless Chromium: sign in with the admin key,
// read a finished job's thumbnail, cancel a running job from its page, drain
// a node with its button, add a node with the form, set its max in flight
// and remove it.
func TestDashboardBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a browser")
	}
	b := startBrowserStack(t)

	b.run("sign in",
		chromedp.Navigate(b.base+"/dashboard"),
		chromedp.WaitVisible(chromedp.ID("key")),
		chromedp.SendKeys(chromedp.ID("key"), testAdminKey),
		chromedp.Click(chromedp.CSS("#loginform button[type=submit]")),
		chromedp.WaitVisible(chromedp.CSS(`#nodes tr[data-node="gpu-2"]`)),
		until(`sessionStorage.getItem("comfyfarm_admin_key") === `+fmt.Sprintf("%q", testAdminKey)),
		until(`document.getElementById("login").hidden`),
	)

	// A finished job's page shows its output as a loaded thumbnail.
	quick := b.submit(quickWorkflow, "u-dash")
	deadline := time.Now().Add(60 * time.Second)
	for b.job(quick).State != schema.JobSucceeded {
		if time.Now().After(deadline) {
			t.Fatalf("quick job: %+v", b.job(quick))
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.run("open the finished job",
		openHash("#/jobs/style/"+quick),
		chromedp.WaitVisible(chromedp.ID("job-outputs-box")),
		until(`document.getElementById("job-state").textContent === "succeeded"`),
		until(`document.getElementById("job-cancel").disabled`),
		until(`document.getElementById("job-stream").textContent === "(finished)"`),
	)
	// The image has loaded: its natural width is the output's, 96.
	width, err := chromedp.Run(b.ctx, chromedp.Poll[int](`(function () {
		var img = document.querySelector("#job-outputs img");
		return !!img && img.complete && img.naturalWidth;
	})()`, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(45*time.Second)))
	if err != nil || width != 96 {
		t.Fatalf("thumbnail naturalWidth %d, %v; want 96", width, err)
	}
	if b.shots != "" {
		b.activity()
		b.run("reopen the finished job", openHash("#/jobs/style/"+quick), until(`document.querySelector("#job-outputs img") && document.querySelector("#job-outputs img").naturalWidth > 0`))
		b.screenshot("dashboard-job-finished")
	}

	// A running job is cancelled from its page.
	slow := b.submit(slowWorkflow, "u-dash")
	b.run("open the running job",
		openHash("#/jobs/style/"+slow),
		until(`document.getElementById("job-state").textContent === "running"`),
		until(`!document.getElementById("job-progress-row").hidden && document.getElementById("job-progress").value > 0`),
		until(`!document.getElementById("job-preview-fig").hidden && document.getElementById("job-preview").naturalWidth > 0`),
		until(`!document.getElementById("job-cancel").disabled`),
	)
	if j := b.job(slow); j.State != schema.JobRunning {
		t.Fatalf("slow job %s before cancel", j.State)
	}
	if b.shots != "" {
		b.run("some progress to show", until(`document.getElementById("job-progress").value >= 5`))
		b.screenshot("dashboard-job")
	}
	b.run("cancel it",
		chromedp.Click(chromedp.ID("job-cancel")),
		until(`document.getElementById("job-state").textContent === "cancelled"`),
		until(`Array.prototype.some.call(document.querySelectorAll("#job-events li"), function (li) { return / cancelled$/.test(li.textContent); })`),
	)
	if j := b.job(slow); j.State != schema.JobCancelled {
		t.Fatalf("after the cancel button the job is %s", j.State)
	}

	// The job list shows both, newest first.
	b.run("job list",
		openHash("#/jobs"),
		until(`document.querySelectorAll("#jobs tr a").length >= 2`),
		until(`document.querySelector("#jobs tr a").textContent === `+fmt.Sprintf("%q", slow)),
	)
	b.screenshot("dashboard-jobs")

	// Drain a node with its button.
	b.run("drain gpu-1",
		openHash("#/"),
		chromedp.WaitVisible(chromedp.CSS(`button[aria-label="Drain gpu-1"]`)),
		// What the node offers, from its catalogue.
		until(`/\d+ checkpoints · \d+ LoRAs · \d+ custom node packs/.test(document.querySelector('#nodes tr[data-node="gpu-1"]').textContent)`),
		chromedp.Click(chromedp.CSS(`button[aria-label="Drain gpu-1"]`)),
		until(`document.querySelector('#nodes tr[data-node="gpu-1"] td[data-field="state"] .state').textContent === "draining"`),
		chromedp.WaitVisible(chromedp.CSS(`button[aria-label="Undrain gpu-1"]`)),
	)
	var views []schema.NodeView
	b.getJSON("/api/v1/nodes", testAdminKey, &views)
	for _, v := range views {
		if v.Name == "gpu-1" && v.State != schema.NodeDraining {
			t.Fatalf("gpu-1 is %s after the drain button", v.State)
		}
	}
	// Add a node with the form, raise its limit in its row, remove it.
	b.run("add gpu-3",
		chromedp.Evaluate[chromedp.Void](`document.getElementById("addnode").open = true`),
		chromedp.SendKeys(chromedp.CSS(`#addform input[name="name"]`), "gpu-3"),
		chromedp.SendKeys(chromedp.CSS(`#addform input[name="url"]`), "http://127.0.0.1:9"),
		chromedp.SendKeys(chromedp.CSS(`#addform input[name="tags"]`), "spare, test"),
		chromedp.Click(chromedp.CSS(`#addform button[type=submit]`)),
		chromedp.WaitVisible(chromedp.CSS(`#nodes tr[data-node="gpu-3"]`)),
		// Focused, the field keeps its value through the table's refreshes.
		chromedp.Click(chromedp.CSS(`input[aria-label="max in flight for gpu-3"]`)),
		chromedp.SetValue(chromedp.CSS(`input[aria-label="max in flight for gpu-3"]`), "3"),
		chromedp.Click(chromedp.CSS(`button[aria-label="Set max in flight of gpu-3"]`)),
		until(`document.getElementById("status").textContent === "gpu-3: max in flight 3"`),
	)
	var all []schema.NodeView
	b.getJSON("/api/v1/nodes", testAdminKey, &all)
	var added schema.NodeView
	for _, v := range all {
		if v.Name == "gpu-3" {
			added = v
		}
	}
	if added.MaxInflight != 3 || strings.Join(added.Tags, ",") != "spare,test" || added.URL != "http://127.0.0.1:9" {
		t.Fatalf("node added and changed from the page: %+v", added)
	}
	b.run("remove gpu-3",
		chromedp.Evaluate[chromedp.Void](`window.confirm = function () { return true; }`),
		chromedp.Click(chromedp.CSS(`button[aria-label="Remove gpu-3"]`)),
		until(`!document.querySelector('#nodes tr[data-node="gpu-3"]')`),
	)
	if res, body := b.do("POST", "/api/v1/nodes/gpu-3/probe", testAdminKey, nil, ""); res.StatusCode != http.StatusNotFound {
		t.Fatalf("gpu-3 after remove: %d %s", res.StatusCode, body)
	}

	b.run("charts drawn", until(`document.querySelectorAll("#chart-queue svg, #chart-finished svg, #chart-busy svg").length === 3`))
	if b.shots != "" {
		// A job running on the node that takes work, its progress in the table.
		running := b.submit(slowWorkflow, "u-shot")
		b.run("running job in the node table",
			until(`!!document.querySelector('#nodes tr[data-node="gpu-2"] td:nth-child(6) .bar')`))
		b.screenshot("dashboard-nodes")
		b.do("DELETE", "/api/v1/jobs/"+running+"?frontend=style", "style-key", nil, "")
	}
}

// activity gives the screenshots something to show: a burst of quick jobs
// on both frontends, one that fails on the node, and time for the charts.
func (b *browserStack) activity() {
	b.t.Helper()
	type fj struct{ frontend, id string }
	var jobs []fj
	for i := 0; i < 30; i++ {
		fe := []string{"style", "logo"}[i%2]
		// A colour of its own, or the node would answer from its cache.
		wf := strings.Replace(quickWorkflow, `"color": 3368652`, fmt.Sprintf(`"color": %d`, 3368652+i), 1)
		jobs = append(jobs, fj{fe, b.submitTo(fe, wf, fmt.Sprintf("u-%d", i))})
		if i%6 == 5 {
			time.Sleep(time.Second) // spread over a few samples
		}
	}
	for _, f := range b.fakes {
		f.FailNth(1)
	}
	failed := b.submit(quickWorkflow, "u-fail")
	deadline := time.Now().Add(60 * time.Second)
	for _, j := range append(jobs, fj{"style", failed}) {
		for !b.jobOf(j.frontend, j.id).State.Terminal() {
			if time.Now().After(deadline) {
				b.t.Fatalf("job %s did not finish", j.id)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	for _, f := range b.fakes {
		f.FailNth(0)
	}
	b.run("open the failed job", openHash("#/jobs/style/"+failed), chromedp.WaitVisible(chromedp.ID("job-error")))
	b.screenshot("dashboard-job-failed")
}

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// hookWorkflow needs no upload: a latent through the sampler to SaveImage.
const hookWorkflow = `{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hook", "images": ["8", 0]}}
}`

const (
	styleSecret = "whsec_c3R5bGUtd2ViaG9vay1zZWNyZXQtMDEyMw=="
	logoSecret  = "whsec_bG9nby13ZWJob29rLXNlY3JldC0wMTIzNA=="
)

// hookServer is a receiving endpoint: answer decides the n-th request's fate.
type hookServer struct {
	*httptest.Server
	got   chan hookRequest
	count atomic.Int32
}

type hookRequest struct {
	n      int
	header http.Header
	body   []byte
}

func newHook(t *testing.T, answer func(n int, w http.ResponseWriter, r *http.Request)) *hookServer {
	h := &hookServer{got: make(chan hookRequest, 64)}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		n := int(h.count.Add(1))
		h.got <- hookRequest{n: n, header: r.Header.Clone(), body: body}
		answer(n, w, r)
	}))
	t.Cleanup(h.Close)
	return h
}

func (h *hookServer) next(t *testing.T) hookRequest {
	t.Helper()
	select {
	case r := <-h.got:
		return r
	case <-time.After(90 * time.Second):
		t.Fatal("no webhook hookRequest arrived")
		return hookRequest{}
	}
}

// hookConfig is a configuration with the given nodes, two frontends with
// webhooks, and fast retries.
func hookConfig(nodes []*comfytest.Server, styleURL, logoURL, extra string) string {
	var b strings.Builder
	b.WriteString("nodes:\n")
	for i, f := range nodes {
		fmt.Fprintf(&b, "  - {name: gpu-%d, url: %q, max_inflight: 2}\n", i+1, f.URL())
	}
	fmt.Fprintf(&b, `scheduler: {probe_interval: 100ms}
frontends:
  style: {api_keys: [style-key], controller: style, credits: {initial: 100, cost_per_job: 0},
          webhook: {url: %q, secret: %q}}
  logo: {api_keys: [logo-key], controller: logo, webhook: {url: %q, secret: %q}}
webhooks: {allow: ["127.0.0.1"], poll_interval: 20ms%s}
`, styleURL, styleSecret, logoURL, logoSecret, extra)
	return b.String()
}

// startHookStack runs `comfyfarm serve` in-process with conf on db and waits
// for its nodes.
func startHookStack(t *testing.T, db dbcontrollers.Config, conf string, nodes int) *stack {
	t.Chdir(t.TempDir())
	if err := os.WriteFile("comfyfarm.yaml", []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	s := &stack{t: t, http: &http.Client{Timeout: 30 * time.Second}}
	environ := []string{"COMFYFARM_LISTEN=127.0.0.1:0", "COMFYFARM_ADMIN_KEY=" + testAdminKey, "COMFYFARM_LOG_LEVEL=warn"}
	environ = append(environ, hookDBEnv(db)...)
	s.base = runServe(t, false, environ, "serve", "--config", "comfyfarm.yaml")
	names := make([]string, nodes)
	for i := range names {
		names[i] = fmt.Sprintf("gpu-%d", i+1)
	}
	s.waitNodes(schema.NodeUp, names...)
	return s
}

func hookDBEnv(db dbcontrollers.Config) []string {
	if db.Driver == dbcontrollers.DialectMySQL {
		return []string{"COMFYFARM_DATABASE_DRIVER=mysql", "COMFYFARM_DATABASE_DSN=" + db.DSN, "COMFYFARM_DATABASE_PREFIX=" + db.Prefix}
	}
	return nil
}

// submitJob posts hookWorkflow for a frontend, with extra body fields.
func (s *stack) submitHookJob(key, extra string) (int, string, []byte) {
	s.t.Helper()
	res, b := s.do("POST", "/api/v1/jobs", key,
		strings.NewReader(`{"user_id":"u-hook","workflow":`+hookWorkflow+extra+`}`), "application/json")
	var sub struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(b, &sub)
	return res.StatusCode, sub.ID, b
}

func (s *stack) hookDeliveries(key, id string) []schema.WebhookDelivery {
	s.t.Helper()
	var list []schema.WebhookDelivery
	s.getJSON("/api/v1/jobs/"+id+"/webhooks", key, &list)
	return list
}

// waitDelivered polls the job's webhook listing until it is delivered.
func (s *stack) waitHookDelivered(key, id string) schema.WebhookDelivery {
	s.t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		list := s.hookDeliveries(key, id)
		if len(list) == 1 && list[0].State == schema.WebhookDelivered {
			return list[0]
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("job %s: deliveries %+v", id, list)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The whole path on each database: a receiver that answers 500 twice and
// then 200 gets the finished job three times with one webhook-id and
// signatures the Standard Webhooks library accepts, while another frontend's
// receiver hangs and holds up neither jobs nor deliveries; a job's own
// webhook_url is used when allowed and refused otherwise.
func TestWebhooksFullStack(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, db dbcontrollers.Config) {
		release := make(chan struct{})
		var hanging atomic.Bool
		slow := newHook(t, func(n int, w http.ResponseWriter, r *http.Request) {
			if n == 1 {
				hanging.Store(true)
				defer hanging.Store(false)
				select {
				case <-release:
				case <-r.Context().Done():
				case <-time.After(60 * time.Second):
				}
			}
		})
		defer close(release)
		style := newHook(t, func(n int, w http.ResponseWriter, _ *http.Request) {
			if n <= 2 {
				w.WriteHeader(http.StatusInternalServerError)
			}
		})
		own := newHook(t, func(int, http.ResponseWriter, *http.Request) {})
		var nodes []*comfytest.Server
		for i := 0; i < 2; i++ {
			f := comfytest.NewServer(comfytest.Options{})
			t.Cleanup(f.Close)
			nodes = append(nodes, f)
		}
		s := startHookStack(t, db, hookConfig(nodes, style.URL+"/style", slow.URL+"/logo", ", timeout: 90s, backoff: [50ms]"), 2)

		// logo's receiver hangs on its first delivery
		code, logoJob, b := s.submitHookJob("logo-key", "")
		if code != http.StatusAccepted {
			t.Fatalf("submit: %d %s", code, b)
		}
		slow.next(t)

		// meanwhile style's jobs run and its receiver is reached, three times
		code, styleJob, b := s.submitHookJob("style-key", "")
		if code != http.StatusAccepted {
			t.Fatalf("submit: %d %s", code, b)
		}
		verifier, err := standardwebhooks.NewWebhook(styleSecret)
		if err != nil {
			t.Fatal(err)
		}
		for i := 1; i <= 3; i++ {
			r := style.next(t)
			if !hanging.Load() {
				t.Fatalf("style's attempt %d came only after logo's hanging receiver let go", i)
			}
			if got, want := r.header.Get("webhook-id"), "msg_"+styleJob+"_succeeded"; got != want {
				t.Fatalf("attempt %d: webhook-id %q, want %q", i, got, want)
			}
			if err := verifier.Verify(r.body, r.header); err != nil {
				t.Fatalf("attempt %d: signature refused: %v", i, err)
			}
			var view schema.Job
			if err := json.Unmarshal(r.body, &view); err != nil || view.ID != styleJob || view.State != schema.JobSucceeded ||
				len(view.Outputs) != 1 || !strings.HasPrefix(view.Outputs[0].URL, "http://") {
				t.Fatalf("attempt %d: body %s", i, r.body)
			}
		}
		d := s.waitHookDelivered("style-key", styleJob)
		if len(d.Attempts) != 3 || d.Attempts[0].StatusCode != 500 || d.Attempts[1].StatusCode != 500 || d.Attempts[2].StatusCode != 200 {
			t.Fatalf("attempts %+v", d.Attempts)
		}

		// a job's own address, allowed by webhooks.allow
		code, ownJob, b := s.submitHookJob("style-key", `,"webhook_url":"`+own.URL+`/mine?x=1"`)
		if code != http.StatusAccepted {
			t.Fatalf("submit with webhook_url: %d %s", code, b)
		}
		if r := own.next(t); r.header.Get("webhook-id") != "msg_"+ownJob+"_succeeded" || verifier.Verify(r.body, r.header) != nil {
			t.Fatalf("own receiver: %v", r.header)
		}
		if d := s.waitHookDelivered("style-key", ownJob); d.URL != own.URL+"/mine?x=1" {
			t.Fatalf("delivered to %s", d.URL)
		}
		// and one that is not
		code, _, b = s.submitHookJob("style-key", `,"webhook_url":"http://10.9.9.9/x"`)
		if code != http.StatusBadRequest || !strings.Contains(string(b), `"field":"webhook_url"`) {
			t.Fatalf("refused webhook_url: %d %s", code, b)
		}
		if !hanging.Load() {
			t.Fatal("logo's receiver stopped hanging before the test let it go")
		}
		// the hanging one: its job ended long ago; its delivery is pending
		var j schema.Job
		s.getJSON("/api/v1/jobs/"+logoJob, "logo-key", &j)
		if j.State != schema.JobSucceeded {
			t.Fatalf("logo job %s", j.State)
		}
		if list := s.hookDeliveries("logo-key", logoJob); len(list) != 1 || list[0].State != schema.WebhookPending {
			t.Fatalf("logo deliveries %+v", list)
		}
		// another frontend's key does not see them
		if res, _ := s.do("GET", "/api/v1/jobs/"+logoJob+"/webhooks", "style-key", nil, ""); res.StatusCode != http.StatusNotFound {
			t.Fatalf("style key on logo's job: %d", res.StatusCode)
		}
		release <- struct{}{}
		s.waitHookDelivered("logo-key", logoJob)
		_, metrics := s.do("GET", "/metrics", "", nil, "")
		for _, want := range []string{`comfyfarm_webhook_deliveries_total{frontend="style",outcome="retry"} 2`,
			`comfyfarm_webhook_deliveries_total{frontend="style",outcome="delivered"} 2`, "comfyfarm_webhook_pending"} {
			if !strings.Contains(string(metrics), want) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})
}

// comfyfarm killed with SIGKILL between two attempts still delivers after a
// restart on the same database, with the same webhook-id.
func TestWebhookSurvivesKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := dockerfileBinary(t)
	var killed atomic.Bool
	afterKill := make(chan bool, 4)
	style := newHook(t, func(n int, w http.ResponseWriter, _ *http.Request) {
		if n == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		afterKill <- killed.Load()
	})
	node := comfytest.NewServer(comfytest.Options{})
	t.Cleanup(node.Close)
	dir := t.TempDir()
	conf := filepath.Join(dir, "comfyfarm.yaml")
	if err := os.WriteFile(conf, []byte(hookConfig([]*comfytest.Server{node}, style.URL, style.URL, ", backoff: [4s]")), 0o600); err != nil {
		t.Fatal(err)
	}
	start := func() (*exec.Cmd, *stack) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		cmd := exec.Command(bin, "serve", "--config", conf, "--listen", addr)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "COMFYFARM_ADMIN_KEY="+testAdminKey, "COMFYFARM_LOG_LEVEL=warn",
			"COMFYFARM_DATA_DIR="+dir, "COMFYFARM_DATABASE_PATH="+dir, "COMFYFARM_STORAGE_LOCAL_DIR="+filepath.Join(dir, "files"))
		var logs syncBuffer
		cmd.Stdout, cmd.Stderr = &logs, &logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
		s := &stack{t: t, base: "http://" + addr, http: &http.Client{Timeout: 30 * time.Second}}
		deadline := time.Now().Add(60 * time.Second)
		for {
			res, err := http.Get(s.base + "/readyz")
			if err == nil {
				res.Body.Close()
				if res.StatusCode == 200 {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("not ready: %v\n%s", err, logs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		s.waitNodes(schema.NodeUp, "gpu-1")
		return cmd, s
	}
	cmd, s := start()
	code, id, b := s.submitHookJob("style-key", "")
	if code != http.StatusAccepted {
		t.Fatalf("submit: %d %s", code, b)
	}
	first := style.next(t)
	// the failed attempt is on record: the retry is due in 4 s
	deadline := time.Now().Add(30 * time.Second)
	for {
		if list := s.hookDeliveries("style-key", id); len(list) == 1 && len(list[0].Attempts) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("first attempt not recorded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	killed.Store(true)
	if err := cmd.Process.Signal(os.Kill); err != nil {
		t.Fatal(err)
	}
	_, s = start()
	second := style.next(t)
	if !<-afterKill {
		t.Fatal("the second attempt came before the kill")
	}
	if first.header.Get("webhook-id") != second.header.Get("webhook-id") || second.header.Get("webhook-id") != "msg_"+id+"_succeeded" {
		t.Fatalf("webhook-id %q then %q", first.header.Get("webhook-id"), second.header.Get("webhook-id"))
	}
	d := s.waitHookDelivered("style-key", id)
	if len(d.Attempts) != 2 || d.Attempts[0].StatusCode != 503 || d.Attempts[1].StatusCode != 200 {
		t.Fatalf("attempts %+v", d.Attempts)
	}
}

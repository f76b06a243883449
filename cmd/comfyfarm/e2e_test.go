package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"image"
	"image/png"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss/osstest"
	"github.com/comfyfarm/comfyfarm/schema"
)

const e2eWorkflow = `{
 "1": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 4, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "e2e", "images": ["8", 0]}},
 "10": {"class_type": "SaveImage", "inputs": {"filename_prefix": "e2e", "images": ["2", 0]}}
}`

const testAdminKey = "test-admin-key-0123456789"

type stack struct {
	t     *testing.T
	base  string
	fakes []*comfytest.Server
	http  *http.Client
}

// startStack runs `comfyfarm serve` on two fake nodes and the given database.
func startStack(t *testing.T, db dbcontrollers.Config, extraEnv ...string) *stack {
	t.Chdir(t.TempDir())
	s := &stack{t: t, http: &http.Client{Timeout: 30 * time.Second}}
	var nodes strings.Builder
	for i := 0; i < 2; i++ {
		f := comfytest.NewServer(comfytest.Options{ClassTime: map[string]time.Duration{"KSampler": 200 * time.Millisecond}})
		t.Cleanup(f.Close)
		s.fakes = append(s.fakes, f)
		fmt.Fprintf(&nodes, "  - {name: gpu-%d, url: %q, max_inflight: 1}\n", i+1, f.URL())
	}
	conf := "nodes:\n" + nodes.String() + "scheduler: {probe_interval: 100ms}\n"
	if err := os.WriteFile("comfyfarm.yaml", []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	environ := []string{"COMFYFARM_LISTEN=127.0.0.1:0", "COMFYFARM_ADMIN_KEY=" + testAdminKey, "COMFYFARM_LOG_LEVEL=warn"}
	if db.Driver == dbcontrollers.DialectMySQL {
		environ = append(environ, "COMFYFARM_DATABASE_DRIVER=mysql", "COMFYFARM_DATABASE_DSN="+db.DSN, "COMFYFARM_DATABASE_PREFIX="+db.Prefix)
	}
	s.base = runServe(t, false, append(environ, extraEnv...), "serve", "--config", "comfyfarm.yaml")
	deadline := time.Now().Add(20 * time.Second)
	for {
		var views []schema.NodeView
		s.getJSON("/api/v1/nodes", testAdminKey, &views)
		up := 0
		for _, v := range views {
			if v.State == schema.NodeUp {
				up++
			}
		}
		if up == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodes not up: %+v", views)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s
}

func (s *stack) do(method, path, key string, body io.Reader, contentType string) (*http.Response, []byte) {
	s.t.Helper()
	req, err := http.NewRequest(method, s.base+path, body)
	if err != nil {
		s.t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	res, err := s.http.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	return res, b
}

func (s *stack) getJSON(path, key string, out any) {
	s.t.Helper()
	res, b := s.do("GET", path, key, nil, "")
	if res.StatusCode != 200 {
		s.t.Fatalf("GET %s: %d %s", path, res.StatusCode, b)
	}
	if err := json.Unmarshal(b, out); err != nil {
		s.t.Fatalf("GET %s: %v", path, err)
	}
}

func pngBytes(t *testing.T, w, h int) []byte {
	var buf bytes.Buffer
	if err := png.Encode(&buf, image.NewGray(image.Rect(0, 0, w, h))); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// The whole path over real HTTP: multipart submit with an input image, the
// same events to a WebSocket and an SSE subscriber in order, photos whose
// URLs download the node's bytes, delete removing the object.
func TestFullStack(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, db dbcontrollers.Config) {
		s := startStack(t, db)
		for _, f := range s.fakes {
			f.Hold()
		}
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		_ = mw.WriteField("frontend", "style")
		_ = mw.WriteField("user_id", "u-e2e")
		_ = mw.WriteField("workflow", e2eWorkflow)
		_ = mw.WriteField("metadata", `{"style":"ink"}`)
		fw, _ := mw.CreateFormFile("images", "input.png")
		input := pngBytes(t, 24, 16)
		_, _ = fw.Write(input)
		_ = mw.Close()
		res, b := s.do("POST", "/api/v1/jobs", "style-key", &body, mw.FormDataContentType())
		if res.StatusCode != http.StatusAccepted {
			t.Fatalf("submit: %d %s", res.StatusCode, b)
		}
		var sub struct {
			ID        string `json:"id"`
			State     string `json:"state"`
			EventsURL string `json:"events_url"`
		}
		if err := json.Unmarshal(b, &sub); err != nil || sub.ID == "" || !strings.Contains(sub.EventsURL, "token=") {
			t.Fatalf("submit answer %s", b)
		}

		// A browser follows with the job-scoped token over WebSocket, a
		// backend with its key over SSE.
		wsURL := "ws" + strings.TrimPrefix(s.base, "http") + sub.EventsURL
		ws, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		req, _ := http.NewRequest("GET", s.base+"/api/v1/jobs/"+sub.ID+"/events?frontend=style", nil)
		req.Header.Set("Authorization", "Bearer style-key")
		req.Header.Set("Accept", "text/event-stream")
		sse, err := (&http.Client{}).Do(req)
		if err != nil || sse.StatusCode != 200 {
			t.Fatalf("sse: %v %v", err, sse)
		}
		defer sse.Body.Close()

		var wg sync.WaitGroup
		var wsEvents, sseEvents []schema.Event
		var wsErr, sseErr error
		// subscribed is done when each stream has its first event (the
		// snapshot), or has ended.
		var subscribed sync.WaitGroup
		subscribed.Add(2)
		wg.Add(2)
		go func() {
			defer wg.Done()
			first := sync.OnceFunc(subscribed.Done)
			defer first()
			for {
				_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
				_, msg, err := ws.ReadMessage()
				if err != nil {
					wsErr = err
					return
				}
				var ev schema.Event
				if err := json.Unmarshal(msg, &ev); err != nil {
					wsErr = err
					return
				}
				if ev.Type == schema.EventKeepAlive {
					continue
				}
				wsEvents = append(wsEvents, ev)
				first()
				if ev.Type.Terminal() {
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			first := sync.OnceFunc(subscribed.Done)
			defer first()
			r := newSSEReader(sse.Body)
			for {
				msg, err := r.Next()
				if err != nil {
					sseErr = err
					return
				}
				var ev schema.Event
				if err := json.Unmarshal([]byte(msg.Data), &ev); err != nil {
					sseErr = err
					return
				}
				if msg.ID != fmt.Sprint(ev.Seq) || msg.Event != string(ev.Type) {
					sseErr = fmt.Errorf("sse id/event %q/%q for %d/%s", msg.ID, msg.Event, ev.Seq, ev.Type)
					return
				}
				sseEvents = append(sseEvents, ev)
				first()
				if ev.Type.Terminal() {
					return
				}
			}
		}()
		subscribed.Wait() // both subscribed before anything moves
		for _, f := range s.fakes {
			f.Release()
		}
		wg.Wait()
		if wsErr != nil || sseErr != nil {
			t.Fatalf("ws: %v, sse: %v", wsErr, sseErr)
		}
		for name, evs := range map[string][]schema.Event{"ws": wsEvents, "sse": sseEvents} {
			if evs[0].Type != schema.EventSnapshot || evs[len(evs)-1].Type != schema.EventSucceeded {
				t.Fatalf("%s: first %s last %s", name, evs[0].Type, evs[len(evs)-1].Type)
			}
			for i := 1; i < len(evs); i++ {
				if evs[i].Seq <= evs[i-1].Seq {
					t.Fatalf("%s: seq %d after %d", name, evs[i].Seq, evs[i-1].Seq)
				}
			}
		}
		since := max(wsEvents[0].Seq, sseEvents[0].Seq)
		a, c := stateEvents(wsEvents, since), stateEvents(sseEvents, since)
		if a != c {
			t.Fatalf("subscribers saw different events:\nws:  %s\nsse: %s", a, c)
		}
		for _, want := range []string{":running ", ":storing ", ":succeeded "} {
			if !strings.Contains(stateEvents(wsEvents, 0), want) {
				t.Fatalf("events %s lack %s", a, want)
			}
		}
		hasProgress := false
		for _, ev := range wsEvents {
			hasProgress = hasProgress || ev.Type == schema.EventProgress
		}
		if !hasProgress {
			t.Fatal("no progress event over the WebSocket")
		}

		// Photos: two outputs (the sampler's and the inverted input), whose
		// URLs download what the node wrote.
		var job schema.Job
		s.getJSON("/api/v1/jobs/"+sub.ID+"?frontend=style", "style-key", &job)
		if job.State != schema.JobSucceeded || len(job.Outputs) != 2 {
			t.Fatalf("job %+v", job)
		}
		var list struct {
			Photos []schema.Photo `json:"photos"`
			Total  int            `json:"total"`
		}
		s.getJSON("/api/v1/photos?frontend=style&user_id=u-e2e", "style-key", &list)
		if list.Total != 2 || len(list.Photos) != 2 {
			t.Fatalf("photos %+v", list)
		}
		for _, p := range list.Photos {
			res, got := s.do("GET", pathOf(t, p.URL), "", nil, "")
			if res.StatusCode != 200 || int64(len(got)) != p.Bytes || res.Header.Get("Content-Type") != "image/png" {
				t.Fatalf("GET %s: %d, %d bytes, %s", p.URL, res.StatusCode, len(got), res.Header.Get("Content-Type"))
			}
			if !nodeHasFile(s.fakes, got) {
				t.Fatalf("photo %d bytes are not a file the node wrote", p.ID)
			}
		}
		var qs schema.QueueStatus
		s.getJSON("/api/v1/queue?frontend=style&job_id="+sub.ID, "style-key", &qs)
		if qs.State != schema.JobSucceeded || qs.Running {
			t.Fatalf("queue status %+v", qs)
		}

		// Deleting a photo removes its object too.
		p := list.Photos[0]
		res, b = s.do("DELETE", fmt.Sprintf("/api/v1/photos/%d?frontend=style", p.ID), "style-key", nil, "")
		if res.StatusCode/100 != 2 {
			t.Fatalf("delete photo: %d %s", res.StatusCode, b)
		}
		if res, _ := s.do("GET", pathOf(t, p.URL), "", nil, ""); res.StatusCode != 404 {
			t.Fatalf("deleted photo's URL answers %d", res.StatusCode)
		}
		res, b = s.do("GET", "/metrics", "", nil, "")
		if res.StatusCode != 200 || !bytes.Contains(b, []byte(`comfyfarm_jobs_finished_total{error_code="",frontend="style",outcome="succeeded"} 1`)) {
			t.Fatalf("metrics lack the finished job:\n%.2000s", b)
		}
	})
}

// pathOf keeps the path and query of a URL built on public_url.
func pathOf(t *testing.T, raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u.RequestURI()
}

// With storage.kind oss: the job's output lands in the (fake,
// signature-checking) OSS, a photo row records it, and the URL GET /photos
// gives downloads the same bytes the node wrote. Bad uploads are refused with
// the right statuses and leave nothing behind.
func TestFullStackOSS(t *testing.T) {
	fake := osstest.Start(t, osstest.Options{})
	s := startStack(t, dbtest.SQLite(t),
		"COMFYFARM_STORAGE_KIND=oss",
		"COMFYFARM_OSS_ENDPOINT="+fake.Endpoint(),
		"COMFYFARM_OSS_BUCKET="+fake.Bucket(),
		"COMFYFARM_OSS_ACCESS_KEY_ID="+fake.AccessKeyID(),
		"COMFYFARM_OSS_ACCESS_KEY_SECRET="+fake.AccessKeySecret(),
		"COMFYFARM_OSS_AUTH_VERSION=v4",
		"COMFYFARM_OSS_REGION="+fake.Region(),
	)
	submit := func(image []byte) (*http.Response, []byte) {
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		_ = mw.WriteField("frontend", "logo")
		_ = mw.WriteField("user_id", "u-oss")
		_ = mw.WriteField("workflow", e2eWorkflow)
		fw, _ := mw.CreateFormFile("images", "input.png")
		_, _ = fw.Write(image)
		_ = mw.Close()
		return s.do("POST", "/api/v1/jobs", "logo-key", &body, mw.FormDataContentType())
	}
	// A ".png" that is text, and a PNG header claiming 20000x20000 pixels.
	res, b := submit([]byte("just some text, not an image"))
	if res.StatusCode != http.StatusUnsupportedMediaType || !bytes.Contains(b, []byte(`"code"`)) {
		t.Fatalf("text as png: %d %s", res.StatusCode, b)
	}
	res, b = submit(bombHeader(20000, 20000))
	if res.StatusCode != http.StatusRequestEntityTooLarge && res.StatusCode != http.StatusBadRequest {
		t.Fatalf("20000x20000 header: %d %s", res.StatusCode, b)
	}
	if n := fake.RequestCount("PUT"); n != 0 {
		t.Fatalf("refused uploads stored %d objects", n)
	}

	res, b = submit(pngBytes(t, 24, 16))
	if res.StatusCode != http.StatusAccepted {
		t.Fatalf("submit: %d %s", res.StatusCode, b)
	}
	var sub struct{ ID string }
	_ = json.Unmarshal(b, &sub)
	deadline := time.Now().Add(30 * time.Second)
	var job schema.Job
	for {
		s.getJSON("/api/v1/jobs/"+sub.ID+"?frontend=logo", "logo-key", &job)
		if job.State.Terminal() || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if job.State != schema.JobSucceeded {
		t.Fatalf("job %s: %+v", job.State, job.Error)
	}
	var list struct {
		Photos []schema.Photo `json:"photos"`
		Total  int            `json:"total"`
	}
	s.getJSON("/api/v1/photos?frontend=logo&user_id=u-oss", "logo-key", &list)
	if list.Total != 2 {
		t.Fatalf("photos %+v", list)
	}
	for _, p := range list.Photos {
		if !strings.HasPrefix(p.URL, fake.Endpoint()) {
			t.Fatalf("photo URL %s is not on the OSS endpoint", p.URL)
		}
		res, err := http.Get(p.URL)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 || !nodeHasFile(s.fakes, got) {
			t.Fatalf("GET %s: %d, %d bytes not from the node", p.URL, res.StatusCode, len(got))
		}
		// The same signature on the job's other object.
		tampered := strings.Replace(p.URL, "0.png?", "1.png?", 1)
		if tampered == p.URL {
			tampered = strings.Replace(p.URL, "1.png?", "0.png?", 1)
		}
		if tampered == p.URL {
			t.Fatalf("cannot tamper with %s", p.URL)
		}
		if res, err := http.Get(tampered); err != nil || res.StatusCode != http.StatusForbidden {
			t.Fatalf("tampered URL %s answered %v %v", tampered, res.StatusCode, err)
		}
	}
	// Deleting a photo deletes its object in OSS.
	p := list.Photos[0]
	res, b = s.do("DELETE", fmt.Sprintf("/api/v1/photos/%d?frontend=logo", p.ID), "logo-key", nil, "")
	if res.StatusCode/100 != 2 {
		t.Fatalf("delete: %d %s", res.StatusCode, b)
	}
	if res, err := http.Get(p.URL); err != nil || res.StatusCode != http.StatusNotFound {
		t.Fatalf("deleted object answered %v %v", res.StatusCode, err)
	}
}

// bombHeader is a PNG signature and IHDR claiming w x h pixels, and no pixels.
func bombHeader(w, h uint32) []byte {
	var b bytes.Buffer
	b.WriteString("\x89PNG\r\n\x1a\n")
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = 8, 6
	_ = binary.Write(&b, binary.BigEndian, uint32(len(ihdr)))
	b.WriteString("IHDR")
	b.Write(ihdr)
	_ = binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(append([]byte("IHDR"), ihdr...)))
	b.Write([]byte{0, 0, 0, 0})
	b.WriteString("IEND")
	_ = binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE([]byte("IEND")))
	return b.Bytes()
}

// stateEvents renders the events after seq, without progress (which a slow
// subscriber may miss), as "seq:type ...".
func stateEvents(evs []schema.Event, after int64) string {
	var b strings.Builder
	for _, ev := range evs {
		if ev.Seq <= after || ev.Type.Droppable() || ev.Type == schema.EventSnapshot {
			continue
		}
		fmt.Fprintf(&b, "%d:%s ", ev.Seq, ev.Type)
	}
	return b.String()
}

func nodeHasFile(fakes []*comfytest.Server, data []byte) bool {
	for _, f := range fakes {
		for _, h := range f.History() {
			for _, files := range h.Outputs {
				for _, fr := range files {
					if b, ok := f.ReadFile(fr.Type, fr.Subfolder, fr.Filename); ok && bytes.Equal(b, data) {
						return true
					}
				}
			}
		}
	}
	return false
}

// The README's first command works: the demo runs sample jobs to success.
func TestDemo(t *testing.T) {
	t.Chdir(t.TempDir())
	e, out, errb := testEnv("COMFYFARM_LISTEN=127.0.0.1:0")
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	if err := run(ctx, e, []string{"demo", "--exit", "--jobs", "5", "--step-time", "5ms"}); err != nil {
		t.Fatalf("demo: %v\n%s\n%s", err, out.String(), errb.String())
	}
	if n := strings.Count(out.String(), " succeeded on demo-gpu-"); n != 5 {
		t.Fatalf("%d jobs succeeded, want 5:\n%s\n%s", n, out.String(), errb.String())
	}
	if !strings.Contains(out.String(), "template portrait@1 job ") || !strings.Contains(out.String(), ": succeeded, node demo-gpu-") {
		t.Fatalf("no template job succeeded:\n%s\n%s", out.String(), errb.String())
	}
	if _, err := os.Stat(filepath.Join("data", "comfyfarm.db")); err != nil {
		t.Fatalf("no embedded database: %v", err)
	}
}

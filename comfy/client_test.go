package comfy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/internal/testnet"
)

const (
	oldDir = "testdata/comfy-traces"
	curDir = "testdata/comfy-traces-current"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// promptOf returns the "prompt" of a recorded POST /prompt request body.
func promptOf(t *testing.T, e traceEvent) json.RawMessage {
	t.Helper()
	var b struct {
		Prompt json.RawMessage `json:"prompt"`
	}
	if err := json.Unmarshal(e.Body, &b); err != nil {
		t.Fatal(err)
	}
	return b.Prompt
}

func TestNewClient(t *testing.T) {
	for _, bad := range []string{"", "ftp://x", "http://", "10.0.0.1:8188", "http://h:1/?q=1", "::"} {
		if _, err := NewClient(bad); err == nil {
			t.Errorf("NewClient(%q) accepted", bad)
		}
	}
	for _, opt := range []Option{WithRequestTimeout(0), WithLongTimeout(-1), WithKeepAlive(0, time.Second), WithMaxJSONBytes(0)} {
		if _, err := NewClient("http://127.0.0.1:8188", opt); err == nil {
			t.Error("non-positive setting accepted")
		}
	}
	c := newTestClient(t, "http://127.0.0.1:8188/")
	if c.BaseURL() != "http://127.0.0.1:8188" {
		t.Errorf("BaseURL %q", c.BaseURL())
	}
	if len(c.ClientID()) != 32 {
		t.Errorf("default client id %q", c.ClientID())
	}
	if other := newTestClient(t, "http://127.0.0.1:8188"); other.ClientID() == c.ClientID() {
		t.Error("two clients share a random id")
	}
	c = newTestClient(t, "https://gpu.example/comfy", WithClientID("farm-1"))
	if c.ClientID() != "farm-1" || c.wsURL() != "wss://gpu.example/comfy/ws?clientId=farm-1" {
		t.Errorf("id %q ws %q", c.ClientID(), c.wsURL())
	}
	if got := c.endpoint("/history/a%2Fb", nil); got != "https://gpu.example/comfy/history/a%2Fb" {
		t.Errorf("endpoint %q", got)
	}
}

func TestSubmitReplay(t *testing.T) {
	for _, dir := range traceDirs {
		t.Run(dir, func(t *testing.T) {
			tr := loadTrace(t, dir, "a_success_3node.json")
			rp, srv := newReplay(t, tr)
			c := newTestClient(t, srv.URL, WithClientID(tr.ClientID))
			req := tr.requests("POST", "/prompt")[0]
			resp, err := c.Submit(testCtx(t), SubmitRequest{Prompt: promptOf(t, req), ExtraData: map[string]any{"job": "j1"}})
			if err != nil {
				t.Fatal(err)
			}
			want := mustJSONMap(t, tr.responses("POST", "/prompt")[0].Body)
			if resp.PromptID != want["prompt_id"] || resp.Number != want["number"] || resp.NodeErrors != nil {
				t.Fatalf("response %+v, want %v", resp, want)
			}
			sent := mustJSONMap(t, rp.requests()[0].Body)
			if sent["client_id"] != tr.ClientID || !jsonEqual(t, sent["prompt"], mustJSONMap(t, promptOf(t, req))) ||
				!jsonEqual(t, sent["extra_data"], map[string]any{"job": "j1"}) {
				t.Errorf("sent %v", sent)
			}
			for _, k := range []string{"front", "number", "prompt_id"} {
				if _, ok := sent[k]; ok {
					t.Errorf("sent %s without being asked", k)
				}
			}
			// History of that prompt: success with the one SaveImage file.
			h, err := c.History(testCtx(t), resp.PromptID)
			if err != nil {
				t.Fatal(err)
			}
			files := h.Files()
			if h.Outcome() != OutcomeSuccess || len(files) != 1 || files[0].NodeID != "3" || files[0].Kind != "images" ||
				files[0].Filename != "trace_00001_.png" || files[0].Type != "output" {
				t.Fatalf("outcome %v files %+v", h.Outcome(), files)
			}
			// /view of it: 200 with the recorded length, and the recorded 404.
			rc, err := c.View(testCtx(t), files[0], 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(rc)
			rc.Close()
			viewLen := tr.responses("GET", "/view?filename=trace_00001_.png&subfolder=&type=output")
			if err != nil || len(viewLen) == 0 || len(body) != viewLen[0].Length || !bytes.Equal(body, fileBytes(len(body))) {
				t.Fatalf("view: %d bytes, %v", len(body), err)
			}
			var missing *traceEvent
			for _, e := range tr.Events {
				if e.Kind == "http_response" && e.Status == 404 && strings.HasPrefix(e.Path, "/view") {
					missing = &e
				}
			}
			if missing == nil {
				t.Fatal("trace has no /view 404")
			}
			_, err = c.View(testCtx(t), FileRef{Filename: "does_not_exist.png", Type: "output"}, 0)
			var ae *APIError
			if !errors.As(err, &ae) || ae.Status != 404 || IsTransient(err) {
				t.Fatalf("missing file: %v", err)
			}
		})
	}
}

func TestSubmitOptionsAndQueuePosition(t *testing.T) {
	for _, dir := range traceDirs {
		t.Run(dir, func(t *testing.T) {
			tr := loadTrace(t, dir, "e2_front_of_queue.json")
			rp, srv := newReplay(t, tr)
			c := newTestClient(t, srv.URL, WithClientID(tr.ClientID))
			reqs := tr.requests("POST", "/prompt")
			if len(reqs) != 5 {
				t.Fatalf("%d prompts", len(reqs))
			}
			half := 0.5
			opts := []SubmitRequest{{}, {}, {}, {Front: true}, {Number: &half, Front: true}}
			ids := map[string]string{}
			for i, name := range []string{"A", "B", "C", "D", "E"} {
				sr := opts[i]
				sr.Prompt = promptOf(t, reqs[i])
				resp, err := c.Submit(testCtx(t), sr)
				if err != nil {
					t.Fatal(err)
				}
				ids[name] = resp.PromptID
			}
			sent := rp.requests()
			d, e := mustJSONMap(t, sent[3].Body), mustJSONMap(t, sent[4].Body)
			if d["front"] != true || d["number"] != nil || e["number"] != 0.5 || e["front"] != nil {
				t.Errorf("front/number sent as %v / %v", d, e)
			}
			// The trace's note names the ids; they must be what the server answered.
			for _, ev := range tr.Events {
				if ev.Kind == "note" && strings.HasPrefix(ev.Text, "ids: ") {
					var want map[string]string
					if err := json.Unmarshal([]byte(strings.TrimPrefix(ev.Text, "ids: ")), &want); err != nil {
						t.Fatal(err)
					}
					if !jsonEqual(t, want, ids) {
						t.Fatalf("ids %v, want %v", ids, want)
					}
				}
			}
			q, err := c.Queue(testCtx(t))
			if err != nil {
				t.Fatal(err)
			}
			wantPos := map[string]struct {
				ahead   int
				running bool
			}{"A": {0, true}, "D": {1, false}, "E": {2, false}, "B": {3, false}, "C": {4, false}}
			for name, w := range wantPos {
				ahead, running, found := q.Position(ids[name])
				if !found || ahead != w.ahead || running != w.running {
					t.Errorf("%s: ahead %d running %v found %v, want %+v", name, ahead, running, found, w)
				}
			}
			if _, _, found := q.Position("nope"); found {
				t.Error("unknown prompt found")
			}
			ord := q.Ordered()
			if len(ord) != 4 || ord[0].PromptID != ids["D"] || ord[3].PromptID != ids["C"] || ord[0].Number != -24 {
				t.Errorf("ordered %+v", ord)
			}
		})
	}
}

// The pending list is a raw heap: Position must sort, and tie-break on prompt_id.
func TestQueuePositionUnsortedHeap(t *testing.T) {
	body := `{"queue_running": [], "queue_pending": [
		[5, "e", {}, {"client_id": "x"}, ["9"]], [1, "b", {}, {}, []], [3.5, "c", {}, {}, []],
		[1, "a", {}, {}, []], [-2, "z", {}, {}, []]]}`
	var q Queue
	if err := json.Unmarshal([]byte(body), &q); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]int{"z": 0, "a": 1, "b": 2, "c": 3, "e": 4} {
		ahead, running, found := q.Position(id)
		if !found || running || ahead != want {
			t.Errorf("%s: ahead %d running %v found %v, want %d", id, ahead, running, found, want)
		}
	}
	if q.Pending[0].ClientID != "x" || q.Pending[0].OutputNodes[0] != "9" {
		t.Errorf("item decoded as %+v", q.Pending[0])
	}
}

func TestHistoryOutcomes(t *testing.T) {
	cases := []struct {
		file string
		want []Outcome
	}{
		{"a_success_3node.json", []Outcome{OutcomeSuccess}},
		{"d_runtime_error.json", []Outcome{OutcomeError}},
		{"f2_interrupt.json", []Outcome{OutcomeInterrupted, OutcomeSuccess}},
	}
	for _, dir := range traceDirs {
		for _, tc := range cases {
			t.Run(dir+"/"+tc.file, func(t *testing.T) {
				tr := loadTrace(t, dir, tc.file)
				_, srv := newReplay(t, tr)
				c := newTestClient(t, srv.URL)
				var got []Outcome
				for _, e := range tr.Events {
					if e.Kind != "http_request" || !strings.HasPrefix(e.Path, "/history/") {
						continue
					}
					h, err := c.History(testCtx(t), strings.TrimPrefix(e.Path, "/history/"))
					if err != nil {
						t.Fatal(err)
					}
					got = append(got, h.Outcome())
					switch h.Outcome() {
					case OutcomeError:
						ee := h.ExecError()
						if ee == nil || ee.NodeType != "ImageBlur" || ee.ExceptionType != "RuntimeError" ||
							!strings.Contains(ee.ExceptionMessage, "Padding size") || len(ee.Traceback) == 0 || len(h.Files()) != 0 {
							t.Errorf("exec error %+v", ee)
						}
					case OutcomeInterrupted:
						in := h.Interruption()
						if in == nil || in.NodeType != "ImageBlur" || h.ExecError() != nil || h.Status.StatusStr != "error" {
							t.Errorf("interruption %+v", in)
						}
					}
				}
				if !jsonEqual(t, got, tc.want) {
					t.Fatalf("outcomes %v, want %v", got, tc.want)
				}
			})
		}
	}
}

func TestHistoryNotFound(t *testing.T) {
	tr := loadTrace(t, curDir, "f1_delete_pending.json")
	_, srv := newReplay(t, tr)
	c := newTestClient(t, srv.URL)
	_, err := c.History(testCtx(t), "0812e638-889c-428a-a20b-176712ea6c15")
	if !errors.Is(err, ErrNotInHistory) || IsTransient(err) {
		t.Fatalf("deleted prompt: %v", err)
	}
}

// A 2023-era entry has no status: success iff outputs.
func TestOutcomeWithoutStatus(t *testing.T) {
	h, err := DecodeHistoryEntry("p", []byte(`{"prompt": [1, "p", {}, {"client_id": "c"}, ["9"]],
		"outputs": {"9": {"images": [{"filename": "x.png", "subfolder": "", "type": "output"}]}}}`))
	if err != nil || h.Outcome() != OutcomeSuccess || h.ExecError() != nil || h.ClientID != "c" {
		t.Fatalf("%+v %v", h, err)
	}
	h, err = DecodeHistoryEntry("p", []byte(`{"prompt": [1, "p", {}, {}, ["9"]], "outputs": {}}`))
	if err != nil || h.Outcome() != OutcomeUnknown {
		t.Fatalf("%+v %v", h, err)
	}
}

func TestFilesOrderAndKinds(t *testing.T) {
	h, err := DecodeHistoryEntry("p", []byte(`{"outputs": {
		"10": {"images": [{"filename": "b.png", "subfolder": "s", "type": "output"}]},
		"2": {"gifs": [{"filename": "v.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4"}],
		      "animated": [true], "text": ["hello"],
		      "audio": [{"filename": "a.flac", "subfolder": "", "type": "temp"}]},
		"2:5": {"images": [{"filename": "c1.png", "type": "temp"}, {"filename": "c2.png", "type": "temp"}, "junk"]},
		"9": {"3d": [{"filename": "m.glb", "subfolder": "3d", "type": "output"}], "images": []}}}`))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range h.Files() {
		got = append(got, f.NodeID+"/"+f.Kind+"/"+f.Path())
	}
	want := []string{"2/audio/a.flac", "2/gifs/v.mp4", "2:5/images/c1.png", "2:5/images/c2.png", "9/3d/3d/m.glb", "10/images/s/b.png"}
	if !jsonEqual(t, got, want) {
		t.Fatalf("files %v\nwant  %v", got, want)
	}
}

func TestFileRefValidate(t *testing.T) {
	for _, f := range []FileRef{{Filename: "a.png"}, {Filename: "a..b.png", Subfolder: "x/y", Type: "temp"}} {
		if err := f.Validate(); err != nil {
			t.Errorf("%+v: %v", f, err)
		}
	}
	for _, f := range []FileRef{{}, {Filename: ".."}, {Filename: "../a.png"}, {Filename: "a/b.png"}, {Filename: `a\b.png`},
		{Filename: "a.png", Subfolder: "../x"}, {Filename: "a.png", Subfolder: "/etc"}, {Filename: "a.png", Subfolder: "x/../../y"},
		{Filename: "a.png", Type: "secret"}, {Filename: "a\x00.png"}} {
		if err := f.Validate(); err == nil {
			t.Errorf("%+v accepted", f)
		}
	}
}

func TestValidationErrorsReplay(t *testing.T) {
	for _, dir := range traceDirs {
		t.Run(dir, func(t *testing.T) {
			tr := loadTrace(t, dir, "c_validation_errors.json")
			_, srv := newReplay(t, tr)
			c := newTestClient(t, srv.URL, WithClientID(tr.ClientID))
			resps := tr.responses("POST", "/prompt")
			for i, want := range resps {
				_, err := c.Submit(testCtx(t), SubmitRequest{Prompt: json.RawMessage(`{"1": {}}`)})
				var ve *ValidationError
				var ae *APIError
				switch want.Status {
				case 400:
					if !errors.As(err, &ve) || ve.Status != 400 || ve.Response != nil || IsTransient(err) {
						t.Fatalf("#%d: %v", i, err)
					}
					body := mustJSONMap(t, want.Body)
					if m, ok := body["error"].(map[string]any); ok && ve.Type != m["type"] {
						t.Errorf("#%d: type %q, want %v", i, ve.Type, m["type"])
					}
					if !errors.As(err, &ae) || ae != ve.APIError {
						t.Errorf("#%d: not unwrappable to *APIError", i)
					}
				case 500:
					if !errors.As(err, &ae) || errors.As(err, &ve) || ae.Status != 500 || !IsTransient(err) ||
						!strings.Contains(string(ae.Body), "Server got itself in trouble") {
						t.Fatalf("#%d: %v", i, err)
					}
				case 200:
					if !errors.As(err, &ve) || ve.Response == nil || ve.Response.PromptID == "" || len(ve.NodeErrors["3"].Errors) != 1 ||
						ve.NodeErrors["3"].Errors[0].Type != "value_not_in_list" || ve.NodeErrors["3"].DependentOutputs[0] != "4" {
						t.Fatalf("#%d: %v", i, err)
					}
				}
			}
		})
	}
}

func TestSubmitClientChosenPromptID(t *testing.T) {
	tr := loadTrace(t, curDir, "m_client_chosen_prompt_id.json")
	rp, srv := newReplay(t, tr)
	c := newTestClient(t, srv.URL)
	req := tr.requests("POST", "/prompt")[1]
	want := mustJSONMap(t, req.Body)["prompt_id"]
	resp, err := c.Submit(testCtx(t), SubmitRequest{Prompt: promptOf(t, req), PromptID: "my-job-42"})
	_ = tr.responses("POST", "/prompt")
	if err != nil {
		t.Fatal(err)
	}
	// The replay answers the first recorded prompt; what matters is what was sent.
	if sent := mustJSONMap(t, rp.requests()[0].Body); sent["prompt_id"] != want || want != "my-job-42" {
		t.Errorf("sent prompt_id %v", sent["prompt_id"])
	}
	if resp.PromptID == "" {
		t.Error("no prompt id")
	}
	h, err := c.History(testCtx(t), "my-job-42")
	if err != nil || h.PromptID != "my-job-42" || h.Outcome() != OutcomeSuccess {
		t.Fatalf("%+v %v", h, err)
	}
}

func TestUploadReplay(t *testing.T) {
	for _, dir := range traceDirs {
		t.Run(dir, func(t *testing.T) {
			tr := loadTrace(t, dir, "g_upload_loadimage.json")
			rp, srv := newReplay(t, tr)
			c := newTestClient(t, srv.URL)
			png := fileBytes(145)
			reqs := []UploadRequest{
				{Name: "trace_upload.png", Overwrite: true, Type: "input"},
				{Name: "trace_upload.png", Type: "input"},
				{Name: "trace_upload.png", Type: "input"},
				{Name: "sub.png", Type: "input", Subfolder: "traces"},
			}
			var values []string
			for _, ur := range reqs {
				ur.Body = bytes.NewReader(png)
				res, err := c.UploadImage(testCtx(t), ur)
				if err != nil {
					t.Fatal(err)
				}
				values = append(values, res.LoadImageValue())
			}
			want := []string{"trace_upload.png", "trace_upload.png", "trace_upload (1).png", "traces/sub.png"}
			if !jsonEqual(t, values, want) {
				t.Fatalf("values %v, want %v", values, want)
			}
			// The recorded LoadImage prompt uses exactly those values.
			g, err := ParseGraph(promptOf(t, tr.requests("POST", "/prompt")[0]), GraphLimits{})
			if err != nil {
				t.Fatal(err)
			}
			if refs := g.LoadImageRefs(); !jsonEqual(t, refs, []string{"trace_upload.png", "traces/sub.png"}) {
				t.Errorf("refs %v", refs)
			}
			// What reached the server: multipart with the image part and the fields.
			for i, r := range rp.requests()[:4] {
				_, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
				if err != nil {
					t.Fatal(err)
				}
				form, err := multipart.NewReader(bytes.NewReader(r.Body), params["boundary"]).ReadForm(1 << 20)
				if err != nil {
					t.Fatal(err)
				}
				fh := form.File["image"]
				if len(fh) != 1 || fh[0].Filename != reqs[i].Name || fh[0].Size != 145 || fh[0].Header.Get("Content-Type") != "image/png" {
					t.Fatalf("#%d image part %+v", i, fh)
				}
				if got := form.Value["overwrite"]; reqs[i].Overwrite != (len(got) == 1 && got[0] == "true") {
					t.Errorf("#%d overwrite %v", i, got)
				}
				if got := form.Value["subfolder"]; reqs[i].Subfolder != "" && (len(got) != 1 || got[0] != reqs[i].Subfolder) {
					t.Errorf("#%d subfolder %v", i, got)
				}
			}
			// The fifth recorded answer is the bare 400 of an upload without image.
			_, err = c.UploadImage(testCtx(t), UploadRequest{Name: "x.png", Body: strings.NewReader("x")})
			var ae *APIError
			if !errors.As(err, &ae) || ae.Status != 400 {
				t.Fatalf("bare 400: %v", err)
			}
		})
	}
	if v := (UploadResult{Name: "o.png", Type: "output"}).LoadImageValue(); v != "o.png [output]" {
		t.Errorf("output annotation %q", v)
	}
	c := newTestClient(t, "http://127.0.0.1:1")
	for _, bad := range []UploadRequest{{Name: "", Body: strings.NewReader("")}, {Name: "../x.png", Body: strings.NewReader("")},
		{Name: "x.png"}, {Name: "x.png", Body: strings.NewReader(""), Type: "models"}} {
		if _, err := c.UploadImage(testCtx(t), bad); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestViewCap(t *testing.T) {
	data := fileBytes(5000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if r.URL.Path != "/view" || q.Get("filename") != "x.png" || q.Get("type") != "output" || q.Get("subfolder") != "s" {
			http.NotFound(w, r)
			return
		}
		if r.Header.Get("X-Chunked") == "" && q.Get("chunked") == "" {
			w.Header().Set("Content-Length", "5000")
		}
		w.Header().Set("Content-Type", "image/png")
		// Write in pieces and flush so the body is chunked when no length is set.
		for i := 0; i < len(data); i += 1000 {
			_, _ = w.Write(data[i : i+1000])
			w.(http.Flusher).Flush()
		}
	}))
	t.Cleanup(srv.Close)
	c := newTestClient(t, srv.URL)
	ref := FileRef{Filename: "x.png", Subfolder: "s", Type: "output"}

	rc, err := c.View(testCtx(t), ref, 5000)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("exact cap: %d bytes, %v", len(got), err)
	}
	// Content-Length above the cap fails before any byte is read.
	if _, err := c.View(testCtx(t), ref, 4999); !errors.Is(err, ErrTooLarge) || IsTransient(err) {
		t.Fatalf("over cap: %v", err)
	}
	// Without a length the read fails once the cap is passed.
	chunked := newTestClient(t, srv.URL, WithHTTPClient(&http.Client{Transport: headerTransport{"X-Chunked", "1"}}))
	rc, err = chunked.View(testCtx(t), ref, 2500)
	if err != nil {
		t.Fatal(err)
	}
	got, err = io.ReadAll(rc)
	rc.Close()
	if !errors.Is(err, ErrTooLarge) || len(got) != 2500 {
		t.Fatalf("chunked over cap: %d bytes, %v", len(got), err)
	}
	if _, err := c.View(testCtx(t), FileRef{Filename: "../x.png"}, 0); err == nil {
		t.Fatal("traversal accepted")
	}
}

type headerTransport struct{ k, v string }

func (h headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(h.k, h.v)
	return http.DefaultTransport.RoundTrip(r)
}

func TestTooLargeAndForbidden(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/prompt", "/upload/image":
			_, _ = io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(http.StatusRequestEntityTooLarge)
			_, _ = io.WriteString(w, "413: Request Entity Too Large")
		default:
			w.WriteHeader(http.StatusForbidden) // the bare 403 of the origin check
		}
	}))
	t.Cleanup(srv.Close)
	c := newTestClient(t, srv.URL)
	_, err := c.Submit(testCtx(t), SubmitRequest{Prompt: json.RawMessage(`{"1": {"class_type": "X", "inputs": {}}}`)})
	if !errors.Is(err, ErrTooLarge) || IsTransient(err) {
		t.Fatalf("submit: %v", err)
	}
	_, err = c.UploadImage(testCtx(t), UploadRequest{Name: "big.png", Body: bytes.NewReader(make([]byte, 1<<20))})
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("upload: %v", err)
	}
	_, err = c.Queue(testCtx(t))
	var ae *APIError
	if !errors.Is(err, ErrForbidden) || !errors.As(err, &ae) || ae.Status != 403 || IsTransient(err) {
		t.Fatalf("queue: %v", err)
	}
}

// ComfyUI's origin check: any Origin that disagrees with Host gets a bare 403, WebSocket
// handshake included. The client must never send Origin or Sec-Fetch-* headers.
func TestNoOriginHeaders(t *testing.T) {
	var bad atomic.Int32
	tr := loadTrace(t, curDir, "info_system_stats_object_info.json")
	rp, srv := newReplay(t, tr)
	check := func(h http.Header) {
		for k := range h {
			if k == "Origin" || strings.HasPrefix(k, "Sec-Fetch-") {
				bad.Add(1)
			}
		}
	}
	rp.extra["GET /ws"] = func(w http.ResponseWriter, r *http.Request) {
		check(r.Header)
		ws, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_ = ws.WriteMessage(1, []byte(`{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "s"}}`))
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
		}
	}
	c := newTestClient(t, srv.URL)
	ctx := testCtx(t)
	if _, err := c.SystemStats(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ObjectInfo(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := c.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Next(ctx); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	for _, r := range rp.requests() {
		check(r.Header)
	}
	if bad.Load() != 0 {
		t.Fatal("an Origin or Sec-Fetch-* header was sent")
	}
}

func TestFeatures(t *testing.T) {
	t.Run("classic v0.3.10", func(t *testing.T) {
		rp, srv := newReplay(t, loadTrace(t, oldDir, "info_system_stats_object_info.json"))
		c := newTestClient(t, srv.URL)
		f, err := c.Features(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if f.Generation != GenClassic || f.Version != "0.3.10" || f.TargetedInterrupt || f.JobsAPI || f.ClientPromptID ||
			f.ProgressState || f.PreviewMetadata || f.Flags != nil {
			t.Fatalf("%+v", f)
		}
		n := len(rp.requests())
		if _, err := c.Features(testCtx(t)); err != nil || len(rp.requests()) != n {
			t.Fatalf("not cached: %d requests after %d", len(rp.requests()), n)
		}
		c.ForgetFeatures()
		if _, err := c.Features(testCtx(t)); err != nil || len(rp.requests()) == n {
			t.Fatal("ForgetFeatures did not re-detect")
		}
	})
	t.Run("current v0.8.0", func(t *testing.T) {
		_, srv := newReplay(t, loadTrace(t, curDir, "info_system_stats_object_info.json"))
		c := newTestClient(t, srv.URL)
		f, err := c.Features(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if f.Generation != GenCurrent || f.Version != "0.8.0" || !f.TargetedInterrupt || !f.JobsAPI || !f.ClientPromptID ||
			!f.ProgressState || !f.PreviewMetadata || f.MaxUploadSize != 104857600 || f.Flags["extension"] == nil {
			t.Fatalf("%+v", f)
		}
	})
	t.Run("legacy", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/system_stats" {
				_, _ = io.WriteString(w, `{"system": {"os": "posix", "python_version": "3.10.6", "embedded_python": false},
					"devices": [{"name": "cuda:0 NVIDIA GeForce RTX 3090 : cudaMallocAsync", "type": "cuda", "index": 0,
					"vram_total": 25447170048, "vram_free": 24000000000, "torch_vram_total": 0, "torch_vram_free": 0}]}`)
				return
			}
			http.NotFound(w, r)
		}))
		t.Cleanup(srv.Close)
		c := newTestClient(t, srv.URL)
		f, err := c.Features(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if f.Generation != GenLegacy || f.Version != "" || f.TargetedInterrupt || f.JobsAPI || f.ProgressState {
			t.Fatalf("%+v", f)
		}
		s, err := c.SystemStats(testCtx(t))
		if err != nil || s.System.HasVersion || *s.Devices[0].Index != 0 || s.Devices[0].VRAMTotal != 25447170048 {
			t.Fatalf("%+v %v", s, err)
		}
	})
	t.Run("2023 build without system_stats", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		t.Cleanup(srv.Close)
		f, err := newTestClient(t, srv.URL).Features(testCtx(t))
		if err != nil || f.Generation != GenLegacy || f.Version != "" {
			t.Fatalf("%+v %v", f, err)
		}
	})
	t.Run("features failing", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/system_stats" {
				_, _ = io.WriteString(w, `{"system": {"comfyui_version": "0.3.60"}, "devices": []}`)
				return
			}
			w.WriteHeader(502)
		}))
		t.Cleanup(srv.Close)
		c := newTestClient(t, srv.URL)
		if _, err := c.Features(testCtx(t)); err == nil || !IsTransient(err) {
			t.Fatalf("502 from /features: %v", err)
		}
		if c.feat != nil {
			t.Fatal("a failed detection was cached")
		}
	})
	t.Run("down", func(t *testing.T) {
		c := newTestClient(t, "http://"+closedAddr(t))
		if _, err := c.Features(testCtx(t)); err == nil || !IsTransient(err) {
			t.Fatalf("%v", err)
		}
	})
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string][3]int{"0.3.57": {0, 3, 57}, "v0.3.10": {0, 3, 10}, "0.8.0": {0, 8, 0},
		"0.4": {0, 4, 0}, "v0.2.2-12-gabcdef": {0, 2, 2}, "1.2.3+cu": {1, 2, 3}} {
		got, ok := parseVersion(in)
		if !ok || got != want {
			t.Errorf("%q: %v %v", in, got, ok)
		}
	}
	for _, bad := range []string{"", "unknown", "1", "a.b.c", "1.2.3.4", "-1.2"} {
		if _, ok := parseVersion(bad); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}

// fakeQueueServer serves /queue and /history/{id} from mutable state.
type fakeQueueServer struct {
	queue       atomic.Value // string
	history     atomic.Value // map[string]string
	queueCalls  atomic.Int32
	onQueueCall func(n int32)
}

func (f *fakeQueueServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/queue":
		n := f.queueCalls.Add(1)
		_, _ = io.WriteString(w, f.queue.Load().(string))
		if f.onQueueCall != nil {
			f.onQueueCall(n)
		}
	case strings.HasPrefix(r.URL.Path, "/history/"):
		id := strings.TrimPrefix(r.URL.Path, "/history/")
		if e, ok := f.history.Load().(map[string]string)[id]; ok {
			_, _ = io.WriteString(w, `{"`+id+`": `+e+`}`)
			return
		}
		_, _ = io.WriteString(w, `{}`)
	default:
		http.NotFound(w, r)
	}
}

func TestPromptStatus(t *testing.T) {
	f := &fakeQueueServer{}
	f.queue.Store(`{"queue_running": [[1, "run", {}, {}, []]], "queue_pending": [[3, "p2", {}, {}, []], [2, "p1", {}, {}, []]]}`)
	f.history.Store(map[string]string{"done": `{"prompt": [0, "done", {}, {}, []], "outputs": {}, "status": {"status_str": "success", "completed": true, "messages": []}}`})
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c := newTestClient(t, srv.URL)
	ctx := testCtx(t)
	for id, want := range map[string]PromptState{
		"run": {Phase: PromptRunning}, "p1": {Phase: PromptPending, Ahead: 1}, "p2": {Phase: PromptPending, Ahead: 2},
		"done": {Phase: PromptDone}, "gone": {Phase: PromptLost},
	} {
		f.queueCalls.Store(0)
		st, h, err := c.PromptStatus(ctx, id)
		if err != nil || st != want || (h != nil) != (want.Phase == PromptDone) {
			t.Errorf("%s: %v %v %v, want %v", id, st, h, err, want)
		}
		if want.Phase == PromptLost && f.queueCalls.Load() != 2 {
			t.Errorf("lost after %d queue checks, want 2", f.queueCalls.Load())
		}
	}
	// The prompt finishes between the first queue check and the history check: found in history.
	f.queue.Store(`{"queue_running": [], "queue_pending": []}`)
	f.history.Store(map[string]string{})
	f.queueCalls.Store(0)
	f.onQueueCall = func(n int32) {
		if n == 2 { // appears in history only after the first round missed it
			f.history.Store(map[string]string{"late": `{"prompt": [0, "late", {}, {}, []], "outputs": {}, "status": {"status_str": "error", "completed": false, "messages": [["execution_interrupted", {"prompt_id": "late", "node_id": "1", "node_type": "X", "executed": []}]]}}`})
		}
	}
	st, h, err := c.PromptStatus(ctx, "late")
	if err != nil || st.Phase != PromptDone || h.Outcome() != OutcomeInterrupted {
		t.Fatalf("late: %v %v %v", st, h, err)
	}
	if st.String() != "done" || (PromptState{Phase: PromptPending, Ahead: 3}).String() != "pending (3 ahead)" {
		t.Error("String")
	}
}

func TestControlRoutes(t *testing.T) {
	tr := loadTrace(t, curDir, "f3_interrupt_with_prompt_id.json")
	rp, srv := newReplay(t, tr)
	for _, p := range []string{"/queue", "/history", "/free"} {
		rp.extra["POST "+p] = func(w http.ResponseWriter, r *http.Request) {} // empty 200, no Content-Type
	}
	c := newTestClient(t, srv.URL)
	ctx := testCtx(t)
	steps := []struct {
		do   func() error
		path string
		body string
	}{
		{func() error { return c.Interrupt(ctx, "62b2bd74-0243-4fe5-bb15-f60787d304db") }, "/interrupt", `{"prompt_id":"62b2bd74-0243-4fe5-bb15-f60787d304db"}`},
		{func() error { return c.Interrupt(ctx, "") }, "/interrupt", ``},
		{func() error { return c.DeletePending(ctx, "a", "b") }, "/queue", `{"delete":["a","b"]}`},
		{func() error { return c.ClearPending(ctx) }, "/queue", `{"clear":true}`},
		{func() error { return c.DeleteHistory(ctx, "a") }, "/history", `{"delete":["a"]}`},
		{func() error { return c.Free(ctx, true, false) }, "/free", `{"free_memory":false,"unload_models":true}`},
	}
	for i, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("#%d: %v", i, err)
		}
		reqs := rp.requests()
		last := reqs[len(reqs)-1]
		if last.Method != "POST" || last.Path != s.path || string(last.Body) != s.body {
			t.Errorf("#%d: sent %s %s %q, want %s %q", i, last.Method, last.Path, last.Body, s.path, s.body)
		}
	}
	n := len(rp.requests())
	if err := c.DeletePending(ctx); err != nil || len(rp.requests()) != n {
		t.Error("empty DeletePending sent a request")
	}
}

func TestSystemStatsAndObjectInfo(t *testing.T) {
	for _, dir := range traceDirs {
		_, srv := newReplay(t, loadTrace(t, dir, "info_system_stats_object_info.json"))
		c := newTestClient(t, srv.URL)
		s, err := c.SystemStats(testCtx(t))
		if err != nil || s.System.ComfyUIVersion == "" || len(s.Devices) != 1 || s.Devices[0].Index != nil {
			t.Fatalf("%s: %+v %v", dir, s, err)
		}
		names, err := c.ClassNames(testCtx(t))
		if err != nil || len(names) != 10 || names[0] != "EmptyImage" {
			t.Fatalf("%s: %v %v", dir, names, err)
		}
		info, err := c.ObjectInfo(testCtx(t))
		if err != nil || !info["SaveImage"].OutputNode || info["ImageBlur"].OutputNode || info["SaveImage"].Category != "image" {
			t.Fatalf("%s: %v", dir, err)
		}
	}
}

func TestObjectInfoLenient(t *testing.T) {
	info, err := DecodeObjectInfo([]byte(`{
		"Odd": {"name": 5, "display_name": null, "output_node": "yes", "input": {"required": {"m": ["COMBO", {"options": ["a.safetensors", 3, "b.gguf"]}]}}},
		"Broken": [1, 2],
		"Loader": {"name": "Loader", "input": {"required": {"ckpt_name": [["x.ckpt", "y.safetensors"], {}]}, "optional": {"o": ["INT"]}}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if info["Odd"].Name != "Odd" || info["Broken"].Name != "Broken" || info["Odd"].OutputNode {
		t.Errorf("%+v", info)
	}
	if got := info["Odd"].ComboOptions("m"); !jsonEqual(t, got, []string{"a.safetensors", "b.gguf"}) {
		t.Errorf("V3 combo %v", got)
	}
	if got := info["Loader"].ComboOptions("ckpt_name"); !jsonEqual(t, got, []string{"x.ckpt", "y.safetensors"}) {
		t.Errorf("classic combo %v", got)
	}
	if got := info["Loader"].InputNames(); !jsonEqual(t, got, []string{"ckpt_name", "o"}) || info["Loader"].ComboOptions("o") != nil {
		t.Errorf("inputs %v", got)
	}
}

// closedAddr returns a loopback address that refuses connections until the
// test ends.
func closedAddr(t *testing.T) string { return testnet.RefusedAddr(t) }

func TestIsTransient(t *testing.T) {
	c := newTestClient(t, "http://"+closedAddr(t))
	_, err := c.Queue(testCtx(t))
	if err == nil || !IsTransient(err) {
		t.Errorf("connection refused: %v transient=%v", err, IsTransient(err))
	}

	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hang":
			select {
			case <-block:
			case <-r.Context().Done():
			}
		case "/reset":
			conn, _, _ := w.(http.Hijacker).Hijack()
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			conn.Close()
		case "/503":
			w.WriteHeader(503)
		case "/400":
			w.WriteHeader(400)
		}
	}))
	t.Cleanup(func() { close(block); srv.Close() })
	c = newTestClient(t, srv.URL, WithRequestTimeout(100*time.Millisecond))
	get := func(ctx context.Context, p string) error {
		return c.doJSON(ctx, request{method: "GET", path: p}, nil)
	}
	for p, want := range map[string]bool{"/hang": true, "/reset": true, "/503": true, "/400": false} {
		err := get(testCtx(t), p)
		if err == nil || IsTransient(err) != want {
			t.Errorf("%s: %v transient=%v, want %v", p, err, IsTransient(err), want)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := get(ctx, "/hang"); err == nil || IsTransient(err) {
		t.Errorf("cancelled: %v", err)
	}
	for _, err := range []error{nil, ErrTooLarge, ErrForbidden, &ValidationError{APIError: &APIError{Status: 400}}, errors.New("x")} {
		if IsTransient(err) {
			t.Errorf("%v transient", err)
		}
	}
}

func TestNaturalLess(t *testing.T) {
	ids := []string{"10", "2", "1", "2:10", "2:3", "a", "01", "b1", "b10", "b2", "", "100"}
	sorted := append([]string(nil), ids...)
	sortStrings(sorted)
	want := []string{"", "1", "01", "2", "2:3", "2:10", "10", "100", "a", "b1", "b2", "b10"}
	if !jsonEqual(t, sorted, want) {
		t.Fatalf("%v", sorted)
	}
	for _, a := range ids {
		if naturalLess(a, a) {
			t.Errorf("%q < itself", a)
		}
		for _, b := range ids {
			if a != b && naturalLess(a, b) == naturalLess(b, a) {
				t.Errorf("%q and %q not ordered", a, b)
			}
		}
	}
}

func sortStrings(s []string) {
	m := map[string]bool{}
	for _, x := range s {
		m[x] = true
	}
	copy(s, sortedKeys(m))
}

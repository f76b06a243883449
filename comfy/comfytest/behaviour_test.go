package comfytest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"image"
	"image/png"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

func sdPrompt(seed int, steps int, prefix string) string {
	return fmt.Sprintf(`{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat in a hat", "clip": ["4", 1]}},
 "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": %d, "steps": %d, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "%s", "images": ["8", 0]}}
}`, seed, steps, prefix)
}

func TestSDWorkflowProgressCheckpointAndCache(t *testing.T) {
	s := newTestServer(t, Options{CheckpointLoad: 30 * time.Millisecond, Previews: true})
	sock := wsDial(t, s, "?clientId=sd")
	id := submit(t, s, `{"client_id": "sd", "prompt": `+sdPrompt(42, 5, "job42")+`}`)
	sock.waitFrame(t, "finish", finished(id))

	var progress []string
	frames := sock.frames()
	for i, f := range frames {
		if f.binary {
			if binary.BigEndian.Uint32(f.data) != 1 || binary.BigEndian.Uint32(f.data[4:]) != 1 {
				t.Errorf("preview frame header % x, want type 1 JPEG", f.data[:8])
			}
			if _, _, err := image.DecodeConfig(bytes.NewReader(f.data[8:])); err != nil {
				t.Errorf("preview is not an image: %v", err)
			}
			// Type 1 previews follow their progress frame.
			if prev := field(mustDecode(t, frames[i-1].data), "type"); prev != "progress" {
				t.Errorf("preview after %v", prev)
			}
			continue
		}
		v := mustDecode(t, f.data)
		if field(v, "type") == "progress" {
			progress = append(progress, fmt.Sprintf("%v/%v@%v", field(v, "data.value"), field(v, "data.max"), field(v, "data.node")))
		}
	}
	if strings.Join(progress, " ") != "1/5@3 2/5@3 3/5@3 4/5@3 5/5@3" {
		t.Errorf("progress %v", progress)
	}
	if st := s.Stats(); len(st.Loaded) != 1 || st.Loaded[0] != "v1-5-pruned-emaonly.safetensors" {
		t.Errorf("loaded %v", st.Loaded)
	}
	data, ok := s.ReadFile("output", "", "job42_00001_.png")
	if !ok {
		t.Fatal("job42_00001_.png not saved")
	}
	cfg, err := png.DecodeConfig(bytes.NewReader(data))
	if err != nil || cfg.Width != 512 || cfg.Height != 512 {
		t.Errorf("saved image %dx%d, %v", cfg.Width, cfg.Height, err)
	}
	if !bytes.Contains(data, []byte("tEXtprompt\x00")) || !bytes.Contains(data, []byte("KSampler")) {
		t.Error("saved PNG lacks the prompt metadata")
	}

	// A new seed reruns the sampler and what follows; loader and text
	// encoders come from the cache.
	n := len(sock.frames())
	id2 := submit(t, s, `{"client_id": "sd", "prompt": `+sdPrompt(43, 2, "job43")+`}`)
	sock.waitFrame(t, "second finish", finished(id2))
	cached := sock.waitFrame(t, "cached", func(typ string, d *obj) bool {
		return typ == "execution_cached" && field(d, "prompt_id") == id2
	})
	if got := pyJSON(field(cached, "nodes")); string(got) != `["4", "5", "6", "7"]` {
		t.Errorf("cached %s", got)
	}
	for _, f := range sock.frames()[n:] {
		if !f.binary && field(mustDecode(t, f.data), "data.node") == "4" {
			t.Errorf("checkpoint loader ran again: %s", f.data)
		}
	}

	call(t, "POST", s.URL()+"/free", `{"unload_models": true}`)
	waitFor(t, "models unloaded", func() bool { return len(s.Stats().Loaded) == 0 })
}

func TestPreviewMetadataNegotiation(t *testing.T) {
	s := newTestServer(t, Options{Previews: true})
	sock := wsDial(t, s, "?clientId=meta")
	if err := sock.conn.WriteMessage(websocket.TextMessage, []byte(`{"type": "feature_flags", "data": {"supports_preview_metadata": true}}`)); err != nil {
		t.Fatal(err)
	}
	sock.waitFrame(t, "server flags", func(typ string, d *obj) bool { return typ == "feature_flags" })
	id := submit(t, s, `{"client_id": "meta", "prompt": `+sdPrompt(1, 3, "meta")+`}`)
	sock.waitFrame(t, "finish", finished(id))
	frames := sock.frames()
	var previews int
	for i, f := range frames {
		if !f.binary {
			continue
		}
		previews++
		if binary.BigEndian.Uint32(f.data) != 4 {
			t.Fatalf("preview type %d, want 4", binary.BigEndian.Uint32(f.data))
		}
		n := binary.BigEndian.Uint32(f.data[4:])
		meta := mustDecode(t, f.data[8:8+n])
		if field(meta, "image_type") != "image/jpeg" || field(meta, "node_id") != "3" || field(meta, "prompt_id") != id {
			t.Errorf("metadata %s", f.data[8:8+n])
		}
		// Type 4 previews come before their progress frame.
		if next := field(mustDecode(t, frames[i+1].data), "type"); next != "progress" {
			t.Errorf("type-4 preview followed by %v", next)
		}
	}
	if previews != 3 {
		t.Errorf("%d previews, want 3", previews)
	}
}

func TestInterruptStopsAtNextProgressStep(t *testing.T) {
	s := newTestServer(t, Options{ClassTime: map[string]time.Duration{"KSampler": 100 * time.Second}})
	sock := wsDial(t, s, "?clientId=i")
	a := submit(t, s, `{"client_id": "i", "prompt": `+sdPrompt(7, 1000, "a")+`}`)
	b := submit(t, s, promptBody("b", "i"))
	sock.waitFrame(t, "sampler started", func(typ string, d *obj) bool { return typ == "executing" && field(d, "node") == "3" })
	// Targeted interrupts for other prompts are no-ops.
	call(t, "POST", s.URL()+"/interrupt", `{"prompt_id": "`+b+`"}`)
	call(t, "POST", s.URL()+"/interrupt", `{"prompt_id": "someone-else"}`)
	if s.Stats().Running != a {
		t.Fatal("sampler stopped by a foreign interrupt")
	}
	call(t, "POST", s.URL()+"/interrupt", `{"prompt_id": "`+a+`"}`)
	intr := sock.waitFrame(t, "interrupted", func(typ string, d *obj) bool { return typ == "execution_interrupted" })
	if field(intr, "node_id") != "3" || field(intr, "node_type") != "KSampler" {
		t.Errorf("interrupted %s", pyJSON(intr))
	}
	sock.waitFrame(t, "b finished", finished(b))
	if h := s.History(); h[a].Status != "interrupted" || h[b].Status != "success" {
		t.Errorf("statuses a=%q b=%q", h[a].Status, h[b].Status)
	}
	_, job := callJSON(t, "GET", s.URL()+"/api/jobs/"+a, "")
	if field(job, "status") != "failed" {
		t.Errorf("interrupted job status %v", field(job, "status"))
	}
}

func TestValidationEdgeCases(t *testing.T) {
	cases := []struct {
		name   string
		body   string
		status int
		want   string // error.type, or "node:<id>:<types>" for node errors
	}{
		{"bad linked input", `{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "x"}}}}`, 400, "node:2:bad_linked_input"},
		{"cycle", `{"prompt": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}}`, 400, "prompt_outputs_failed_validation"},
		{"slot out of range", `{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 5], "filename_prefix": "x"}}}}`, 400, "node:2:exception_during_validation"},
		{"missing inputs key", `{"prompt": {"2": {"class_type": "SaveImage"}}}`, 400, "node:2:exception_during_validation"},
		{"sampler not in long list", `{"prompt": ` + strings.Replace(sdPrompt(1, 2, "x"), `"euler"`, `"nope"`, 1) + `}`, 400, "node:3:value_not_in_list"},
		{"unknown checkpoint", `{"prompt": ` + strings.Replace(sdPrompt(1, 2, "x"), `v1-5-pruned-emaonly`, `nope`, 1) + `}`, 400, "node:4:value_not_in_list"},
		{"seed above uint64", `{"prompt": ` + strings.Replace(sdPrompt(1, 2, "x"), `"seed": 1`, `"seed": 18446744073709551616`, 1) + `}`, 400, "node:3:value_bigger_than_max"},
		{"empty prompt", `{"prompt": {}}`, 400, "prompt_no_outputs"},
		{"prompt is a list", `{"prompt": [1]}`, 500, ""},
		{"node is a number", `{"prompt": {"1": 5}}`, 500, ""},
		{"number not numeric", `{"number": "soon", "prompt": {}}`, 500, ""},
		{"body is a list", `["prompt"]`, 500, ""},
		{"body is a string", `"hello"`, 400, "no_prompt"},
		{"extra_data not an object", `{"extra_data": [], "client_id": "x", "prompt": {}}`, 500, ""},
	}
	s := newTestServer(t, Options{})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, _, body := call(t, "POST", s.URL()+"/prompt", tc.body)
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if tc.want == "" {
				return
			}
			v := mustDecode(t, body)
			if node, types, ok := strings.Cut(strings.TrimPrefix(tc.want, "node:"), ":"); ok && strings.HasPrefix(tc.want, "node:") {
				if got := errorTypes(field(v, "node_errors."+node)); got != types {
					t.Errorf("node %s errors %q, want %q: %s", node, got, types, body)
				}
				return
			}
			if got := field(v, "error.type"); got != tc.want {
				t.Errorf("error.type %v, want %s: %s", got, tc.want, body)
			}
		})
	}
	// A combo of more than 20 options is not echoed.
	_, _, body := call(t, "POST", s.URL()+"/prompt", cases[4].body)
	e := field(mustDecode(t, body), "node_errors.3.errors").([]any)[0]
	if field(e, "details") != "sampler_name: 'nope' not in (list of length 29)" || field(e, "extra_info.input_config") != nil {
		t.Errorf("long combo error %s", pyJSON(e))
	}
}

func TestPromptConversionAndClientChoices(t *testing.T) {
	s := newTestServer(t, Options{})
	body := `{"prompt_id": "mine-1", "prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": "64", "height": 32.9, "batch_size": true, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "conv"}}, "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, "partial_execution_targets": ["2"]}`
	id := submit(t, s, body)
	if id != "mine-1" {
		t.Fatalf("prompt_id %q, want the client's", id)
	}
	e := waitHistory(t, s, id)
	inputs := field(e, "prompt").([]any)[2]
	if got := string(pyJSON(field(inputs, "1.inputs"))); got != `{"width": 64, "height": 32, "batch_size": 1, "color": 0}` {
		t.Errorf("converted inputs %s", got)
	}
	if outs := field(e, "outputs").(*obj); outs.len() != 1 || !outs.has("2") {
		t.Errorf("partial execution ran %v", outs.keys)
	}

	classic := newTestServer(t, Options{Generation: GenClassic})
	if id := submit(t, classic, body); id == "mine-1" {
		t.Error("v0.3.10 honoured a client prompt_id")
	}
}

func TestSaveImagePathsAndCounters(t *testing.T) {
	s := newTestServer(t, Options{})
	body := func(prefix string, batch int) string {
		return fmt.Sprintf(`{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": %d, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": %q}}}}`, batch, prefix)
	}
	id := submit(t, s, body("jobs/7/out", 2))
	imgs := field(waitHistory(t, s, id), "outputs.2.images").([]any)
	if len(imgs) != 2 || field(imgs[0], "filename") != "out_00001_.png" || field(imgs[1], "filename") != "out_00002_.png" || field(imgs[0], "subfolder") != "jobs/7" {
		t.Fatalf("batch outputs %s", pyJSON(imgs))
	}
	id = submit(t, s, body("jobs/7/out", 1))
	if f := field(field(waitHistory(t, s, id), "outputs.2.images").([]any)[0], "filename"); f != "out_00003_.png" {
		t.Errorf("counter continued at %v", f)
	}
	status, ctype, data := call(t, "GET", s.URL()+"/view?filename=out_00003_.png&subfolder=jobs/7&type=output", "")
	if status != 200 || ctype != "image/png" || !isPNG(data) {
		t.Errorf("view %d %s", status, ctype)
	}
	// Escaping the output folder fails at run time, like ComfyUI.
	sock := wsDial(t, s, "?clientId=esc")
	id = submit(t, s, strings.Replace(body("../../etc/x", 1), `{"prompt"`, `{"client_id": "esc", "prompt"`, 1))
	e := sock.waitFrame(t, "error", func(typ string, d *obj) bool { return typ == "execution_error" })
	if field(e, "exception_type") != "Exception" || !strings.Contains(field(e, "exception_message").(string), "outside the output folder") {
		t.Errorf("escape error %s", pyJSON(e))
	}
	sock.waitFrame(t, "finish", finished(id))
}

func TestViewRules(t *testing.T) {
	s := newTestServer(t, Options{})
	if err := s.WriteInput("pic.png", solidPNG(4, 3, [3]uint8{1, 2, 3}, nil)); err != nil {
		t.Fatal(err)
	}
	classic := newTestServer(t, Options{Generation: GenClassic})
	cases := []struct {
		srv    *Server
		query  string
		status int
	}{
		{s, "filename=pic.png&type=input", 200},
		{s, "filename=pic.png%20[input]", 200},
		{s, "filename=pic.png", 404},
		{s, "", 404},
		{s, "filename=../pic.png&type=input", 400},
		{s, "filename=/etc/passwd", 400},
		{s, "filename=pic.png&type=models", 400},
		{s, "filename=pic.png&type=input&subfolder=../..", 403},
		{s, "filename=pic.png&type=input&subfolder=/etc", 403},
		{s, "filename=", 400},
		{classic, "filename=", 500},
		{s, "filename=pic.png&type=input&preview=jpeg;50", 200},
		{s, "filename=pic.png&type=input&channel=a", 200},
	}
	for _, tc := range cases {
		status, ctype, body := call(t, "GET", tc.srv.URL()+"/view?"+tc.query, "")
		if status != tc.status {
			t.Errorf("/view?%s: %d, want %d", tc.query, status, tc.status)
			continue
		}
		if status == 200 {
			if _, _, err := image.DecodeConfig(bytes.NewReader(body)); err != nil {
				t.Errorf("/view?%s: %s body is not an image: %v", tc.query, ctype, err)
			}
		}
	}
	resp, err := httpClient.Head(s.URL() + "/view?filename=pic.png&type=input")
	if err != nil || resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "image/png" {
		t.Errorf("HEAD /view: %v %v", err, resp)
	}
	req, _ := http.NewRequest("GET", s.URL()+"/view?filename=pic.png&type=input", nil)
	req.Header.Set("Range", "bytes=0-7")
	resp, err = httpClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusPartialContent {
		t.Errorf("range request: %v %v", err, resp)
	}
}

func upload(t *testing.T, s *Server, route string, fields map[string]string, name string, data []byte) (int, any) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	if name != "" {
		w, _ := mw.CreateFormFile("image", name)
		_, _ = w.Write(data)
	}
	for k, v := range fields {
		_ = mw.WriteField(k, v)
	}
	_ = mw.Close()
	resp, err := httpClient.Post(s.URL()+route, mw.FormDataContentType(), &buf)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	v, _ := decodeJSON(b.Bytes())
	return resp.StatusCode, v
}

func TestUploadRules(t *testing.T) {
	a, b := solidPNG(8, 8, [3]uint8{1, 1, 1}, nil), solidPNG(8, 8, [3]uint8{2, 2, 2}, nil)
	for _, gen := range []Generation{GenCurrent, GenLegacy} {
		t.Run(gen.String(), func(t *testing.T) {
			s := newTestServer(t, Options{Generation: gen})
			names := func(v any) string {
				return fmt.Sprintf("%v|%v|%v", field(v, "name"), field(v, "subfolder"), field(v, "type"))
			}
			_, v := upload(t, s, "/upload/image", nil, "cat.png", a)
			if names(v) != "cat.png||input" {
				t.Errorf("first upload %s", pyJSON(v))
			}
			_, v = upload(t, s, "/upload/image", nil, "cat.png", a)
			want := "cat.png||input" // identical bytes: the existing name
			if gen == GenLegacy {
				want = "cat (1).png||input" // no duplicate detection before 2024-07
			}
			if names(v) != want {
				t.Errorf("same bytes: %s, want %s", pyJSON(v), want)
			}
			_, v = upload(t, s, "/upload/image", nil, "cat.png", b)
			if n := field(v, "name"); n == "cat.png" {
				t.Errorf("different bytes kept the name")
			}
			_, v = upload(t, s, "/upload/image", map[string]string{"overwrite": "true"}, "cat.png", b)
			if field(v, "name") != "cat.png" {
				t.Errorf("overwrite renamed: %s", pyJSON(v))
			}
			if got, _ := s.ReadFile("input", "", "cat.png"); !bytes.Equal(got, b) {
				t.Error("overwrite did not replace the file")
			}
			_, v = upload(t, s, "/upload/image", map[string]string{"subfolder": "jobs/1", "type": "temp"}, "d.png", a)
			if names(v) != "d.png|jobs/1|temp" {
				t.Errorf("subfolder upload %s", pyJSON(v))
			}
			if st, _ := upload(t, s, "/upload/image", map[string]string{"type": "input"}, "", nil); st != 400 {
				t.Errorf("no image: %d", st)
			}
			if st, _ := upload(t, s, "/upload/image", map[string]string{"subfolder": "../../x"}, "e.png", a); st != 400 {
				t.Errorf("escaping subfolder: %d", st)
			}
			if st, _ := upload(t, s, "/upload/image", map[string]string{"type": "models"}, "e.png", a); st != 500 {
				t.Errorf("unknown type: %d", st)
			}
			// The upload shows up in LoadImage's combo.
			_, info := callJSON(t, "GET", s.URL()+"/object_info/LoadImage", "")
			if list := pyJSON(field(info, "LoadImage.input.required.image").([]any)[0]); !bytes.Contains(list, []byte(`"cat.png"`)) {
				t.Errorf("LoadImage options %s", list)
			}
		})
	}
}

func TestUploadMaskCopiesAlpha(t *testing.T) {
	s := newTestServer(t, Options{})
	upload(t, s, "/upload/image", nil, "base.png", solidPNG(4, 4, [3]uint8{9, 9, 9}, nil))
	var mask bytes.Buffer
	img := image.NewNRGBA(image.Rect(0, 0, 4, 4))
	for i := 3; i < len(img.Pix); i += 4 {
		img.Pix[i] = 77
	}
	_ = png.Encode(&mask, img)
	status, v := upload(t, s, "/upload/mask", map[string]string{"original_ref": `{"filename": "base.png", "subfolder": "", "type": "input"}`}, "mask.png", mask.Bytes())
	if status != 200 {
		t.Fatalf("upload/mask: %d %v", status, v)
	}
	data, _ := s.ReadFile("input", "", pyStr(field(v, "name")))
	out, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, a := out.At(1, 1).RGBA(); a>>8 != 77 {
		t.Errorf("alpha %d, want 77", a>>8)
	}
}

func TestBodyLimit(t *testing.T) {
	s := newTestServer(t, Options{MaxUploadMB: 0.001})
	big := `{"prompt": {}, "pad": "` + strings.Repeat("x", 2000) + `"}`
	status, ctype, body := call(t, "POST", s.URL()+"/prompt", big)
	if status != 413 || ctype != "text/plain; charset=utf-8" || !strings.HasPrefix(string(body), "Maximum request body size 1048 exceeded") {
		t.Errorf("oversized prompt: %d %s %q", status, ctype, body)
	}
	_, f := callJSON(t, "GET", s.URL()+"/features", "")
	if field(f, "max_upload_size") != int64(1048) {
		t.Errorf("features %s", pyJSON(f))
	}
}

func TestReconnectWithSameClientIDUnregistersNewSocket(t *testing.T) {
	s := newTestServer(t, Options{})
	old := wsDial(t, s, "?clientId=dup")
	fresh := wsDial(t, s, "?clientId=dup")
	old.close()
	// The old handler's exit removes the registration of "dup": the fresh
	// socket stays open but gets no per-prompt events (ComfyUI issue #16010).
	waitFor(t, "old socket unregistered", func() bool { return s.Stats().Sockets == 1 })
	id := submit(t, s, promptBody("dup", "dup"))
	waitHistory(t, s, id)
	waitFor(t, "status broadcasts", func() bool { return len(fresh.frames()) >= 1 })
	for _, typ := range frameTypes(t, fresh.frames()) {
		if typ != "status" {
			t.Errorf("fresh socket got %s", typ)
		}
	}
}

func TestRoutingAndMisc(t *testing.T) {
	s := newTestServer(t, Options{})
	checks := []struct {
		method, path, body string
		status             int
		ctype              string
	}{
		{"GET", "/nope", "", 404, "application/octet-stream"},
		{"POST", "/nope", "{}", 405, "text/plain; charset=utf-8"},
		{"GET", "/interrupt", "", 404, "application/octet-stream"},
		{"GET", "/jobs", "", 404, "application/octet-stream"},
		{"GET", "/api/jobs?limit=abc", "", 400, "application/json; charset=utf-8"},
		{"GET", "/api/jobs?sort_order=up", "", 400, "application/json; charset=utf-8"},
		{"GET", "/api/jobs/none", "", 404, "application/json; charset=utf-8"},
		{"POST", "/queue", "not json", 500, "text/plain; charset=utf-8"},
		{"POST", "/history", `{"clear": true}`, 200, ""},
		{"POST", "/interrupt", "", 200, ""},
		{"GET", "/history?max_items=x", "", 500, "text/plain; charset=utf-8"},
		{"GET", "/models/checkpoints", "", 200, "application/json; charset=utf-8"},
		{"GET", "/models/nope", "", 404, ""},
		{"GET", "/api/object_info/EmptyImage", "", 200, "application/json; charset=utf-8"},
	}
	for _, c := range checks {
		status, ctype, body := call(t, c.method, s.URL()+c.path, c.body)
		if status != c.status || ctype != c.ctype {
			t.Errorf("%s %s: %d %q (%s), want %d %q", c.method, c.path, status, ctype, body, c.status, c.ctype)
		}
	}
	// The origin check of 2024-09+: a browser origin that is not the host.
	req, _ := http.NewRequest("GET", s.URL()+"/queue", nil)
	req.Header.Set("Origin", "http://evil.example")
	resp, err := httpClient.Do(req)
	if err != nil || resp.StatusCode != 403 {
		t.Errorf("foreign origin: %v %v", err, resp)
	}
	for gen, os := range map[Generation]string{GenCurrent: "linux", GenClassic: "posix"} {
		srv := newTestServer(t, Options{Generation: gen})
		_, st := callJSON(t, "GET", srv.URL()+"/system_stats", "")
		if field(st, "system.os") != os || field(st, "devices") == nil {
			t.Errorf("%s system_stats %s", gen, pyJSON(st))
		}
	}
}

func TestNoClientIDPromptBroadcastsOnlyWhatComfyUIBroadcasts(t *testing.T) {
	s := newTestServer(t, Options{ProgressSteps: map[string]int{"ImageInvert": 2}})
	watcher := wsDial(t, s, "?clientId=watcher")
	id := submit(t, s, promptBody("anon", ""))
	waitHistory(t, s, id)
	// sid status, then enqueue, dequeue and the final status: the last frame
	// a prompt without client_id sends.
	waitFor(t, "final status", func() bool {
		n := 0
		for _, typ := range frameTypes(t, watcher.frames()) {
			if typ == "status" {
				n++
			}
		}
		return n >= 4
	})
	seen := map[string]int{}
	for _, typ := range frameTypes(t, watcher.frames()) {
		seen[typ]++
	}
	if seen["progress"] != 2 || seen["progress_state"] == 0 || seen["executing"] != 0 || seen["execution_start"] != 0 || seen["executed"] != 0 {
		t.Errorf("watcher saw %v", seen)
	}
}

// Model lists change without a restart, as files copied into a model folder
// do: /object_info offers the new list and validation checks against it,
// answering a name no longer there with value_not_in_list "Value not in list".
func TestSetCheckpoints(t *testing.T) {
	s := newTestServer(t, Options{Checkpoints: []string{"a.safetensors"}, Loras: []string{}})
	prompt := func(ckpt string) (int, string) {
		status, _, body := call(t, "POST", s.URL()+"/prompt",
			`{"prompt": `+strings.Replace(sdPrompt(1, 2, "x"), `v1-5-pruned-emaonly.safetensors`, ckpt, 1)+`}`)
		return status, string(body)
	}
	choices := func() string {
		_, _, body := call(t, "GET", s.URL()+"/object_info/CheckpointLoaderSimple", "")
		return string(body)
	}
	if status, body := prompt("b.safetensors"); status != 400 || !strings.Contains(body, `"value_not_in_list"`) || !strings.Contains(body, `"Value not in list"`) {
		t.Fatalf("unknown checkpoint: %d %s", status, body)
	}
	s.SetCheckpoints("a.safetensors", "b.safetensors")
	if body := choices(); !strings.Contains(body, `"b.safetensors"`) {
		t.Fatalf("object_info after SetCheckpoints: %s", body)
	}
	if status, body := prompt("b.safetensors"); status != 200 {
		t.Fatalf("checkpoint added: %d %s", status, body)
	}
	s.SetCheckpoints("b.safetensors")
	if status, body := prompt("a.safetensors"); status != 400 || !strings.Contains(body, "value_not_in_list") {
		t.Fatalf("checkpoint removed: %d %s", status, body)
	}
	if body := choices(); strings.Contains(body, `"a.safetensors"`) {
		t.Fatalf("object_info still lists a removed checkpoint: %s", body)
	}
	if got := s.Loras(); len(got) != 0 {
		t.Errorf("loras %v, want none as configured", got)
	}
}

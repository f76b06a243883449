package comfy

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// wireView maps a decoded event back to the wire's data keys, written independently of the
// decoder, so a golden frame can be compared key by key: a key of the frame missing here, or a
// value that differs, is data the decoder lost.
func wireView(t *testing.T, ev Event) map[string]any {
	t.Helper()
	nullable := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	switch e := ev.(type) {
	case *Status:
		return map[string]any{"status": map[string]any{"exec_info": map[string]any{"queue_remaining": e.QueueRemaining}}, "sid": e.SID}
	case *ExecutionStart:
		return map[string]any{"prompt_id": e.PromptID, "timestamp": e.Timestamp}
	case *ExecutionCached:
		return map[string]any{"prompt_id": e.PromptID, "nodes": e.Nodes, "timestamp": e.Timestamp}
	case *Executing:
		var node any = e.Node
		if e.Done {
			node = nil
		}
		return map[string]any{"prompt_id": e.PromptID, "node": node, "display_node": e.DisplayNode}
	case *Progress:
		return map[string]any{"prompt_id": e.PromptID, "node": e.Node, "value": e.Value, "max": e.Max}
	case *ProgressState:
		nodes := map[string]any{}
		for id, n := range e.Nodes {
			nodes[id] = map[string]any{"value": n.Value, "max": n.Max, "state": n.State, "node_id": n.NodeID,
				"prompt_id": n.PromptID, "display_node_id": n.DisplayNodeID, "parent_node_id": nullable(n.ParentNodeID),
				"real_node_id": n.RealNodeID}
		}
		return map[string]any{"prompt_id": e.PromptID, "nodes": nodes}
	case *Executed:
		return map[string]any{"prompt_id": e.PromptID, "node": e.Node, "display_node": e.DisplayNode, "output": e.Output}
	case *ExecutionSuccess:
		return map[string]any{"prompt_id": e.PromptID, "timestamp": e.Timestamp}
	case *ExecutionError:
		return map[string]any{"prompt_id": e.PromptID, "node_id": e.NodeID, "node_type": e.NodeType,
			"exception_message": e.ExceptionMessage, "exception_type": e.ExceptionType, "traceback": e.Traceback,
			"executed": e.Executed, "current_inputs": e.CurrentInputs, "current_outputs": e.CurrentOutputs,
			"timestamp": e.Timestamp}
	case *ExecutionInterrupted:
		return map[string]any{"prompt_id": e.PromptID, "node_id": e.NodeID, "node_type": e.NodeType,
			"executed": e.Executed, "timestamp": e.Timestamp}
	case *FeatureFlags:
		return e.Flags
	}
	t.Fatalf("no wire view for %T", ev)
	return nil
}

// checkAgainstData asserts that every key of the recorded data survived decoding.
func checkAgainstData(t *testing.T, where string, ev Event, data map[string]any) {
	t.Helper()
	view := wireView(t, ev)
	for k, want := range data {
		got, ok := view[k]
		if !ok {
			t.Errorf("%s: %s: field %q not decoded", where, ev.EventType(), k)
			continue
		}
		if !jsonEqual(t, got, want) {
			t.Errorf("%s: %s.%s = %v, want %v", where, ev.EventType(), k, truncate(toJSON(got), 120), truncate(toJSON(want), 120))
		}
	}
	if pid, ok := data["prompt_id"].(string); ok && ev.EventPromptID() != pid {
		t.Errorf("%s: EventPromptID %q, want %q", where, ev.EventPromptID(), pid)
	}
}

func toJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestGoldenTextFrames(t *testing.T) {
	counts := map[string]map[string]int{}
	for _, tr := range loadTraces(t) {
		if counts[tr.Dir] == nil {
			counts[tr.Dir] = map[string]int{}
		}
		for i, e := range tr.Events {
			if e.Kind != "ws_text" {
				continue
			}
			where := traceName(tr) + "#" + itoa(i)
			var env struct {
				Type string         `json:"type"`
				Data map[string]any `json:"data"`
			}
			if err := json.Unmarshal(e.Data, &env); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			ev, err := DecodeText([]byte(e.Raw))
			if err != nil {
				t.Errorf("%s: DecodeText: %v", where, err)
				continue
			}
			if u, ok := ev.(*Unknown); ok {
				t.Errorf("%s: type %q decoded as Unknown", where, u.Type)
				continue
			}
			if ev.EventType() != env.Type {
				t.Errorf("%s: EventType %q, want %q", where, ev.EventType(), env.Type)
			}
			checkAgainstData(t, where, ev, env.Data)
			counts[tr.Dir][env.Type]++

			wantTerminal := env.Type == "execution_success" || env.Type == "execution_interrupted" ||
				(env.Type == "execution_error" && env.Data["exception_type"] != "ExecutionBlocked") ||
				(env.Type == "executing" && env.Data["node"] == nil)
			if IsTerminal(ev) != wantTerminal {
				t.Errorf("%s: IsTerminal %v for %s", where, IsTerminal(ev), env.Type)
			}
			// Spot checks of the typed fields on top of the generic comparison.
			switch x := ev.(type) {
			case *Executing:
				if x.Done != (env.Data["node"] == nil) {
					t.Errorf("%s: Done %v with node %v", where, x.Done, env.Data["node"])
				}
			case *ExecutionError:
				if x.Blocked() || x.Error() == "" || len(x.Traceback) == 0 {
					t.Errorf("%s: execution_error decoded as %+v", where, x)
				}
			case *Executed:
				if len(x.Files()) == 0 {
					t.Errorf("%s: executed without files", where)
				}
			}
		}
	}
	// Every message type recorded must have been seen, per generation.
	want := map[string][]string{
		"testdata/comfy-traces": {"status", "execution_start", "execution_cached", "executing", "progress",
			"executed", "execution_success", "execution_error", "execution_interrupted"},
		"testdata/comfy-traces-current": {"status", "execution_start", "execution_cached", "executing", "progress",
			"progress_state", "executed", "execution_success", "execution_error", "execution_interrupted", "feature_flags"},
	}
	for dir, types := range want {
		for _, typ := range types {
			if counts[dir][typ] == 0 {
				t.Errorf("%s: no %s frame decoded", dir, typ)
			}
		}
	}
	t.Logf("decoded frames: %v", counts)
}

// The history's status.messages are the same payloads as the WebSocket frames.
func TestGoldenHistoryMessages(t *testing.T) {
	n := 0
	for _, tr := range loadTraces(t) {
		for i, e := range tr.Events {
			if e.Kind != "http_response" || e.Method != "GET" || !strings.HasPrefix(e.Path, "/history") || e.Status != 200 {
				continue
			}
			var raw map[string]struct {
				Status *struct {
					Messages [][2]json.RawMessage `json:"messages"`
				} `json:"status"`
			}
			if err := json.Unmarshal(e.Body, &raw); err != nil {
				t.Fatal(err)
			}
			entries, err := DecodeHistory(e.Body)
			if err != nil {
				t.Fatalf("%s#%d: %v", traceName(tr), i, err)
			}
			for id, r := range raw {
				if r.Status == nil {
					continue
				}
				h := entries[id]
				if len(h.Status.Messages) != len(r.Status.Messages) {
					t.Fatalf("%s: %d messages, want %d", id, len(h.Status.Messages), len(r.Status.Messages))
				}
				for j, m := range h.Status.Messages {
					ev, err := m.Event()
					if err != nil {
						t.Fatalf("%s message %d: %v", id, j, err)
					}
					if _, unknown := ev.(*Unknown); unknown {
						t.Errorf("%s message %d: type %s unknown", id, j, m.Type)
						continue
					}
					checkAgainstData(t, traceName(tr)+" history "+id, ev, mustJSONMap(t, r.Status.Messages[j][1]))
					n++
				}
			}
		}
	}
	if n < 50 {
		t.Fatalf("only %d history messages checked", n)
	}
}

func TestGoldenBinaryFrames(t *testing.T) {
	kinds := map[uint32]int{}
	for _, tr := range loadTraces(t) {
		for _, e := range tr.Events {
			if e.Kind != "ws_binary" {
				continue
			}
			frame := e.frame(t)
			ev, err := DecodeBinary(frame)
			if err != nil {
				t.Fatalf("%s: %v", traceName(tr), err)
			}
			p, ok := ev.(*Preview)
			if !ok {
				t.Fatalf("%s: decoded %T", traceName(tr), ev)
			}
			kinds[p.Kind]++
			if p.EventType() != "preview" {
				t.Errorf("EventType %q", p.EventType())
			}
			switch p.Kind {
			case BinaryPreviewImage:
				if p.Format != PreviewFormatPNG || p.ContentType != "image/png" || len(p.Image) != e.Length-8 || p.Meta != nil {
					t.Errorf("%s: kind 1 decoded as %+v", traceName(tr), p)
				}
			case BinaryPreviewImageWithMetadata:
				head, _ := hex.DecodeString(e.First8Hex)
				metaLen := int(head[4])<<24 | int(head[5])<<16 | int(head[6])<<8 | int(head[7])
				if got := len(pythonJSON(t, e.Metadata)); got != metaLen {
					t.Fatalf("rebuilt metadata is %d bytes, recorded %d", got, metaLen)
				}
				var meta map[string]any
				_ = json.Unmarshal(e.Metadata, &meta)
				if p.Meta == nil || p.Meta.NodeID != meta["node_id"] || p.Meta.PromptID != meta["prompt_id"] ||
					p.Meta.DisplayNodeID != meta["display_node_id"] || p.Meta.RealNodeID != meta["real_node_id"] ||
					p.Meta.ParentNodeID != "" || p.Meta.ImageType != meta["image_type"] {
					t.Errorf("metadata decoded as %+v, want %v", p.Meta, meta)
				}
				img, _ := hex.DecodeString(e.ImageFirst8Hex)
				if p.ContentType != "image/png" || !bytes.HasPrefix(p.Image, img) || len(p.Image) != e.Length-8-metaLen {
					t.Errorf("kind 4 image: %s, %d bytes", p.ContentType, len(p.Image))
				}
				if p.EventPromptID() != meta["prompt_id"] {
					t.Errorf("EventPromptID %q", p.EventPromptID())
				}
			default:
				t.Errorf("unexpected kind %d", p.Kind)
			}
		}
	}
	if kinds[1] != 8 || kinds[4] != 2 {
		t.Fatalf("binary frames decoded per kind: %v, want 8 of kind 1 and 2 of kind 4", kinds)
	}
}

func TestGoldenHTTPBodies(t *testing.T) {
	seen := map[string]int{}
	for _, tr := range loadTraces(t) {
		for i, e := range tr.Events {
			if e.Kind != "http_response" {
				continue
			}
			where := traceName(tr) + "#" + itoa(i) + " " + e.Method + " " + e.Path
			path := strings.SplitN(e.Path, "?", 2)[0]
			gen := filepath.Base(tr.Dir)
			switch {
			case e.Method == "POST" && path == "/prompt":
				checkPromptBody(t, where, e)
				seen[gen+" prompt "+itoa(e.Status)]++
			case e.Method == "GET" && (path == "/queue" || path == "/api/queue"):
				checkQueueBody(t, where, e.Body)
				seen[gen+" queue"]++
			case e.Method == "GET" && strings.HasPrefix(path, "/history"):
				checkHistoryBody(t, where, e.Body)
				seen[gen+" history"]++
			case e.Method == "GET" && path == "/system_stats":
				checkSystemStats(t, where, e.Body)
				seen[gen+" system_stats"]++
			case e.Method == "GET" && strings.HasPrefix(path, "/object_info"):
				body := e.Body
				if len(body) == 0 {
					body = e.BodyExcerpt
				}
				checkObjectInfo(t, where, body)
				seen[gen+" object_info"]++
			case e.Method == "GET" && (path == "/features" || path == "/api/features"):
				var flags map[string]any
				if err := json.Unmarshal(e.Body, &flags); err != nil || flags["supports_preview_metadata"] != true {
					t.Errorf("%s: features %v %v", where, flags, err)
				}
				seen[gen+" features"]++
			case e.Method == "POST" && path == "/upload/image":
				if e.Status == 200 {
					var r UploadResult
					if err := json.Unmarshal(e.Body, &r); err != nil || r.Name == "" || r.Type != "input" {
						t.Errorf("%s: upload result %+v %v", where, r, err)
					}
					seen[gen+" upload"]++
				}
			}
		}
	}
	for _, gen := range []string{"comfy-traces", "comfy-traces-current"} {
		for _, k := range []string{"prompt 200", "prompt 400", "prompt 500", "queue", "history", "system_stats", "object_info", "upload"} {
			if seen[gen+" "+k] == 0 {
				t.Errorf("%s: no %s body checked", gen, k)
			}
		}
		if seen[gen+" prompt 400"] < 11 {
			t.Errorf("%s: %d validation bodies, want 11", gen, seen[gen+" prompt 400"])
		}
	}
	if seen["comfy-traces-current features"] == 0 {
		t.Error("no /features body checked")
	}
	t.Logf("bodies checked: %v", seen)

	// The two plain files.
	for _, dir := range traceDirs {
		b, err := os.ReadFile(filepath.Join(dir, "system_stats.json"))
		if err != nil {
			t.Fatal(err)
		}
		checkSystemStats(t, dir, b)
		b, err = os.ReadFile(filepath.Join(dir, "object_info_used_nodes.json"))
		if err != nil {
			t.Fatal(err)
		}
		checkObjectInfo(t, dir, b)
	}
}

func checkPromptBody(t *testing.T, where string, e traceEvent) {
	t.Helper()
	switch e.Status {
	case 200:
		body := mustJSONMap(t, e.Body)
		resp, err := DecodeSubmitResponse(e.Body)
		if resp == nil || resp.PromptID != body["prompt_id"] || resp.Number != body["number"] {
			t.Fatalf("%s: decoded %+v, %v", where, resp, err)
		}
		ne, _ := body["node_errors"].(map[string]any)
		var ve *ValidationError
		if (len(ne) > 0) != errors.As(err, &ve) {
			t.Fatalf("%s: node_errors %v gave error %v", where, ne, err)
		}
		if ve != nil && (ve.Response != resp || len(ve.NodeErrors) != len(ne)) {
			t.Errorf("%s: validation error %+v", where, ve)
		}
	case 400:
		body := mustJSONMap(t, e.Body)
		ve, err := DecodeValidationError(e.Body)
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		switch x := body["error"].(type) {
		case string:
			if ve.Message != x || ve.Type != "" {
				t.Errorf("%s: string error decoded as %q/%q", where, ve.Type, ve.Message)
			}
		case map[string]any:
			if ve.Type != x["type"] || ve.Message != x["message"] || ve.Details != x["details"] || ve.Type == "" {
				t.Errorf("%s: error decoded as %q/%q/%q", where, ve.Type, ve.Message, ve.Details)
			}
		default:
			t.Fatalf("%s: odd error %v", where, x)
		}
		wantNodes, _ := body["node_errors"].(map[string]any)
		if len(ve.NodeErrors) != len(wantNodes) {
			t.Fatalf("%s: %d node errors, want %d", where, len(ve.NodeErrors), len(wantNodes))
		}
		for id, raw := range wantNodes {
			w := raw.(map[string]any)
			got := ve.NodeErrors[id]
			if got.ClassType != w["class_type"] || !jsonEqual(t, got.DependentOutputs, w["dependent_outputs"]) {
				t.Errorf("%s: node %s decoded as %+v", where, id, got)
			}
			items := w["errors"].([]any)
			if len(got.Errors) != len(items) {
				t.Fatalf("%s: node %s: %d errors, want %d", where, id, len(got.Errors), len(items))
			}
			for k, it := range items {
				m := it.(map[string]any)
				g := got.Errors[k]
				if g.Type != m["type"] || g.Message != m["message"] || g.Details != m["details"] || !jsonEqual(t, g.ExtraInfo, m["extra_info"]) {
					t.Errorf("%s: node %s error %d decoded as %+v", where, id, k, g)
				}
			}
		}
		if !strings.Contains(ve.Error(), "prompt rejected") || IsTransient(ve) {
			t.Errorf("%s: Error() %q transient %v", where, ve.Error(), IsTransient(ve))
		}
	case 500:
		if e.BodyText == nil {
			t.Fatalf("%s: no text body", where)
		}
		if _, err := DecodeValidationError([]byte(*e.BodyText)); err == nil {
			t.Errorf("%s: plain text decoded as a validation error", where)
		}
	}
}

func checkQueueBody(t *testing.T, where string, body []byte) {
	t.Helper()
	var q Queue
	if err := json.Unmarshal(body, &q); err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	var raw struct {
		Running [][]any `json:"queue_running"`
		Pending [][]any `json:"queue_pending"`
	}
	_ = json.Unmarshal(body, &raw)
	check := func(got []QueueItem, want [][]any) {
		if len(got) != len(want) {
			t.Fatalf("%s: %d items, want %d", where, len(got), len(want))
		}
		for i, w := range want {
			extra := w[3].(map[string]any)
			ct, _ := extra["create_time"].(float64)
			cid, _ := extra["client_id"].(string)
			if got[i].Number != w[0] || got[i].PromptID != w[1] || got[i].ClientID != cid ||
				got[i].CreateTime != int64(ct) || !jsonEqual(t, got[i].OutputNodes, w[4]) {
				t.Errorf("%s: item %d decoded as %+v, want %v", where, i, got[i], w[:2])
			}
		}
	}
	check(q.Running, raw.Running)
	check(q.Pending, raw.Pending)
}

func checkHistoryBody(t *testing.T, where string, body []byte) {
	t.Helper()
	entries, err := DecodeHistory(body)
	if err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	var raw map[string]map[string]any
	_ = json.Unmarshal(body, &raw)
	if len(entries) != len(raw) {
		t.Fatalf("%s: %d entries, want %d", where, len(entries), len(raw))
	}
	for id, r := range raw {
		h := entries[id]
		prompt := r["prompt"].([]any)
		if h.PromptID != id || h.Number != prompt[0] || h.PromptID != prompt[1] || len(h.Prompt) == 0 ||
			!jsonEqual(t, h.OutputsToExecute, prompt[4]) {
			t.Errorf("%s: entry %s header decoded as %+v", where, id, h)
		}
		if cid, _ := prompt[3].(map[string]any)["client_id"].(string); h.ClientID != cid {
			t.Errorf("%s: client id %q, want %q", where, h.ClientID, cid)
		}
		outputs := r["outputs"].(map[string]any)
		if !jsonEqual(t, h.Outputs, outputs) {
			t.Errorf("%s: outputs differ", where)
		}
		// Files: one per {filename...} object, in node/kind/index order.
		wantFiles := 0
		for _, o := range outputs {
			for _, v := range o.(map[string]any) {
				if list, ok := v.([]any); ok {
					for _, it := range list {
						if m, ok := it.(map[string]any); ok && m["filename"] != nil {
							wantFiles++
						}
					}
				}
			}
		}
		files := h.Files()
		if len(files) != wantFiles {
			t.Errorf("%s: %d files, want %d", where, len(files), wantFiles)
		}
		for _, f := range files {
			if err := f.Validate(); err != nil || f.Type == "" || f.Kind == "" || f.NodeID == "" {
				t.Errorf("%s: file %+v: %v", where, f, err)
			}
		}
		if !sort.SliceIsSorted(files, func(i, j int) bool { return naturalLess(files[i].NodeID, files[j].NodeID) }) {
			t.Errorf("%s: files not in node order: %+v", where, files)
		}
		st := r["status"].(map[string]any)
		if h.Status == nil || h.Status.StatusStr != st["status_str"] || h.Status.Completed != st["completed"] {
			t.Fatalf("%s: status decoded as %+v", where, h.Status)
		}
		msgs := st["messages"].([]any)
		last := msgs[len(msgs)-1].([]any)[0]
		var want Outcome
		switch {
		case st["status_str"] == "success":
			want = OutcomeSuccess
		case last == "execution_interrupted":
			want = OutcomeInterrupted
		case last == "execution_error":
			want = OutcomeError
		}
		if h.Outcome() != want {
			t.Errorf("%s: outcome %v, want %v (last %v)", where, h.Outcome(), want, last)
		}
		if (h.ExecError() != nil) != (want == OutcomeError) || (h.Interruption() != nil) != (want == OutcomeInterrupted) {
			t.Errorf("%s: ExecError %v Interruption %v for %v", where, h.ExecError(), h.Interruption(), want)
		}
		if meta, ok := r["meta"].(map[string]any); ok {
			for nid, m := range meta {
				mm := m.(map[string]any)
				if h.Meta[nid].NodeID != mm["node_id"] || h.Meta[nid].DisplayNode != mm["display_node"] || h.Meta[nid].RealNodeID != mm["real_node_id"] {
					t.Errorf("%s: meta %s decoded as %+v", where, nid, h.Meta[nid])
				}
			}
		}
	}
}

func checkSystemStats(t *testing.T, where string, body []byte) {
	t.Helper()
	var s SystemStats
	if err := json.Unmarshal(body, &s); err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	var raw struct {
		System  map[string]any   `json:"system"`
		Devices []map[string]any `json:"devices"`
	}
	_ = json.Unmarshal(body, &raw)
	sys := raw.System
	if s.System.OS != sys["os"] || float64(s.System.RAMTotal) != sys["ram_total"] || float64(s.System.RAMFree) != sys["ram_free"] ||
		s.System.ComfyUIVersion != sys["comfyui_version"] || s.System.PythonVersion != sys["python_version"] ||
		s.System.PytorchVersion != sys["pytorch_version"] || !s.System.HasVersion || !jsonEqual(t, s.System.Argv, sys["argv"]) {
		t.Errorf("%s: system decoded as %+v", where, s.System)
	}
	if rf, ok := sys["required_frontend_version"]; ok && s.System.RequiredFrontendVersion != rf {
		t.Errorf("%s: required_frontend_version %q", where, s.System.RequiredFrontendVersion)
	}
	if len(s.Devices) != len(raw.Devices) {
		t.Fatalf("%s: %d devices", where, len(s.Devices))
	}
	for i, d := range raw.Devices {
		g := s.Devices[i]
		if g.Name != d["name"] || g.Type != d["type"] || float64(g.VRAMTotal) != d["vram_total"] ||
			float64(g.VRAMFree) != d["vram_free"] || float64(g.TorchVRAMFree) != d["torch_vram_free"] || (g.Index == nil) != (d["index"] == nil) {
			t.Errorf("%s: device decoded as %+v", where, g)
		}
	}
}

func checkObjectInfo(t *testing.T, where string, body []byte) {
	t.Helper()
	info, err := DecodeObjectInfo(body)
	if err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	var raw map[string]map[string]any
	_ = json.Unmarshal(body, &raw)
	if len(info) != len(raw) {
		t.Fatalf("%s: %d classes, want %d", where, len(info), len(raw))
	}
	for name, r := range raw {
		ci := info[name]
		dn, _ := r["display_name"].(string)
		if ci.Name != r["name"] || ci.OutputNode != r["output_node"] || ci.Category != r["category"] ||
			ci.DisplayName != dn || ci.PythonModule != r["python_module"] || !jsonEqual(t, ci.Input, r["input"]) ||
			!jsonEqual(t, ci.OutputName, r["output_name"]) {
			t.Errorf("%s: class %s decoded as %+v", where, name, ci)
		}
		if name == "LoadImage" {
			if opts := ci.ComboOptions("image"); len(opts) == 0 {
				t.Errorf("%s: LoadImage has no image options", where)
			}
		}
		if name == "ImageScale" {
			if got := ci.ComboOptions("upscale_method"); !jsonEqual(t, got, []string{"nearest-exact", "bilinear", "area", "bicubic", "lanczos"}) {
				t.Errorf("%s: ImageScale upscale_method options %v", where, got)
			}
		}
	}
}

func itoa(i int) string {
	b, _ := json.Marshal(i)
	return string(b)
}

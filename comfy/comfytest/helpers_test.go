package comfytest

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Test helpers: a plain HTTP client and WebSocket reader against a fake.

func newTestServer(t *testing.T, opts Options) *Server {
	t.Helper()
	if opts.DefaultClassTime == 0 {
		opts.DefaultClassTime = time.Millisecond
	}
	s := NewServer(opts)
	t.Cleanup(s.Close)
	return s
}

var httpClient = &http.Client{Timeout: waitLimit}

// call sends a request with a raw body and returns status, content type and
// body.
func call(t *testing.T, method, url, body string) (int, string, []byte) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Content-Type"), data
}

// callJSON sends a request and decodes a JSON answer.
func callJSON(t *testing.T, method, url, body string) (int, any) {
	t.Helper()
	status, _, data := call(t, method, url, body)
	v, err := decodeJSON(data)
	if err != nil {
		t.Fatalf("%s %s: %d %q is not JSON", method, url, status, data)
	}
	return status, v
}

// field walks an object path like "error.type".
func field(v any, path string) any {
	for _, k := range strings.Split(path, ".") {
		o, ok := v.(*obj)
		if !ok {
			return nil
		}
		v, _ = o.get(k)
	}
	return v
}

// submit posts a prompt and returns its id.
func submit(t *testing.T, s *Server, body string) string {
	t.Helper()
	status, v := callJSON(t, "POST", s.URL()+"/prompt", body)
	if status != 200 {
		t.Fatalf("POST /prompt: %d %s", status, pyJSON(v))
	}
	id, _ := field(v, "prompt_id").(string)
	return id
}

// waitHistory polls /history/{id} until the entry exists.
func waitHistory(t *testing.T, s *Server, id string) *obj {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for time.Now().Before(deadline) {
		_, v := callJSON(t, "GET", s.URL()+"/history/"+id, "")
		if e, ok := field(v, id).(*obj); ok {
			return e
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("prompt %s never finished", id)
	return nil
}

// waitFor polls cond until true.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func wsDial(t *testing.T, s *Server, query string) *testSock {
	t.Helper()
	sock := dialSock(t, "ws"+strings.TrimPrefix(s.URL(), "http")+"/ws"+query)
	t.Cleanup(sock.close)
	// The socket is registered when its first status frame arrives; events
	// sent before that are lost, as with ComfyUI.
	waitFor(t, "first status", func() bool { return len(sock.frames()) > 0 })
	return sock
}

// frameTypes lists the "type" of text frames and "bin:N" of binary frames.
func frameTypes(t *testing.T, frames []received) []string {
	var out []string
	for _, f := range frames {
		if f.binary {
			out = append(out, "bin:"+string(rune('0'+f.data[3])))
			continue
		}
		out = append(out, pyStr(field(mustDecode(t, f.data), "type")))
	}
	return out
}

// waitFrame waits for a text frame satisfying match and returns its data.
func (s *testSock) waitFrame(t *testing.T, what string, match func(typ string, data *obj) bool) *obj {
	t.Helper()
	var found *obj
	waitFor(t, what, func() bool {
		for _, f := range s.frames() {
			if f.binary {
				continue
			}
			v := mustDecode(t, f.data)
			typ, _ := field(v, "type").(string)
			d, _ := field(v, "data").(*obj)
			if match(typ, d) {
				found = d
				return true
			}
		}
		return false
	})
	return found
}

// finished matches executing{node: null} of a prompt.
func finished(id string) func(string, *obj) bool {
	return func(typ string, d *obj) bool {
		n, has := d.get("node")
		return typ == "executing" && has && n == nil && field(d, "prompt_id") == id
	}
}

const threeNodePrompt = `{"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 255}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "%s"}}}`

func promptBody(prefix, clientID string) string {
	b := `{"prompt": ` + strings.Replace(threeNodePrompt, "%s", prefix, 1)
	if clientID != "" {
		b += `, "client_id": "` + clientID + `"`
	}
	return b + "}"
}

func isPNG(b []byte) bool { return bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) }

func stringsReader(s string) io.Reader { return strings.NewReader(s) }

func stringsReplace(s, old, new string) string { return strings.Replace(s, old, new, 1) }

package comfytest

import (
	"errors"
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"
)

func TestCrashRefusesThenRestartServesFreshState(t *testing.T) {
	s := newTestServer(t, Options{})
	url := s.URL()
	id := submit(t, s, promptBody("before_crash", ""))
	e := waitHistory(t, s, id)
	name := field(e, "outputs.3.images").([]any)[0].(*obj).vals["filename"].(string)

	sock := wsDial(t, s, "?clientId=c1")
	s.Crash()
	select {
	case <-sock.done:
	case <-time.After(waitLimit):
		t.Fatal("WebSocket still open after Crash")
	}
	_, err := httpClient.Get(url + "/queue")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("GET after Crash: %v, want connection refused", err)
	}
	if st := s.Stats(); st.Submitted != 0 || st.Running != "" {
		t.Errorf("stats of a crashed server: %+v", st)
	}

	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	if s.URL() != url {
		t.Fatalf("restart moved from %s to %s", url, s.URL())
	}
	_, hist := callJSON(t, "GET", url+"/history", "")
	if hist.(*obj).len() != 0 {
		t.Errorf("history survived the restart: %s", pyJSON(hist))
	}
	// The counter starts over, as in a new process.
	_, v := callJSON(t, "POST", url+"/prompt", promptBody("after_restart", ""))
	if n := field(v, "number"); n != int64(0) {
		t.Errorf("first number after restart %v, want 0", n)
	}
	// Output files live on disk: still there.
	status, ctype, body := call(t, "GET", url+"/view?filename="+name+"&type=output", "")
	if status != 200 || ctype != "image/png" || !isPNG(body) {
		t.Errorf("output after restart: %d %s", status, ctype)
	}
}

func TestCrashMidRunLosesQueue(t *testing.T) {
	s := newTestServer(t, Options{ClassTime: map[string]time.Duration{"ImageInvert": time.Hour}})
	running := submit(t, s, promptBody("long", ""))
	waiting := submit(t, s, promptBody("queued", ""))
	waitFor(t, "prompt running", func() bool { return s.Stats().Running == running })
	if p := s.Stats().Pending; len(p) != 1 || p[0] != waiting {
		t.Fatalf("pending %v", p)
	}
	s.Crash()
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	_, q := callJSON(t, "GET", s.URL()+"/queue", "")
	if len(field(q, "queue_running").([]any)) != 0 || len(field(q, "queue_pending").([]any)) != 0 {
		t.Errorf("queue after restart: %s", pyJSON(q))
	}
	_, h := callJSON(t, "GET", s.URL()+"/history/"+running, "")
	if h.(*obj).len() != 0 {
		t.Errorf("history of the lost prompt: %s", pyJSON(h))
	}
}

func TestHangTimesOutClientsAndThaws(t *testing.T) {
	s := newTestServer(t, Options{})
	sock := wsDial(t, s, "?clientId=h1")
	waitFor(t, "first status", func() bool { return len(sock.frames()) == 1 })

	s.Hang(true)
	short := &http.Client{Timeout: 200 * time.Millisecond}
	_, err := short.Get(s.URL() + "/system_stats")
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("GET while hung: %v, want a timeout", err)
	}
	// A prompt posted while hung is not answered either, and no frame moves.
	done := make(chan int, 1)
	go func() {
		resp, err := httpClient.Post(s.URL()+"/prompt", "application/json", stringsReader(promptBody("hung", "h1")))
		if err != nil {
			done <- -1
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	select {
	case code := <-done:
		t.Fatalf("POST answered while hung: %d", code)
	case <-time.After(200 * time.Millisecond):
	}
	if n := len(sock.frames()); n != 1 {
		t.Fatalf("%d frames while hung, want 1", n)
	}

	s.Hang(false)
	if code := <-done; code != 200 {
		t.Fatalf("POST after thaw: %d", code)
	}
	sock.waitFrame(t, "prompt finished after thaw", func(typ string, d *obj) bool {
		n, has := d.get("node")
		return typ == "executing" && has && n == nil
	})
}

func TestSetSlowDelaysResponses(t *testing.T) {
	s := newTestServer(t, Options{})
	s.SetSlow(300 * time.Millisecond)
	short := &http.Client{Timeout: 100 * time.Millisecond}
	if _, err := short.Get(s.URL() + "/queue"); err == nil {
		t.Fatal("slow server answered within 100ms")
	}
	s.SetSlow(0)
	if resp, err := httpClient.Get(s.URL() + "/queue"); err != nil {
		t.Fatalf("after SetSlow(0): %v", err)
	} else {
		resp.Body.Close()
	}
}

func TestFailNthFailsOnlyThatPrompt(t *testing.T) {
	for _, gen := range []Generation{GenCurrent, GenClassic, GenLegacy} {
		t.Run(gen.String(), func(t *testing.T) {
			s := newTestServer(t, Options{Generation: gen})
			sock := wsDial(t, s, "?clientId=f1")
			s.FailNth(2)
			ids := []string{
				submit(t, s, promptBody("one", "f1")),
				submit(t, s, promptBody("two", "f1")),
				submit(t, s, promptBody("three", "f1")),
			}
			for _, id := range ids {
				sock.waitFrame(t, "finish of "+id, finished(id))
			}
			errFrame := sock.waitFrame(t, "execution_error", func(typ string, d *obj) bool { return typ == "execution_error" })
			if field(errFrame, "prompt_id") != ids[1] {
				t.Errorf("error for %v, want %s", field(errFrame, "prompt_id"), ids[1])
			}
			wantType := "torch.OutOfMemoryError"
			if gen == GenLegacy {
				wantType = "torch.cuda.OutOfMemoryError"
			}
			if field(errFrame, "exception_type") != wantType {
				t.Errorf("exception_type %v", field(errFrame, "exception_type"))
			}
			h := s.History()
			for i, id := range ids {
				want := "success"
				if i == 1 {
					want = "error"
				}
				if h[id].Status != want {
					t.Errorf("prompt %d: status %q, want %q", i, h[id].Status, want)
				}
			}
		})
	}
}

func TestHoldFreezesQueueInPriorityOrder(t *testing.T) {
	s := newTestServer(t, Options{})
	s.Hold()
	a := submit(t, s, promptBody("a", ""))
	b := submit(t, s, promptBody("b", ""))
	c := submit(t, s, `{"front": true, "prompt": `+threeNodePromptWith("c")+`}`)
	d := submit(t, s, `{"number": 0.5, "prompt": `+threeNodePromptWith("d")+`}`)
	st := s.Stats()
	want := []string{c, a, d, b} // -2, 0, 0.5, 1
	if st.Running != "" || len(st.Pending) != 4 {
		t.Fatalf("held: %+v", st)
	}
	for i := range want {
		if st.Pending[i] != want[i] {
			t.Fatalf("pending order %v, want %v", st.Pending, want)
		}
	}
	_, q := callJSON(t, "GET", s.URL()+"/queue", "")
	if n := len(field(q, "queue_pending").([]any)); n != 4 {
		t.Fatalf("GET /queue pending %d", n)
	}
	s.Release()
	for _, id := range want {
		waitHistory(t, s, id)
	}
	// History keeps completion order: the priority order.
	_, h := callJSON(t, "GET", s.URL()+"/history", "")
	got := h.(*obj).keys
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("completion order %v, want %v", got, want)
		}
	}
}

func threeNodePromptWith(prefix string) string {
	return stringsReplace(threeNodePrompt, "%s", prefix)
}

func TestLegacySequence(t *testing.T) {
	s := newTestServer(t, Options{Generation: GenLegacy})
	sock := wsDial(t, s, "?clientId=old")
	id := submit(t, s, promptBody("legacy", "old"))
	sock.waitFrame(t, "finish", finished(id))
	got := frameTypes(t, sock.frames())
	want := []string{"status", "status", "status", "execution_start", "execution_cached", "executing", "executing", "executing", "executed", "status", "executing"}
	if compareTypeLists(want, got) != "" {
		t.Fatalf("legacy frames %v, want %v", got, want)
	}
	for _, f := range sock.frames() {
		d := field(mustDecode(t, f.data), "data").(*obj)
		if d.has("timestamp") || d.has("display_node") {
			t.Errorf("legacy frame with timestamp/display_node: %s", f.data)
		}
	}
	e := waitHistory(t, s, id)
	if e.has("status") || e.has("meta") || !e.has("outputs") || !e.has("prompt") {
		t.Errorf("legacy history entry keys %v", e.keys)
	}
	// Identical resubmission: everything cached, and no executed frame.
	n := len(sock.frames())
	id2 := submit(t, s, promptBody("legacy", "old"))
	sock.waitFrame(t, "second finish", finished(id2))
	second := frameTypes(t, sock.frames()[n:])
	if compareTypeLists([]string{"status", "status", "execution_start", "execution_cached", "status", "executing"}, second) != "" {
		t.Errorf("cached legacy run %v", second)
	}
	cached := sock.waitFrame(t, "cached list", func(typ string, d *obj) bool {
		return typ == "execution_cached" && field(d, "prompt_id") == id2
	})
	if l, _ := field(cached, "nodes").([]any); len(l) != 3 {
		t.Errorf("execution_cached %s", pyJSON(cached))
	}
	// Routes that did not exist yet.
	for _, p := range []string{"/features", "/api/queue", "/api/prompt"} {
		if status, _, _ := call(t, "GET", s.URL()+p, ""); status != 404 {
			t.Errorf("GET %s: %d, want 404", p, status)
		}
	}
	if status, _, _ := call(t, "POST", s.URL()+"/free", `{"free_memory": true}`); status != 405 {
		t.Errorf("POST /free: %d, want 405", status)
	}
	status, v := callJSON(t, "POST", s.URL()+"/prompt", `{"client_id": "old"}`)
	if status != 400 || field(v, "error") != "no prompt" {
		t.Errorf("no prompt: %d %s", status, pyJSON(v))
	}
}

func TestLegacyProgressHasNoPromptID(t *testing.T) {
	s := newTestServer(t, Options{Generation: GenLegacy, ProgressSteps: map[string]int{"ImageInvert": 3}})
	sock := wsDial(t, s, "?clientId=p")
	id := submit(t, s, promptBody("p", "p"))
	sock.waitFrame(t, "finish", finished(id))
	var n int
	for _, f := range sock.frames() {
		v := mustDecode(t, f.data)
		if field(v, "type") != "progress" {
			continue
		}
		n++
		if d := field(v, "data").(*obj); d.len() != 2 || !d.has("value") || !d.has("max") {
			t.Errorf("legacy progress %s", f.data)
		}
	}
	if n != 3 {
		t.Errorf("%d progress frames, want 3", n)
	}
}

package comfy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image/png"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
)

const fakeGraph = `{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 1, "color": 0}},
 "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
 "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fake"}}}`

// recorder collects a Stream's events.
type recorder struct {
	mu  sync.Mutex
	evs []comfy.Event
	ch  chan struct{}
}

func newRecorder() *recorder { return &recorder{ch: make(chan struct{}, 1)} }

func (r *recorder) add(ev comfy.Event) {
	r.mu.Lock()
	r.evs = append(r.evs, ev)
	r.mu.Unlock()
	select {
	case r.ch <- struct{}{}:
	default:
	}
}

// waitFor waits until an event satisfies ok, looking at events from index from on.
func (r *recorder) waitFor(t *testing.T, from int, what string, ok func(comfy.Event) bool) int {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		r.mu.Lock()
		for i := from; i < len(r.evs); i++ {
			if ok(r.evs[i]) {
				r.mu.Unlock()
				return i
			}
		}
		r.mu.Unlock()
		select {
		case <-r.ch:
		case <-deadline:
			t.Fatalf("no %s event", what)
		}
	}
}

// The client against the fake server, in every protocol generation: submit,
// follow the events to completion, confirm with history, download the
// output; then the server crashes and restarts and the stream recovers.
func TestClientAgainstFakeEveryGeneration(t *testing.T) {
	for _, gen := range []comfytest.Generation{comfytest.GenLegacy, comfytest.GenClassic, comfytest.GenCurrent} {
		t.Run(gen.String(), func(t *testing.T) {
			srv := comfytest.NewServer(comfytest.Options{Generation: gen})
			defer srv.Close()
			c, err := comfy.NewClient(srv.URL(), comfy.WithReconnectBackoff(func(int) time.Duration { return 20 * time.Millisecond }))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			feats, err := c.Features(ctx)
			if err != nil {
				t.Fatal(err)
			}
			wantGen := map[comfytest.Generation]comfy.Generation{
				comfytest.GenLegacy: comfy.GenLegacy, comfytest.GenClassic: comfy.GenClassic, comfytest.GenCurrent: comfy.GenCurrent,
			}[gen]
			if feats.Generation != wantGen || feats.ClientPromptID != (gen == comfytest.GenCurrent) {
				t.Fatalf("features %+v", feats)
			}

			rec := newRecorder()
			streamDone := make(chan error, 1)
			go func() { streamDone <- c.Stream(ctx, rec.add) }()
			rec.waitFor(t, 0, "connected", func(ev comfy.Event) bool { _, ok := ev.(*comfy.Connected); return ok })

			run := func(from int) (string, int) {
				resp, err := c.Submit(ctx, comfy.SubmitRequest{Prompt: json.RawMessage(fakeGraph)})
				if err != nil {
					t.Fatal(err)
				}
				// Completion: execution_success where the generation has it,
				// executing(null) alone on 2023-era servers.
				end := rec.waitFor(t, from, "completion", func(ev comfy.Event) bool {
					if ev.EventPromptID() != resp.PromptID {
						return false
					}
					if ex, ok := ev.(*comfy.Executing); ok && ex.Done {
						return true
					}
					return false
				})
				return resp.PromptID, end
			}
			pid, end := run(0)
			sawSuccess := false
			rec.mu.Lock()
			for _, ev := range rec.evs[:end] {
				if _, ok := ev.(*comfy.ExecutionSuccess); ok && ev.EventPromptID() == pid {
					sawSuccess = true
				}
			}
			rec.mu.Unlock()
			if sawSuccess == (gen == comfytest.GenLegacy) {
				t.Fatalf("execution_success seen = %v on %s", sawSuccess, gen)
			}
			entry, err := c.History(ctx, pid)
			if err != nil || entry.Outcome() != comfy.OutcomeSuccess {
				t.Fatalf("history: %+v, %v", entry, err)
			}
			files := entry.Files()
			if len(files) != 1 {
				t.Fatalf("files %+v", files)
			}
			rc, err := c.View(ctx, files[0], 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			data, _ := io.ReadAll(rc)
			rc.Close()
			cfg, err := png.DecodeConfig(bytes.NewReader(data))
			if err != nil || cfg.Width != 32 || cfg.Height != 24 {
				t.Fatalf("output: %v %+v", err, cfg)
			}
			if st, _, err := c.PromptStatus(ctx, pid); err != nil || st.Phase != comfy.PromptDone {
				t.Fatalf("prompt status %v %v", st, err)
			}

			// Crash: connections are refused; the stream says so and keeps trying.
			rec.mu.Lock()
			mark := len(rec.evs)
			rec.mu.Unlock()
			srv.Crash()
			rec.waitFor(t, mark, "disconnected", func(ev comfy.Event) bool { _, ok := ev.(*comfy.Disconnected); return ok })
			if _, err := c.Queue(ctx); err == nil || !comfy.IsTransient(err) {
				t.Fatalf("queue of a crashed server: %v, want a transient error", err)
			}
			// Restart on the same port: the stream reconnects, the lost
			// history shows the old prompt as lost, new work runs.
			if err := srv.Restart(); err != nil {
				t.Fatal(err)
			}
			rec.waitFor(t, mark, "reconnected", func(ev comfy.Event) bool {
				cn, ok := ev.(*comfy.Connected)
				return ok && cn.Reconnect
			})
			if st, _, err := c.PromptStatus(ctx, pid); err != nil || st.Phase != comfy.PromptLost {
				t.Fatalf("prompt status after restart %v %v, want lost", st, err)
			}
			rec.mu.Lock()
			mark = len(rec.evs)
			rec.mu.Unlock()
			if pid2, _ := run(mark); pid2 == "" {
				t.Fatal("no prompt after restart")
			}
			cancel()
			if err := <-streamDone; !errors.Is(err, context.Canceled) {
				t.Fatalf("stream returned %v", err)
			}
		})
	}
}

package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
)

// TestBenchCommand runs `comfyfarm bench` small against two fake nodes and
// checks it measures every row (the numbers are reported, not judged).
func TestBenchCommand(t *testing.T) {
	a := comfytest.NewServer(comfytest.Options{DefaultClassTime: time.Millisecond})
	defer a.Close()
	b := comfytest.NewServer(comfytest.Options{DefaultClassTime: time.Millisecond, Generation: comfytest.GenClassic})
	defer b.Close()
	e, out, errb := testEnv()
	err := run(context.Background(), e, []string{"bench", "--node", a.URL(), "--node", b.URL(),
		"--jobs", "3", "--burst", "4", "--submits", "40", "--clients", "4"})
	if err != nil {
		t.Fatalf("%v\n%s%s", err, out.String(), errb.String())
	}
	for _, want := range []string{"direct to ComfyUI", "through comfyfarm", "added by comfyfarm", "4 jobs at once on 2 nodes", "submits, 4 clients, queue 0 to 40"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("no %q row:\n%s", want, out.String())
		}
	}
	if s := a.Stats().Submitted + b.Stats().Submitted; s < 3+3+4 {
		t.Fatalf("the nodes ran %d prompts, want at least 10", s)
	}
}

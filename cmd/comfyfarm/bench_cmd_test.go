package main

import (
	"context"
	"os/exec"
	"regexp"
	"strconv"
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
		"--jobs", "3", "--burst", "4", "--submits", "40", "--clients", "4", "--subscribers", "0"})
	if err != nil {
		t.Fatalf("%v\n%s%s", err, out.String(), errb.String())
	}
	for _, want := range []string{"direct to ComfyUI", "through comfyfarm", "added by comfyfarm", "2 clients at once, direct",
		"added by comfyfarm, 2 clients", "4 jobs at once on 2 nodes", "submits, 4 clients, queue 0 to 40"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("no %q row:\n%s", want, out.String())
		}
	}
	if s := a.Stats().Submitted + b.Stats().Submitted; s < 3+3+6+6+4 {
		t.Fatalf("the nodes ran %d prompts, want at least 22", s)
	}
}

// TestBenchSubscribersRun runs the subscribers part of `comfyfarm bench`
// from the built binary (its client side is the binary run again as a child
// process): every stream follows its job to the end and receives progress.
func TestBenchSubscribersRun(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := dockerfileBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "bench", "--jobs", "1", "--burst", "1", "--submits", "0",
		"--subscribers", "40", "--subscriber-jobs", "2", "--subscriber-sampler", "400ms").CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	m := regexp.MustCompile(`40 SSE subscribers on 2 running jobs \(0 failed\)\s+(\d+) progress events delivered`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no subscribers row:\n%s", out)
	}
	if n, _ := strconv.Atoi(string(m[1])); n == 0 || n > 40*200 {
		t.Fatalf("%d progress events delivered to 40 streams of 200-step jobs:\n%s", n, out)
	}
	for _, want := range []string{"progress lag behind the first subscriber", "server memory per open stream"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("no %q row:\n%s", want, out)
		}
	}
}

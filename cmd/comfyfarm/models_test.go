package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
)

// TestModelsAndPlacement, over real sockets: two nodes with different
// checkpoints; `comfyfarm models` says which has which; a submit naming a
// checkpoint neither has is 503 no_node naming it; once the file is on a
// node and the operator probes it, the same submit runs there.
func TestModelsAndPlacement(t *testing.T) {
	a := comfytest.NewServer(comfytest.Options{DefaultClassTime: 5 * time.Millisecond, Checkpoints: []string{"sd_xl_base_1.0.safetensors"}})
	defer a.Close()
	b := comfytest.NewServer(comfytest.Options{DefaultClassTime: 5 * time.Millisecond, Checkpoints: []string{"v1-5-pruned-emaonly.safetensors"}})
	defer b.Close()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	base := startServe(t, "COMFYFARM_NODES=gpu-a="+a.URL()+",gpu-b="+b.URL(), "COMFYFARM_SCHEDULER_PROBE_INTERVAL=100ms")

	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := cli(t, base, "models", "--json")
		var m map[string]map[string][]string
		if err == nil && json.Unmarshal([]byte(out), &m) == nil &&
			strings.Join(m["ckpt_name"]["sd_xl_base_1.0.safetensors"], ",") == "gpu-a" &&
			strings.Join(m["ckpt_name"]["v1-5-pruned-emaonly.safetensors"], ",") == "gpu-b" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("models never listed both nodes' checkpoints: %v\n%s", err, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, err := cli(t, base, "models")
	if err != nil || !strings.Contains(out, "gpu-a") || !strings.Contains(out, "sd_xl_base_1.0.safetensors") || strings.Contains(out, "sampler_name") {
		t.Fatalf("models: %v\n%s", err, out)
	}

	sample, err := os.ReadFile(filepath.Join(wd, "sample_workflow.json"))
	if err != nil {
		t.Fatal(err)
	}
	flux := strings.Replace(string(sample), "sd_xl_base_1.0.safetensors", "flux-dev.safetensors", 1)
	body, _ := json.Marshal(map[string]any{"user_id": "u", "workflow": json.RawMessage(flux)})
	req, _ := http.NewRequestWithContext(context.Background(), "POST", base+"/api/v1/jobs", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer logo-key")
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 503 || !strings.Contains(string(got), `"code":"no_node"`) || !strings.Contains(string(got), `"missing":{"ckpt_name":["flux-dev.safetensors"]}`) {
		t.Fatalf("submit naming a checkpoint no node has: %d %s", res.StatusCode, got)
	}

	b.SetCheckpoints("v1-5-pruned-emaonly.safetensors", "flux-dev.safetensors")
	if out, err := cli(t, base, "nodes", "probe", "gpu-b", "--json"); err != nil || !strings.Contains(out, `"checkpoints": 2`) {
		t.Fatalf("probe: %v\n%s", err, out)
	}
	file := filepath.Join(t.TempDir(), "flux.json")
	if err := os.WriteFile(file, []byte(flux), 0o600); err != nil {
		t.Fatal(err)
	}
	e, outb, errb := testEnv("COMFYFARM_SERVER="+base, "COMFYFARM_API_KEY=logo-key")
	if err := run(context.Background(), e, []string{"submit", "--workflow", file, "--user", "u", "--wait"}); err != nil {
		var ae *apiError
		errors.As(err, &ae)
		t.Fatalf("submit after the probe: %v %+v\n%s%s", err, ae, outb, errb)
	}
	id := strings.Fields(outb.String())[1]
	e, outb, errb = testEnv("COMFYFARM_SERVER="+base, "COMFYFARM_API_KEY=logo-key")
	if err := run(context.Background(), e, []string{"jobs", "show", id}); err != nil || !strings.Contains(outb.String(), "succeeded") || !strings.Contains(outb.String(), "gpu-b") {
		t.Fatalf("jobs show: %v\n%s%s", err, outb, errb)
	}
}

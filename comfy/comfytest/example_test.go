package comfytest_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
)

// A fake server of the current generation with a slow sampler and a one-time
// checkpoint load.
func ExampleNewServer() {
	s := comfytest.NewServer(comfytest.Options{
		Generation:     comfytest.GenCurrent,
		ClassTime:      map[string]time.Duration{"KSampler": 50 * time.Millisecond},
		CheckpointLoad: 20 * time.Millisecond,
	})
	defer s.Close()

	resp, err := http.Post(s.URL()+"/prompt", "application/json", strings.NewReader(
		`{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
		             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "demo"}}}}`))
	if err != nil {
		panic(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Println(resp.StatusCode, strings.Contains(string(body), `"node_errors": {}`))
	// Output: 200 true
}

func ExampleListenAndServe() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		done <- comfytest.ListenAndServe(ctx, "127.0.0.1:0", comfytest.Options{Generation: comfytest.GenClassic})
	}()
	cancel()
	fmt.Println(<-done)
	// Output: <nil>
}

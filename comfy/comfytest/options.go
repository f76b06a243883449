package comfytest

import (
	"context"
	"log/slog"
	"time"
)

// Generation selects which ComfyUI release the fake behaves like.
type Generation int

const (
	// GenCurrent behaves like ComfyUI v0.8.0 (January 2026): progress_state,
	// the feature_flags handshake and /features, binary type-4 previews,
	// client-chosen prompt_id, targeted interrupt, /api/jobs, object-shaped
	// error bodies, no Content-Type on empty bodies.
	GenCurrent Generation = iota
	// GenClassic behaves like ComfyUI v0.3.10 (December 2024), the release the
	// traces in testdata/comfy-traces were recorded from.
	GenClassic
	// GenLegacy behaves like a mid/late-2023 build: no execution_success, no
	// timestamps, executing{node:null} is the only completion signal, history
	// entries without status, progress without prompt_id/node, no /api prefix,
	// no /features, no /free.
	GenLegacy
)

func (g Generation) String() string {
	switch g {
	case GenCurrent:
		return "current"
	case GenClassic:
		return "classic"
	case GenLegacy:
		return "legacy"
	}
	return "unknown"
}

// Options configures a fake server. The zero value is a current-generation
// server on a random loopback port with small per-node times.
type Options struct {
	// Generation picks the protocol generation (default GenCurrent).
	Generation Generation
	// Addr is the listen address; empty means "127.0.0.1:0".
	Addr string
	// ClassTime is how long one execution of a node class takes. Classes not
	// listed take DefaultClassTime. Progress classes spread their time over
	// their steps.
	ClassTime map[string]time.Duration
	// DefaultClassTime applies to classes missing from ClassTime (default
	// 10ms; negative means no delay at all).
	DefaultClassTime time.Duration
	// ProgressSteps makes a class report progress: n > 0 steps per execution.
	// KSampler always reports progress, one step per "steps" input unless
	// listed here. SaveImageWebsocket reports one step per image, as in
	// ComfyUI.
	ProgressSteps map[string]int
	// Previews makes progress classes send a binary JPEG preview per step
	// (type 1, or type 4 to sockets that negotiated supports_preview_metadata).
	Previews bool
	// CheckpointLoad is the extra time of the first CheckpointLoaderSimple run
	// for a checkpoint; afterwards the checkpoint counts as loaded until
	// POST /free unloads models or the server restarts.
	CheckpointLoad time.Duration
	// Checkpoints are the names CheckpointLoaderSimple accepts
	// (default: "sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors").
	Checkpoints []string
	// Loras are the names LoraLoader accepts (default: "detail_tweaker.safetensors").
	Loras []string
	// MaxUploadMB limits every request body, uploads and prompts alike
	// (default 100, ComfyUI's --max-upload-size). Larger bodies get 413.
	MaxUploadMB float64
	// DeviceName and VRAM describe the device in /system_stats
	// (default an RTX 4090 with 24 GiB).
	DeviceName string
	VRAM       int64
	// Logger receives one line per request and per prompt; nil discards.
	Logger *slog.Logger

	// gate, when set, is called by the worker before each observable step
	// (taking a prompt, each node, the history write). Tests use it to move
	// the worker in lockstep with a recorded trace.
	gate stepGate
	// virtualTime makes node time a counter instead of sleeping: timestamps
	// advance by exactly the configured class times.
	virtualTime bool
}

// stepGate blocks the worker until the test lets it take the next step.
type stepGate interface {
	step(ctx context.Context, what string) error
}

func (o Options) withDefaults() Options {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:0"
	}
	if o.DefaultClassTime == 0 {
		o.DefaultClassTime = 10 * time.Millisecond
	}
	if o.Checkpoints == nil {
		o.Checkpoints = []string{"sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"}
	}
	if o.Loras == nil {
		o.Loras = []string{"detail_tweaker.safetensors"}
	}
	if o.MaxUploadMB <= 0 {
		o.MaxUploadMB = 100
	}
	if o.DeviceName == "" {
		o.DeviceName = "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync"
	}
	if o.VRAM <= 0 {
		o.VRAM = 24 << 30
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

func (o *Options) classTime(class string) time.Duration {
	d, ok := o.ClassTime[class]
	if !ok {
		d = o.DefaultClassTime
	}
	if d < 0 {
		return 0
	}
	return d
}

func (o *Options) maxBody() int64 { return int64(o.MaxUploadMB * 1024 * 1024) }

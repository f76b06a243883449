package comfy

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// Generation groups ComfyUI servers by protocol behaviour.
type Generation int

// Generations.
const (
	// GenLegacy: before 2024-08 (no comfyui_version in /system_stats). Do not expect
	// execution_success or timestamps; executing{node:null} is the completion signal, and
	// history may lack status.
	GenLegacy Generation = iota
	// GenClassic: 2024-08 .. 0.3.44 (v0.3.10-like): execution_success, history status and
	// meta, no /features.
	GenClassic
	// GenCurrent: >= 0.3.45: /features, the feature_flags handshake, progress_state,
	// kind-4 previews, client-chosen prompt_id.
	GenCurrent
)

func (g Generation) String() string {
	switch g {
	case GenClassic:
		return "classic"
	case GenCurrent:
		return "current"
	}
	return "legacy"
}

// Features is what a server supports, from probes rather than version numbers where possible.
type Features struct {
	Generation Generation
	// Version is comfyui_version without a leading "v" ("" when absent).
	Version string
	// ClientPromptID: POST /prompt honours prompt_id.
	ClientPromptID bool
	// TargetedInterrupt: POST /interrupt {"prompt_id"} interrupts only that prompt
	// (version >= 0.3.57).
	TargetedInterrupt bool
	// JobsAPI: GET /api/jobs answers (>= 0.6.0).
	JobsAPI bool
	// ProgressState: the server sends progress_state frames.
	ProgressState bool
	// PreviewMetadata: the server offers kind-4 previews (supports_preview_metadata).
	PreviewMetadata bool
	// MaxUploadSize is the body limit in bytes when the server tells it (max_upload_size).
	MaxUploadSize int64
	// Flags is the raw GET /features object (nil before 0.3.45).
	Flags map[string]any
}

// Features detects what the server supports (GET /system_stats, GET /features, and
// GET /api/jobs?limit=1 on current servers). The result is cached on the client until
// ForgetFeatures; failed probes are not cached.
func (c *Client) Features(ctx context.Context) (*Features, error) {
	c.featMu.Lock()
	defer c.featMu.Unlock()
	if c.feat != nil {
		f := *c.feat
		return &f, nil
	}
	f, err := c.detectFeatures(ctx)
	if err != nil {
		return nil, err
	}
	c.feat = f
	cp := *f
	return &cp, nil
}

// ForgetFeatures drops the cached Features (after a server restart or upgrade).
func (c *Client) ForgetFeatures() {
	c.featMu.Lock()
	c.feat = nil
	c.featMu.Unlock()
}

func (c *Client) detectFeatures(ctx context.Context) (*Features, error) {
	f := &Features{}
	var ae *APIError
	stats, err := c.SystemStats(ctx)
	switch {
	case err == nil:
		f.Version = strings.TrimPrefix(stats.System.ComfyUIVersion, "v")
		if stats.System.HasVersion {
			f.Generation = GenClassic
		}
	case errors.As(err, &ae) && ae.Status == 404:
		// Builds from before mid-2023 have no /system_stats.
	default:
		return nil, err
	}
	var flags map[string]any
	err = c.doJSON(ctx, request{method: http.MethodGet, path: "/features"}, &flags)
	switch {
	case err == nil:
		if flags == nil {
			flags = map[string]any{}
		}
		f.Generation = GenCurrent
		f.Flags = flags
		f.ClientPromptID = true
		f.ProgressState = true
		f.PreviewMetadata, _ = flags["supports_preview_metadata"].(bool)
		if n, ok := flags["max_upload_size"].(float64); ok {
			f.MaxUploadSize = int64(n)
		}
	case errors.As(err, &ae) && (ae.Status == 404 || ae.Status == 405):
		// Before 0.3.45.
	default:
		return nil, err
	}
	if v, ok := parseVersion(f.Version); ok {
		f.TargetedInterrupt = !versionLess(v, [3]int{0, 3, 57})
	}
	if f.Generation == GenCurrent {
		err := c.doJSON(ctx, request{method: http.MethodGet, path: "/api/jobs", query: url.Values{"limit": {"1"}}}, nil)
		switch {
		case err == nil:
			f.JobsAPI = true
		case errors.As(err, &ae) && ae.Status/100 == 4:
		default:
			return nil, err
		}
	}
	return f, nil
}

// parseVersion reads "0.3.57" (a trailing "-suffix" or "+build" is ignored). Git-describe
// texts ("v0.2.2-12-gabcdef") do parse, as the release they build on.
func parseVersion(s string) ([3]int, bool) {
	var v [3]int
	s = strings.TrimPrefix(s, "v")
	if i := strings.IndexAny(s, "-+ "); i >= 0 {
		s = s[:i]
	}
	parts := strings.Split(s, ".")
	if len(parts) < 2 || len(parts) > 3 {
		return v, false
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return v, false
		}
		v[i] = n
	}
	return v, true
}

func versionLess(a, b [3]int) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}

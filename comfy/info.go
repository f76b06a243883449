package comfy

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
)

// SystemStats is GET /system_stats.
type SystemStats struct {
	System  SystemInfo `json:"system"`
	Devices []Device   `json:"devices"`
}

// SystemInfo describes the host. Fields appear over time: RAM 2024-09, ComfyUIVersion,
// PytorchVersion and Argv 2024-08 (a git-describe text, "unknown", "v0.3.10" or "0.8.0").
type SystemInfo struct {
	OS                        string   `json:"os"`
	RAMTotal                  int64    `json:"ram_total"`
	RAMFree                   int64    `json:"ram_free"`
	ComfyUIVersion            string   `json:"comfyui_version"`
	RequiredFrontendVersion   string   `json:"required_frontend_version"`
	InstalledTemplatesVersion string   `json:"installed_templates_version"`
	RequiredTemplatesVersion  string   `json:"required_templates_version"`
	PythonVersion             string   `json:"python_version"`
	PytorchVersion            string   `json:"pytorch_version"`
	EmbeddedPython            bool     `json:"embedded_python"`
	Argv                      []string `json:"argv"`
	// HasVersion reports that comfyui_version was present (servers from 2024-08 on).
	HasVersion bool `json:"-"`
}

// UnmarshalJSON decodes the system block, noting whether comfyui_version is present.
func (s *SystemInfo) UnmarshalJSON(b []byte) error {
	type plain SystemInfo
	// One pass: the shallower comfyui_version field takes the key, so
	// presence shows as a non-nil raw value (JSON null included).
	var w struct {
		plain
		Version json.RawMessage `json:"comfyui_version"`
	}
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	p := w.plain
	if p.HasVersion = w.Version != nil; p.HasVersion {
		if err := json.Unmarshal(w.Version, &p.ComfyUIVersion); err != nil {
			return err
		}
	}
	*s = SystemInfo(p)
	return nil
}

// Device is one compute device; sizes in bytes. Index is nil for the CPU.
type Device struct {
	Name           string `json:"name"`
	Type           string `json:"type"`
	Index          *int   `json:"index"`
	VRAMTotal      int64  `json:"vram_total"`
	VRAMFree       int64  `json:"vram_free"`
	TorchVRAMTotal int64  `json:"torch_vram_total"`
	TorchVRAMFree  int64  `json:"torch_vram_free"`
}

// SystemStats fetches GET /system_stats.
func (c *Client) SystemStats(ctx context.Context) (*SystemStats, error) {
	var s SystemStats
	if err := c.doJSON(ctx, request{method: http.MethodGet, path: "/system_stats"}, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// ClassInfo is one node class of GET /object_info. Fields of unexpected types are left empty
// rather than failing the whole catalogue (custom nodes publish odd specs).
type ClassInfo struct {
	Name         string
	DisplayName  string
	Description  string
	Category     string
	PythonModule string
	OutputNode   bool
	Deprecated   bool
	Experimental bool
	APINode      bool
	// Input is the raw input spec {"required": {...}, "optional": {...}, "hidden": {...}}.
	Input json.RawMessage
	// Output is the raw list of output types.
	Output     json.RawMessage
	OutputName []string
}

// UnmarshalJSON decodes a class leniently.
func (ci *ClassInfo) UnmarshalJSON(b []byte) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	str := func(k string) string {
		var s string
		_ = json.Unmarshal(m[k], &s)
		return s
	}
	flag := func(k string) bool {
		var v bool
		_ = json.Unmarshal(m[k], &v)
		return v
	}
	*ci = ClassInfo{
		Name: str("name"), DisplayName: str("display_name"), Description: str("description"),
		Category: str("category"), PythonModule: str("python_module"), OutputNode: flag("output_node"),
		Deprecated: flag("deprecated"), Experimental: flag("experimental"), APINode: flag("api_node"),
		Input: m["input"], Output: m["output"],
	}
	var names []lenientString
	if json.Unmarshal(m["output_name"], &names) == nil {
		ci.OutputName = stringsOf(names)
	}
	return nil
}

// InputSpec returns the raw spec of an input ([type, {config}]) from required, optional or
// hidden, or nil.
func (ci ClassInfo) InputSpec(name string) json.RawMessage {
	var groups map[string]map[string]json.RawMessage
	if json.Unmarshal(ci.Input, &groups) != nil {
		return nil
	}
	for _, g := range []string{"required", "optional", "hidden"} {
		if spec, ok := groups[g][name]; ok {
			return spec
		}
	}
	return nil
}

// InputNames lists required and optional input names, sorted.
func (ci ClassInfo) InputNames() []string {
	var groups map[string]map[string]json.RawMessage
	if json.Unmarshal(ci.Input, &groups) != nil {
		return nil
	}
	var out []string
	for _, g := range []string{"required", "optional"} {
		for k := range groups[g] {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// ComboOptions returns the choices of a combo input, in both spec forms: classic
// [[options...], {config}] and V3 ["COMBO", {"options": [...]}]. Non-string options are
// skipped. It is how a server's model files are listed (CheckpointLoaderSimple.ckpt_name ...).
func (ci ClassInfo) ComboOptions(input string) []string {
	var spec []json.RawMessage
	if json.Unmarshal(ci.InputSpec(input), &spec) != nil || len(spec) == 0 {
		return nil
	}
	var list []json.RawMessage
	if json.Unmarshal(spec[0], &list) != nil {
		var typ string
		if json.Unmarshal(spec[0], &typ) != nil || typ != "COMBO" || len(spec) < 2 {
			return nil
		}
		var cfg struct {
			Options []json.RawMessage `json:"options"`
		}
		if json.Unmarshal(spec[1], &cfg) != nil {
			return nil
		}
		list = cfg.Options
	}
	out := make([]string, 0, len(list))
	for _, o := range list {
		var s string
		if json.Unmarshal(o, &s) == nil {
			out = append(out, s)
		}
	}
	return out
}

// ObjectInfo fetches GET /object_info (MBs, seconds on big installs; bounded by the long
// timeout). Cache the result per server.
func (c *Client) ObjectInfo(ctx context.Context) (map[string]ClassInfo, error) {
	var raw map[string]json.RawMessage
	err := c.doJSON(ctx, request{method: http.MethodGet, path: "/object_info", timeout: c.longTimeout}, &raw)
	if err != nil {
		return nil, err
	}
	return decodeObjectInfo(raw)
}

// DecodeObjectInfo decodes a GET /object_info body.
func DecodeObjectInfo(body []byte) (map[string]ClassInfo, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		return nil, fmt.Errorf("comfy: decode object_info: %w", err)
	}
	return decodeObjectInfo(raw)
}

func decodeObjectInfo(raw map[string]json.RawMessage) (map[string]ClassInfo, error) {
	out := make(map[string]ClassInfo, len(raw))
	for name, r := range raw {
		var ci ClassInfo
		if err := json.Unmarshal(r, &ci); err != nil {
			// One broken custom node must not hide the rest: keep the class, without details.
			ci = ClassInfo{}
		}
		if ci.Name == "" {
			ci.Name = name
		}
		out[name] = ci
	}
	return out, nil
}

// ClassNames returns the sorted node class names the server can run (from /object_info).
func (c *Client) ClassNames(ctx context.Context) ([]string, error) {
	info, err := c.ObjectInfo(ctx)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(info))
	for k := range info {
		names = append(names, k)
	}
	sort.Strings(names)
	return names, nil
}

// ComboInputs returns every required and optional input of the class whose type is a list of
// choices (model files, input images, samplers...), input name -> choices. An input with an
// empty list is present with no choices: no value is accepted there.
func (ci ClassInfo) ComboInputs() map[string][]string {
	var groups map[string]map[string]json.RawMessage
	if json.Unmarshal(ci.Input, &groups) != nil {
		return nil
	}
	var out map[string][]string
	for _, g := range []string{"required", "optional"} {
		for name := range groups[g] {
			if opts := ci.ComboOptions(name); opts != nil {
				if out == nil {
					out = make(map[string][]string)
				}
				out[name] = opts
			}
		}
	}
	return out
}

package comfy

import (
	"context"
	"encoding/json"
	"net/http"
)

// ObjectInfoRaw fetches GET /object_info and keeps every class as the server
// sent it, for passing on unchanged (a farm's ComfyUI-compatible API).
func (c *Client) ObjectInfoRaw(ctx context.Context) (map[string]json.RawMessage, error) {
	var raw map[string]json.RawMessage
	err := c.doJSON(ctx, request{method: http.MethodGet, path: "/object_info", timeout: c.longTimeout}, &raw)
	if err != nil {
		return nil, err
	}
	return raw, nil
}

// SystemStatsRaw fetches GET /system_stats as the server sent it.
func (c *Client) SystemStatsRaw(ctx context.Context) (json.RawMessage, error) {
	var raw json.RawMessage
	if err := c.doJSON(ctx, request{method: http.MethodGet, path: "/system_stats"}, &raw); err != nil {
		return nil, err
	}
	return raw, nil
}

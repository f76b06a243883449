package dispatch

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"testing"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
)

// catalogueProxy fronts a fake node, changing its object_info: adding a
// class of its own and leaving one out.
func catalogueProxy(t *testing.T, s *comfytest.Server, add, drop string) string {
	t.Helper()
	target, err := url.Parse(s.URL())
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ModifyResponse = func(res *http.Response) error {
		if res.Request.URL.Path != "/object_info" || res.StatusCode != http.StatusOK {
			return nil
		}
		body, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err != nil {
			return err
		}
		var cat map[string]json.RawMessage
		if err := json.Unmarshal(body, &cat); err != nil {
			return err
		}
		delete(cat, drop)
		cat[add] = json.RawMessage(`{"name":"` + add + `","output_node":false,"input":{"required":{}}}`)
		if body, err = json.Marshal(cat); err != nil {
			return err
		}
		res.Body = io.NopCloser(bytes.NewReader(body))
		res.ContentLength = int64(len(body))
		res.Header.Set("Content-Length", strconv.Itoa(len(body)))
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return srv.URL
}

// ObjectInfo is the union of the up nodes' catalogues: a class only one
// node offers is in it, and so is a class one node lacks; SystemStats is
// the first node's.
func TestFarmObjectInfoUnion(t *testing.T) {
	e := newFarmEnvWith(t, dbtest.SQLite(t), []comfytest.Options{{}, {DeviceName: "second device"}}, nil, nil,
		func(name string, s *comfytest.Server) string {
			if name == "n1" {
				return catalogueProxy(t, s, "OnlyOnN1", "ImageInvert")
			}
			return catalogueProxy(t, s, "OnlyOnN2", "KSampler")
		})
	ctx := context.Background()
	union, err := e.farm.ObjectInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, class := range []string{"OnlyOnN1", "OnlyOnN2", "KSampler", "ImageInvert", "SaveImage"} {
		if _, ok := union[class]; !ok {
			t.Errorf("union lacks %s", class)
		}
	}
	var info struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(union["OnlyOnN2"], &info); err != nil || info.Name != "OnlyOnN2" {
		t.Fatalf("OnlyOnN2: %s", union["OnlyOnN2"])
	}
	raw, err := e.farm.SystemStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var stats struct {
		Devices []struct {
			Name string `json:"name"`
		} `json:"devices"`
	}
	if err := json.Unmarshal(raw, &stats); err != nil || len(stats.Devices) != 1 || stats.Devices[0].Name == "second device" {
		t.Fatalf("system_stats %s", raw)
	}
}

package server

import (
	"context"
	"reflect"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

func (f *fakeNodes) Models(context.Context) (map[string]map[string][]string, error) {
	return map[string]map[string][]string{"ckpt_name": {"sd_xl_base_1.0.safetensors": {"gpu-1", "gpu-2"}}}, nil
}

// GET /models is the admin's: each value and the nodes that have it.
func TestModelList(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		r := b.do(req{method: "GET", path: "/api/v1/models", key: adminKey})
		expect(t, r, 200)
		var m map[string]map[string][]string
		b.decode(r, &m)
		if want := []string{"gpu-1", "gpu-2"}; !reflect.DeepEqual(m["ckpt_name"]["sd_xl_base_1.0.safetensors"], want) {
			t.Errorf("models %s", r.body)
		}
		expect(t, b.do(req{method: "GET", path: "/api/v1/models", key: styleKey}), 403)
	})
}

// Requirements come in JSON and multipart submits, are checked, and reach
// the service; a refusal for a value no node has names it.
func TestSubmitRequirements(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
			body: `{"user_id":"u","workflow":` + workflow + `,"requirements":{"tags":["sdxl","sdxl"," a100 "],"min_vram_gb":24}}`})
		expect(t, r, 202)
		want := &schema.Requirements{Tags: []string{"a100", "sdxl"}, MinVRAMGB: 24}
		if got := b.jobs.calls()[0].params.Requirements; !reflect.DeepEqual(got, want) {
			t.Fatalf("requirements %+v, want %+v", got, want)
		}
		ct, body := multipartBody(t, map[string]string{"user_id": "u", "workflow": workflow, "requirements": `{"min_vram_gb":12.5}`}, "images", nil)
		expect(t, b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: body, header: map[string]string{"Content-Type": ct}}), 202)
		if got := b.jobs.calls()[1].params.Requirements; got == nil || got.MinVRAMGB != 12.5 {
			t.Fatalf("multipart requirements %+v", got)
		}
		for _, bad := range []string{`{"min_vram_gb":-1}`, `{"min_vram_gb":"24"}`, `{"tags":[""]}`, `{"tags":"sdxl"}`, `{"gpu":1}`} {
			r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":` + workflow + `,"requirements":` + bad + `}`})
			expect(t, r, 400)
		}
		if n := len(b.jobs.calls()); n != 2 {
			t.Fatalf("%d submits reached the service", n)
		}
		b.jobs.SubmitFunc = func(context.Context, schema.SubmitParams) (*schema.Job, error) {
			return nil, &schema.NoNodeError{Reason: "no node offers ckpt_name flux-dev.safetensors",
				Missing: map[string][]string{"ckpt_name": {"flux-dev.safetensors"}}}
		}
		r = b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey, body: `{"user_id":"u","workflow":` + workflow + `}`})
		expect(t, r, 503)
		if !strings.Contains(string(r.body), `"code":"no_node"`) || !strings.Contains(string(r.body), `"missing":{"ckpt_name":["flux-dev.safetensors"]}`) {
			t.Errorf("refusal: %s", r.body)
		}
	})
}
